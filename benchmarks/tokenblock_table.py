"""A markdown table of finished tokenblock runs, for docs/EXPERIMENTS.md: the predictor against its
three controls (zero context, untrained network, add-k bigram), seeds side by side (`a ; b`).

    python benchmarks/tokenblock_table.py WORKSPACE RUN [RUN ...]   # runs named CORPUS.PRESET.seed-S

Per run: val perplexity and top-1 accuracy, the perplexity ratio and verdict against each control,
and the seconds of each fit (the sum of its epochs: predictor / zero context / untrained network).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from presets_table import table


def cells(run: Path) -> list[str]:
    p2 = json.loads((run / "phase2.json").read_text())
    base, curves = p2["baselines"], p2.get("curves", {})

    def versus(key: str) -> str:
        b = base.get(key)
        return f"{b['ratio']:.3f} {b['verdict'].split()[0]}" if b else "skipped"

    seconds = "/".join(
        f"{sum(r['seconds'] for r in curves.get(k) or []):.0f}" for k in ("head", "zero_context", "control")
    )
    return [f"{p2['val']['perplexity']:.1f}", f"{p2['val']['accuracy']:.3f}",
            *(versus(k) for k in ("zero_context", "untrained_network", "bigram_add_k")), seconds]  # fmt: skip


def main() -> None:
    header = ["tokenblock ppl", "accuracy", "vs zero context", "vs untrained", "vs bigram", "fit s"]
    table(header, cells, sys.argv[1:])


if __name__ == "__main__":
    main()
