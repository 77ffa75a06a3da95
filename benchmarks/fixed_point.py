"""Anderson against plain iteration on the same documents: passes and wall time of the carry-over solve.

    python benchmarks/fixed_point.py --workspace W --run NAME [--repeats 5] [--tol 1e-4]

Takes a finished run's trained Phase 1 network and solves c_0 = F(c_0) for every document of its
train and val splits with each solver, from zero contexts like validation does, without updates.
The two solvers alternate within each repeat (plain, anderson, then anderson, plain, ...) so load
from other jobs on the machine falls on both alike. Prints, per split: passes, documents within the
tolerance, and the median wall time of each with its range; the ratio of the medians and the range
of the per-repeat ratios. The untrained control (same seed, no Phase 1) is solved too.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from newllm_cli import stages
from newllm_cli.data import dataset
from newllm_cli.settings import Settings
from newllm_cli.store.artifacts import Workspace, read_json
from newllm_cli.training.phase1 import run_cvfp


def solve(model, tokens, offsets, s: Settings, solver: str, tol: float) -> tuple[float, dict]:
    cfg = s.phase1.model_copy(update={"fixed_point_solver": solver, "fixed_point_tol": tol})
    start = time.perf_counter()
    res = run_cvfp(model, tokens, offsets, cfg, train=False, device=torch.device("cpu"))
    return time.perf_counter() - start, res.solve_report


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workspace", required=True)
    ap.add_argument("--run", required=True)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tol", type=float, default=1e-4)
    a = ap.parse_args()
    saved = read_json(Workspace(a.workspace, a.run).settings(), "the run's settings")
    saved["runtime"].update(workspace=a.workspace, run=a.run)
    s = Settings.model_validate(saved)
    torch.set_num_threads(s.runtime.threads or 1)
    ws, meta = dataset.load_meta(s)
    trained, _ = stages.load_phase1_model(ws, s, meta, torch.device("cpu"))
    control = stages.untrained_network(s, meta["vocab_size"], torch.device("cpu"))
    for name, model in (("trained", trained), ("control", control)):
        for split in ("train", "val"):
            tokens, offsets = dataset.load_split(ws, split, meta)
            times: dict[str, list[float]] = {"plain": [], "anderson": []}
            reports: dict[str, dict] = {}
            for r in range(a.repeats):
                for solver in ("plain", "anderson") if r % 2 == 0 else ("anderson", "plain"):
                    seconds, reports[solver] = solve(model, tokens, offsets, s, solver, a.tol)
                    times[solver].append(seconds)
            ratios = [b / p for p, b in zip(times["plain"], times["anderson"])]
            print(f"{name} {split}: {len(tokens):,} tokens, {len(offsets) - 1} documents, tol {a.tol:g}")
            for solver in ("plain", "anderson"):
                t, rep = times[solver], reports[solver]
                print(
                    f"  {solver:>8}: {rep['passes']:>3} passes, {rep['documents'] - rep['failing']}/{rep['documents']}"
                    f" documents within ({rep['stalled']} stalled, {rep['cycling']} cycling), solved at pass"
                    f" {rep['solved_at_median']} (median) / {rep['solved_at_max']} (last), {statistics.median(t):.2f} s"
                    f" ({min(t):.2f}-{max(t):.2f})"
                )
            print(
                f"  anderson / plain wall time: {statistics.median(times['anderson']) / statistics.median(times['plain']):.2f}"
                f" (per repeat {min(ratios):.2f}-{max(ratios):.2f}); passes"
                f" {reports['anderson']['passes'] / max(reports['plain']['passes'], 1):.2f}"
            )


if __name__ == "__main__":
    main()
