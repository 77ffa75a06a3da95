"""Count baselines that give Phase 2's perplexity a meaning: add-one unigram and add-k bigram.

Both are computed on the same split and tokenizer as the head, over the same (x_t, x_{t+1}) pairs.
The bigram's k is chosen on a held-out tenth of the training documents, then counts are refitted
on all training pairs.
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
    """The k of K_GRID with the lowest perplexity on the last tenth of the training documents."""
    n_docs = len(offsets) - 1
    cut_doc = n_docs - max(1, n_docs // 10) if n_docs >= 2 else None
    pos = pair_positions(offsets)
    if cut_doc is None or cut_doc == 0:  # one document: hold out its last tenth of pairs
        cut = int(len(pos) * 0.9)
        fit, held = pos[:cut], pos[cut:]
    else:
        boundary = offsets[cut_doc]
        fit, held = pos[pos < boundary], pos[pos >= boundary]
    if len(fit) == 0 or len(held) == 0:
        return 1.0
    model = Bigram(tokens[fit], tokens[fit + 1], vocab_size)
    return min(K_GRID, key=lambda k: model.perplexity(tokens[held], tokens[held + 1], k))


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
