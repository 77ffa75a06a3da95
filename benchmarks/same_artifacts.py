"""Are a refactor's artifacts byte-identical? `newllm full` from --baseline and from this checkout.

    python benchmarks/same_artifacts.py --baseline OLD_CHECKOUT              # bundled sample
    python benchmarks/same_artifacts.py --baseline OLD_CHECKOUT --text pydoc.txt

Both sides run in turn in the same workspace path (absolute paths inside artifacts then agree), each
as `python -m newllm_cli` with its own checkout first on PYTHONPATH. Every file must be byte-identical
except wall times: `seconds`, `wall_seconds` and `token_iterations_per_second` in JSON, the `seconds`
column of metrics.csv, and what stages.json records of its files (sizes, which those times change;
mtimes and inodes; keys, which hash them), and log.txt (a transcript with times). Prints one line
per file and exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

TIMES = {"seconds", "wall_seconds", "token_iterations_per_second"}


def without_times(obj):
    """A JSON value with wall times (and stages.json's mtime/inode of each output) blanked."""
    if isinstance(obj, dict):
        out = {k: (None if k in TIMES else without_times(v)) for k, v in obj.items()}
        if isinstance(obj.get("outputs"), list):  # stages.json: [path, size, mtime_ns, inode]
            out["outputs"] = [o[:1] for o in obj["outputs"]]  # and a key hashing them
            out["key"] = None
        return out
    if isinstance(obj, list):
        return [without_times(v) for v in obj]
    return obj


def comparable(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix == ".json":
        return json.dumps(without_times(json.loads(data)), sort_keys=True).encode()
    if path.name == "metrics.csv":
        rows = list(csv.DictReader(io.StringIO(data.decode())))
        return json.dumps([{k: v for k, v in r.items() if k != "seconds"} for r in rows]).encode()
    return data


def where(a: Path, b: Path) -> str:
    """For JSON, the first key path whose values differ."""
    if a.suffix != ".json":
        return ""

    def first(x, y, path: str) -> str | None:
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y)):
                found = first(x.get(k), y.get(k), f"{path}.{k}")
                if found:
                    return found
            return None
        if isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
            return next((f for i, (u, v) in enumerate(zip(x, y)) if (f := first(u, v, f"{path}[{i}]"))), None)
        return None if x == y else f"{path}: {str(x)[:60]} vs {str(y)[:60]}"

    return f"  ({first(without_times(json.loads(a.read_text())), without_times(json.loads(b.read_text())), '')})"


def run_full(checkout: Path, workspace: Path, args: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    subprocess.run(
        [sys.executable, "-m", "newllm_cli", "full", "--workspace", str(workspace), "-q", *args],
        check=True,
        env=env,
        cwd=workspace.parent,
        stdout=subprocess.DEVNULL,
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", type=Path, required=True)
    ap.add_argument("--text", type=Path, help="a text file (byte tokenizer); default: the bundled sample")
    a = ap.parse_args()
    here = Path(__file__).resolve().parents[1]
    args = (
        ["--source", "text_file", "--path", str(a.text.resolve()), "--tokenizer", "byte", "--num-samples", "16"]
        if a.text
        else ["--num-samples", "10"]
    ) + ["--context-dim", "16", "--num-layers", "2"]
    root = Path(tempfile.mkdtemp())
    ws = root / "ws"
    for side, checkout in (("baseline", a.baseline.resolve()), ("current", here)):
        run_full(checkout, ws, args)
        ws.rename(root / side)
    files = sorted(p.relative_to(root / "baseline") for p in (root / "baseline").rglob("*") if p.is_file())
    others = sorted(p.relative_to(root / "current") for p in (root / "current").rglob("*") if p.is_file())
    bad = 0
    for rel in sorted(set(files) | set(others)):
        if rel.name == "log.txt" or rel.suffix == ".lock":
            continue
        a_, b_ = root / "baseline" / rel, root / "current" / rel
        if not (a_.exists() and b_.exists()):
            print(f"MISSING  {rel} (only in {'baseline' if a_.exists() else 'current'})")
            bad += 1
        elif comparable(a_) != comparable(b_):
            print(f"DIFFERS  {rel}{where(a_, b_)}")
            bad += 1
        else:
            print(f"same     {rel}")
    print(f"{len(files)} files, {bad} differing")
    shutil.rmtree(root)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
