"""Phase 1 at scale: memory and time against corpus size, GFLOP/s against this machine's own matrix
multiply, the C=16 kernel against the previous one, the kernel crossover, and the original loop.

Tokens are the bytes of a real text (byte tokenizer: id = byte value), documents split at blank
lines; make one with `python benchmarks/corpus.py T.txt --licences --bytes 12600000` (the figures in
docs/EXPERIMENTS.md used that text).

    python benchmarks/phase1.py tokens    --text FILE [--sizes 100000 1000000 10000000]
    python benchmarks/phase1.py width     --text FILE [--widths 16 64 256 768] [--layers 2 6] [--repeats 3]
    python benchmarks/phase1.py kernel    --text FILE --baseline OLD_CHECKOUT [--tokens 300000] [--repeats 5]
    python benchmarks/phase1.py crossover --text FILE
    python benchmarks/phase1.py e2e       --text FILE --baseline OLD_CHECKOUT [--repeats 3]
    python benchmarks/phase1.py threads   --text FILE [--tokens 1000000] [--repeats 3]

OLD_CHECKOUT is a work tree of an earlier commit (`git worktree add /tmp/old 43482bf`).
Each prints a table; ratios come from runs interleaved in one script, so a busy machine slows both
sides alike. Speeds are never asserted here: read the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def corpus(text: Path, n: int, docs: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """n byte tokens of `text` (repeated if short); documents at blank lines, or `docs` equal parts."""
    raw = np.frombuffer(text.read_bytes(), dtype=np.uint8)
    tokens = np.resize(raw, n)
    if docs is not None:
        return tokens, np.linspace(0, n, docs + 1).astype(np.int64)
    breaks = np.flatnonzero((tokens[:-1] == 10) & (tokens[1:] == 10)) + 2
    return tokens, np.unique(np.concatenate([[0], breaks[breaks < n], [n]])).astype(np.int64)


def matmul_gflops(seconds: float = 2.0) -> float:
    """Float32 matrix multiply, 2048 x 2048 by 2048, as fast as torch's BLAS does it here."""
    import torch

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        runs += 1
    return 2 * 2048**3 * runs / (time.perf_counter() - start) / 1e9


def macs_per_token(C: int, L: int, depth: int = 1) -> int:
    return L * depth * (2 * C) ** 2  # E = C: each Linear is (C+E) x (C+E)


def train(tokens, offsets, C, L, iterations, kernel="auto", budget=1 << 30, training_only=False):
    """Phase 1 training for a fixed number of iterations (never converges early), then its no-update
    solve. Returns seconds, token-iterations and FLOPs: 2 x multiply-adds of the sweep, plus the
    re-forward and the backward (2x) in iterations that take a step. training_only: the training
    iterations alone (their own timings), without set-up and solve."""
    import torch

    from newllm_cli.model.network import NewLLM
    from newllm_cli.settings import Phase1Settings
    from newllm_cli.training.phase1 import run_cvfp

    torch.manual_seed(0)
    model = NewLLM(256, C, C, L)
    cfg = Phase1Settings(max_iterations=iterations, min_converged_ratio=1.0, convergence_threshold=1e-30, kernel=kernel)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        res = run_cvfp(
            model,
            tokens,
            offsets,
            cfg,
            train=True,
            device=torch.device("cpu"),
            memory_budget=budget,
            scratch=Path(scratch),
        )
        res.contexts.close()
    seconds = time.perf_counter() - start
    records = res.history if training_only else res.history + res.solve
    if training_only:
        seconds = sum(h["seconds"] for h in records)
    passes = sum(1 + 3 * (h["lr"] is not None) for h in records)
    return seconds, len(tokens) * len(records), 2 * macs_per_token(C, L) * len(tokens) * passes


