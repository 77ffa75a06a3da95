"""The ablation behind the defaults: each variant run end to end, one markdown row per corpus and seed.

    python benchmarks/ablation.py --workspace W --corpus pydoc=PATH --corpus licences=DIR \
        [--seeds 1 2] [--variants default w=0 ...] [--probe-rows 5000]

A corpus given as a file is read as blank-line-separated documents (text_file), a directory as one
document per file (text_dir). Every run goes through the same stage functions as `newllm full`.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from newllm_cli import stages  # noqa: E402
from newllm_cli.settings import Settings  # noqa: E402

VARIANTS = {
    "default": {},
    "w=0": {"phase1": {"dist_reg_weight": 0.0}},
    "w=0.01": {"phase1": {"dist_reg_weight": 0.01}},
    "w=1": {"phase1": {"dist_reg_weight": 1.0}},
    "C=64": {"model": {"context_dim": 64}},
    "parallel": {"phase1": {"scheme": "parallel"}},
    "context+token": {"phase2": {"head_input": "context+token"}},
    "seed stop (10 it., 2 drops)": {"phase1": {"max_iterations": 10, "stop_on_drops": 2}},
}


def row(name: str, corpus: str, seed: int, r: dict, seconds: float) -> str:
    p1t, p1v, ana, p2 = r["phase1_train"], r["phase1_val"], r["analysis"], r["phase2"]
    probes = ana.get("decodability", {}).get("probes", {})

    def probe(key: str) -> str:
        if key not in probes:
            return "-"
        v = probes[key]
        return " / ".join(f"{v[s]['val_accuracy']:.2f}" for s in ("phase1", "untrained", "gaussian"))

    b = p2["baselines"]
    ctrl = b.get("untrained_network")
    vs = (
        (
            f"{ctrl['val_perplexity']:.1f}, {ctrl['ratio']:.3f} [{ctrl['ratio_low']:.3f}, {ctrl['ratio_high']:.3f}] "
            f"{ctrl['verdict']}"
        )
        if ctrl
        else "-"
    )
    return (
        f"| {name} | {corpus} | {seed} | {p1t['converged_ratio']:.1%} / {p1v['converged_ratio']:.1%} | "
        f"{ana['train']['centred']['effective_rank']:.2f} / {ana['val']['centred']['effective_rank']:.2f} | "
        f"{probe('token_from_context')} | {probe('token_from_step')} | {probe('next_from_context')} | "
        f"{p2['val']['perplexity']:.1f} | {vs} | {b['unigram_add_one']['val_perplexity']:.1f} | "
        f"{b['bigram_add_k']['val_perplexity']:.1f} | {seconds:.0f} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workspace", required=True)
    ap.add_argument("--corpus", action="append", required=True, help="NAME=PATH")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--probe-rows", type=int, default=5000)
    args = ap.parse_args()
    print(
        "| variant | corpus | seed | Phase 1 converged train / val | centred eff. rank train / val "
        "| acc. x_t from c_t (P1 / untrained / noise) | acc. x_t from c_t - c_t-1 | acc. x_t+1 from c_t "
        "| Phase 2 val ppl | control ppl, head / control [95%] | unigram | bigram | s |"
    )
    print("| --- | --- | ---: | --- | --- | --- | --- | --- | ---: | --- | ---: | ---: | ---: |", flush=True)
    for spec in args.corpus:
        corpus, path = spec.split("=", 1)
        data = (
            {"source": "text_dir", "path": path, "pattern": "*.txt"}
            if Path(path).is_dir()
            else {"source": "text_file", "path": path}
        )
        for seed in args.seeds:
            for name in args.variants:
                extra = VARIANTS[name]
                s = Settings.model_validate(
                    {
                        **extra,
                        "data": data,
                        "runtime": {
                            "workspace": args.workspace,
                            "seed": seed,
                            "run": re.sub(r"[^A-Za-z0-9_.-]", "_", f"{corpus}-{seed}-{name}"),
                        },
                    }
                )
                t0 = time.perf_counter()
                out = {
                    "prepare_data": stages.prepare_data(s),
                    "phase1_train": stages.phase1(s, "train"),
                    "phase1_val": stages.phase1(s, "val"),
                    "analysis": stages.analyze(s, probe_rows=args.probe_rows),
                }
                out["phase2"] = stages.phase2(s, force=True)
                print(row(name, corpus, seed, out, time.perf_counter() - t0), flush=True)


if __name__ == "__main__":
    main()
