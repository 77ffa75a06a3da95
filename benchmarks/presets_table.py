"""A markdown table of finished runs side by side, for docs/EXPERIMENTS.md's preset comparison.

    python benchmarks/presets_table.py WORKSPACE RUN [RUN ...]   # e.g. pydoc.oacd.seed-42 pydoc.oacd.seed-43

One row per corpus and preset (from the runs' names, `CORPUS.PRESET.seed-S`), its seeds' figures
side by side (`a ; b`): Phase 1 training iterations (each block's, `+`, for side-by-side networks)
and the converged share they ended at, Phase 1 wall time, the centred effective rank of train and
val contexts, and the linear head's val perplexity (`*`: the gate refused, --force ran it) with its
ratio and verdict against add-one unigram, add-k bigram and the untrained network.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def verdict(baselines: dict, key: str) -> str:
    b = baselines.get(key)
    return f"{b['ratio']:.2f} {b['verdict'].split()[0]}" if b else "-"


def cells(run: Path) -> list[str]:
    """One run's figures, in the table's column order."""
    p1, ana, p2 = (_read(run / f) for f in ("phase1_train.json", "analysis.json", "phase2.json"))
    blocks = p1.get("blocks") or [p1]
    iters = "+".join(str(len(b["history"])) for b in blocks)
    share = "+".join(f"{b['history'][-1]['converged_ratio'] or 0:.0%}" for b in blocks)  # at training's end
    rank = "/".join(f"{ana[s]['centred']['effective_rank']:.1f}" for s in ("train", "val") if s in ana)
    base = p2.get("baselines", {})
    forced = "*" if ana.get("gate", {}).get("passed") is False else ""
    ppl = p2.get("val", {}).get("perplexity")
    return [
        iters,
        share,
        f"{p1.get('seconds', 0):.0f}",
        rank,
        f"{ppl:.1f}{forced}" if ppl else "-",
        *(verdict(base, k) for k in ("unigram_add_one", "bigram_add_k", "untrained_network")),
    ]


def table(header: list[str], cells_of, argv: list[str]) -> None:
    """Print the table: one row per corpus and preset of the runs `argv[1:]` under workspace `argv[0]`,
    each cell its seeds' values joined by ' ; '."""
    root = Path(argv[0])
    groups: dict[tuple[str, str], list[list[str]]] = {}
    for name in argv[1:]:
        corpus, preset, _ = name.split(".", 2)
        groups.setdefault((corpus, preset), []).append(cells_of(root / "runs" / name))
    print("| " + " | ".join(["corpus", "preset", *header]) + " |")
    print("|" + " --- |" * (len(header) + 2))
    for (corpus, preset), rows in groups.items():
        print(f"| {corpus} | {preset} | " + " | ".join(" ; ".join(column) for column in zip(*rows)) + " |")


def main() -> None:
    header = ["Phase 1 iterations", "converged", "Phase 1 s", "centred rank train/val", "head ppl", "vs unigram",
              "vs bigram", "vs untrained"]  # fmt: skip
    table(header, cells, sys.argv[1:])


if __name__ == "__main__":
    main()