def original_rate(tokens, C, L, n=300) -> float:
    """The original program's shape: a Python loop over tokens, autograd through each step, one
    backward per iteration. Token-iterations per second on n tokens (its rate does not depend on N)."""
    import torch

    from newllm_cli.model.network import NewLLM
    from newllm_cli.settings import Phase1Settings
    from newllm_cli.training.objectives import reference_losses

    torch.manual_seed(0)
    model = NewLLM(256, C, C, L)
    opt = torch.optim.Adam([p for b in model.blocks for p in b.parameters()], lr=0.002)
    emb = model.embed_tokens(torch.as_tensor(tokens[:n].astype(np.int64))).detach()
    prev, c, start = None, torch.zeros(C), time.perf_counter()
    for _ in range(2):
        outs = []
        for t in range(n):
            c = model.step(emb[t], c.detach())
            outs.append(c)
        q = torch.stack(outs)
        if prev is not None:
            opt.zero_grad()
            reference_losses(q, prev, Phase1Settings())["loss"].backward()
            opt.step()
        prev = q.detach()
    return 2 * n / (time.perf_counter() - start)


def section_tokens(a) -> None:
    if a.one:
        tokens, offsets = corpus(a.text, a.one)
        seconds, tok_iters, _ = train(tokens, offsets, 16, 2, a.iterations, budget=int(a.budget * 2**30))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps({"seconds": seconds, "rate": tok_iters / seconds, "peak_mb": peak}))
        return
    print(
        f"C=16 L=2, {a.iterations} iterations (the first and last without a step) + no-update solve, "
        f"budget {a.budget} GiB; fresh process each"
    )
    print(f"{'tokens':>11} {'seconds':>8} {'tok-iter/s':>11} {'us/tok-iter':>12} {'peak RSS MB':>12}")
    for n in a.sizes:
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "tokens",
                "--text",
                str(a.text),
                "--one",
                str(n),
                "--iterations",
                str(a.iterations),
                "--budget",
                str(a.budget),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"{n:>11,} {r['seconds']:>8.1f} {r['rate']:>11,.0f} {1e6 / r['rate']:>12.2f} {r['peak_mb']:>12,.0f}",
            flush=True,
        )


def section_width(a) -> None:
    print(
        f"Phase 1 training iterations ({a.iterations}, the first and last without a step), {a.docs} "
        f"documents, --kernel auto; GFLOP/s = 2 x multiply-adds of sweep, re-forward and backward"
    )
    print(
        f"{'C':>4} {'L':>2} {'kernel':>6} {'tokens':>9} {'GFLOP/s':>8} {'matmul':>7} {'share':>6} "
        f"{'range':>10} {'tok-iter/s':>11} {'original':>9} {'x orig':>7}   (medians of --repeats)"
    )
    import torch

    from newllm_cli.model.recurrence import choose_kernel

    for C in a.widths:
        for L in a.layers:
            per_doc = max(8, int(a.flops / (6 * macs_per_token(C, L) * a.docs * a.iterations)))
            tokens, offsets = corpus(a.text, per_doc * a.docs, docs=a.docs)
            shares, rates, gfs, peaks = [], [], [], []
            for _ in range(a.repeats):  # matmul, training, matmul: each share against its neighbours
                before = matmul_gflops()
                seconds, tok_iters, flops = train(tokens, offsets, C, L, a.iterations, training_only=True)
                peak = (before + matmul_gflops()) / 2
                gfs.append(flops / seconds / 1e9)
                peaks.append(peak)
                shares.append(gfs[-1] / peak)
                rates.append(tok_iters / seconds)
            orig = original_rate(tokens, C, L, n=200 if C < 768 else 40)
            kernel = choose_kernel("auto", torch.device("cpu"), C, offsets)
            med = statistics.median
            print(
                f"{C:>4} {L:>2} {kernel:>6} {len(tokens):>9,} {med(gfs):>8.1f} {med(peaks):>7.1f} "
                f"{med(shares):>6.0%} {min(shares):>5.0%}-{max(shares):<4.0%} {med(rates):>11,.0f} "
                f"{orig:>9,.0f} {med(rates) / orig:>7.1f}",
                flush=True,
            )


