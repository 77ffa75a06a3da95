"""Phase 2 throughput: a pass of newllm's head fit against an epoch of the original's batch-32 loop.

Both read every pair once per unit of work: the original's epoch is a DataLoader over (context,
next token), batch 32, Adam 1e-4, autograd (its rate does not depend on the targets); newllm's unit
is one evaluation of the penalised loss and its gradient over class rows (`probe.Objective`), of which
L-BFGS spends one to two per iteration. newllm fits one row per class of tokens that training cannot
tell apart, so its rate depends on how many distinct tokens are targets:

  uniform  every token equally likely: nearly all rows train (the worst case)
  zipf     p(rank r) ~ 1/r over the whole vocabulary: the word-frequency law of natural text
  text     a real file (--text) tokenized by a BPE trained on it (or GPT-2's, from the hub, with
           --text-tokenizer gpt2), inside a V-sized head; rows longer than the file are skipped

    python benchmarks/phase2.py [--pairs 20000 100000] [--vocab 4096 50257] [--text pydoc.txt]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from newllm_cli.evaluation import baselines
from newllm_cli.training import head_fit as probe

ORIGINAL_PAIRS = 20000


def original_loop(x: torch.Tensor, y: torch.Tensor, vocab: int) -> float:
    """The seed's loop: DataLoader, batch 32, Adam 1e-4, clip 1.0. Returns tokens per second."""
    torch.manual_seed(0)
    head = torch.nn.Linear(x.shape[1], vocab)
    opt = torch.optim.Adam(head.parameters(), lr=1e-4)
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    start = time.perf_counter()
    for xb, yb in loader:
        loss = F.cross_entropy(head(xb), yb)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        opt.step()
    return len(y) / (time.perf_counter() - start)


def newllm_pass(x: torch.Tensor, y: np.ndarray, vocab: int, repeats: int = 3) -> float:
    """Loss and gradient over every pair at the unigram start (best of `repeats`). Tokens per second."""
    cpu = torch.device("cpu")
    prior = baselines.unigram_log_probs(y, vocab)
    classes = probe.VocabClasses.build(y, prior, cpu)
    prior_c = torch.as_tensor(prior, dtype=torch.float32)[classes.representative]
    objective = probe.Objective(classes, prior_c, 1e-3, cpu)
    cols = torch.zeros(x.shape[1] + 1, len(classes.representative))
    cols[-1] = prior_c
    xa, targets = probe._with_ones(x), torch.as_tensor(y, dtype=torch.int64)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        objective(cols, xa, targets)
        best = min(best, time.perf_counter() - start)
    return len(y) / best


def targets(kind: str, n: int, vocab: int, rng: np.random.Generator, text: np.ndarray | None) -> np.ndarray:
    if kind == "uniform":
        return rng.integers(0, vocab, n)
    if kind == "zipf":
        p = 1.0 / np.arange(1, vocab + 1)
        return rng.permutation(vocab)[rng.choice(vocab, n, p=p / p.sum())]
    return text[:n]


def text_tokens(path: str, vocab: int, name: str) -> np.ndarray:
    from newllm_cli.data.tokenizer import build

    body = Path(path).read_text(encoding="utf-8")
    tok = build(name, vocab, [body])
    if tok.get_vocab_size() > vocab:
        raise SystemExit(f"the {name} tokenizer has {tok.get_vocab_size():,} tokens, more than V = {vocab:,}")
    ids = np.asarray(tok.encode(body).ids, dtype=np.int64)
    print(f"# {path}: {len(ids):,} tokens, {name} vocabulary {tok.get_vocab_size():,} (head V = {vocab:,})", flush=True)
    return ids


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, nargs="+", default=[20000, 100000])
    ap.add_argument("--vocab", type=int, nargs="+", default=[4096, 50257])
    ap.add_argument("--context-dim", type=int, default=16)
    ap.add_argument("--text", help="a text file for the `text` rows")
    ap.add_argument("--text-tokenizer", default="bpe", choices=["bpe", "gpt2"])
    a = ap.parse_args()
    print(
        f"{'V':>7} {'targets':>8} {'pairs':>8} {'distinct':>8} {'original tok/s':>15} {'newllm tok/s':>13} {'speed-up':>9}"
    )
    g = torch.Generator().manual_seed(0)
    for vocab in a.vocab:
        x = torch.randn(max(a.pairs + [ORIGINAL_PAIRS]), a.context_dim, generator=g)
        rng = np.random.default_rng(0)
        old = original_loop(x[:ORIGINAL_PAIRS], torch.as_tensor(rng.integers(0, vocab, ORIGINAL_PAIRS)), vocab)
        text = text_tokens(a.text, vocab, a.text_tokenizer) if a.text else None
        for kind in ("uniform", "zipf") + (("text",) if a.text else ()):
            for n in a.pairs:
                if kind == "text" and n > len(text):
                    continue
                y = targets(kind, n, vocab, rng, text)
                new = newllm_pass(x[:n], y, vocab)
                print(
                    f"{vocab:>7,} {kind:>8} {n:>8,} {len(np.unique(y)):>8,} {old:>15,.0f} {new:>13,.0f} "
                    f"{new / old:>8.1f}x",
                    flush=True,
                )


if __name__ == "__main__":
    main()
