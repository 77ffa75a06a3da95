"""Every CUDA path against the CPU result of the same run, with throughput: for a lent GPU.

    python benchmarks/gpu_check.py --text pydoc.txt [--device cuda] [--bytes 400000]

On a small byte-tokenized slice of the text, each case runs twice, on --device and on cpu, in
workspaces of its own: Phase 1 training and validation with both schemes (the torch kernel: the
compiled one is CPU-only), the solves to --fixed-point-tol (anderson), Phase 2's head and control
fits, and with two or more GPUs a torchrun NCCL job. It prints the largest difference of the saved
contexts and of the val perplexity, and each side's seconds. Tolerances: Phase 1 iterates a chaotic
map, so contexts may drift apart by float rounding (cuBLAS sums in another order); what must agree
is the perplexity, within 1% relative, and both sides' fixed-point check. `--device cpu` runs the
script end to end on a machine without a GPU (both sides alike).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CASES = {
    "sequential": ["--scheme", "sequential", "--kernel", "torch"],
    "parallel": ["--scheme", "parallel", "--kernel", "torch"],
    "anderson": ["--scheme", "sequential", "--kernel", "torch", "--fixed-point-solver", "anderson"],
}


def newllm(args: list[str], cwd: str) -> tuple[dict, float]:
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "newllm_cli", *args, "--json", "-q"],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    if out.returncode:
        raise SystemExit(f"newllm {' '.join(args)} failed: {out.stderr.strip().splitlines()[-1]}")
    return json.loads(out.stdout), time.perf_counter() - start


def run(device: str, case: list[str], text: Path, root: Path, cwd: str) -> dict:
    ws = root / device
    common = ["--workspace", str(ws), "--source", "text_file", "--path", str(text), "--tokenizer", "byte"]
    common += ["--device", device, *case, "--phase2-max-iterations", "40"]
    full, seconds = newllm(["full", *common, "--probe-rows", "0"], cwd)
    run_dir = Path(full["run_dir"])
    return {
        "seconds": seconds,
        "contexts": np.load(run_dir / "contexts_val.npy"),
        "perplexity": full["phase2"]["val"]["perplexity"],
        "within": full["phase1_val"]["fixed_point"]["within_tolerance"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", type=Path, required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--bytes", type=int, default=400_000)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "slice.txt"
        text.write_bytes(a.text.read_bytes()[: a.bytes])
        print(f"{'case':12} {'max |ctx diff|':>15} {'ppl ' + a.device:>12} {'ppl cpu':>10} {'rel':>8} "
              f"{'within':>13} {'s ' + a.device:>8} {'s cpu':>7}")  # fmt: skip
        bad = 0
        for name, case in CASES.items():
            root = Path(tmp) / name
            dev, cpu = (run(d, case, text, root, tmp) for d in (a.device, "cpu"))
            diff = float(np.abs(dev["contexts"] - cpu["contexts"]).max())
            rel = abs(dev["perplexity"] - cpu["perplexity"]) / cpu["perplexity"]
            bad += rel > 0.01
            print(f"{name:12} {diff:15.3g} {dev['perplexity']:12.2f} {cpu['perplexity']:10.2f} {rel:8.2%} "
                  f"{dev['within']:6.0%}/{cpu['within']:<6.0%} {dev['seconds']:8.1f} {cpu['seconds']:7.1f}")  # fmt: skip
        gpus = int(subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
                                  capture_output=True, text=True).stdout or 0)  # fmt: skip
        if a.device == "cuda" and gpus >= 2:
            ws = Path(tmp) / "nccl"
            start = time.perf_counter()
            subprocess.run(["torchrun", "--standalone", "--nproc-per-node", str(gpus), "-m", "newllm_cli", "--",
                            "phase1", "--workspace", str(ws), "--source", "text_file", "--path", str(text),
                            "--tokenizer", "byte", "--device", "cuda", "--kernel", "torch", "-q"],
                           check=True, cwd=tmp, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})  # fmt: skip
            print(f"torchrun NCCL, {gpus} GPUs: phase1 train in {time.perf_counter() - start:.1f} s")
        else:
            print("torchrun NCCL: skipped (needs two or more GPUs)")
        sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
