"""Resume points: a stage's state saved at a safe point (Ctrl-C, --save-every), valid only for the
settings and inputs that made it, and checked like every other artifact before it is used."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path

from newllm_cli.runtime.errors import RefusedError
from newllm_cli.runtime.progress import info, warn
from newllm_cli.store.artifacts import fingerprint, publishes, read_checkpoint, write_checkpoint
from newllm_cli.store.publish import at_once


class BadResume(ValueError):
    """A resume point whose state cannot be where a run stood: ignored, the stage starts afresh."""


def state_of(cls, saved: dict):
    """`cls(**saved)` for a resume state's dataclass, each saved field checked against its
    annotation (an int is a counter: never negative, never a bool); BadResume otherwise."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    for name, value in saved.items():
        if name in fields and not _fits(value, hints[name]):
            raise BadResume(f"its {name} ({str(value)[:40]}) is not a {hints[name]}")
    return cls(**{k: v for k, v in saved.items() if k in fields})


def _fits(value, tp) -> bool:
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
