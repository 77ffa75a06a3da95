"""People's output: rich on stderr (results for scripts go to stdout, from cli/commands.py only)."""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, TaskProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Column
from rich.text import Text

from newllm_cli.runtime.session import current

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def set_quiet(quiet: bool) -> None:
    """--quiet: no progress bars, info lines or summaries on stderr (the log still gets them)."""
    current().quiet = quiet


def mute(who: str) -> None:
    """Say nothing (no bars, lines or log: the leader says it all) but errors, prefixed by `who`."""
    current().muted = who


def error_prefix() -> str:
    muted = current().muted
    return f"{muted}: " if muted else ""


def log_to(path: Path | None) -> None:
    """From now on (until None), what people see on stderr is also appended, as plain text, to
    `path`: the run's log.txt, starting with what the command said before. Progress bars are not
    logged."""
    session = current()
    if path == session.log:  # the same run again within one command (`full`): one header
        return
    session.log = path
    if path is not None and session.pending is not None and not session.muted:
        header = f"\n== {time.strftime('%Y-%m-%d %H:%M:%S')} newllm {session.command}\n"
        _append(path, header + "".join(session.pending))
    session.pending = None if path is None else []


def record(text: str) -> None:
    """Into the run's log, or kept for it until the run is known."""
    session = current()
    if session.muted:
        return
    if session.log is not None:
        _append(session.log, text)
    elif session.pending is not None:
        session.pending.append(text)


def _append(path: Path, text: str) -> None:
    from newllm_cli.runtime import nofollow

    try:
        with nofollow.open_file(path, "a") as f:  # a link or FIFO planted there is never written through
            f.write(_ANSI.sub("", text))
    except (OSError, nofollow.Unsafe):  # a log must never stop the work it records
        pass


class _Tee:
    """stderr, with a plain-text copy of everything written going to the log."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        record(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()


class _Null:
    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def console(log: bool = True, quiet: bool = False) -> Console:
    """A console bound to the current sys.stderr (tests swap it), plain when not a terminal, and
    copied to the run's log when one is open; `quiet` output is silenced by --quiet (not logged)."""
    session = current()
    screen: Any = _Null() if (quiet and session.quiet) or session.muted else sys.stderr
    stream: Any = _Tee(screen) if log else screen
    return Console(file=stream, highlight=False, soft_wrap=True)


def info(message: str) -> None:
    console(quiet=True).print(message)


def warn(message: str) -> None:
    console().print(f"[yellow]warning:[/] {message}")


class _Rate(ProgressColumn):
    """Units per second, with k/M prefixes."""

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        if not speed:
            return Text("")
        scaled = next((f"{speed / f:.1f}{p}" for f, p in ((1e6, "M"), (1e3, "k")) if speed >= f), f"{speed:.1f}")
        return Text(f"{scaled} {task.fields['unit']}/s")


class _Eta(TimeRemainingColumn):
    def render(self, task) -> Text:
        return Text("eta ") + super().render(task)


def make_bar(con: Console, disable: bool = False) -> Progress:
    """The progress line: the description gives way (cut with an ellipsis) so that the bar, rate
    and ETA fit the terminal's width, 80 columns included."""
    return Progress(
        TextColumn("{task.description}", table_column=Column(no_wrap=True, overflow="ellipsis", max_width=26)),
        BarColumn(bar_width=10),
        TaskProgressColumn(),
        _Rate(),
        _Eta(),
        TextColumn("{task.fields[status]}", table_column=Column(no_wrap=True, overflow="ellipsis", max_width=10)),
        console=con,
        transient=True,
        disable=disable,
        expand=False,
    )


@contextmanager
def progress(description: str, total: int | None, unit: str = "rows") -> Iterator:
    """A bar with rate and ETA on stderr when it is a terminal and --quiet is off; `advance(n)`
    either way. Nothing of it reaches the log."""
    con = console(log=False)
    bar = make_bar(con, disable=current().quiet or not con.is_terminal)
    with bar:
        task = bar.add_task(description, total=total, status="", unit=unit)

        def advance(n: int = 1, status: str | None = None) -> None:
            if status is None:
                bar.update(task, advance=n)
            else:
                bar.update(task, advance=n, status=status)

        yield advance
