"""`newllm eval`: a trained run measured on any text, with the verdicts `phase2` gives on its own val.

The text is tokenized with the run's tokenizer and solved with its frozen Phase 1 network by the
same call `phase1 --split val` makes; the predictor and every control are then fitted on the run's
training split by the same code as `phase2` (they never see validation text, so the fit is the
run's own head: its id is checked against phase2's checkpoint) and scored on the text. Results go to
runs/NAME/eval/KEY/, KEY hashing the text's token ids and the model ids, so several texts sit side
by side and a rerun is skipped.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from newllm_cli import stages
from newllm_cli.data import dataset, sources
from newllm_cli.data import tokenizer as tokenizers
from newllm_cli.evaluation import verdict
from newllm_cli.runtime import distributed, nofollow
from newllm_cli.runtime.errors import RefusedError, UsageError
from newllm_cli.runtime.progress import info
from newllm_cli.settings import Settings
from newllm_cli.store import uptodate, validate
from newllm_cli.store.artifacts import Workspace, fingerprint, read_json, write_array, write_json
from newllm_cli.store.publish import latest
from newllm_cli.store.weights import read_weights

TEXT_SOURCES = ("text_file", "text_dir", "ultrachat", "sample")


@dataclass
class Text:
    """The evaluated text as the run's tokens: ids, document offsets, where they came from."""

    tokens: np.ndarray
    offsets: np.ndarray
    described: dict  # source, path, input content hash, tokens, documents, unknown tokens, sha256
    stored: bool  # whether eval/KEY keeps a copy of the ids (not for the run's own splits)


def unknown_id(tok) -> int | None:
    """The id the tokenizer gives what it cannot encode (None for byte-level ones, which encode all)."""
    name = getattr(tok.model, "unk_token", None)
    return tok.token_to_id(name) if name else None


def count_id(tokens: np.ndarray, wanted: int | None) -> int:
    if wanted is None:
        return 0
    return int(sum(np.count_nonzero(block == wanted) for block in validate.blocks(tokens)))


def read_text(
    ws: Workspace, s: Settings, meta: dict, scratch: Path, text: tuple[str | None, str | None], tokens: Path | None,
    split: str | None,
) -> Text:  # fmt: skip
    """The text to evaluate from exactly one of (source, path), --tokens or --split."""
    source, path = text
    given = [name for name, v in (("--source/--path", source or path), ("--tokens", tokens), ("--split", split)) if v]
    if len(given) != 1:
        raise UsageError(
            "eval needs one text: --path FILE (- for stdin; --source text_dir|ultrachat|sample for others), "
            "--tokens FILE.npy, or --split val"
        )
    vocab = meta["vocab_size"]
    if split is not None:
        if split not in stages.SPLITS:
            raise UsageError(f"--split must be train or val, not {split!r}")
        ids, offsets = dataset.load_split(ws, split, meta)
        described = {"source": f"the run's {split} split", "dataset": meta["key"]}
        return Text(ids, offsets, _described(described, ids, offsets, None), False)
    if tokens is not None:
        ids = stages._user_array(tokens, "--tokens")
        stages._checked_input(ids, tokens, kind="int", below=vocab)
        offsets = np.asarray([0, len(ids)], dtype=np.int64)  # one document
        return Text(ids, offsets, _described({"source": "tokens", "path": str(tokens)}, ids, offsets, None), True)
    source = source or "text_file"
    if source not in TEXT_SOURCES:
        raise UsageError(f"eval reads --source {', '.join(TEXT_SOURCES)}, not {source!r}")
    where, digest = None, None
    if path is not None:
        where = "/dev/stdin" if path == "-" else path
        if source in ("text_file", "ultrachat"):
            _, digest = sources.settle(where, scratch)  # a pipe is read once
    tok = tokenizers.load_checked(ws.tokenizer(), vocab, dataset.FIX, meta.get("tokenizer_sha256"))
    paths = (scratch / "tokens.npy", scratch / "offsets.npy")
    docs = sources.documents(source, where, s.data, None)
    dataset.write_tokens(tok, docs, dataset.token_dtype(vocab), *paths, 0, "eval text")
    ids, offsets = np.load(paths[0], mmap_mode="r"), np.load(paths[1])
    if len(ids) == 0:
        raise UsageError(f"the text to evaluate ({path or source}) has no tokens")
    described = {"source": source, "path": path, "input_sha256": digest}
    return Text(ids, offsets, _described(described, ids, offsets, unknown_id(tok)), True)


def _described(d: dict, ids: np.ndarray, offsets: np.ndarray, unk: int | None) -> dict:
    return {
        **d,
        "tokens": int(len(ids)),
        "documents": int(len(offsets) - 1),
        "unknown_tokens": count_id(ids, unk),
        "sha256": fingerprint([validate.digest(ids), validate.digest(np.asarray(offsets))]),
    }


