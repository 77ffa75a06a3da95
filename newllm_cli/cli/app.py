"""The `newllm` command: parses options, calls a stage, prints. All logic lives in stages.py."""

from __future__ import annotations

import functools
import os
import signal
import sys

import typer

from newllm_cli import __version__
from newllm_cli.cli import commands, report
from newllm_cli.cli.options import ANALYZE, COMPARE, CSV, FORCE, FULL, GENERATE, PLOT, REBUILD, SPLIT, SWEEP
from newllm_cli.runtime.errors import NewLLMError
from newllm_cli.runtime.progress import begin, error_prefix, log_to, record

try:  # typer >= 0.29 vendors click; older releases raise click's own exceptions
    from typer import TyperException as CliError
except ImportError:  # pragma: no cover
    from click import ClickException as CliError

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


RECURRENCE = ("model", "data", "phase1", "runtime")
register = functools.partial(commands.register, app)
stage = functools.partial(register, lock="write", parallel=True)  # the run's writer; also a torchrun job

stage("prepare-data", "stages.prepare_data", report.prepare, sections=("data", "runtime"))
stage("phase1", "stages.phase1", report.phase1, [SPLIT, REBUILD], RECURRENCE)
stage(
    "analyze",
    "stages.analyze",
    report.analysis,
    ANALYZE,
    RECURRENCE,
    lock=lambda options: None if options.get("contexts") else "write",
)  # an outside file: no run
stage("phase2", "stages.phase2", report.phase2, [FORCE, REBUILD, PLOT])
stage("full", "stages.full", report.full, FULL)
register("generate", "stages.generate", report.generate, GENERATE, lock="read")
register("config", "settings.effective", lambda result: None)
register("sweep", "experiments.sweep.sweep", report.sweep, SWEEP, saved=False)
register("runs", "experiments.compare.runs", report.runs, CSV, ("runtime",), saved=False)
register("compare", "experiments.compare.compare", report.compare, COMPARE, ("runtime",), saved=False)


def main(argv: list[str] | None = None) -> int:
    """Entry point: one error boundary, one line per error (in the run's log too), meaningful exit codes."""
    argv = sys.argv[1:] if argv is None else list(argv)
    commands.ARGV[:] = argv
    begin(argv)
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
    finally:
        log_to(None)


def _fail(message: str, code: int) -> int:
    sys.stderr.write(f"{error_prefix()}Error: {message}\n")  # one write: ranks share the terminal
    sys.stderr.flush()
    record(f"Error: {message}\n")
    return code


def entry() -> None:
    code = main()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the work is done: a late Ctrl-C must not kill the exit
    sys.exit(code)
