"""How long `newllm --help` (and one command's help) takes: this checkout against --baseline.

    python benchmarks/startup.py --baseline OLD_CHECKOUT [--repeats 10]

Each run is a fresh `python -m newllm_cli ... --help` with its checkout first on PYTHONPATH, the
two sides interleaved, so a busy machine slows both alike. Help must not import torch: it answers
from the command table and the settings model alone.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def seconds(checkout: Path, args: list[str], cwd: str) -> float:
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "newllm_cli", *args],
        env={**os.environ, "PYTHONPATH": str(checkout)},
        check=True,
        capture_output=True,
        cwd=cwd,  # not a checkout: it would shadow PYTHONPATH
    )
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=10)
    a = ap.parse_args()
    sides = {"baseline": a.baseline.resolve(), "current": Path(__file__).resolve().parents[1]}
    with tempfile.TemporaryDirectory() as cwd:
        for args in (["--help"], ["phase1", "--help"]):
            times: dict[str, list[float]] = {name: [] for name in sides}
            for _ in range(a.repeats):
                for name, checkout in sides.items():
                    times[name].append(seconds(checkout, args, cwd))
            print(f"newllm {' '.join(args)}, {a.repeats} interleaved runs")
            for name, ts in times.items():
                print(f"  {name:9} median {statistics.median(ts):.3f}s (min {min(ts):.3f}, max {max(ts):.3f})")


if __name__ == "__main__":
    main()
