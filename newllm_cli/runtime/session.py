"""How one command runs: its log, its voice, its rank and its Ctrl-C, in one object the CLI owns.

The CLI makes a Session per command and installs it with `use()` for the command's duration; the
runtime helpers (progress, interrupt, distributed, artifacts) read it through `current()`. Code
called from Python without a CLI gets a fresh default session on every call: it logs to no run,
publishes as one process and has no interrupt handler, so importing and calling a stage writes
only the artifacts that stage documents.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Session:
    argv: list[str] = field(default_factory=list)  # the command line (sweep workers copy it)
    quiet: bool = False  # --quiet: no bars, info lines or summaries on stderr (the log keeps them)
    muted: str | None = None  # a torchrun job's non-leader rank: it says nothing but its errors
    publishing: bool = True  # writes the run's files (off on non-leader ranks, which compute the same)
    group: Any = None  # the torchrun process group (runtime.distributed.Ranks); None: one process
    log: Path | None = None  # the run's log.txt once known
    pending: list[str] | None = None  # said before the run's log was known (None: nothing is kept)
    interrupt_requested: bool = False  # a first Ctrl-C inside a loop with safe points
    safe_loops: int = 0  # loops with safe points now running

    @property
    def command(self) -> str:
        return " ".join(self.argv)


_active: contextvars.ContextVar[Session | None] = contextvars.ContextVar("newllm_session", default=None)


def current() -> Session:
    """The command's session, or a fresh default one outside a command (changes to it are lost)."""
    session = _active.get()
    return Session() if session is None else session


@contextmanager
def use(session: Session) -> Iterator[Session]:
    """Make `session` the current one until the block ends."""
    token = _active.set(session)
    try:
        yield session
    finally:
        _active.reset(token)
