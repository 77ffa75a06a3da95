"""Ctrl-C as a request, not a crash: training loops stop at their next safe point and save.

Inside `graceful()`, the first SIGINT only sets a flag that Phase 1 (per iteration) and Phase 2 (per
epoch) check; they then save a resume checkpoint and raise Interrupted. A second SIGINT aborts at
once, for a user who really wants out.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator

_requested = False


def requested() -> bool:
    return _requested


@contextmanager
def graceful() -> Iterator[None]:
    global _requested
    _requested = False
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        global _requested
        if _requested:
            raise KeyboardInterrupt
        _requested = True
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _requested = False
