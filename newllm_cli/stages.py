"""The five stages as plain functions: settings in, artifacts on disk, a JSON-able summary out.

Every stage reads its inputs from the workspace and checks their provenance, so any stage can be
rerun alone and nothing produced under other settings is silently mixed in. Under torchrun every
rank runs the same stage: Phase 1 and the heads on its share of the documents, the rest whole
(distributed.py); only the leader writes.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from newllm_cli.data import dataset, embeddings
from newllm_cli.data import tokenizer as tokenizers
from newllm_cli.evaluation import analysis, baselines, decodability, memory, plots, verdict
from newllm_cli.evaluation.controls import CONTROLS, Bench, label
from newllm_cli.model import architectures
from newllm_cli.model import generate as gen
from newllm_cli.model.head import Head
from newllm_cli.model.network import ContextNetwork
from newllm_cli.model.recurrence import embedding_table
from newllm_cli.model.side_by_side import SideBySide
from newllm_cli.runtime import distributed, interrupt
from newllm_cli.runtime.errors import GateRefused, RefusedError, UsageError, first_line
from newllm_cli.runtime.progress import info, log_to, warn
from newllm_cli.settings import PROBE_ROWS, ModelSettings, Settings
from newllm_cli.store import metrics, uptodate, validate
from newllm_cli.store.artifacts import (
    Workspace,
    check_same,
    publishes,
    read_array,
    read_json,
    write_json,
)
from newllm_cli.store.publish import latest, together
from newllm_cli.store.resume import Resumable
from newllm_cli.store.weights import read_weights, write_weights
from newllm_cli.training import fixed_point, predictors
from newllm_cli.training import pairs as p2
from newllm_cli.training.blocks import run_side_by_side
from newllm_cli.training.objectives import objective_weights
from newllm_cli.training.phase1 import prompt_context, run_cvfp

SPLITS = ("train", "val")


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def apply_threads(threads: int) -> None:
    """--threads: torch's and numba's pools (0 keeps one thread per core)."""
    if threads:
        torch.set_num_threads(threads)
        try:
            import numba

            numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))  # type: ignore[attr-defined]
        except ImportError:  # pragma: no cover
            pass


def open_run(s: Settings) -> tuple[Workspace, dict]:
    """The run's workspace and its prepared dataset."""
    ws, meta = dataset.load_meta(s)
    ws.preflight()
    ws.ensure()
    log_to(ws.log())
    return ws, meta


def finish_stage(ws: Workspace, s: Settings) -> None:
    """Only a stage that succeeded records its settings: a refused one must not change the run.
    Every rank of a job waits here for the others, so the next stage reads what the leader wrote."""
    write_json(ws.settings(), s.model_dump())
    distributed.current().barrier()


def embedding_hash(model: ContextNetwork) -> str:
    """The embedding's content hash, equal to a loaded file's Embeddings.sha256: provenance names its content."""
    return embeddings.content_hash(model.embed.weight.detach().cpu().numpy())


def model_id(model: torch.nn.Module) -> str:
    """A content hash of the weights: what every context artifact records as its producer."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def budget(ws: Workspace, s: Settings) -> dict:
    """The memory budget in bytes, and where Phase 1 contexts and Phase 2 pairs go beyond it."""
    return {"memory_budget": int(s.runtime.memory_budget * 2**30), "scratch": ws.run_dir}


def board(ws: Workspace, s: Settings) -> Path | None:
    """Where --tensorboard events go (None when off); refuses at once when the package is missing,
    not after the work."""
    if not s.runtime.tensorboard:
        return None
    if importlib.util.find_spec("tensorboard") is None:
        raise UsageError("--tensorboard needs the tensorboard package: pip install 'newllm[tensorboard]'")
    return ws.tensorboard()


def build_model(s: Settings, vocab_size: int, pretrained: bool = True) -> ContextNetwork:
    """The network as the seed draws it; with --embeddings (and `pretrained`), their matrix replaces
    the drawn embedding (drawn all the same, so the other weights do not depend on it). A network
    whose weights alone exceed the machine's memory is refused before anything is allocated."""
    with torch.device("meta"):  # shapes only: no memory
        need = sum(
            p.numel() * p.element_size()
            for p in architectures.build(s.model.architecture, vocab_size, s.model).parameters()
        )
    have = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if need > have:
        raise UsageError(
            f"the network's weights alone need {need / 2**30:.1f} GiB, more than this machine's "
            f"{have / 2**30:.1f} GiB of memory: choose a smaller --context-dim, --embed-dim or --num-layers"
        )
    model = architectures.build(s.model.architecture, vocab_size, s.model)
    if pretrained and s.model.embeddings:
        matrix = embeddings.load(s.model.embeddings, s.model.embeddings_tensor, vocab_size, s.model.embed_dim).matrix
        with torch.no_grad():
            model.embed.weight.copy_(torch.from_numpy(matrix))
    return model


def embedding_files(s: Settings) -> list[Path]:
    """A local --embeddings file, an input of the stages that draw a network: a changed file reruns them."""
    spec = s.model.embeddings
    return [Path(spec)] if spec and spec not in embeddings.HUB else []


def load_phase1_model(ws: Workspace, s: Settings, meta: dict, device: torch.device) -> tuple[ContextNetwork, dict]:
    fix = "newllm phase1 --split train"
    ckpt = read_weights(ws.phase1_checkpoint(), f"Phase 1 checkpoint (run `{fix}`)", fix)
    made = ckpt["provenance"].get("model")
    if isinstance(made, dict):  # a checkpoint from before a model setting existed was made at its default
        made = {**ModelSettings().model_dump(), **made}
    check_same(
        {"dataset": meta["key"], "model": s.model.model_dump()},
        {"dataset": ckpt["provenance"].get("dataset"), "model": made},
        "the Phase 1 checkpoint",
    )
    model = build_model(s, meta["vocab_size"], pretrained=False)  # the checkpoint holds the embedding
    validate.state(model, ckpt, ws.phase1_checkpoint(), fix, keys=("state", "provenance", "model_id"))
    if model_id(model) != ckpt["model_id"]:  # the id every context artifact is matched against: recomputed
        raise validate.Damaged(ws.phase1_checkpoint(), "its weights are not the network its model_id names", fix)
    return model.to(device), ckpt


