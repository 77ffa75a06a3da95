"""People's output: rich on stderr (results for scripts go to stdout, from cli.py only)."""
from __future__ import annotations

import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


_log: Path | None = None
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def log_to(path: Path | None) -> None:
    """From now on (until None), what people see on stderr is also appended, as plain text, to
    `path`: the run's log.txt. Progress bars are not logged."""
    global _log
    if path == _log:  # the same run again within one command (`full`): one header
        return
    _log = path
    if path is not None:
        _append(path, f"\n== {time.strftime('%Y-%m-%d %H:%M:%S')} newllm {' '.join(sys.argv[1:])}\n")


def _append(path: Path, text: str) -> None:
    try:
        with open(path, "a") as f:
            f.write(_ANSI.sub("", text))
    except OSError:  # a log must never stop the work it records
        pass


class _Tee:
    """stderr, with a plain-text copy of everything written going to the log."""

    def __init__(self, stream, path: Path):
        self.stream, self.path = stream, path

    def write(self, text: str) -> int:
        _append(self.path, text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()


def console(log: bool = True) -> Console:
    """A console bound to the current sys.stderr (tests swap it), plain when not a terminal, and
    copied to the run's log when one is open."""
    stream = _Tee(sys.stderr, _log) if log and _log is not None else sys.stderr
    return Console(file=stream, highlight=False, soft_wrap=True)


def info(message: str) -> None:
    console().print(message)


def warn(message: str) -> None:
    console().print(f"[yellow]warning:[/] {message}")


@contextmanager
def progress(description: str, total: int | None) -> Iterator:
    """A progress bar on stderr when it is a terminal; `advance(n)` either way."""
    con = console(log=False)
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TextColumn("{task.fields[status]}"),
                   console=con, transient=True, disable=not con.is_terminal)
    with bar:
        task = bar.add_task(description, total=total, status="")

        def advance(n: int = 1, status: str = "") -> None:
            bar.update(task, advance=n, status=status)
        yield advance
