"""Phase 1 speed of the `context` architecture (one ContextLayer, GELU) under the `oacd` preset's
iteration (Jacobi over one stream from zero, noise, per-batch OACD), as a share of this machine's
own float32 matrix multiply, the way `phase1.py width` measures the residual network.

    python benchmarks/context_arch.py --text FILE [--widths 64 500] [--embed 768] [--repeats 3]
    python benchmarks/context_arch.py --text FILE --lockstep [--docs 64] [--tokens 80000]

--lockstep: the cost of running the torch (lockstep) pass block by block, which keeps its matrix
products alike on every world size, against one lockstep over all documents (C = 64 residual).

Random embeddings (E = --embed), byte tokens of FILE. FLOPs: 2 x multiply-adds of the parallel pass,
plus the re-forward and the backward (2x) in iterations that take a step; the random iteration 0
does no pass. Each share is taken against the mean of the matmul rates measured just before and
just after it, so a busy machine slows both alike. Speeds are never asserted: read the figures.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from phase1 import corpus, matmul_gflops


def train(tokens, offsets, C: int, E: int, iterations: int) -> tuple[float, float]:
    """Seconds of the training iterations alone, and their FLOPs."""
    import torch

    from newllm_cli import presets
    from newllm_cli.model.context_layers import ContextLayerNetwork
    from newllm_cli.settings import Phase1Settings
    from newllm_cli.training.phase1 import run_cvfp

    torch.manual_seed(0)
    model = ContextLayerNetwork(256, C, E, 1, activation="gelu", init_std=0.1, init_bias_std=0.01)
    recipe = presets.RECIPES["oacd"]["phase1"]
    cfg = Phase1Settings(**{**recipe, "max_iterations": iterations, "min_converged_ratio": 1.0,
                            "convergence_threshold": 1e-30})  # fmt: skip
    with tempfile.TemporaryDirectory() as scratch:
        res = run_cvfp(model, tokens, offsets, cfg, train=True, device=torch.device("cpu"), scratch=Path(scratch))
        res.contexts.close()
    macs = C * (C + E)  # one Linear (C + E) -> C per token; LayerNorm and GELU not counted
    passes = sum((k > 0) + 3 * (h["lr"] is not None) for k, h in enumerate(res.history))
    return sum(h["seconds"] for h in res.history), 2.0 * macs * len(tokens) * passes


def lockstep(a) -> None:
    """Block-by-block lockstep against one lockstep over the corpus, interleaved and repeated."""
    import time

    import numpy as np
    import torch

    from newllm_cli.model.network import NewLLM
    from newllm_cli.model.recurrence import embedding_table
    from newllm_cli.runtime.distributed import shard_of
    from newllm_cli.store.rowstore import RowStore
    from newllm_cli.training.schemes import Problem

    tokens, offsets = corpus(a.text, a.tokens, docs=a.docs)
    torch.manual_seed(0)
    model = NewLLM(256, 64, 64, 2)
    table = embedding_table(model, torch.device("cpu"))
    blocks = shard_of(offsets, 0, 1).blocks
    whole = Problem(model, "torch", table, tokens, offsets, 1 << 20, 8192)
    cut = Problem(model, "torch", table, tokens, offsets, 1 << 20, 8192, blocks=blocks)
    c0 = np.zeros((a.docs, 64), np.float32)
    ratios = []
    for _ in range(a.repeats):
        times = []
        for problem in (whole, cut):
            with RowStore(len(tokens), 64) as out:
                start = time.perf_counter()
                problem.recur(c0, out, lambda n: None)
                times.append(time.perf_counter() - start)
        ratios.append(times[1] / times[0])
    print(
        f"{len(tokens):,} tokens, {a.docs} documents, {len(blocks) - 1} blocks: block by block / whole lockstep "
        f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}), {a.repeats} interleaved repeats"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--text", type=Path, required=True)
    ap.add_argument("--widths", type=int, nargs="+", default=[64, 500])
    ap.add_argument("--embed", type=int, default=768)
    ap.add_argument("--iterations", type=int, default=5)
    ap.add_argument("--flops", type=float, default=1e11, help="work per width")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--lockstep", action="store_true")
    ap.add_argument("--docs", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=80_000)
    a = ap.parse_args()
    if a.lockstep:
        return lockstep(a)
    print(
        f"context architecture, oacd iteration, E = {a.embed}, {a.iterations} iterations (a step in all but the first and last)"
    )
    print(f"{'C':>4} {'tokens':>9} {'GFLOP/s':>8} {'matmul':>7} {'share':>6} {'range':>10} {'tok-iter/s':>11}")
    for C in a.widths:
        n = max(20_000, int(a.flops / (2 * C * (C + a.embed) * 4 * a.iterations)))
        tokens, _ = corpus(a.text, n)
        offsets = [0, n]
        shares, gfs, peaks, rates = [], [], [], []
        for _ in range(a.repeats):
            before = matmul_gflops()
            seconds, flops = train(tokens, offsets, C, a.embed, a.iterations)
            peak = (before + matmul_gflops()) / 2
            gfs.append(flops / seconds / 1e9)
            peaks.append(peak)
            shares.append(gfs[-1] / peak)
            rates.append(n * a.iterations / seconds)
        med = statistics.median
        print(
            f"{C:>4} {n:>9,} {med(gfs):>8.1f} {med(peaks):>7.1f} {med(shares):>6.0%} "
            f"{min(shares):>5.0%}-{max(shares):<4.0%} {med(rates):>11,.0f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