def prepare_data(s: Settings) -> dict:
    """Read the sources, build or load the tokenizer, write train and val token arrays (cached)."""
    out = dataset.prepare(s)
    ws = Workspace(s.runtime.workspace, s.runtime.run)  # the run's settings need no dataset key
    ws.preflight()
    ws.ensure()
    log_to(ws.log())
    finish_stage(ws, s)
    return out


def rebuild_upstream(s: Settings, upto: str) -> None:
    """--rebuild: rerun every stage before `upto`, so mismatched inputs are replaced, not refused."""
    order = ["prepare", "phase1_train", "phase1_val", "analyze"]
    steps = {
        "prepare": lambda: prepare_data(s),
        "phase1_train": lambda: _phase1(s, "train", force=True),
        "phase1_val": lambda: _phase1(s, "val", force=True),
        "analyze": lambda: _analyze(s, force=True),
    }
    for name in order[: order.index(upto)] if upto in order else order:
        info(f"rebuild: {name}")
        steps[name]()


def _given(s: Settings, *sections: str, **extra) -> dict:
    """What a stage's result depends on: its settings sections, the seed, device and threads (float
    sums differ between thread counts), the dataset; not where files go or how memory is used."""
    rt = s.runtime
    return {
        **{name: getattr(s, name).model_dump() for name in sections},
        "data": s.data.model_dump(),
        "runtime": {"seed": rt.seed, "device": rt.device, "threads": rt.threads, "tensorboard": rt.tensorboard},
        **extra,
    }


def _once(
    ws: Workspace, s: Settings, name: str, given: dict, inputs: list[Path], outputs: list[Path], compute, force: bool
) -> dict:
    """compute() unless stage `name` is up to date (uptodate.py); a skipped stage ends as a run one does."""
    return uptodate.run_once(
        ws, name, given, inputs, outputs, compute, force, distributed.current(), lambda: finish_stage(ws, s)
    )


def _dataset_files(ws: Workspace) -> list[Path]:
    return [ws.dataset_meta(), ws.tokenizer(), *(f(split) for split in SPLITS for f in (ws.tokens, ws.offsets))]


def phase1(s: Settings, split: str = "train", rebuild: bool = False) -> dict:
    """Train the context blocks on `train`, or find the val fixed points with the trained network."""
    if split not in SPLITS:
        raise UsageError(f"--split must be train or val, not {split!r}")
    if rebuild:
        rebuild_upstream(s, f"phase1_{split}")
    return _phase1(s, split, force=rebuild)


def _phase1(s: Settings, split: str, force: bool = False) -> dict:
    ws, meta = open_run(s)
    outputs = [ws.contexts(split), ws.phase1_report(split)] + ([ws.phase1_checkpoint()] if split == "train" else [])
    inputs = _dataset_files(ws) + ([ws.phase1_checkpoint()] if split == "val" else embedding_files(s))
    return _once(
        ws,
        s,
        f"phase1 {split}",
        _given(s, "model", "phase1", split=split),
        inputs,
        outputs,
        lambda: _train_or_solve(s, split, ws, meta),
        force,
    )


