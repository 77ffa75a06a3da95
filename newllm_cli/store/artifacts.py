"""Where every artifact lives and the one way to write and read it: atomically, with provenance.

    WORKSPACE/datasets/<key>/   tokenizer.json, {train,val}.tokens.npy, {train,val}.offsets.npy, dataset.json
    WORKSPACE/runs/<run>/       settings.json, log.txt, metrics.csv, phase1.pt, phase1_{train,val}.json,
                                contexts_{train,val}.npy, control_contexts_{train,val}.npy (the
                                untrained network's), analysis.json, phase2.pt, phase2.json
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
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from newllm_cli.runtime import locks, nofollow
from newllm_cli.runtime.errors import RefusedError, UsageError
from newllm_cli.runtime.progress import info, warn
from newllm_cli.runtime.session import current
from newllm_cli.store.validate import Damaged, json_fields


def fingerprint(obj: Any) -> str:
    """A short stable hash of any JSON-able value."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def publishes() -> bool:
    """False on the non-leader ranks of a torchrun job: they compute the same artifacts as the
    leader, which alone writes them (runtime/distributed.py)."""
    return current().publishing


def umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def share(path: Path, directory: bool = False) -> None:
    """Give a file made by mkstemp/mkdtemp (always 0600/0700) the mode the user's umask asks for,
    as open() would have: a teammate can read a shared workspace under umask 022."""
    os.chmod(path, (0o777 if directory else 0o666) & ~umask())


_BATCH = threading.local()  # a stack: per open `together` block, [(temporary, path)] written so far


def _stack() -> list[list[tuple[str, Path]] | None]:
    if not hasattr(_BATCH, "stack"):
        _BATCH.stack = []
    return _BATCH.stack


@contextmanager
def together() -> Iterator[None]:
    """Publish every artifact written inside the block only once all of them are written: each
    goes to a temporary name, and they are renamed into place together when the block succeeds,
    checkpoints last (a reader then never pairs a new network with old contexts, nor the reverse);
    when it fails, the temporaries go and the previous artifacts stay as they were. A block inside
    another publishes its own outputs when it ends. Under torchrun every rank reads what the leader
    wrote at once, so there each artifact is published as soon as it is written."""
    from newllm_cli.runtime import distributed

    if distributed.current().size > 1:
        yield
        return
    pending: list[tuple[str, Path]] = []
    _stack().append(pending)
    try:
        yield
    except BaseException:
        for tmp, _ in pending:
            Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        _stack().pop()  # this block's list (blocks nest)
    for tmp, path in sorted(pending, key=lambda p: p[1].suffix == ".pt"):
        os.replace(tmp, path)


def publish(tmp: str | Path, path: str | Path, now: bool = False) -> None:
    """Rename a finished temporary over `path`, now or (inside `together`) with the others."""
    pending = _stack()[-1] if _stack() else None
    if now or pending is None:
        os.replace(tmp, path)
        return
    for i, (old, target) in enumerate(pending):
        if target == Path(path):  # written again (metrics.csv): the newer copy wins
            Path(old).unlink(missing_ok=True)
            pending[i] = (str(tmp), Path(path))
            return
    pending.append((str(tmp), Path(path)))


@contextmanager
def at_once() -> Iterator[None]:
    """Inside a `together` block, publish what is written here at once: a resume point must
    survive the failure (Ctrl-C) of the stage it belongs to."""
    _stack().append(None)
    try:
        yield
    finally:
        _stack().pop()


def latest(path: Path) -> Path:
    """Where the current content of `path` is: its unpublished copy inside `together`, else itself."""
    for pending in reversed(_stack()):
        for tmp, target in pending or []:
            if target == Path(path):
                return Path(tmp)
    return path


