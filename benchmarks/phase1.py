"""Phase 1 training throughput (token-iterations per second) and peak memory.

C = E = 16, L = 2, vocabulary 4096, 10 iterations of training (8 optimizer steps: no step after
the final sweep). Every configuration runs in a fresh process so peak RSS is its own. The naive
baseline is the original program's shape: a Python loop over tokens, autograd through each step,
one backward per iteration. It runs fewer tokens because it is slow; its rate does not depend on N.

    python benchmarks/phase1.py [--sizes 20000 200000] [--naive-tokens 4000]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np


def one(scheme: str, n: int, docs: int, kernel: str) -> dict:
    import torch
    from newllm_cli.model import NewLLM
    from newllm_cli.phase1 import phase1_losses, run_cvfp
    from newllm_cli.settings import Phase1Settings

    torch.manual_seed(0)
    model = NewLLM(4096, 16, 16, 2)
    tokens = np.random.default_rng(0).integers(0, 4096, n).astype(np.uint16)
    offsets = np.linspace(0, n, docs + 1).astype(np.int64)
    cfg = Phase1Settings(max_iterations=10, min_converged_ratio=1.0, convergence_threshold=1e-12)
    if scheme == "naive":
        opt = torch.optim.Adam([p for b in model.blocks for p in b.parameters()], lr=0.002)
        emb = model.embed_tokens(torch.as_tensor(tokens.astype(np.int64))).detach()
        start = time.perf_counter()
        prev, c = None, torch.zeros(16)
        for _ in range(2):  # iteration 1 (no step) and one training iteration
            outs = []
            for t in range(n):
                c = model.step(emb[t], c.detach())
                outs.append(c)
            q = torch.stack(outs)
            if prev is not None:
                opt.zero_grad()
                phase1_losses(q, prev, cfg)["loss"].backward()
                opt.step()
            prev = q.detach()
        seconds, iters = time.perf_counter() - start, 2
    else:
        cfg = cfg.model_copy(update={"scheme": scheme, "kernel": kernel})
        run_cvfp(model, tokens[:1000], np.array([0, 1000]), cfg.model_copy(update={"max_iterations": 2}),
                 train=False, device=torch.device("cpu"))  # warm-up: numba cache load
        start = time.perf_counter()
        res = run_cvfp(model, tokens, offsets, cfg, train=True, device=torch.device("cpu"))
        seconds, iters = time.perf_counter() - start, len(res.history)
    return {"rate": n * iters / seconds, "seconds": seconds, "iterations": iters,
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[20000, 200000])
    ap.add_argument("--naive-tokens", type=int, default=4000)
    ap.add_argument("--one", nargs=4)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(a.one[0], int(a.one[1]), int(a.one[2]), a.one[3])))
        return
    rows = [("naive loop (original)", "naive", a.naive_tokens, 1, "torch")]
    for n in a.sizes:
        for docs in (1, 64):
            rows.append(("sequential numba", "sequential", n, docs, "numba"))
            rows.append(("parallel (Jacobi)", "parallel", n, docs, "torch"))
            if n <= 20000 or docs == 64:
                rows.append(("sequential torch", "sequential", n, docs, "torch"))
    print(f"{'implementation':24} {'tokens':>8} {'docs':>5} {'tok-iter/s':>12} {'seconds':>8} {'peak MB':>8}")
    for label, scheme, n, docs, kernel in rows:
        out = subprocess.run([sys.executable, __file__, "--one", scheme, str(n), str(docs), kernel],
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{label:24} {n:>8,} {docs:>5} {r['rate']:>12,.0f} {r['seconds']:>8.2f} {r['peak_mb']:>8.0f}", flush=True)


if __name__ == "__main__":
    main()
