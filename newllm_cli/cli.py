"""The `newllm` command: parses options, calls a stage, prints. All logic lives in stages.py."""
from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import os
import signal
import sys
import threading
from typing import Callable, Optional

import typer

from . import __version__, interrupt, locks, report
from .artifacts import Workspace
from .errors import NewLLMError
from .progress import begin, log_to, record, set_quiet
from .options import (ANALYZE, COMMON, COMPARE, CSV, DOCS, FORCE, GENERATE, PLOT, REBUILD, SPLIT, SWEEP,
                      settings_parameters, split_kwargs)
from .settings import SECTIONS, resolve

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
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """New-LLM research toolkit: CVFP context training (Phase 1), analysis and next-token heads
    (Phase 2), stage by stage on disk."""


RECURRENCE = ("model", "data", "phase1", "runtime")


def command(name: str, stage: str, render: Callable, extra: list[inspect.Parameter] = (),
            sections: tuple[str, ...] = tuple(SECTIONS), saved: bool = True, lock: str | None = None) -> None:
    """Register `<module>.<function>(settings, **extra)` as a command whose options come from the
    settings model (a run's saved settings too, unless `saved` is False), holding the run's lock
    (`lock`: "write" or "read"); its module (stages, and torch with it) is imported only when the
    command runs."""
    module, function = stage.split(".")

    def run(**kwargs):
        core = importlib.import_module(f".{module}", __package__)
        if threading.current_thread() is threading.main_thread():  # imports done (a Ctrl-C inside
            signal.signal(signal.SIGINT, signal.default_int_handler)  # torch's would abort): KeyboardInterrupt now
        options, rest = split_kwargs(kwargs)
        config, as_json = rest.pop("config"), rest.pop("json_output")
        set_quiet(rest.pop("quiet"))
        settings = resolve(options, config, lambda ws, run_name: Workspace(ws, run_name).settings() if saved else None)
        if "argv" in inspect.signature(getattr(core, function)).parameters:
            rest["argv"] = _argv
        if module in ("stages", "sweep"):  # the commands that compute
            importlib.import_module(".stages", __package__).apply_threads(settings.runtime.threads)
        rt = settings.runtime
        guard = locks.run(rt.workspace, rt.run, exclusive=lock == "write") if lock else contextlib.nullcontext()
        with guard, interrupt.graceful():
            result = getattr(core, function)(settings, **rest)
        render(result)  # the tables go to the run's log too
        print(json.dumps(result, default=str) if as_json else report.primary_path(name, result))
    run.__signature__ = inspect.Signature([*extra, *COMMON, *settings_parameters(sections)])
    run.__doc__ = DOCS[stage]
    app.command(name)(run)


command("prepare-data", "stages.prepare_data", report.prepare, sections=("data", "runtime"), lock="write")
command("phase1", "stages.phase1", report.phase1, [SPLIT, REBUILD], RECURRENCE, lock="write")
command("analyze", "stages.analyze", report.analysis, ANALYZE, RECURRENCE, lock="write")
command("phase2", "stages.phase2", report.phase2, [FORCE, REBUILD, PLOT], lock="write")
command("full", "stages.full", report.full, [FORCE], lock="write")
command("generate", "stages.generate", report.generate, GENERATE, lock="read")
command("config", "settings.effective", lambda result: None)
command("sweep", "sweep.sweep", report.sweep, SWEEP, saved=False)
command("runs", "compare.runs", report.runs, CSV, ("runtime",), saved=False)
command("compare", "compare.compare", report.compare, COMPARE, ("runtime",), saved=False)
_argv: list[str] = []


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point: one error boundary, one line per error (in the run's log too), meaningful exit codes."""
    global _argv
    argv = _argv = sys.argv[1:] if argv is None else list(argv)
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
    print(f"Error: {message}", file=sys.stderr, flush=True)
    record(f"Error: {message}\n")
    return code


def entry() -> None:
    code = main()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the work is done: a late Ctrl-C must not kill the exit
    sys.exit(code)
