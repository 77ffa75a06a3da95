"""A markdown table of `newllm replicate` reports, for docs/EXPERIMENTS.md.

    python benchmarks/replicate_table.py WORKSPACE/replicates/pydoc.json WORKSPACE/replicates/licences.json

One row per report: each seed's perplexity ratio of the head against its untrained control (seeds
whose Phase 2 the gate refused and --force ran are named), and the pooled verdicts with their
intervals against the control and the strongest count model.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from newllm_cli.evaluation.verdict import strongest_count_model


def main() -> None:
    print("| corpus | seeds | head vs its untrained control | vs strongest count model |")
    print("| --- | --- | --- | --- |")
    for name in sys.argv[1:]:
        rep = json.loads(Path(name).read_text())
        counts = strongest_count_model(rep["runs"][0])
        seeds = [row["seed"] for row in rep["runs"]]
        forced = [str(row["seed"]) for row in rep["runs"] if row.get("gate_forced")]
        ratios = ", ".join(f"{row['untrained_network']['ratio']:.3f}" for row in rep["runs"])
        label = f"{min(seeds)}-{max(seeds)}" + (f" ({', '.join(forced)} gate forced)" if forced else "")
        pc, pn = rep["pooled"]["untrained_network"], rep["pooled"][counts]
        print(
            f"| {rep['run']} | {label}: {'ratios ' if not forced else ''}{ratios} | **{pc['size']}** | **{pn['size']}** ({counts}) |"
        )


if __name__ == "__main__":
    main()
