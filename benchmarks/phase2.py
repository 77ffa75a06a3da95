"""Phase 2 training throughput: newllm's head training against the original's batch-32 loop.

Both train Linear(C, V) with Adam, cross entropy and gradient clipping on the same saved contexts
(random here: speed does not depend on their values). The original's loop is the seed's Phase 2:
a DataLoader over (context, next token) with batch 32 and lr 1e-4. newllm's is `train_head` with
its defaults (batch 512, shuffled index batches on in-memory tensors), timed for one epoch
including its validation pass.

    python benchmarks/phase2.py [--pairs 20000] [--vocab 4096 50257]
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from newllm_cli.phase2 import Split, train_head
from newllm_cli.settings import Phase2Settings


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


def newllm_epoch(x: torch.Tensor, y: torch.Tensor, vocab: int) -> float:
    split = Split(x, y)
    val = Split(x[: len(x) // 10], y[: len(y) // 10])
    start = time.perf_counter()
    train_head(split, val, vocab, Phase2Settings(epochs=1), seed=0, bias=None, device=torch.device("cpu"))
    return len(y) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=20000)
    ap.add_argument("--vocab", type=int, nargs="+", default=[4096, 50257])
    ap.add_argument("--context-dim", type=int, default=16)
    a = ap.parse_args()
    print(f"{'vocabulary':>10} {'original tok/s':>15} {'newllm tok/s':>13} {'speed-up':>9}")
    for vocab in a.vocab:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(a.pairs, a.context_dim, generator=g)
        y = torch.randint(0, vocab, (a.pairs,), generator=g)
        old, new = original_loop(x, y, vocab), newllm_epoch(x, y, vocab)
        print(f"{vocab:>10,} {old:>15,.0f} {new:>13,.0f} {new / old:>8.1f}x", flush=True)


if __name__ == "__main__":
    main()