def _train_or_solve(s: Settings, split: str, ws: Workspace, meta: dict) -> dict:
    events = board(ws, s)
    tokens, offsets = dataset.load_split(ws, split, meta)
    device = resolve_device(s.runtime.device)
    train = split == "train"
    if train:
        torch.manual_seed(s.runtime.seed)
        model = build_model(s, meta["vocab_size"]).to(device)
        mid = None  # known after training
    else:
        model, ckpt = load_phase1_model(ws, s, meta, device)
        mid = ckpt["model_id"]  # validation never changes the weights
    cfg = s.phase1
    info(
        f"phase1 {split}: {len(tokens):,} tokens in {len(offsets) - 1:,} documents, "
        f"{cfg.scheme} scheme{' (concat)' if cfg.concat else ''}"
    )

    def show(r: dict) -> None:
        if r["converged_ratio"] is None:
            info(f"  iteration {r['iteration']:>2}: first pass {r['seconds']:.2f}s")
        elif r["cvfp_loss"] is None:  # a pass of a solve to --fixed-point-tol
            info(
                f"  pass {r['iteration']:>2}: {r['converged_ratio']:6.1%} of tokens in solved documents, worst "
                f"relative carry-over {r['residual']:.2g}  {r['seconds']:.2f}s"
            )
        else:
            terms = "  ".join(f"{k[:-5]} {v:.5g}" for k, v in r.items() if k.endswith("_loss") and v is not None)
            info(
                f"  iteration {r['iteration']:>2}: {terms}  "
                f"converged {r['converged_ratio']:6.1%}  lr {r['lr'] or 0:.0e}  {r['seconds']:.2f}s"
            )

    t0 = time.perf_counter()
    resumable = Resumable(
        ws.resume(f"phase1_{split}"),
        {
            "dataset": meta["key"],
            "model": s.model.model_dump(),
            "phase1": cfg.model_dump(),
            "seed": s.runtime.seed,
            "split": split,
            "network": mid,
            "memory_budget": s.runtime.memory_budget,  # where rows live changes float sums: resume only alike
        },
    )
    group = distributed.current()
    side_by_side = train and isinstance(model, SideBySide)
    run: Callable[..., Any] = run_side_by_side if side_by_side else run_cvfp
    parts: list[dict] | None = None

    def work(resume: dict | None):
        return run(
            model,
            tokens,
            offsets,
            cfg,
            device=device,
            on_iteration=show,
            label=f"phase1 {split}",
            resume=resume,
            save_resume=resumable.save,
            group=group,
            save_every=s.runtime.save_every,
            seed=s.runtime.seed,
            **budget(ws, s),
            **({} if side_by_side else {"train": train}),
        )

    with interrupt.safe_points():
        res = resumable.run(work)
    if side_by_side:
        res, parts = res
    seconds = time.perf_counter() - t0
    for w in res.warnings:
        warn(w)
    if train:
        mid = model_id(model)
        write_weights(
            ws.phase1_checkpoint(),
            {
                "state": model.state_dict(),
                "vocab_size": meta["vocab_size"],
                "model_id": mid,
                "provenance": {
                    "dataset": meta["key"],
                    "model": s.model.model_dump(),
                    "embeddings": embedding_hash(model),
                    "phase1": cfg.model_dump(),
                    "seed": s.runtime.seed,
                    "world_size": group.size,
                },
            },
        )
    digest = saved_contexts(res, ws.contexts(split))
    iterations = len(res.history) + len(res.solve)
    report = {
        "split": split,
        "architecture": s.model.architecture,
        "objective": objective_weights(cfg),
        "tokens": int(len(tokens)),
        "documents": int(len(offsets) - 1),
        "iterations": iterations,
        "optimizer_steps": res.optimizer_steps,
        "converged_ratio": res.converged_ratio,
        "residual": res.residual,
        "stopped_by": res.stopped_by,
        "solve": res.solve,
        "fixed_point": res.fixed_point,
        **({"fixed_point_solve": res.solve_report} if res.solve_report else {}),
        "warnings": res.warnings,
        "seconds": seconds,
        "token_iterations_per_second": len(tokens) * iterations / max(seconds, 1e-9),
        "history": res.history,
        **({"blocks": parts} if parts is not None else {}),
        "contexts": str(ws.contexts(split)),
        "contexts_sha256": digest,
        "provenance": {
            "dataset": meta["key"],
            "model_id": mid,
            "model": s.model.model_dump(),
            "world_size": group.size,
        },
    }
    write_json(ws.phase1_report(split), report)
    metrics.record(ws.metrics(), "phase1", split, res.history, events)
    metrics.record(ws.metrics(), "phase1_solve", split, res.solve, events)
    for part in parts or []:
        metrics.record(ws.metrics(), f"phase1_block{part['block']}", split, part["history"], events)
    resumable.clear()
    finish_stage(ws, s)
    return report


def load_contexts(
    ws: Workspace, split: str, meta: dict, width: int, expected_model: str | None = None
) -> tuple[np.ndarray, dict]:
    """A split's saved contexts and their report, checked: N x C, finite, from these inputs."""
    fix = f"newllm phase1 --split {split}"
    rep = read_json(ws.phase1_report(split), f"{split} contexts report (run `{fix}`)", fix, validate.Phase1Report)
    expected = {"dataset": meta["key"]}
    if expected_model:
        expected["model_id"] = expected_model
    check_same(expected, rep["provenance"], f"the {split} contexts")
    ctx = validate.array(
        read_array(ws.contexts(split), f"{split} contexts", fix),
        ws.contexts(split),
        fix,
        kind="float",
        rows=meta[split]["tokens"],
        cols=width,
        finite=True,
        sha256=rep.get("contexts_sha256"),  # runs made before these checks lack it
    )
    return ctx, rep


def analyze(
    s: Settings,
    contexts: Path | None = None,
    tokens: Path | None = None,
    tokenizer_file: Path | None = None,
    plot: Path | None = None,
    rebuild: bool = False,
    probe_rows: int = PROBE_ROWS,
) -> dict:
    """Analyse the run's train and val contexts (or any contexts .npy) and apply the Phase-1 gate.

    --json prints one object. Per split ("train", "val"; "contexts" for --contexts): n, dim,
    attainable_rank (C-1), centred and information (uncentred): effective_rank, actual_rank,
    singular_values; global_attractor, zero_solution, distribution; steps: norm_spread,
    consecutive_cosine, autocorrelation {lag_1, lag_10, lag_100}; directions. Then decodability:
    rows {train, val} and probes {token_from_context, token_from_step, next_from_context}, each
    {phase1, untrained, gaussian}: val_perplexity, val_accuracy, train_perplexity, train_accuracy, l2;
    control_steps {train, val} (the untrained network's steps); gate {passed, problems}; path.
    """
    if probe_rows < 0:
        raise UsageError("--probe-rows must not be negative")
    if contexts is not None:
        return analyze_file(s, contexts, tokens, tokenizer_file, plot)
    if rebuild:
        rebuild_upstream(s, "analyze")
    return _analyze(s, plot, probe_rows, force=rebuild)


def _analyze(s: Settings, plot: Path | None = None, probe_rows: int = PROBE_ROWS, force: bool = False) -> dict:
    ws, meta = open_run(s)
    inputs = _dataset_files(ws) + [f(split) for split in SPLITS for f in (ws.contexts, ws.phase1_report)]
    given = _given(s, "model", "phase1", probe_rows=probe_rows)
    return _once(
        ws,
        s,
        "analyze",
        given,
        inputs,
        [ws.analysis()],
        lambda: _analyze_run(s, ws, meta, plot, probe_rows),
        force or plot is not None,
    )