def baseline_package(checkout: Path, name: str = "newllm_baseline"):
    """Import another checkout's newllm_cli under another name, beside this one, in this process."""
    import importlib.util

    root = checkout / "newllm_cli"
    spec = importlib.util.spec_from_file_location(name, root / "__init__.py", submodule_search_locations=[str(root)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def section_kernel(a) -> None:
    """This checkout's sequential sweep against --baseline's (its own code, imported here), one stream."""
    import importlib

    import torch

    from newllm_cli.model.network import NewLLM
    from newllm_cli.model.recurrence import embedding_table, recur_numba

    baseline_package(a.baseline)
    try:  # the layout since the subpackages, then the flat one before
        old = importlib.import_module("newllm_baseline.model.recurrence")
    except ImportError:
        old = importlib.import_module("newllm_baseline.recurrence")
    torch.manual_seed(0)
    model = NewLLM(256, 16, 16, 2)
    tokens, _ = corpus(a.text, a.tokens)
    ids = torch.as_tensor(tokens.astype(np.int64))
    offsets = np.array([0, len(ids)], dtype=np.int64)
    table, c0 = embedding_table(model, torch.device("cpu")), torch.zeros(1, 16)
    emb = table[ids]
    outs = {}
    runs = {
        "baseline": lambda: getattr(old, "recur_numba", getattr(old, "sweep_numba", None))(model, emb, offsets, c0),
        "current": lambda: recur_numba(model, table, ids, offsets, c0),
    }
    times = {k: [] for k in runs}
    for k in runs:  # compile or load the cache
        runs[k]()
    for _ in range(a.repeats):
        for k, fn in runs.items():
            start = time.perf_counter()
            outs[k] = fn()
            times[k].append(time.perf_counter() - start)
    ratios = [p / c for p, c in zip(times["baseline"], times["current"])]
    print(f"C=16 L=2 sequential sweep, one stream of {len(ids):,} tokens, {a.repeats} interleaved repeats")
    for k in runs:
        print(
            f"  {k:9} median {statistics.median(times[k]):.3f}s  ({len(ids) / statistics.median(times[k]):,.0f} tokens/s)"
        )
    print(
        f"  speed-up median {statistics.median(ratios):.2f}x (min {min(ratios):.2f}, max {max(ratios):.2f}); "
        f"identical output: {torch.equal(outs['baseline'], outs['current'])}"
    )


def section_crossover(a) -> None:
    """Sweep rate (tokens/s) of each kernel by C and the number of documents side by side."""
    import torch

    from newllm_cli.model.network import NewLLM
    from newllm_cli.model.recurrence import embedding_table, recur_numba, recur_torch

    print(f"{'C':>4} {'docs':>5} {'numba tok/s':>12} {'torch tok/s':>12} {'torch/numba':>12}")
    for C in (16, 64, 128, 256, 768):
        torch.manual_seed(0)
        model = NewLLM(256, C, C, 2)
        table = embedding_table(model, torch.device("cpu"))
        for docs in (1, 4, 16, 64) + ((256, 2048) if C <= 64 else ()):
            n = max(docs * 64, int(2e9 / (2 * macs_per_token(C, 2) * 50)))
            tokens, offsets = corpus(a.text, n, docs=docs)
            ids, c0 = torch.as_tensor(tokens.astype(np.int64)), torch.zeros(docs, C)
            recur_numba(model, table, ids[:64], np.array([0, 64]), c0[:1])
            rates = {}
            for name, fn in (
                ("numba", recur_numba),
                ("torch", recur_torch),
                ("numba2", recur_numba),
                ("torch2", recur_torch),
            ):
                start = time.perf_counter()
                fn(model, table, ids, offsets, c0)
                rates[name] = n / (time.perf_counter() - start)
            nb, tc = (rates["numba"] + rates["numba2"]) / 2, (rates["torch"] + rates["torch2"]) / 2
            print(f"{C:>4} {docs:>5} {nb:>12,.0f} {tc:>12,.0f} {tc / nb:>12.2f}", flush=True)


def section_e2e(a) -> None:
    """`newllm phase1` on a prepared byte-tokenized corpus: this checkout against --baseline."""
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "corpus.txt"
        text.write_bytes(np.resize(np.frombuffer(a.text.read_bytes(), np.uint8), int(a.tokens * 1.25)).tobytes())
        here = str(Path(__file__).resolve().parents[1])
        sides = {"baseline": str(a.baseline), "current": here}
        for name, src in sides.items():  # each side prepares its own workspace: settings differ
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "newllm_cli",
                    "prepare-data",
                    "--source",
                    "text_file",
                    "--path",
                    str(text),
                    "--tokenizer",
                    "byte",
                    "--workspace",
                    str(Path(tmp) / name),
                ],
                check=True,
                capture_output=True,
                env={**os.environ, "PYTHONPATH": src},
                cwd=tmp,
            )
        times: dict[str, list[float]] = {"baseline": [], "current": []}
        for _ in range(a.repeats):
            for name, src in sides.items():
                start = time.perf_counter()
                out = subprocess.run(
                    [sys.executable, "-m", "newllm_cli", "phase1", "--workspace", str(Path(tmp) / name)],
                    env={**os.environ, "PYTHONPATH": src},
                    check=True,
                    capture_output=True,
                    text=True,
                    cwd=tmp,
                )  # not the checkout's directory: it would shadow PYTHONPATH
                times[name].append(time.perf_counter() - start)
                if len(times[name]) == 1:
                    print(f"  {name} ({src}): {out.stderr.strip().splitlines()[-1]}")
        ratios = [b / c for b, c in zip(times["baseline"], times["current"])]
        print(f"newllm phase1, {a.tokens:,} byte tokens, defaults, {a.repeats} interleaved repeats")
        for name, ts in times.items():
            print(f"  {name:9} median {statistics.median(ts):.1f}s  ({', '.join(f'{t:.1f}' for t in ts)})")
        print(f"  speed-up median {statistics.median(ratios):.2f}x (min {min(ratios):.2f}, max {max(ratios):.2f})")


