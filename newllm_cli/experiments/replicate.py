"""`newllm replicate --seeds N`: the same run under N seeds, and verdicts that cover the seeds.

A verdict of one run resamples its validation documents under one seed; between seeds the ratios
move several times further than that interval (docs/EXPERIMENTS.md). Each seed s = --seed, --seed
+ 1, ... is an ordinary run RUN.seed-s made by `newllm full` (trained network and its untrained
control both from seed s), so any of its stages can be rerun alone; then every comparison of
Phase 2 is pooled over the seeds (evaluation/verdict.pooled) into WORKSPACE/replicates/RUN.json.
"""

from __future__ import annotations

from pathlib import Path

from newllm_cli.evaluation.controls import CONTROLS, label
from newllm_cli.evaluation.verdict import strongest_count_model
from newllm_cli.runtime import locks
from newllm_cli.runtime.errors import GateRefused, RefusedError, UsageError
from newllm_cli.runtime.progress import info, warn
from newllm_cli.settings import PROBE_ROWS, Settings
from newllm_cli.store.artifacts import write_json


def seed_settings(s: Settings, seed: int) -> Settings:
    runtime = s.runtime.model_copy(update={"seed": seed, "run": f"{s.runtime.run}.seed-{seed}"})
    return s.model_copy(update={"runtime": runtime})


def replicate(s: Settings, seeds: int = 4, force: bool = False, probe_rows: int = PROBE_ROWS) -> dict:
    """Run `full` for --seeds consecutive seeds from --seed (runs RUN.seed-S), then pool every
    comparison of the head over them: per-seed ratios and one verdict whose interval covers seeds."""
    from newllm_cli import stages
    from newllm_cli.evaluation import verdict

    if seeds < 1:
        raise UsageError("--seeds must be at least 1")
    rows, tables, refused = [], [], []
    for i in range(seeds):
        each = seed_settings(s, s.runtime.seed + i)
        info(f"replicate {s.runtime.run}: seed {each.runtime.seed} ({i + 1} of {seeds}) -> run {each.runtime.run}")
        try:
            with locks.run(each.runtime.workspace, each.runtime.run):
                out = stages.full(each, force=force, probe_rows=probe_rows)
        except GateRefused as e:
            warn(f"seed {each.runtime.seed}: {e}; the pooled verdicts leave it out")
            refused.append({"seed": each.runtime.seed, "run": each.runtime.run, "problem": str(e)})
            continue
        p2, table = out["phase2"], out["phase2"]["baselines"]
        tables.append(table)
        rows.append(
            {
                "seed": each.runtime.seed,
                "run": each.runtime.run,
                "perplexity": p2["val"]["perplexity"],
                "control_converged": table.get("untrained_network", {}).get("solve", {}).get("converged"),
                "gate_forced": bool(p2.get("gate", {}).get("forced")),
                **{k: {f: v[f] for f in ("val_perplexity", "ratio", "verdict")} for k, v in table.items()},
            }
        )
    if not tables:
        raise RefusedError(f"the Phase-1 gate refused every seed ({refused[0]['problem']}); --force to fit anyway")
    keys = [c.key for c in CONTROLS if all(c.key in t for t in tables)]
    if any(t[k]["unit_pairs"] != tables[0][k]["unit_pairs"] for t in tables for k in keys):
        raise RefusedError("the seeds' runs were scored on different validation documents: pooling needs the same")
    pooled = {
        k: verdict.pooled([t[k]["unit_sums"] for t in tables], tables[0][k]["unit_pairs"], seed=s.runtime.seed)
        for k in keys
    }
    out = {"run": s.runtime.run, "seeds": [r["seed"] for r in rows], "runs": rows, "pooled": pooled, "refused": refused}
    out["finding"] = finding(pooled, strongest_count_model(tables[0]), refused)  # count models: the same every seed
    path = Path(s.runtime.workspace) / "replicates" / f"{s.runtime.run}.json"
    out["path"] = str(write_json(path, out))
    return out


def finding(pooled: dict, counts: str | None, refused: list[dict]) -> str:
    """One sentence on the pooled comparisons with the untrained control and the strongest count model,
    and the seeds the gate refused."""
    parts = []
    for key in ("untrained_network", counts or ""):
        if key in pooled:
            p = pooled[key]
            parts.append(f"against the {label(key)} it {p['size']} (the interval {p['covers']})")
    n = next(iter(pooled.values()))["seeds"] if pooled else 0
    left = (
        f" Refused by the Phase-1 gate, so left out: seed {', '.join(str(r['seed']) for r in refused)}."
        if refused
        else ""
    )
    return f"Over {n} seed{'s' * (n != 1)}, the head on the Phase 1 contexts: " + "; ".join(parts) + "." + left