def _analyze_run(s: Settings, ws: Workspace, meta: dict, plot: Path | None, probe_rows: int) -> dict:
    tok = tokenizers.load_checked(ws.tokenizer(), meta["vocab_size"], dataset.FIX, meta.get("tokenizer_sha256"))
    reports, ids, data, ctxs = {}, {}, {}, {}
    network = None  # loaded once, for the contraction figures
    for split in SPLITS:
        if not ws.phase1_report(split).exists():
            continue
        ctx, rep = load_contexts(ws, split, meta, s.model.context_width)
        toks, offs = dataset.load_split(ws, split, meta)
        reports[split] = analysis.analyze_contexts(
            ctx, seed=s.runtime.seed, tokens=toks, decode=tok.decode, offsets=offs
        )
        reports[split]["memory"] = memory.token_share(ctx, toks)
        reports[split]["stopped_by"] = rep.get("stopped_by")
        reports[split]["optimizer_steps"] = rep.get("optimizer_steps")
        if rep.get("fixed_point"):  # how far the contexts are from a fixed point (phase1's check)
            reports[split]["fixed_point"] = rep["fixed_point"]
        if not s.phase1.concat:  # one document the size of the corpus has no pass to linearise
            if network is None:
                network = load_phase1_model(ws, s, meta, resolve_device(s.runtime.device))[0]
                table = embedding_table(network, resolve_device(s.runtime.device))
            reports[split]["contraction"] = fixed_point.contraction(network, table, toks, offs, ctx, s.runtime.seed)
        ids[split], data[split], ctxs[split] = rep["provenance"]["model_id"], (toks, offs), ctx
    if not reports:
        raise RefusedError("no contexts to analyse: run `newllm phase1` first")
    if len(set(ids.values())) > 1:
        raise RefusedError(f"train and val contexts come from different networks ({ids}); rerun phase1 --split val")
    gate = analysis.gate(reports.get("train"), reports.get("val"))
    out: dict[str, Any] = {
        **reports,
        "gate": {"passed": not gate, "problems": gate},
        "architecture": s.model.architecture,
        "objective": objective_weights(s.phase1),
        "provenance": {"dataset": meta["key"], "model_id": next(iter(ids.values()))},
        "path": str(ws.analysis()),
    }
    if probe_rows and len(reports) == 2:
        device = resolve_device(s.runtime.device)
        untrained = untrained_network(s, meta["vocab_size"], device)
        control = tuple(control_contexts(ws, s, meta, split, untrained, device) for split in SPLITS)
        out["decodability"] = decodability.probe_all(
            {"phase1": (ctxs["train"], ctxs["val"]), "untrained": control},
            data["train"],
            data["val"],
            meta["vocab_size"],
            rows=probe_rows,
            seed=s.runtime.seed,
            device=device,
            on_fit=lambda what: info(f"probe: {what}"),
        )
        out["control_steps"] = {split: analysis.steps(c, data[split][1]) for split, c in zip(SPLITS, control)}
    if plot is not None:
        out["plots"] = [str(plots.spectrum(reports, plot))]
        histories = {
            split: read_json(
                ws.phase1_report(split),
                f"{split} Phase 1 report",
                f"newllm phase1 --split {split}",
                validate.Phase1Report,
            )["history"]
            for split in SPLITS
            if ws.phase1_report(split).exists()
        }
        out["plots"].append(str(plots.convergence(histories, s.phase1.min_converged_ratio, plot)))
    write_json(ws.analysis(), out)
    finish_stage(ws, s)
    return out


def analyze_file(
    s: Settings, contexts: Path, tokens: Path | None, tokenizer_file: Path | None, plot: Path | None
) -> dict:
    """Contexts made by anything: an N x C float .npy, optionally token ids and a tokenizer to decode."""
    ctx = _user_array(contexts, "contexts")
    if ctx.ndim != 2 or ctx.dtype.kind != "f" or 0 in ctx.shape:
        raise UsageError(f"{contexts}: expected a non-empty N x C float array, found {ctx.dtype} {ctx.shape}")
    _checked_input(ctx, contexts, kind="float", cols=ctx.shape[1], finite=True)
    ids = None
    if tokens is not None:
        ids = _user_array(tokens, "tokens")
        if ids.ndim != 1 or len(ids) != len(ctx) or ids.dtype.kind not in "iu":
            found = f"{ids.dtype} {ids.shape}"
            raise UsageError(f"{tokens}: expected {len(ctx)} integer token ids (one per row), found {found}")
    decode, vocab = None, 2**63 - 1
    if tokenizer_file is not None:
        if ids is None:
            raise UsageError("--tokenizer-file needs --tokens")
        try:
            tok = tokenizers.pretrained(str(tokenizer_file))
        except Exception as e:  # the tokenizers library's own error types
            raise UsageError(f"cannot load tokenizer {tokenizer_file}: {first_line(e)}") from None
        decode, vocab = tok.decode, tok.get_vocab_size()
    if ids is not None and tokens is not None:
        _checked_input(ids, tokens, kind="int", below=vocab)
    rep = analysis.analyze_contexts(ctx, seed=s.runtime.seed, tokens=ids, decode=decode)
    gate = analysis.gate(rep, None)
    out_path = contexts.with_name(contexts.stem + ".analysis.json")
    out = {"contexts": rep, "gate": {"passed": not gate, "problems": gate}, "path": str(out_path)}
    if plot is not None:
        out["plots"] = [str(plots.spectrum({"contexts": rep}, plot))]
    write_json(out_path, out)
    return out


def _checked_input(a: np.ndarray, path: Path, **checks) -> None:
    """validate.array for a file the user gave: its problem is a usage error (exit 2), not damage."""
    try:
        validate.array(a, path, "", **checks)
    except validate.Damaged as e:
        raise UsageError(f"{path}: {e.problem}") from None


