"""Time and peak memory of `newllm analyze --contexts` on a large contexts file (default 10M x 16).

python benchmarks/analyze.py [--rows 10000000] [--dim 16]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from newllm_cli.store.rowstore import RowStore


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--dim", type=int, default=16)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "contexts.npy"
        # written with pwrite, not through a map: a child inherits its parent's peak RSS across exec,
        # so a parent that had the file mapped would inflate the figure measured below
        out = RowStore(a.rows, a.dim, Path(tmp))
        rng = np.random.default_rng(0)
        mix = rng.normal(size=(a.dim, a.dim)).astype(np.float32)
        for s in range(0, a.rows, 1 << 20):  # anisotropic Gaussian contexts, written in chunks
            m = min(1 << 20, a.rows - s)
            out.write(s, rng.standard_normal((m, a.dim), dtype=np.float32) @ mix)
        out.save(path)
        start = time.perf_counter()
        res = subprocess.run(
            [
                sys.executable,
                "-m",
                "newllm_cli",
                "analyze",
                "--contexts",
                str(path),
                "--json",
                "--workspace",
                str(Path(tmp) / "ws"),
            ],
            capture_output=True,
            text=True,
        )
        seconds = time.perf_counter() - start
        if res.returncode:
            sys.exit(res.stderr)
        rep = json.loads(res.stdout)["contexts"]
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(
            f"analyze {a.rows:,} x {a.dim} float32 ({path.stat().st_size / 2**20:.0f} MB): {seconds:.1f} s, "
            f"peak RSS {peak:.0f} MB, effective rank {rep['information']['effective_rank']:.2f}"
        )


if __name__ == "__main__":
    main()
