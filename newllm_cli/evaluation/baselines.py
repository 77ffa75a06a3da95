"""Count baselines that give Phase 2's perplexity a meaning: add-one unigram, add-k bigram, and
interpolated (Jelinek-Mercer) bigram and trigram, the count models at full strength.

All are computed on the same split and tokenizer as the head, over the same (x_t, x_{t+1}) pairs.
Smoothing parameters (k, the interpolation weights) are chosen on a held-out tenth of the training
documents, then counts are refitted on all training pairs: validation never shapes them.
"""

from __future__ import annotations

import math

import numpy as np

from newllm_cli.training.pairs import pair_positions

K_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0)


def unigram_log_probs(tokens: np.ndarray, vocab_size: int) -> np.ndarray:
    """log p(w) = log((count_w + 1) / (N + V)): add-one smoothing of the training counts."""
    counts = np.bincount(np.asarray(tokens, dtype=np.int64), minlength=vocab_size).astype(np.float64)
    return np.log((counts + 1.0) / (counts.sum() + vocab_size))


def unigram_perplexity(train_tokens: np.ndarray, targets: np.ndarray, vocab_size: int) -> float:
    logp = unigram_log_probs(train_tokens, vocab_size)
    return float(math.exp(-logp[np.asarray(targets, dtype=np.int64)].mean()))


class Bigram:
    """Sparse pair counts; p(w | v) = (c(v, w) + k) / (c(v) + k V)."""

    def __init__(self, prev: np.ndarray, nxt: np.ndarray, vocab_size: int):
        self.vocab = vocab_size
        keys = np.asarray(prev, np.int64) * vocab_size + np.asarray(nxt, np.int64)
        self.keys, self.counts = np.unique(keys, return_counts=True)
        self.context_counts = np.bincount(np.asarray(prev, np.int64), minlength=vocab_size)

    def log_probs(self, prev: np.ndarray, nxt: np.ndarray, k: float) -> np.ndarray:
        prev, nxt = np.asarray(prev, np.int64), np.asarray(nxt, np.int64)
        keys = prev * self.vocab + nxt
        at = np.searchsorted(self.keys, keys)
        found = (at < len(self.keys)) & (self.keys[np.minimum(at, len(self.keys) - 1)] == keys)
        pair = np.where(found, self.counts[np.minimum(at, len(self.keys) - 1)], 0)
        return np.log((pair + k) / (self.context_counts[prev] + k * self.vocab))

    def predict(self, prev: np.ndarray, fallback: int) -> np.ndarray:
        """The most frequent successor of each token (the smallest id among ties, as argmax would);
        `fallback` for tokens never seen with a successor. Independent of k."""
        first, nxt = self.keys // self.vocab, self.keys % self.vocab
        order = np.lexsort((nxt, -self.counts, first))  # per first token: most counts, then smallest id
        best = np.full(self.vocab, fallback, dtype=np.int64)
        head = np.unique(first[order], return_index=True)[1]
        best[first[order][head]] = nxt[order][head]
        return best[np.asarray(prev, np.int64)]

    def perplexity(self, prev: np.ndarray, nxt: np.ndarray, k: float) -> float:
        return float(math.exp(-self.log_probs(prev, nxt, k).mean()))


def choose_k(tokens: np.ndarray, offsets: np.ndarray, vocab_size: int) -> float:
    """The k of K_GRID with the lowest perplexity on the held-out tenth of the training documents."""
    (fit_t, fit_o), (held_t, held_o) = held_out(tokens, offsets)
    fit, held = pair_positions(fit_o), pair_positions(held_o)
    if len(fit) == 0 or len(held) == 0:
        return 1.0
    model = Bigram(fit_t[fit], fit_t[fit + 1], vocab_size)
    return min(K_GRID, key=lambda k: model.perplexity(held_t[held], held_t[held + 1], k))