def _user_array(path: Path, what: str) -> np.ndarray:
    """A .npy array given on the command line, memory-mapped; anything else is one line, exit 2."""
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as e:
        raise UsageError(f"cannot read {what} {path}: {e.strerror or e}") from None
    if magic != b"\x93NUMPY":
        raise UsageError(f"cannot read {what} {path}: not a .npy array" + ("" if magic else " (empty file)"))
    try:
        return np.load(path, mmap_mode="r")
    except Exception as e:  # numpy: ValueError (object arrays), EOFError, SyntaxError (damaged header)
        raise UsageError(
            f"cannot read {what} {path}: a damaged or object .npy ({first_line(e) if str(e) else 'empty'})"
        ) from None


def untrained_network(s: Settings, vocab: int, device: torch.device) -> ContextNetwork:
    """The control: the network as initialised by the run's seed, before any Phase 1 step."""
    torch.manual_seed(s.runtime.seed)
    return build_model(s, vocab).to(device)


def control_contexts(
    ws: Workspace, s: Settings, meta: dict, split: str, untrained: ContextNetwork, device: torch.device
) -> np.ndarray:
    """The untrained network's fixed contexts of a split: the control every verdict is measured
    against. Computed once per run and settings, then read from disk."""
    key = {"dataset": meta["key"], "model_id": model_id(untrained), "phase1": s.phase1.model_dump()}
    return solved_once(
        ws, s, untrained, device, (ws.control_contexts(split), ws.control_report(split)), key, f"control {split}",
        lambda: dataset.load_split(ws, split, meta), meta[split]["tokens"], "newllm phase2",
    )  # fmt: skip


def solved_once(
    ws: Workspace,
    s: Settings,
    network: ContextNetwork,
    device: torch.device,
    paths: tuple[Path, Path],
    key: dict,
    label: str,
    text: Callable[[], tuple[np.ndarray, np.ndarray]],
    rows: int,
    fix: str,
    seed: int = 0,
) -> np.ndarray:
    """A frozen network's fixed contexts of `text()` (tokens, offsets), saved at paths (contexts,
    report) with `key` as their provenance; read back while the key still matches. `seed`: of a
    random iteration 0 (`phase1 --split val` passes the run's; the control has always had 0)."""
    path, rep_path = paths
    width = network.context_dim
    if path.exists() and rep_path.exists():
        try:
            rep = read_json(rep_path, "control report", fix, validate.ControlReport)
            if rep["provenance"] == key:
                return validate.array(
                    read_array(path, f"{label} contexts", fix),
                    path,
                    fix,
                    kind="float",
                    rows=rows,
                    cols=width,
                    finite=True,
                    sha256=rep.get("contexts_sha256"),
                )
        except RefusedError as e:
            warn(f"recomputing the {label} contexts: {e}")
    tokens, offsets = text()
    info(f"{label}: fixed contexts of the frozen network ({len(tokens):,} tokens)")
    res = run_cvfp(
        network,
        tokens,
        offsets,
        s.phase1,
        train=False,
        device=device,
        label=label,
        group=distributed.current(),
        seed=seed,
        **budget(ws, s),
    )
    with together():
        digest = saved_contexts(res, path)
        write_json(
            rep_path,
            {
                "converged_ratio": res.converged_ratio,
                "residual": res.residual,
                "iterations": len(res.history),
                "fixed_point": res.fixed_point,
                **({"fixed_point_solve": res.solve_report} if res.solve_report else {}),
                "stopped_by": res.stopped_by,
                "warnings": res.warnings,
                "contexts_sha256": digest,
                "provenance": key,
            },
        )
    for w in res.warnings:
        warn(f"{label}: {w}")
    return read_array(latest(path), f"{label} contexts", fix)


def saved_contexts(res, path: Path) -> str | None:
    """Save a pass's contexts; their content hash, which the report records and every reader checks
    (the leader's: it alone writes reports)."""
    res.save_contexts(path)
    return validate.digest(read_array(latest(path), "contexts")) if publishes() else None


def control_check(s: Settings, reports: dict[str, Path]) -> dict:
    """Whether the untrained control's own solve reached its target, on each split, from its reports:
    every document within --fixed-point-tol (a carry-over solver), or the converged share (iterate).
    A verdict against a control that did not converge is against contexts that depend on where its
    iteration stopped."""
    out: dict[str, Any] = {}
    for split, path in reports.items():
        rep = read_json(latest(path), "control report", "newllm phase2", validate.ControlReport)

        solve = rep.get("fixed_point_solve")
        if solve:
            ok, said = solve["failing"] == 0, f"{solve['documents'] - solve['failing']}/{solve['documents']} documents"
        else:
            ratio = rep.get("converged_ratio") or 0.0
            ok, said = ratio >= s.phase1.min_converged_ratio, f"{ratio:.1%} of tokens"
        out[split] = {"converged": ok, "reached": said, "warnings": rep.get("warnings", [])}
    out["converged"] = all(v["converged"] for v in out.values())
    return out


def phase2(s: Settings, force: bool = False, rebuild: bool = False, plot: Path | None = None) -> dict:
    """Fit the head on the saved contexts, behind the Phase-1 gate, beside baselines and the control."""
    if rebuild:
        rebuild_upstream(s, "phase2")
    return _phase2(s, force, plot, fresh=rebuild)


def _phase2(s: Settings, force: bool = False, plot: Path | None = None, fresh: bool = False) -> dict:
    ws, meta = open_run(s)
    inputs = _dataset_files(ws) + [
        ws.phase1_checkpoint(),
        ws.analysis(),
        *(f(split) for split in SPLITS for f in (ws.contexts, ws.phase1_report)),
    ]
    given = _given(s, "model", "phase1", "phase2", force=force)
    return _once(
        ws,
        s,
        "phase2",
        given,
        inputs,
        [ws.phase2_checkpoint(), ws.phase2_report()],
        lambda: _fit_phase2(s, ws, meta, force, plot),
        fresh or plot is not None,
    )


