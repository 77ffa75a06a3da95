"""Where every artifact lives and the one way to write and read it: atomically, with provenance.

    WORKSPACE/datasets/<key>/   tokenizer.json, {train,val}.tokens.npy, {train,val}.offsets.npy, dataset.json
    WORKSPACE/runs/<run>/       settings.json, log.txt, metrics.csv, phase1.safetensors, phase1_{train,val}.json,
                                contexts_{train,val}.npy, control_contexts_{train,val}.npy (the
                                untrained network's), analysis.json, phase2.safetensors, phase2.json, eval/KEY/
Each JSON artifact carries a `provenance` dict (fingerprints of what produced it), and readers compare
it with what they expect, so artifacts from different settings are never silently mixed.
In a distributed job only the leader publishes run artifacts (write_json, write_array,
write_checkpoint, and metrics and figures through `publishes`); `atomic_path` itself always writes.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from newllm_cli.runtime import nofollow
from newllm_cli.runtime.errors import RefusedError, UsageError
from newllm_cli.runtime.session import current
from newllm_cli.store.publish import atomic_path, save_npy
from newllm_cli.store.validate import Damaged, json_fields


def fingerprint(obj: Any) -> str:
    """A short stable hash of any JSON-able value."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def publishes() -> bool:
    """False on the non-leader ranks of a torchrun job: they compute the same artifacts as the
    leader, which alone writes them (runtime/distributed.py)."""
    return current().publishing


def write_json(path: Path, data: Any, private: bool = False) -> Path:
    """`private`: a file in the caller's own temporary directory, written whatever its rank."""
    if not (publishes() or private):
        return path
    with atomic_path(path, now=private) as tmp:  # a private file is no stage output
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path


def read_json(path: Path, what: str, fix: str = "the stage that writes it", schema=None) -> dict:
    """A JSON artifact, parsed and, given a pydantic `schema`, checked for the fields readers use."""
    if not os.path.lexists(path):
        raise RefusedError(f"missing {what}: {path}")
    try:
        data = json.loads(nofollow.read_text(path))
    except (ValueError, OSError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise Damaged(path, f"not JSON ({str(e).splitlines()[0][:80]})", fix) from None
    if not isinstance(data, dict):
        raise Damaged(path, "not a JSON object", fix)
    return json_fields(data, schema, path, fix) if schema is not None else data


def write_array(path: Path, array: np.ndarray) -> Path:
    if not publishes():
        return path
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        save_npy(f, array)
    return path


def read_array(path: Path, what: str, fix: str = "the stage that writes it") -> np.ndarray:
    """Memory-mapped, read-only: later stages never load a whole corpus into memory."""
    if not os.path.lexists(path):
        raise RefusedError(f"missing {what}: {path}")
    nofollow.check(path)
    try:
        return np.load(path, mmap_mode="r")
    except Exception as e:  # numpy raises ValueError, EOFError, even SyntaxError for a damaged header
        raise Damaged(path, f"not a .npy array ({str(e).splitlines()[0][:80] if str(e) else 'empty'})", fix) from None


def write_checkpoint(path: Path, payload: dict) -> Path:
    """Tensors plus plain values only, so it loads with weights_only=True. Serialised in memory
    first, then written with plain file I/O, so a full disk is an OSError (ENOSPC), not torch's
    "unexpected pos"."""
    import io

    import torch  # here, not at the top: `newllm --help` must not wait for torch

    if not publishes():
        return path
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getbuffer())
    return path


def read_checkpoint(path: Path, what: str, fix: str = "the stage that writes it") -> dict:
    if not os.path.lexists(path):
        raise RefusedError(f"missing {what}: {path}")
    import torch

    try:
        with nofollow.open_file(path, "rb") as f:
            payload = torch.load(f, map_location="cpu", weights_only=True)
    except nofollow.Unsafe:
        raise
    except Exception as e:  # truncated, foreign or not a checkpoint at all
        raise Damaged(path, f"cannot be loaded ({type(e).__name__})", fix) from None
    if not isinstance(payload, dict) or not isinstance(payload.get("provenance"), dict):
        raise Damaged(path, "not a newllm checkpoint (no provenance)", fix)
    return payload


def check_same(expected: dict, found: dict, what: str) -> None:
    """Refuse when an input was produced by other settings than the ones in force, naming both."""
    diff = {k: (expected.get(k), found.get(k)) for k in expected if expected.get(k) != found.get(k)}
    if diff:
        parts = ", ".join(f"{k}: expected {a!r}, found {b!r}" for k, (a, b) in sorted(diff.items()))
        raise RefusedError(
            f"{what} does not match the current settings ({parts}); "
            "rerun the stage that produces it, or add --rebuild to rerun the stages before"
        )


