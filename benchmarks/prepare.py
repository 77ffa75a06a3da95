"""Peak memory and time of `newllm prepare-data` on a large text file (default 100 MB).

The file is built from the Python documentation's topic texts (shipped with the interpreter),
repeated until it reaches the size; documents are blank-line separated.

    python benchmarks/prepare.py [--megabytes 100] [--tokenizer bpe]
    python benchmarks/prepare.py --megabytes 50 --single-line   # one 50 MB document, separate val text

The parent only builds files with plain writes, so the child's peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def build_text(path: Path, megabytes: int, single_line: bool = False) -> None:
    from pydoc_data import topics

    docs = [re.sub(r"\n\s*\n", "\n", t.strip()) for _, t in sorted(topics.topics.items())]
    block = ("\n\n".join(docs) + "\n\n").encode()
    if single_line:  # every line break a space: one document, one line
        block = re.sub(rb"\s+", b" ", block)
    with open(path, "wb") as f:
        for _ in range(max(1, megabytes * 2**20 // len(block))):
            f.write(block)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--megabytes", type=int, default=100)
    ap.add_argument("--tokenizer", default="bpe")
    ap.add_argument("--single-line", action="store_true")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "big.txt"
        build_text(text, a.megabytes, a.single_line)
        val = []
        if a.single_line:  # one document cannot be split into train and val
            build_text(Path(tmp) / "val.txt", 1)
            val = ["--val-source", "text_file", "--val-path", str(Path(tmp) / "val.txt")]
        start = time.perf_counter()
        out = subprocess.run(
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
                a.tokenizer,
                "--workspace",
                str(Path(tmp) / "ws"),
                *val,
                "--json",
            ],
            capture_output=True,
            text=True,
        )
        seconds = time.perf_counter() - start
        if out.returncode:
            sys.exit(out.stderr)
        meta = json.loads(out.stdout)
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        tokens = meta["train"]["tokens"] + meta["val"]["tokens"]
        print(
            f"text {text.stat().st_size / 2**20:.0f} MB, tokenizer {a.tokenizer} (vocabulary {meta['vocab_size']:,}): "
            f"{tokens:,} tokens in {seconds:.1f} s ({tokens / seconds:,.0f} tokens/s), peak RSS {peak:.0f} MB"
        )


if __name__ == "__main__":
    main()