def _fit_phase2(s: Settings, ws: Workspace, meta: dict, force: bool, plot: Path | None) -> dict:
    t0 = time.perf_counter()
    board(ws, s)
    device = resolve_device(s.runtime.device)
    model, ckpt = load_phase1_model(ws, s, meta, device)
    mid = ckpt["model_id"]
    splits = {}
    for split in SPLITS:
        ctx, _ = load_contexts(ws, split, meta, s.model.context_width, expected_model=mid)
        tokens, offsets = dataset.load_split(ws, split, meta)
        splits[split] = (ctx, tokens, offsets)
    try:
        ana = (
            read_json(ws.analysis(), "analysis", "newllm analyze", validate.AnalysisReport)
            if ws.analysis().exists()
            else None
        )
    except RefusedError as e:  # this stage can make it again
        warn(f"recomputing the analysis: {e}")
        ana = None
    if ana is None or ana["provenance"].get("model_id") != mid or ana.get("val") is None:
        info("phase2: the gate needs an analysis of these contexts: running `newllm analyze` first (no probes)")
        ana = _analyze(s, probe_rows=0)
    cfg, vocab = s.phase2, meta["vocab_size"]
    problems = distributed.current().broadcast(analysis.gate(ana.get("train"), ana.get("val")))  # the leader's
    if problems:
        if not force:
            raise GateRefused("Phase-1 gate: " + "; ".join(problems) + " (--force to train anyway)")
        warn("Phase-1 gate overridden: " + "; ".join(problems))
    reads = "the token and " + cfg.head_input.split("+")[0] if cfg.predictor != predictors.DEFAULT else cfg.head_input
    info(f"phase2: {cfg.predictor} predictor reads {reads}, vocabulary {vocab:,}")
    judged = judge(
        s, ws, model, mid, splits, vocab, device,
        lambda split, net: control_contexts(ws, s, meta, split, net, device),
        {split: ws.control_report(split) for split in SPLITS}, ana.get("val"),
    )  # fmt: skip
    res, table, curves, warnings, chosen = judged
    provenance = {
        "dataset": meta["key"],
        "model_id": mid,
        "head_input": cfg.head_input,
        "predictor": cfg.predictor,
        "vocab_size": vocab,
        "world_size": distributed.current().size,
    }
    head, record = chosen.head(res), chosen.record(res)
    kept = {k: record[k] for k in ("l2",) if k in record}  # the linear head's penalty, as before
    provenance["head_id"] = model_id(head)
    write_weights(ws.phase2_checkpoint(), {"state": head.state_dict(), "provenance": provenance, **kept})
    out = {
        **scored(res, record, table, warnings),
        "curves": curves,
        "gate": {"passed": not problems, "problems": problems, "forced": bool(problems)},
        "settings": cfg.model_dump(),
        "provenance": provenance,
        "checkpoint": str(ws.phase2_checkpoint()),
        "finding": verdict.finding(table)
        + resting((ana.get("val") or {}).get("fixed_point"), ws.control_report("val"))
        + " "
        + verdict.beyond_three(table),
        "seconds": time.perf_counter() - t0,
    }
    if plot is not None:
        out["plots"] = [str(plots.phase2(out, plot))]
    write_json(ws.phase2_report(), out)
    finish_stage(ws, s)
    return out


def scored(res, record: dict, table: dict, warnings: list[str]) -> dict:
    """The figures phase2.json and eval.json share: the predictor's, every control's, what was skipped."""
    return {
        "val": res.val,
        "train": res.train,
        **record,
        "baselines": table,
        "skipped": [c.label for c in CONTROLS if c.key not in table],
        "warnings": warnings,
    }


def judge(
    s: Settings,
    ws: Workspace,
    model: ContextNetwork,
    mid: str,
    splits: dict,
    vocab: int,
    device: torch.device,
    control_of: Callable[[str, ContextNetwork], np.ndarray],
    control_reports: dict[str, Path],
    val_analysis: dict | None,
    stage: str = "phase2",
) -> tuple[Any, dict, dict, list[str], predictors.Predictor]:
    """The chosen predictor fitted on splits["train"] (contexts, tokens, offsets) and scored on
    splits["val"], beside every control and baseline with its paired verdict: what `phase2` reports
    on the run's val split and `eval` on any other text. `control_of(split, network)` gives the untrained
    network's contexts of a split, `control_reports` where their solves are reported; `stage` names
    the resume points and metrics rows. Returns (fit, baselines table, curves, warnings, predictor)."""
    cfg = s.phase2
    res, val_groups, curves = fit_head_on(model, splits, s, vocab, device, "phase1 contexts", ws, mid, stage=stage)
    curves = {"head": curves}
    train_tokens, train_offsets = splits["train"][1], splits["train"][2]
    val_tokens, val_offsets = splits["val"][1], splits["val"][2]
    targets = np.asarray(val_tokens)[p2.pair_positions(val_offsets) + 1]

    held: dict[str, np.ndarray] = {}  # the control's val contexts, once fitted: for its memory share

    def fit_untrained():
        untrained = untrained_network(s, vocab, device)
        contexts = {
            split: (control_of(split, untrained), tok, off)
            for split, (_, tok, off) in splits.items()
        }  # fmt: skip
        held["val"] = contexts["val"][0]
        fit, _, blocks = fit_head_on(
            untrained, contexts, s, vocab, device, "untrained contexts", ws, model_id(untrained), stage=stage
        )
        return fit, blocks

    def fit_zero():
        fit, _, blocks = fit_head_on(model, splits, s, vocab, device, "zero contexts", ws, mid, zero=True, stage=stage)
        return fit, blocks

    chosen = predictors.PREDICTORS[cfg.predictor]
    bench = Bench(train_tokens, train_offsets, val_tokens, val_offsets, targets, vocab, s, fit_untrained, fit_zero,
                  lambda fit, label: chosen.advice(fit, label, cfg), lambda fit: chosen.record(fit))  # fmt: skip
    warnings = chosen.advice(res, "head", cfg)
    losses, table = {}, {}
    for control in CONTROLS:
        outcome = control.run(bench)
        if outcome is None:
            continue
        losses[control.key], table[control.key] = outcome.losses, outcome.entry
        if control.curve is not None and outcome.curves is not None:
            curves[control.curve] = outcome.curves
        warnings += outcome.warnings
    for key, entry in table.items():
        entry["val_perplexity"] = float(np.exp(np.mean(losses[key])))
        entry.update(verdict.compare(res.val_losses, losses[key], val_groups, seed=s.runtime.seed))
    if "untrained_network" in table:
        table["untrained_network"]["memory"] = memory.token_share(held["val"], val_tokens)
        less = analysis.remembers_less(val_analysis, table["untrained_network"])
        if less:
            warnings.append(less)
        checked = table["untrained_network"]["solve"] = control_check(s, control_reports)
        if not checked["converged"]:
            warnings.append(
                "the untrained control's solve did not converge ("
                + "; ".join(f"{sp}: {checked[sp]['reached']} within its target" for sp in control_reports)
                + "): the verdict against it depends on where its iteration stopped"
            )
    if table["unigram_add_one"]["verdict"] != "beats":
        warnings.append(
            "the head does not beat add-one unigram, its own starting point: the contexts add "
            "nothing a linear head can use beyond token frequencies"
        )
    warnings += sanity_warnings(res.val["perplexity"], table, vocab, len(train_tokens), len(val_tokens))
    for w in warnings:
        warn(w)
    return res, table, curves, warnings, chosen


