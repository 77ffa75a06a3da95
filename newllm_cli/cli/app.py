"""The `newllm` command: the commands of cli/table.py, one error boundary and the exit codes."""

from __future__ import annotations

import os
import signal
import sys

import typer

from newllm_cli import __version__
from newllm_cli.cli import commands
from newllm_cli.cli.table import COMMANDS
from newllm_cli.runtime.errors import NewLLMError
from newllm_cli.runtime.progress import error_prefix, record
from newllm_cli.runtime.session import Session, use

try:  # typer >= 0.29 vendors click; older releases raise click's own exceptions
    from typer import TyperException as CliError
except ImportError:  # pragma: no cover
    from click import ClickException as CliError  # type: ignore[assignment]

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


def _version(value: bool) -> None:
    if value:
        print(f"newllm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """New-LLM research toolkit: CVFP context training (Phase 1), analysis and next-token heads
    (Phase 2), stage by stage on disk."""


for command in COMMANDS:
    commands.register(app, command)


def main(argv: list[str] | None = None) -> int:
    """Entry point: one error boundary, one line per error (in the run's log too), meaningful exit codes.
    Each call is one command with a session of its own (its log, --quiet, rank, Ctrl-C)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    with use(Session(argv=argv, pending=[])):  # said before the run is known waits for its log
        return _command(argv)


def _command(argv: list[str]) -> int:
    try:
        code = typer.main.get_command(app).main(args=argv, prog_name="newllm", standalone_mode=False)
        if code == 130:  # typer turns a KeyboardInterrupt into a silent exit 130
            return _fail("interrupted", 130)
        return code if isinstance(code, int) else 0
    except (typer.Abort, KeyboardInterrupt):
        return _fail("interrupted", 130)
    except CliError as e:
        if type(e).__name__ == "NoArgsIsHelpError":
            print(e.format_message(), file=sys.stderr)
            return e.exit_code
        return _fail(e.format_message(), e.exit_code)
    except NewLLMError as e:
        if os.environ.get("NEWLLM_DEBUG"):
            raise
        return _fail(str(e), e.exit_code)
    except OSError as e:  # full disk, permissions, a path that is a file: the user's to fix
        if os.environ.get("NEWLLM_DEBUG"):
            raise
        return _fail(f"{e.strerror or e}{f': {e.filename}' if e.filename else ''}", 1)


def _fail(message: str, code: int) -> int:
    message = " ".join(message.split("\n"))
    if len(message) > 600:  # a value echoed whole (a 10 MB --source) must not flood the terminal
        message = f"{message[:400]} [... {len(message) - 550:,} characters cut ...] {message[-150:]}"
    sys.stderr.write(f"{error_prefix()}Error: {message}\n")  # one write: ranks share the terminal
    sys.stderr.flush()
    record(f"Error: {message}\n")
    return code


def entry() -> None:
    code = main()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the work is done: a late Ctrl-C must not kill the exit
    sys.exit(code)