class Workspace:
    """Paths of one run and of the dataset its settings select."""

    def __init__(self, root: str | Path, run: str, dataset_key: str | None = None):
        self.root = Path(root)
        nofollow.register(self.root)
        self.run_dir = self.root / "runs" / run
        self._data_dir = self.root / "datasets" / dataset_key if dataset_key else None

    @property
    def data_dir(self) -> Path:
        """The dataset's directory (a workspace made without a dataset key has none)."""
        if self._data_dir is None:
            raise RuntimeError("this workspace was opened for a run only, without its dataset")
        return self._data_dir

    def runs(self) -> list[str]:
        return sorted(p.name for p in (self.root / "runs").glob("*") if Workspace(self.root, p.name).started())

    def started(self) -> bool:
        """Whether the run holds anything (a directory made only to be locked is no run yet)."""
        if not nofollow.is_dir(self.run_dir):
            return False
        return any(not p.name.startswith(".") for p in self.run_dir.iterdir())

    def no_such_run(self) -> RefusedError:
        """The refusal for a run that does not exist, naming those that do (most likely a typo)."""
        others = self.runs()
        there = f" (runs there: {', '.join(others)})" if others else ""
        return RefusedError(
            f"no run named {self.run_dir.name!r} in {self.root}{there}; "
            "check --run, or start it with `newllm prepare-data --run NAME`"
        )

    RESUMED = ("phase1_train", "phase1_val", *(f"{stage}_{fit}" for stage in ("phase2", "eval")
               for fit in ("phase1", "zero", "untrained")))  # fmt: skip
    EVALUATED = ("eval.json", "tokens.npy", "offsets.npy", "contexts.npy", "contexts.json", "control_contexts.npy",
                 "control.json")  # fmt: skip

    def files(self) -> list[tuple[Path, str]]:
        """Every artifact path of the run (and of its dataset when known) with what it must be
        ("file" or "dir"), read off this class's path methods, so a new artifact is listed at once."""
        out: list[tuple[Path, str]] = []
        for name, method in vars(Workspace).items():
            if name.startswith("_") or not callable(method) or method.__annotations__.get("return") != "Path":
                continue
            params = list(inspect.signature(method).parameters)[1:]
            if name in ("tokens", "offsets", "tokenizer", "dataset_meta") and self._data_dir is None:
                continue
            args: dict[tuple, list[tuple]] = {
                (): [()],
                ("split",): [(x,) for x in ("train", "val")],
                ("stage",): [(x,) for x in self.RESUMED],
                ("key", "name"): [(p.parent.name, n) for p in self.evaluations() for n in self.EVALUATED],
            }
            for a in args[tuple(params)]:
                out.append((method(self, *a), "dir" if name == "tensorboard" else "file"))
        return out

    def preflight(self) -> None:
        """Refuse (exit 3), before any work, a link or special file at any of the run's paths."""
        nofollow.check(self.run_dir, "dir")
        if self._data_dir is not None:
            nofollow.check(self._data_dir, "dir")
        for path, what in self.files():
            nofollow.check(path, what)

    def staged(self, directory: Path) -> Workspace:
        """The same layout with the dataset files in `directory` (built there, then renamed)."""
        other = copy.copy(self)
        other._data_dir = Path(directory)
        return other

    def ensure(self) -> None:
        try:
            nofollow.makedirs(self.run_dir)
            probe = self.run_dir / f".write-test.{os.getpid()}.{threading.get_ident()}"  # parallel commands: one each
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise UsageError(f"workspace {self.root} is not writable: {e.strerror or e}") from None

    # dataset
    def tokens(self, split: str) -> Path:
        return self.data_dir / f"{split}.tokens.npy"

    def offsets(self, split: str) -> Path:
        return self.data_dir / f"{split}.offsets.npy"

    def tokenizer(self) -> Path:
        return self.data_dir / "tokenizer.json"

    def dataset_meta(self) -> Path:
        return self.data_dir / "dataset.json"

    # run
    def settings(self) -> Path:
        return self.run_dir / "settings.json"

    def phase1_checkpoint(self) -> Path:
        return self.run_dir / "phase1.safetensors"

    def contexts(self, split: str) -> Path:
        return self.run_dir / f"contexts_{split}.npy"

    def control_contexts(self, split: str) -> Path:
        return self.run_dir / f"control_contexts_{split}.npy"

    def control_report(self, split: str) -> Path:
        return self.run_dir / f"control_{split}.json"

    def phase1_report(self, split: str) -> Path:
        return self.run_dir / f"phase1_{split}.json"

    def analysis(self) -> Path:
        return self.run_dir / "analysis.json"

    def phase2_checkpoint(self) -> Path:
        return self.run_dir / "phase2.safetensors"

    def phase2_report(self) -> Path:
        return self.run_dir / "phase2.json"

    def resume(self, stage: str) -> Path:
        return self.run_dir / f"{stage}.resume.pt"

    def log(self) -> Path:
        return self.run_dir / "log.txt"

    def stages(self) -> Path:
        return self.run_dir / "stages.json"

    def metrics(self) -> Path:
        return self.run_dir / "metrics.csv"

    def tensorboard(self) -> Path:
        return self.run_dir / "tensorboard"

    def evaluation(self, key: str, name: str) -> Path:
        """A file of `newllm eval` on one text (KEY: the text's and the models' hash)."""
        return self.run_dir / "eval" / key / name

    def evaluations(self) -> list[Path]:
        """The eval.json of every text the run was evaluated on."""
        where = self.run_dir / "eval"
        if not nofollow.is_dir(where):
            return []
        return sorted(p / "eval.json" for p in where.iterdir() if not p.name.startswith(".") and nofollow.is_dir(p))