def section_threads(a) -> None:
    """Training on --tokens at C=16 under three thread settings, each in a fresh process (the OpenMP
    wait policy is read when the library loads), alone and beside a busy process on one core."""
    if a.one:
        tokens, offsets = corpus(a.text, a.one)
        seconds, _, _ = train(tokens, offsets, 16, 2, a.iterations, training_only=True)
        print(json.dumps({"seconds": seconds}))
        return
    variants = {
        "active wait (OpenMP default)": {"OMP_WAIT_POLICY": "ACTIVE"},
        "passive wait": {"OMP_WAIT_POLICY": "PASSIVE"},
        "one thread": {"OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"},
    }
    print(
        f"C=16 L=2 training, {a.tokens:,} tokens, {a.iterations} iterations; seconds, median of {a.repeats} interleaved"
    )
    for busy in (False, True):
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
        times: dict[str, list[float]] = {k: [] for k in variants}
        try:
            for _ in range(a.repeats):
                for name, env in variants.items():
                    out = subprocess.run(
                        [
                            sys.executable,
                            __file__,
                            "threads",
                            "--text",
                            str(a.text),
                            "--one",
                            str(a.tokens),
                            "--iterations",
                            str(a.iterations),
                        ],
                        env={**os.environ, **env},
                        capture_output=True,
                        text=True,
                        check=True,
                    )
                    times[name].append(json.loads(out.stdout.strip().splitlines()[-1])["seconds"])
        finally:
            if hog:
                hog.kill()
        base = times["active wait (OpenMP default)"]
        print(f"  {'with a busy core' if busy else 'machine otherwise idle'}:")
        for name, ts in times.items():
            ratio = [b / t for b, t in zip(base, ts)]
            print(
                f"    {name:30} {statistics.median(ts):6.1f}s  x{statistics.median(ratio):.2f} "
                f"vs active (min {min(ratio):.2f}, max {max(ratio):.2f})",
                flush=True,
            )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("section", choices=["tokens", "width", "kernel", "crossover", "e2e", "threads"])
    ap.add_argument("--text", type=Path, required=True)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    ap.add_argument("--iterations", type=int, default=6)
    ap.add_argument("--budget", type=float, default=1.0)
    ap.add_argument("--one", type=int)
    ap.add_argument("--widths", type=int, nargs="+", default=[16, 64, 256, 768])
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 6])
    ap.add_argument("--docs", type=int, default=64)
    ap.add_argument("--flops", type=float, default=3e11, help="work per width configuration")
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--baseline", type=Path)
    a = ap.parse_args()
    {
        "tokens": section_tokens,
        "width": section_width,
        "kernel": section_kernel,
        "crossover": section_crossover,
        "e2e": section_e2e,
        "threads": section_threads,
    }[a.section](a)


if __name__ == "__main__":
    main()
