"""Data parallelism: the same job as torchrun jobs of 1 and of 2 processes, side by side.

    python benchmarks/distributed.py [--text FILE] [--repeats 3] [--iterations 20] [--jobs 1 1:1 2]

The text defaults to the Python documentation's topics (benchmarks/corpus.py), byte tokens. A job
N:T is N processes of T threads each (N alone: the cores shared out, torchrun's and newllm's
default). Each repeat runs `newllm phase1`, `phase1 --split val` and `phase2 --phase2-l2 0.001` as
each job in turn, so a busy machine slows every job alike. Printed per job, as median (min-max)
over the repeats: the Phase 1 rate (token-iterations per second, from its report), the Phase 2 time
(head and control, from its report) and the Phase 1 command's wall time (torchrun's start
included). "1:1 x N" rows against "N" rows give the parallel efficiency, what communication and
uneven shares cost; "1" against "N" is what a user of one machine gains.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from corpus import build  # noqa: E402


def newllm(job: str, *args: str) -> float:
    """Run a newllm command as torchrun job "N" or "N:T"; its wall time."""
    nproc, _, threads = job.partition(":")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "newllm_cli",
        "--",
        *args,
        "--quiet",
        *(["--threads", threads] if threads else []),
    ]
    start = time.perf_counter()
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr}")
    return time.perf_counter() - start


def spread(values: list[float], fmt: str) -> str:
    return f"{format(statistics.median(values), fmt)} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", type=Path)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--iterations", type=int, default=20, help="Phase 1 iterations (the target is unreachable)")
    ap.add_argument("--jobs", nargs="+", default=["1", "1:1", "2"])
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="newllm-dist-"))
    text = a.text or build(work / "pydoc.txt")
    common = [
        "--workspace",
        str(work / "ws"),
        "--source",
        "text_file",
        "--path",
        str(text),
        "--tokenizer",
        "byte",
        "--phase1-max-iterations",
        str(a.iterations),
        "--convergence-threshold",
        "1e-12",
    ]
    subprocess.run(
        [sys.executable, "-m", "newllm_cli", "prepare-data", *common, "--quiet"], check=True, stdout=subprocess.DEVNULL
    )
    rate, head, wall = ({job: [] for job in a.jobs} for _ in range(3))
    for r in range(a.repeats):
        for job in a.jobs:
            name = f"job{job.replace(':', 'x')}-{r}"
            run = work / "ws" / "runs" / name
            wall[job].append(newllm(job, "phase1", *common, "--run", name))
            rate[job].append(json.loads((run / "phase1_train.json").read_text())["token_iterations_per_second"])
            newllm(job, "phase1", "--split", "val", *common, "--run", name)
            newllm(job, "phase2", *common, "--run", name, "--force", "--phase2-l2", "0.001")
            head[job].append(json.loads((run / "phase2.json").read_text())["seconds"])
    tokens = json.loads((run / "phase1_train.json").read_text())["tokens"]
    print(f"{text.name}: {tokens:,} train tokens, {a.iterations} Phase 1 iterations, {a.repeats} repeats")
    print(f"{'job':>5}  {'phase1 tok-it/s':>30}  {'phase2 s':>18}  {'phase1 command s':>18}  {'rate vs first':>13}")
    base = statistics.median(rate[a.jobs[0]])
    for job in a.jobs:
        print(
            f"{job:>5}  {spread(rate[job], ',.0f'):>30}  {spread(head[job], '.1f'):>18}  {spread(wall[job], '.1f'):>18}  "
            f"{statistics.median(rate[job]) / base:>12.2f}x"
        )


if __name__ == "__main__":
    main()