def training_pairs(tokens: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(x_t, x_{t+1}) for every pair inside a training document."""
    pos, tokens = pair_positions(offsets), np.asarray(tokens)
    return tokens[pos], tokens[pos + 1]


def bigram_perplexity(
    train_tokens: np.ndarray,
    train_offsets: np.ndarray,
    val_tokens: np.ndarray,
    val_offsets: np.ndarray,
    vocab_size: int,
) -> dict:
    """The add-k bigram on the val pairs: perplexity, per-pair log-probabilities, and the accuracy of
    its most likely successor."""
    k = choose_k(np.asarray(train_tokens), train_offsets, vocab_size)
    vp, val_tokens = pair_positions(val_offsets), np.asarray(val_tokens)
    model = Bigram(*training_pairs(train_tokens, train_offsets), vocab_size)
    prev, nxt = val_tokens[vp], val_tokens[vp + 1]
    log_probs = model.log_probs(prev, nxt, k)
    top = int(np.argmax(unigram_log_probs(train_tokens, vocab_size)))
    return {
        "k": k,
        "val_perplexity": float(math.exp(-log_probs.mean())),
        "log_probs": log_probs,
        "accuracy": float(np.mean(model.predict(prev, top) == nxt)) if len(nxt) else 0.0,
    }


LAMBDAS = tuple(round(float(x), 2) for x in np.arange(0.0, 1.0, 0.01))  # the interpolation weights tried


def held_out(
    tokens: np.ndarray, offsets: np.ndarray
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """(tokens, offsets) of the training documents a smoothing parameter is fitted on, and of the last
    tenth it is chosen on; one document: its last tenth of pairs (the two parts share a token)."""
    tokens, offsets = np.asarray(tokens), np.asarray(offsets, np.int64)
    n_docs = len(offsets) - 1
    if n_docs >= 2:
        cut = n_docs - max(1, n_docs // 10)
        return (tokens[: offsets[cut]], offsets[: cut + 1]), (tokens[offsets[cut] :], offsets[cut:] - offsets[cut])
    pairs = max(len(tokens) - 1, 0)
    cut = int(pairs * 0.9)
    return (tokens[: cut + 1], np.array([0, cut + 1])), (tokens[cut:], np.array([0, len(tokens) - cut]))


def _histories(
    tokens: np.ndarray, offsets: np.ndarray, n: int, vocab: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every pair (x_p, x_{p+1}) inside a document: the key of its history x_{p-n+2..p} (n - 1
    tokens), the target, and whether the history lies inside the document."""
    tokens, pos = np.asarray(tokens, np.int64), pair_positions(offsets)
    start = np.asarray(offsets, np.int64)[np.searchsorted(offsets, pos, side="right") - 1]
    valid = pos - (n - 2) >= start
    key = np.zeros(len(pos), np.int64)
    for j in range(n - 1):  # oldest first
        key = key * vocab + tokens[np.maximum(pos - (n - 2) + j, 0)]
    return key, tokens[pos + 1], valid


def _counts(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.unique(keys, return_counts=True)


def _lookup(table: tuple[np.ndarray, np.ndarray], keys: np.ndarray) -> np.ndarray:
    uniq, counts = table
    if not len(uniq):
        return np.zeros(len(keys), np.int64)
    at = np.minimum(np.searchsorted(uniq, keys), len(uniq) - 1)
    return np.where(uniq[at] == keys, counts[at], 0)


class Interpolated:
    """Jelinek-Mercer n-gram: p_1 is the add-one unigram, and for n >= 2
    p_n(w | h) = lam_n c(h, w) / c(h) + (1 - lam_n) p_{n-1}(w | h') when c(h) > 0, else p_{n-1}(w | h'),
    h the n - 1 previous tokens inside the document, h' its last n - 2. Counts over training pairs."""

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, vocab: int, order: int):
        self.vocab = vocab
        self.unigram = np.exp(unigram_log_probs(tokens, vocab))
        self.tables = {}
        for n in range(2, order + 1):
            hist, target, valid = _histories(tokens, offsets, n, vocab)
            hist, target = hist[valid], target[valid]
            self.tables[n] = (_counts(hist * vocab + target), _counts(hist))

    def parts(self, tokens: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, dict]:
        """Per pair: p_1(w), and for each n its ML estimate and whether it applies (c(h) > 0)."""
        hist, target, _ = _histories(tokens, offsets, 2, self.vocab)
        out = {}
        for n, (joint, marginal) in self.tables.items():
            hist, _, valid = _histories(tokens, offsets, n, self.vocab)
            seen = _lookup(marginal, hist) * valid
            ml = _lookup(joint, hist * self.vocab + target) / np.maximum(seen, 1)
            out[n] = (ml, seen > 0)
        return self.unigram[target], out

    def predict(self, tokens: np.ndarray, offsets: np.ndarray, lambdas: dict, chunk: int = 128) -> np.ndarray:
        """The most likely next token of every pair (the smallest id among ties, as argmax): p(. | h)
        over the whole vocabulary, `chunk` pairs at a time (chunk x V floats in memory)."""
        hists = {n: _histories(tokens, offsets, n, self.vocab) for n in self.tables}
        count = len(next(iter(hists.values()))[0]) if hists else 0
        out = np.empty(count, np.int64)
        for s in range(0, count, chunk):
            p = np.tile(self.unigram, (min(chunk, count - s), 1))
            for n in sorted(self.tables):
                (keys, counts), marginal = self.tables[n]
                hist, _, valid = (a[s : s + chunk] for a in hists[n])
                seen = _lookup(marginal, hist) * valid
                rows = np.flatnonzero(seen > 0)
                p[rows] *= 1 - lambdas[n]
                lo = np.searchsorted(keys, hist[rows] * self.vocab)
                size = np.searchsorted(keys, (hist[rows] + 1) * self.vocab) - lo
                at = np.arange(size.sum()) - np.repeat(np.cumsum(size) - size, size) + np.repeat(lo, size)
                row = np.repeat(rows, size)  # each (row, successor) once: a plain += is exact
                p[row, keys[at] % self.vocab] += lambdas[n] * counts[at] / seen[row]
            out[s : s + len(p)] = p.argmax(1)
        return out

    @staticmethod
    def mix(base: np.ndarray, parts: dict, lambdas: dict) -> np.ndarray:
        p = base
        for n in sorted(parts):
            ml, seen = parts[n]
            p = np.where(seen, lambdas[n] * ml + (1 - lambdas[n]) * p, p)
        return p


def interpolated(train_tokens, train_offsets, val_tokens, val_offsets, vocab: int, order: int) -> dict:
    """The interpolated n-gram on the val pairs: each lam_n chosen in turn (lam_2 first) on the held-out
    tenth of the training documents with counts from the rest, then counts from all of them."""
    (fit_t, fit_o), (held_t, held_o) = held_out(train_tokens, train_offsets)
    lambdas: dict[int, float] = {}
    if len(fit_t) > 1 and len(held_t) > 1:
        base, parts = Interpolated(fit_t, fit_o, vocab, order).parts(held_t, held_o)
        for n in sorted(parts):
            below = Interpolated.mix(base, {m: parts[m] for m in parts if m < n}, lambdas)
            ml, seen = parts[n]
            lambdas[n] = min(
                LAMBDAS, key=lambda lam: -np.log(np.where(seen, lam * ml + (1 - lam) * below, below)).sum()
            )
    else:
        lambdas = dict.fromkeys(range(2, order + 1), 0.5)
    model = Interpolated(train_tokens, train_offsets, vocab, order)
    base, parts = model.parts(val_tokens, val_offsets)
    log_probs = np.log(Interpolated.mix(base, parts, lambdas))
    targets = _histories(val_tokens, val_offsets, 2, vocab)[1]
    hits = model.predict(val_tokens, val_offsets, lambdas) == targets
    return {
        "lambdas": {str(n): lam for n, lam in lambdas.items()},
        "log_probs": log_probs,
        "accuracy": float(hits.mean()) if len(hits) else 0.0,
    }
