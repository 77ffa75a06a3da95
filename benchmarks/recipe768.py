"""The author's later configuration, C = E = 768, L = 6, over 500 UltraChat-format dialogues, timed
on this machine at a tenth of the length: Phase 1 time is linear in tokens at a fixed number of
documents (each lockstep step is the same 500-row matrix product), so a full-length iteration takes
ten times as long.

The dialogues are cut from a real text (user and assistant turns of the UltraChat schema), written
as a local JSONL export and read with `--source ultrachat --path`, byte tokens.

    python benchmarks/recipe768.py --text FILE [--dialogues 500] [--bytes 106] [--iterations 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

FULL_TOKENS_PER_DIALOGUE = 1060  # ~530k GPT-2 tokens over 500 UltraChat dialogues (the author's runs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--text", type=Path, required=True)
    ap.add_argument("--dialogues", type=int, default=500)
    ap.add_argument("--bytes", type=int, default=106, help="per dialogue (a tenth of the full length)")
    ap.add_argument("--iterations", type=int, default=3)
    a = ap.parse_args()
    text = a.text.read_text(errors="replace")
    with tempfile.TemporaryDirectory() as tmp:
        export = Path(tmp) / "dialogues.jsonl"
        with export.open("w") as f:
            for i in range(a.dialogues):
                piece = text[(i * a.bytes) % (len(text) - a.bytes) :][: a.bytes]
                half = len(piece) // 2
                f.write(
                    json.dumps(
                        {
                            "messages": [
                                {"role": "user", "content": piece[:half]},
                                {"role": "assistant", "content": piece[half:]},
                            ]
                        }
                    )
                    + "\n"
                )
        common = ["--workspace", str(Path(tmp) / "ws"), "--run", "r768", "--json"]
        subprocess.run(
            [
                sys.executable,
                "-m",
                "newllm_cli",
                "prepare-data",
                "--source",
                "ultrachat",
                "--path",
                str(export),
                "--tokenizer",
                "byte",
                "--val-ratio",
                "0.01",
                *common,
            ],
            check=True,
            capture_output=True,
        )
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "newllm_cli",
                "phase1",
                "--context-dim",
                "768",
                "--embed-dim",
                "768",
                "--num-layers",
                "6",
                "--phase1-max-iterations",
                str(a.iterations),
                *common,
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        rep = json.loads(out.stdout)
    tokens, docs = rep["tokens"], rep["documents"]
    scale = FULL_TOKENS_PER_DIALOGUE * docs / tokens
    print(
        f"C=E=768 L=6, {docs} dialogues, {tokens:,} byte tokens ({tokens / docs:.0f} per dialogue); "
        f"x{scale:.1f} gives the full length ({FULL_TOKENS_PER_DIALOGUE} tokens per dialogue)"
    )
    for r in rep["history"] + rep["solve"]:
        kind = "training step" if r["lr"] else "sweep only"
        print(
            f"  iteration {r['iteration']:>2} ({kind:13}) {r['seconds']:7.1f}s  full length: {r['seconds'] * scale / 60:6.1f} min"
        )


if __name__ == "__main__":
    main()
