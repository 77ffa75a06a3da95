"""The cross-corpus table of docs/EXPERIMENTS.md from `newllm eval --json` outputs (or eval.json files).

    python benchmarks/eval_table.py RUN=FILE.json ...     # e.g. pydoc:licences=x.json

Prints one markdown row per file: the run and the text, tokens, the head's perplexity, and its
verdict against the untrained control, the zero-context control and the add-k bigram.
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    print(
        "| trained on : evaluated on | tokens | head ppl | vs untrained control | vs zero context | vs add-k bigram |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for arg in sys.argv[1:]:
        name, path = arg.split("=", 1)
        with open(path) as f:
            r = json.load(f)
        b = r["baselines"]
        cells = [b[k]["size"] if k in b else "-" for k in ("untrained_network", "zero_context", "bigram_add_k")]
        print(f"| {name} | {r['text']['tokens']:,} | {r['val']['perplexity']:.1f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