@contextmanager
def atomic_path(path: Path, now: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds.
    Inside a workspace, no directory on the way and not `path` itself may be a link. A failed
    write (a full disk) names `path` and the cause, never the temporary."""
    nofollow.makedirs(path.parent)
    nofollow.check(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{locks.tag()}", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with naming(path):
            yield Path(tmp)
        share(Path(tmp))
        publish(tmp, path, now)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def naming(path: Path) -> Iterator[None]:
    """An OSError inside the block (a short write on a full disk) re-raised naming `path`, the
    file being written, and its cause."""
    try:
        yield
    except OSError as e:
        raise OSError(e.errno, f"{e.strerror or e} while writing", str(path)) from None


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


def save_npy(f, array: np.ndarray, rows: int = 1 << 16) -> None:
    """np.save through f.write, a block of rows at a time: a full disk is an OSError with its errno
    (ndarray.tofile, which np.save uses, reports only "N requested and M written")."""
    array = np.asarray(array)
    header = {"descr": np.lib.format.dtype_to_descr(array.dtype), "fortran_order": False, "shape": array.shape}
    np.lib.format.write_array_header_1_0(f, header)
    flat = array.reshape(1) if array.ndim == 0 else array
    for s in range(0, len(flat), rows):
        f.write(np.ascontiguousarray(flat[s : s + rows]).tobytes())


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

    RESUMED = ("phase1_train", "phase1_val", "phase2_phase1", "phase2_zero", "phase2_untrained")

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
        return self.run_dir / "phase1.pt"

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
        return self.run_dir / "phase2.pt"

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


class BadResume(ValueError):
    """A resume point whose state cannot be where a run stood: ignored, the stage starts afresh."""


def state_of(cls, saved: dict):
    """`cls(**saved)` for a resume state's dataclass, each saved field checked against its
    annotation (an int is a counter: never negative, never a bool); BadResume otherwise."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    for name, value in saved.items():
        if name in fields and not _fits(value, hints[name]):
            raise BadResume(f"its {name} ({str(value)[:40]}) is not a {hints[name]}")
    return cls(**{k: v for k, v in saved.items() if k in fields})


def _fits(value, tp) -> bool:
    import math
    import types
    import typing

    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is not None:
        return isinstance(value, origin)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, tp)


class Resumable:
    """A resume checkpoint valid only for the settings and inputs that made it (by fingerprint).

    Row stores (contexts) go to .npy files beside it, named by the caller's `tag` (the iteration),
    and the checkpoint names them: a process killed between the two writes leaves the previous
    checkpoint with its own rows, never a checkpoint with another iteration's rows."""

    def __init__(self, path: Path, key: dict):
        self.path, self.fingerprint = path, fingerprint(key)

    def run(self, work):
        """work(the resume point or None); when the point proves damaged as work applies it
        (BadResume, raised before any work is done), a warning, and work(None) from the start."""
        try:
            return work(self.load())
        except BadResume as e:
            warn(f"ignoring {self.path.name}: {e}; starting afresh")
            return work(None)

    def load(self) -> dict | None:
        if not self.path.exists():
            return None
        try:
            payload = read_checkpoint(self.path, "resume checkpoint")
        except RefusedError as e:
            warn(f"ignoring {self.path.name}: {e}; starting afresh")
            return None
        if payload["provenance"].get("fingerprint") != self.fingerprint or not isinstance(payload.get("state"), dict):
            warn(f"ignoring {self.path.name}: it was saved under other settings; starting afresh")
            return None
        state = payload["state"]
        for key, value in state.items():
            if isinstance(value, dict) and set(value) == {"rows"}:
                state[key] = self.path.parent / Path(str(value["rows"])).name
                if not state[key].is_file():
                    warn(f"ignoring {self.path.name}: its rows {state[key].name} are missing; starting afresh")
                    return None
        info(f"resuming from {self.path}")
        return state

    def save(self, state: dict, tag: str = "") -> None:
        """Row stores (anything with .save(path), collective in a distributed job) first, then the
        checkpoint naming them, then the rows of earlier saves go."""
        state = dict(state)
        with at_once():
            for key, value in state.items():
                if callable(getattr(value, "save", None)):
                    value.save(self._rows(key, tag))
                    state[key] = {"rows": self._rows(key, tag).name}
            write_checkpoint(self.path, {"state": state, "provenance": {"fingerprint": self.fingerprint}})
        if publishes():
            kept = {v["rows"] for v in state.values() if isinstance(v, dict) and set(v) == {"rows"}}
            for old in self.path.parent.glob(f"{self.path.name}.*.npy"):
                if old.name not in kept:
                    old.unlink(missing_ok=True)

    def _rows(self, key: str, tag: str) -> Path:
        return self.path.with_name(f"{self.path.name}.{key}{'.' + tag if tag else ''}.npy")

    def clear(self) -> None:
        if not publishes():
            return
        for extra in self.path.parent.glob(f"{self.path.name}.*.npy"):
            extra.unlink(missing_ok=True)
        self.path.unlink(missing_ok=True)
