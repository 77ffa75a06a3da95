"""Ctrl-C as a request, not a crash: training loops stop at their next safe point and save.

Inside `graceful()`, while a loop with safe points runs (`safe_points()`: Phase 1 per iteration,
Phase 2 per L-BFGS block), the first SIGINT only sets a flag the loop checks; it then saves a resume
checkpoint and raises Interrupted. Anywhere else, and at a second SIGINT, Ctrl-C stops at once.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator

_requested = False
_armed = 0


def requested() -> bool:
    return _requested


@contextmanager
def safe_points() -> Iterator[None]:
    """A loop that checks `requested()` runs: the first Ctrl-C waits for it."""
    global _armed
    _armed += 1
    try:
        yield
    finally:
        _armed -= 1


@contextmanager
def graceful() -> Iterator[None]:
    global _requested
    _requested = False
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        global _requested
        if _requested or not _armed:
            raise KeyboardInterrupt
        _requested = True
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _requested = False