def resting(mine: dict | None, control_report: Path) -> str:
    """What the verdicts rest on: the share of val documents whose saved contexts meet the carry-over
    condition c_0 = c_N (`mine`: the trained network's fixed-point check; the control's from its report)."""
    if not mine:
        return ""
    control = read_json(latest(control_report), "control report") if latest(control_report).exists() else {}
    theirs = control.get("fixed_point")
    other = f" (the control's: {theirs['within_tolerance']:.0%})" if theirs else ""
    return (
        f" These rest on val contexts of which {mine['within_tolerance']:.0%} of {mine['documents']:,} documents "
        f"meet the carry-over condition c_0 = c_N to {mine['tolerance']:g}{other}."
    )


MIN_VAL_TOKENS = 1000  # below this a perplexity's interval is too wide to say much


def sanity_warnings(head_perplexity: float, table: dict, vocab: int, train_tokens: int, val_tokens: int) -> list[str]:
    """What makes the printed figures hard to read: a model worse than guessing uniformly, a tiny
    validation set, fewer training tokens than vocabulary entries."""
    out = []
    worse = [
        name
        for name, ppl in [("the head", head_perplexity)] + [(label(k), b["val_perplexity"]) for k, b in table.items()]
        if ppl > vocab
    ]
    if worse:
        out.append(
            f"perplexity above the vocabulary size {vocab:,} ({', '.join(worse)}): worse than a uniform guess, "
            "so that model has learned frequencies the validation text does not share"
        )
    if val_tokens < MIN_VAL_TOKENS:
        out.append(
            f"the validation set has {val_tokens:,} tokens (under {MIN_VAL_TOKENS:,}): its perplexities "
            "and intervals rest on few predictions; give more validation text"
        )
    if train_tokens < vocab:
        out.append(
            f"the training set ({train_tokens:,} tokens) is smaller than the vocabulary ({vocab:,}): most "
            "entries are never seen, and every model's figures mostly measure smoothing"
        )
    return out


def fit_head_on(
    model: ContextNetwork,
    splits: dict,
    s: Settings,
    vocab: int,
    device: torch.device,
    label: str,
    ws: Workspace,
    network: str,
    zero: bool = False,
    predictor: str | None = None,
    stage: str = "phase2",
):
    """The predictor (training/predictors.py) of s.phase2 fitted on given (contexts, tokens, offsets)
    per split (`zero`: every context set to zero; `predictor`: another registry entry); resumable.
    Returns its result, the val pairs' document ids (for the verdicts' bootstrap) and its fitting curve."""
    cfg, group = s.phase2, distributed.current()
    name = predictor or cfg.predictor
    chosen = predictors.PREDICTORS[name]

    def embed(ids: np.ndarray) -> torch.Tensor:
        with torch.no_grad():
            return model.embed_tokens(torch.as_tensor(ids, device=device))

    features = embed if cfg.head_input == "context+token" and not chosen.reads_token else None
    lags = chosen.previous(cfg)
    with contextlib.ExitStack() as owned:  # the streamed pairs' files go when the fit is done
        data = {
            k: owned.enter_context(
                p2.make_split(c, t, o, device, features, group=group, previous=lags, zero=zero, **budget(ws, s))
            )
            for k, (c, t, o) in splits.items()
        }
        pairs = [group.sum(len(data[k].targets)) for k in ("train", "val")]  # of every rank
        if 0 in pairs:
            raise UsageError("Phase 2 needs documents of at least 2 tokens in both splits")
        prior = (
            baselines.unigram_log_probs(splits["train"][1], vocab) if cfg.head_init == "unigram" else np.zeros(vocab)
        )
        info(f"  {label}: {pairs[0]:,} train and {pairs[1]:,} val pairs")

        blocks = []

        def show(r: dict) -> None:
            blocks.append(r)
            what = (
                f"l2={r['l2']:g}: objective {r['objective']:.5f} after {r['iterations']} iterations"
                if "l2" in r
                else f"epoch {r['epoch']}: held-out loss {r['heldout_loss']:.5f} after {r['steps']} steps"
            )
            info(f"  {r['stage']} {what}  {r['seconds']:.1f}s")

        tag = label.split()[0]
        resumable = Resumable(
            ws.resume(f"{stage}_{tag}"),
            {
                "network": network,
                "format": "probe" if name == predictors.DEFAULT else name,
                "phase2": cfg.model_dump(),
                "seed": s.runtime.seed,
                "vocab": vocab,
                "pairs": pairs,
            },
        )

        def work(resume: dict | None):
            job = predictors.Job(cfg, s.model, model.embed.weight.detach(), s.runtime.seed, device, show,
                                 resume, resumable.save, f"{name} on {label}", group,
                                 s.runtime.save_every)  # fmt: skip
            return chosen.fit(data["train"], data["val"], vocab, prior, job)

        with interrupt.safe_points():
            res = resumable.run(work)
        resumable.clear()
        metrics.record(ws.metrics(), f"{stage}_{tag}", "train", blocks, board(ws, s))

        said = f"l2 {res.l2:g}, " if name == predictors.DEFAULT else ""
        info(f"  {label}: {said}val perplexity {res.val['perplexity']:.2f}")
        val_groups = data["val"].groups
        assert val_groups is not None  # make_split always groups by document
        return res, group.cat(val_groups.cpu().numpy()), blocks


