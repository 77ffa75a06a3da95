"""How a command runs: options to settings, the run's lock, the stage, its tables and its stdout.

Commands are declared once, in cli/app.py's table, by `<module>.<function>` names, so the module
(stages, and torch with it) is imported only when the command runs: help and argument errors answer
at once.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import re
import shlex
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import typer

from newllm_cli.cli.options import COMMON, SEP, docstring, settings_parameters, split_kwargs
from newllm_cli.runtime import locks
from newllm_cli.runtime.errors import NewLLMError, UsageError
from newllm_cli.runtime.progress import set_quiet
from newllm_cli.settings import SECTIONS, RuntimeSettings, resolve

if TYPE_CHECKING:
    from newllm_cli.runtime.distributed import Group


COMPUTING = ("newllm_cli.stages", "newllm_cli.experiments.sweep", "newllm_cli.use.evaluate")  # take --threads


@dataclass(frozen=True)
class Command:
    """One command: `target` is `<module>.<function>(settings, **options)` under newllm_cli, run with
    the settings `sections` as options (and a run's saved settings, when `saved`) beside its own
    `options`, the run's `lock` held ("write", "read", or a function of its options giving either or
    None); then `report` prints its tables on stderr and `prints` gives its stdout (without --json).
    `parallel` commands also run as torchrun jobs: every rank runs the stage, the leader holds the
    lock and prints. Settings named in `own` reach the stage as options of their field's name."""

    name: str
    target: str
    report: Callable[[dict], None]
    prints: Callable[[dict], str]
    options: tuple[inspect.Parameter, ...] | list[inspect.Parameter] = ()
    sections: tuple[str, ...] = tuple(SECTIONS)
    saved: bool = True
    lock: str | Callable[[dict], str | None] | None = None
    parallel: bool = False
    own: tuple[str, ...] = ()  # settings ("section.name") this command takes as its own options instead

    @property
    def module(self) -> str:
        return "newllm_cli." + self.target.rsplit(".", 1)[0]

    def function(self) -> Callable[..., dict]:
        """The stage function (imports its module: torch, for most)."""
        return getattr(importlib.import_module(self.module), self.target.rsplit(".", 1)[1])

    def stdout(self, result: dict) -> str:
        if "stdout" in result:  # --csv, --markdown
            return result["stdout"].rstrip("\n")
        return str(self.prints(result))


def register(app: typer.Typer, command: Command) -> None:
    """Add `command` to `app`."""

    def run(**kwargs):
        from newllm_cli.runtime import interrupt  # with numpy: not for help
        from newllm_cli.store.artifacts import Workspace

        stage = command.function()
        if threading.current_thread() is threading.main_thread():  # imports done (a Ctrl-C inside
            signal.signal(signal.SIGINT, signal.default_int_handler)  # torch's would abort): KeyboardInterrupt now
        for name in command.own:  # e.g. eval's --path names the text to evaluate, not the run's data
            section, field = name.split(".")
            kwargs[field] = kwargs.pop(f"{section}{SEP}{field}", None)
        options, rest = split_kwargs(kwargs)
        config, as_json, preset = rest.pop("config"), rest.pop("json_output"), rest.pop("preset")
        set_quiet(rest.pop("quiet"))
        saved = command.saved
        settings = resolve(
            options, config, lambda ws, run_name: Workspace(ws, run_name).settings() if saved else None, preset
        )
        rt = settings.runtime
        group = join(command.name, rt.device, command.parallel)
        try:
            if command.module in COMPUTING:  # the commands that compute
                importlib.import_module("newllm_cli.stages").apply_threads(rt.threads or group.threads())
            kind = command.lock(rest) if callable(command.lock) else command.lock
            guard = locks.run(rt.workspace, rt.run, exclusive=kind == "write") if kind else contextlib.nullcontext()
            with group.leading(guard), interrupt.graceful():
                result = stage(settings, **rest)
        except NewLLMError as e:  # its rebuild hints act on this command's run
            e.args = (on_this_run(str(e), rt.workspace, rt.run),)
            raise
        finally:
            group.close()
        if group.leader:
            command.report(result)  # the tables go to the run's log too
            print(json.dumps(result, default=str) if as_json else command.stdout(result))

    options = [*command.options, *COMMON, *settings_parameters(command.sections)]
    run.__signature__ = inspect.Signature(options)  # type: ignore[attr-defined]
    run.__doc__ = docstring(command.target)
    app.command(command.name)(run)


def on_this_run(message: str, workspace: str, run: str) -> str:
    """Every `newllm COMMAND ...` hint in a message, given the --workspace and --run (where they are
    not the defaults) of the command that failed, so that copying it acts on the same run."""
    defaults = RuntimeSettings()
    where = "".join(
        f" --{flag} {shlex.quote(value)}"
        for flag, value, default in (("workspace", workspace, defaults.workspace), ("run", run, defaults.run))
        if value != default
    )
    if not where:
        return message
    return re.sub(
        r"`(newllm [a-z-]+)([^`]*)`",
        lambda m: m[0] if "--run" in m[2] or "--workspace" in m[2] else f"`{m[1]}{m[2]}{where}`",
        message,
    )


def join(name: str, device: str, parallel: bool) -> Group:
    """The torchrun job this process belongs to (SOLO outside one)."""
    from newllm_cli.runtime import distributed

    if not distributed.launched():
        return distributed.SOLO
    if not parallel:
        raise UsageError(f"`newllm {name}` runs in one process: start it without torchrun")
    stages = importlib.import_module("newllm_cli.stages")
    return distributed.start(stages.resolve_device(device))
