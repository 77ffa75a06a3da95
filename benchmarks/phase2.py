"""Phase 2 training throughput: newllm's head training against the original's batch-32 loop.

Both train the head Linear(C, V) with Adam, cross entropy and gradient clipping on the same saved
contexts (random here: speed does not depend on their values). The original's loop is the seed's
Phase 2: a DataLoader over (context, next token), batch 32, lr 1e-4, autograd; its rate does not
depend on the targets. newllm's is `train_head` with its defaults, timed for one epoch including
its validation pass (a tenth more pairs). newllm trains one row per class of tokens that training
cannot tell apart, so its rate depends on how many distinct tokens are targets:

  uniform  every token equally likely: nearly all rows train (the worst case)
  zipf     p(rank r) ~ 1/r over the whole vocabulary: the word-frequency law of natural text
  text     a real file (--text) tokenized by a BPE trained on it (or GPT-2's, from the hub, with
           --text-tokenizer gpt2), inside a V-sized head; rows longer than the file are skipped

    python benchmarks/phase2.py [--pairs 20000 100000] [--vocab 4096 50257] [--text pydoc.txt]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from newllm_cli import baselines
from newllm_cli.phase2 import Split, train_head
from newllm_cli.settings import Phase2Settings

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


def newllm_epoch(x: torch.Tensor, y: np.ndarray, vocab: int) -> float:
    """One default epoch of `train_head` from the unigram start, with its validation pass."""
    targets = torch.as_tensor(y, dtype=torch.int64)
    cut = len(y) // 10
    start = time.perf_counter()
    train_head(Split(x, targets), Split(x[:cut], targets[:cut]), vocab, Phase2Settings(epochs=1), seed=0,
               bias=baselines.unigram_log_probs(y, vocab), device=torch.device("cpu"))
    return len(y) / (time.perf_counter() - start)


def targets(kind: str, n: int, vocab: int, rng: np.random.Generator, text: np.ndarray | None) -> np.ndarray:
    if kind == "uniform":
        return rng.integers(0, vocab, n)
    if kind == "zipf":
        p = 1.0 / np.arange(1, vocab + 1)
        return rng.permutation(vocab)[rng.choice(vocab, n, p=p / p.sum())]
    return text[:n]


def text_tokens(path: str, vocab: int, name: str) -> np.ndarray:
    from newllm_cli.tokenizer import build
    body = open(path, encoding="utf-8").read()
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
    print(f"{'V':>7} {'targets':>8} {'pairs':>8} {'distinct':>8} {'original tok/s':>15} {'newllm tok/s':>13} {'speed-up':>9}")
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
                new = newllm_epoch(x[:n], y, vocab)
                print(f"{vocab:>7,} {kind:>8} {n:>8,} {len(np.unique(y)):>8,} {old:>15,.0f} {new:>13,.0f} "
                      f"{new / old:>8.1f}x", flush=True)


if __name__ == "__main__":
    main()