def evaluate(
    s: Settings,
    path: str | None = None,
    source: str | None = None,
    tokens: Path | None = None,
    split: str | None = None,
    val_path: str | None = None,
    val_source: str | None = None,
) -> dict:
    """The run's network, predictor and controls on another text; what phase2.json says of val.
    The text: --path FILE (- for stdin) with --source text_file, text_dir, ultrachat or sample (or
    the same as --val-source/--val-path), --tokens FILE.npy, or --split train|val.

    Returns eval.json's fields: text {source, path, tokens, documents, unknown_tokens, sha256}, val
    (the predictor: perplexity, accuracy), baselines (each control: val_perplexity, verdict, ratio
    and its interval), finding, warnings, provenance {model_id, head_id, dataset}, path."""
    ws, meta = stages.open_run(s)
    nofollow.makedirs(ws.run_dir / "eval")
    scratch = Path(tempfile.mkdtemp(prefix=f".text.{os.getpid()}.", dir=ws.run_dir / "eval"))
    try:
        if (source or path) and (val_source or val_path):
            raise UsageError("give the text once: --source/--path or --val-source/--val-path")
        text = read_text(ws, s, meta, scratch, (source or val_source, path or val_path), tokens, split)
        return _evaluate(s, ws, meta, text)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _evaluate(s: Settings, ws: Workspace, meta: dict, text: Text) -> dict:
    head = read_weights(ws.phase2_checkpoint(), "Phase 2 checkpoint (run `newllm phase2`)", "newllm phase2")
    mid, head_id = head["provenance"].get("model_id"), head["provenance"].get("head_id")
    key = fingerprint({"text": text.described["sha256"], "model_id": mid, "head_id": head_id})
    info(
        f"eval: {text.described['tokens']:,} tokens in {text.described['documents']:,} documents"
        f" ({text.described['unknown_tokens']:,} unknown to the tokenizer) -> eval/{key}"
    )
    kept = [n for n in Workspace.EVALUATED if text.stored or n not in ("tokens.npy", "offsets.npy")]
    outputs = [ws.evaluation(key, name) for name in kept]
    inputs = stages._dataset_files(ws) + [ws.phase1_checkpoint(), ws.phase2_checkpoint(), ws.contexts("train")]
    given = stages._given(s, "model", "phase1", "phase2", text=text.described["sha256"])
    group = distributed.current()
    return uptodate.run_once(  # the run's settings.json is not rewritten: eval changes no stage of the run
        ws, f"eval {key}", given, inputs, outputs, lambda: _measure(s, ws, meta, text, key, head_id), False, group,
        group.barrier,
    )  # fmt: skip


def _measure(s: Settings, ws: Workspace, meta: dict, text: Text, key: str, head_id: str | None) -> dict:
    t0 = time.perf_counter()
    device = stages.resolve_device(s.runtime.device)
    model, ckpt = stages.load_phase1_model(ws, s, meta, device)
    mid, vocab = ckpt["model_id"], meta["vocab_size"]
    if text.stored:
        write_array(ws.evaluation(key, "tokens.npy"), text.tokens)
        write_array(ws.evaluation(key, "offsets.npy"), np.asarray(text.offsets))
    rows, fix = len(text.tokens), "newllm eval"
    paths_ctx = (ws.evaluation(key, "contexts.npy"), ws.evaluation(key, "contexts.json"))
    ctx = stages.solved_once(
        ws, s, model, device, paths_ctx,
        {"text": text.described["sha256"], "model_id": mid, "phase1": s.phase1.model_dump()}, "eval",
        lambda: (text.tokens, text.offsets), rows, fix, seed=s.runtime.seed,
    )  # fmt: skip
    train_ctx, _ = stages.load_contexts(ws, "train", meta, s.model.context_width, expected_model=mid)
    train_tokens, train_offsets = dataset.load_split(ws, "train", meta)
    splits = {"train": (train_ctx, train_tokens, train_offsets), "val": (ctx, text.tokens, text.offsets)}
    paths = {"train": ws.control_report("train"), "val": ws.evaluation(key, "control.json")}

    def control(split: str, net) -> np.ndarray:
        if split == "train":
            return stages.control_contexts(ws, s, meta, "train", net, device)
        return stages.solved_once(
            ws, s, net, device, (ws.evaluation(key, "control_contexts.npy"), paths["val"]),
            {"text": text.described["sha256"], "model_id": stages.model_id(net), "phase1": s.phase1.model_dump()},
            "eval control", lambda: (text.tokens, text.offsets), rows, fix,
        )  # fmt: skip

    res, table, _, warnings, chosen = stages.judge(
        s, ws, model, mid, splits, vocab, device, control, paths, None, stage="eval"
    )
    refit = stages.model_id(chosen.head(res))
    if head_id is not None and refit != head_id:
        raise RefusedError(
            f"the predictor fitted again on the run's training split ({refit}) is not phase2's ({head_id}): "
            "the run's settings or inputs changed since; run `newllm phase2` again"
        )
    out = {
        "text": text.described,
        **stages.scored(res, chosen.record(res), table, warnings),
        "provenance": {
            "dataset": meta["key"],
            "model_id": mid,
            "head_id": refit,
            "head_input": s.phase2.head_input,
            "predictor": s.phase2.predictor,
            "vocab_size": vocab,
        },  # fmt: skip
        "finding": verdict.finding(table)
        + stages.resting(read_json(latest(paths_ctx[1]), "eval contexts report").get("fixed_point"), paths["val"])
        + " "
        + verdict.beyond_three(table),
        "path": str(ws.evaluation(key, "eval.json")),
        "seconds": time.perf_counter() - t0,
    }
    write_json(ws.evaluation(key, "eval.json"), out)
    return out


def results(ws: Workspace) -> list[dict]:
    """Every evaluation kept under a run (runs/NAME/eval/*/eval.json), oldest first."""
    found = []
    for p in sorted(ws.evaluations(), key=lambda p: p.stat().st_mtime):
        try:
            found.append(read_json(p, "evaluation"))
        except RefusedError:
            continue
    return found
