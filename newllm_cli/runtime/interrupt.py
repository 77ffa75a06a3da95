"""Ctrl-C as a request, not a crash: training loops stop at their next safe point and save.

Inside `graceful()`, while a loop with safe points runs (`safe_points()`: Phase 1 per iteration,
Phase 2 per L-BFGS block), the first SIGINT or SIGTERM only sets a flag the loop checks; it then
saves a resume checkpoint and raises Interrupted. Anywhere else, and at a second signal, it stops at once.
The same loops also save every --save-every minutes (`SavePoints`), so a killed process, or a
distributed job that lost a rank, resumes from its last save.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from newllm_cli.runtime.distributed import SOLO, Group
from newllm_cli.runtime.session import current


def requested() -> bool:
    return current().interrupt_requested


@contextmanager
def safe_points() -> Iterator[None]:
    """A loop that checks `requested()` runs: the first Ctrl-C waits for it."""
    session = current()
    session.safe_loops += 1
    try:
        yield
    finally:
        session.safe_loops -= 1


@contextmanager
def graceful() -> Iterator[None]:
    session = current()
    session.interrupt_requested = False
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if session.interrupt_requested or not session.safe_loops:
            raise KeyboardInterrupt
        session.interrupt_requested = True

    # SIGTERM too: what torchrun forwards, and a batch system's notice before it kills
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        session.interrupt_requested = False


class SavePoints:
    """At a loop's safe point: save a resume point after Ctrl-C (then stop) or when `minutes` have
    passed since the last save (then go on; 0: never). Every rank of a job decides alike."""

    def __init__(self, minutes: float = 0.0, group: Group = SOLO):
        self.every, self.group, self.last = minutes * 60.0, group, time.monotonic()

    def poll(self) -> tuple[bool, bool]:
        """(stop, save)."""
        due = self.every > 0 and time.monotonic() - self.last >= self.every
        stop, due = self.group.any(requested(), due)
        if stop or due:
            self.last = time.monotonic()
        return stop, stop or due
