"""`newllm export`: a run as a self-describing folder, loadable by `newllm_cli.load_run(DIR)` and
uploadable to the Hugging Face hub as it is (`huggingface-cli upload USER/NAME DIR`).

    DIR/config.json          every setting (the architecture's included), vocabulary, ids, hashes
    DIR/phase1.safetensors   the frozen context network (provenance in its metadata)
    DIR/phase2.safetensors   the Phase 2 predictor
    DIR/tokenizer.json       the run's tokenizer
    DIR/README.md            its figures: the predictor beside every control, with verdicts
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from newllm_cli.data import dataset
from newllm_cli.evaluation.controls import label
from newllm_cli.runtime import nofollow
from newllm_cli.runtime.errors import UsageError
from newllm_cli.settings import Settings
from newllm_cli.store import weights
from newllm_cli.store.artifacts import Workspace, read_json
from newllm_cli.use.api import CONFIG
from newllm_cli.use.evaluate import results

FORMAT = "newllm-export-1"


def export(s: Settings, directory: Path) -> dict:
    """Write the run into `directory` (new or empty), every file at once or none.

    Returns: {"path": the folder, "files": its files}."""
    out = Path(directory).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out} exists and is not an empty directory; choose a new one")
    run = Workspace(s.runtime.workspace, s.runtime.run)
    if not run.started():
        raise run.no_such_run()
    p1 = weights.read_weights(run.phase1_checkpoint(), "Phase 1 checkpoint (run `newllm phase1`)", "newllm phase1")
    ws = Workspace(s.runtime.workspace, s.runtime.run, p1["provenance"]["dataset"])  # the data it was trained on
    meta = dataset.read_meta(ws)
    p2 = weights.read_weights(ws.phase2_checkpoint(), "Phase 2 checkpoint (run `newllm phase2`)", "newllm phase2")
    report = read_json(ws.phase2_report(), "Phase 2 report (run `newllm phase2`)", "newllm phase2")
    settings = s.model_dump()
    settings["runtime"] = {k: v for k, v in settings["runtime"].items() if k not in ("workspace", "run")}
    config = {
        "format": FORMAT,
        "architecture": s.model.model_dump(),
        "settings": settings,
        "vocab_size": meta["vocab_size"],
        "dataset": meta["key"],
        "model_id": p1["model_id"],
        "head_id": p2["provenance"].get("head_id"),
        "predictor": p2["provenance"].get("predictor", "linear"),
        "head_input": p2["provenance"].get("head_input"),
        "tokenizer_sha256": meta.get("tokenizer_sha256"),
        "val_perplexity": report["val"]["perplexity"],
    }
    staging = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        import json

        (staging / "phase1.safetensors").write_bytes(weights.encode(p1))
        (staging / "phase2.safetensors").write_bytes(weights.encode(p2))
        (staging / "tokenizer.json").write_bytes(nofollow.read_bytes(ws.tokenizer()))
        (staging / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (staging / "README.md").write_text(card(s, config, report, results(Workspace(ws.root, s.runtime.run))))
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"path": str(out), "files": sorted(p.name for p in out.iterdir())}


def card(s: Settings, config: dict, report: dict, evaluations: list[dict]) -> str:
    """The folder's README: what the model is and its figures, as tables."""
    m = s.model
    lines = [
        "# A New-LLM run (newllm)",
        "",
        f"Context network `{m.architecture}`, C = {m.context_dim}, E = {m.embed_dim}, {m.num_layers} layers; "
        f"{config['predictor']} predictor reading {config['head_input']}; vocabulary {config['vocab_size']:,}. "
        "Load it with `import newllm_cli as nl; run = nl.load_run(DIR)`.",
        "",
        "| text | model | perplexity | the predictor against it |",
        "| --- | --- | ---: | --- |",
    ]
    for where, r in [("own val", report)] + [(e["text"].get("path") or e["text"]["source"], e) for e in evaluations]:
        lines.append(f"| {where} | the predictor | {r['val']['perplexity']:.2f} | |")
        for key, b in r["baselines"].items():
            lines.append(f"| {where} | {label(key)} | {b['val_perplexity']:.2f} | {b['size']} |")
    return "\n".join(lines + ["", report.get("finding", ""), ""])