def load_predictor(
    ws: Workspace, s: Settings, meta: dict, model: ContextNetwork, mid: str, device: torch.device
) -> tuple[torch.nn.Module, dict]:
    """The run's Phase 2 predictor (a linear Head, or a TokenBlock) with its weights checked against
    the network `mid` and its own head_id; and its provenance."""
    path, fix = ws.phase2_checkpoint(), "newllm phase2"
    ckpt = read_weights(path, "Phase 2 checkpoint (run `newllm phase2`)", fix)
    check_same({"model_id": mid, "vocab_size": meta["vocab_size"]}, ckpt["provenance"], "the Phase 2 head")
    provenance = ckpt["provenance"]
    head_input = provenance.get("head_input")
    if head_input not in ("context", "context+token"):
        raise validate.Damaged(path, f"head input {head_input!r}", fix)
    head: torch.nn.Module
    if provenance.get("predictor", predictors.DEFAULT) == predictors.DEFAULT:
        in_dim = model.context_dim + (model.embed_dim if head_input == "context+token" else 0)
        head = Head(in_dim, meta["vocab_size"])
    else:
        job = predictors.Job(s.phase2, s.model, model.embed.weight.detach(), s.runtime.seed, device)
        head = predictors.token_block(job, s.model.context_width)
    validate.state(head, ckpt, path, fix)
    if provenance.get("head_id", model_id(head)) != model_id(head):
        raise validate.Damaged(path, "its weights are not the head its head_id names", fix)
    return head.to(device), provenance


def generate(s: Settings, prompt: str, max_new_tokens: int = 50, temperature: float = 1.0, top_k: int = 0) -> dict:
    """Sample text from a run: the prompt's fixed context, then the head and the recurrence."""
    if max_new_tokens < 0 or not math.isfinite(temperature) or temperature < 0 or top_k < 0:
        raise UsageError("--max-new-tokens, --temperature and --top-k must be finite and not negative")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:  # bytes that are not UTF-8 arrive as lone surrogates
        raise UsageError(f"--prompt is not valid UTF-8 text (at character {e.start})") from None
    ws, meta = open_run(s)
    device = resolve_device(s.runtime.device)
    model, ckpt = load_phase1_model(ws, s, meta, device)
    head, provenance = load_predictor(ws, s, meta, model, ckpt["model_id"], device)
    if provenance.get("predictor", predictors.DEFAULT) != predictors.DEFAULT:
        raise UsageError("generate samples from the linear head; this run's Phase 2 is a tokenblock predictor")
    head_input = provenance["head_input"]
    tok = tokenizers.load_checked(ws.tokenizer(), meta["vocab_size"], dataset.FIX, meta.get("tokenizer_sha256"))
    ids = np.asarray(tok.encode(prompt, add_special_tokens=False).ids, dtype=np.int64)
    if len(ids) == 0:
        raise UsageError("--prompt has no tokens")
    start = prompt_context(model, ids, s.phase1, device)
    assert isinstance(head, Head)  # a tokenblock predictor was refused above
    new = gen.sample(
        model,
        head,
        head_input,
        start,
        int(ids[-1]),
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        seed=s.runtime.seed,
        device=device,
        context_ids=ids.tolist(),
    )
    return {
        "prompt": prompt,
        "completion": tok.decode(new),
        "text": tok.decode(ids.tolist() + new),
        "prompt_ids": ids.tolist(),
        "token_ids": new,
    }


def full(
    s: Settings, force: bool = False, probe_rows: int = PROBE_ROWS, rebuild: bool = False, plot: Path | None = None
) -> dict:
    """Every stage in order, each writing its artifacts exactly as when run alone; a stage whose
    inputs and settings are unchanged since it last succeeded is skipped (--rebuild reruns all)."""
    if probe_rows < 0:
        raise UsageError("--probe-rows must not be negative")
    out: dict[str, Any] = {"prepare_data": uptodate.timed("prepare-data", lambda: prepare_data(s))}
    out["phase1_train"] = _phase1(s, "train", force=rebuild)
    out["phase1_val"] = _phase1(s, "val", force=rebuild)
    out["analysis"] = _analyze(s, plot, probe_rows=probe_rows, force=rebuild)
    out["phase2"] = _phase2(s, force=force, plot=plot, fresh=rebuild)
    out["seconds"] = {name: out[name]["wall_seconds"] for name in list(out)}
    out["run_dir"] = str(Workspace(s.runtime.workspace, s.runtime.run).run_dir)
    return out
