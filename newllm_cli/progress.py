"""People's output: rich on stderr (results for scripts go to stdout, from cli.py only)."""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def console() -> Console:
    """A console bound to the current sys.stderr (tests swap it), plain when not a terminal."""
    return Console(file=sys.stderr, highlight=False, soft_wrap=True)


def info(message: str) -> None:
    console().print(message)


def warn(message: str) -> None:
    console().print(f"[yellow]warning:[/] {message}")


@contextmanager
def progress(description: str, total: int | None) -> Iterator:
    """A progress bar on stderr when it is a terminal; `advance(n)` either way."""
    con = console()
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TextColumn("{task.fields[status]}"),
                   console=con, transient=True, disable=not con.is_terminal)
    with bar:
        task = bar.add_task(description, total=total, status="")

        def advance(n: int = 1, status: str = "") -> None:
            bar.update(task, advance=n, status=status)
        yield advance
