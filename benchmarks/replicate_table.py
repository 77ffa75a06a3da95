"""A markdown table of `newllm replicate` reports, for docs/EXPERIMENTS.md.

    python benchmarks/replicate_table.py WORKSPACE/replicates/pydoc.json WORKSPACE/replicates/licences.json

One row per seed and a pooled row per report: the head's val perplexity and its ratio (with the
verdict) against the untrained control and the strongest count model, and whether the control's own
solve converged (a seed whose Phase 2 the gate refused and --force ran is marked); the pooled row
gives the interval and whether it covers every seed's ratio.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from newllm_cli.evaluation.verdict import strongest_count_model


def main() -> None:
    print("| corpus | seed | head ppl | vs control | control solved | vs strongest count model |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in sys.argv[1:]:
        rep = json.loads(Path(name).read_text())
        counts = strongest_count_model(rep["runs"][0])
        for row in rep["runs"]:
            ctrl, cm = row["untrained_network"], row[counts]
            print(
                f"| {rep['run']} | {row['seed']}{' (gate forced)' if row.get('gate_forced') else ''} | {row['perplexity']:.1f} | {ctrl['ratio']:.3f} {ctrl['verdict']} |"
                f" {'yes' if row['control_converged'] else 'no'} | {cm['ratio']:.3f} {cm['verdict']} ({counts}) |"
            )
        pc, pn = rep["pooled"]["untrained_network"], rep["pooled"][counts]
        print(
            f"| {rep['run']} | pooled ({len(rep['seeds'])}) | | **{pc['size']}**, {pc['covers']} | |"
            f" **{pn['size']}**, {pn['covers']} |"
        )


if __name__ == "__main__":
    main()
