"""What `newllm eval` costs beside `newllm phase1 --split val` on the same tokens: eval solves the
same contexts, then fits the predictor and every control again on the training split (they never
read validation text) and scores them. Interleaved and repeated, each in a fresh process, on a copy
of a finished run.

    python benchmarks/eval_time.py WORKSPACE RUN [--repeats 3]   # where the run was made (its --path)

Prints seconds of each command per repeat, and the ratio eval / phase1 val with its spread.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "newllm_cli", *argv, "--quiet"], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("workspace", type=Path)
    ap.add_argument("run")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ws = Path(tmp) / "ws"
        shutil.copytree(a.workspace, ws, symlinks=True)
        run = ws / "runs" / a.run
        where = ["--workspace", str(ws), "--run", a.run]
        ratios = []
        for i in range(a.repeats):
            (run / "stages.json").unlink(missing_ok=True)  # phase1 val is not skipped as up to date
            val = timed(["phase1", "--split", "val", *where])
            shutil.rmtree(run / "eval", ignore_errors=True)  # nor is eval a cache hit
            ev = timed(["eval", "--split", "val", *where])
            ratios.append(ev / val)
            print(f"repeat {i + 1}: phase1 --split val {val:.1f} s, eval --split val {ev:.1f} s, ratio {ev / val:.2f}")
        print(f"eval / phase1 val: {statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
