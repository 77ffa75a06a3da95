"""Every command of `newllm`, declared once: adding a command is one entry here (and its stage)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from newllm_cli.cli import report
from newllm_cli.cli.commands import Command
from newllm_cli.cli.options import (
    ANALYZE,
    COMPARE,
    CSV,
    EVAL,
    EXPORT,
    FORCE,
    FULL,
    GENERATE,
    PLOT,
    REBUILD,
    REPLICATE,
    SPLIT,
    SWEEP,
)  # fmt: skip

RECURRENCE = ("model", "data", "phase1", "runtime")
WRITER: dict[str, Any] = {"lock": "write", "parallel": True}  # the run's writer; also a torchrun job


def key(name: str) -> Callable[[dict[str, Any]], str]:
    """stdout: the result's `name` (a path, mostly)."""
    return lambda result: str(result[name])


def unless_outside(options: dict[str, Any]) -> str | None:
    """`analyze --contexts FILE` reads an outside file and touches no run: no lock."""
    return None if options.get("contexts") else "write"


# Every command, once: its stage function (imported only when it runs: help stays fast), the
# settings sections it takes as options, its own options, its lock, its tables and its stdout.
COMMANDS = [
    Command(
        "prepare-data", "stages.prepare_data", report.prepare, key("dataset_dir"), (), ("data", "runtime"), **WRITER
    ),
    Command("phase1", "stages.phase1", report.phase1, key("contexts"), (SPLIT, REBUILD), RECURRENCE, **WRITER),
    Command(
        "analyze",
        "stages.analyze",
        report.analysis,
        key("path"),
        ANALYZE,
        RECURRENCE,
        lock=unless_outside,
        parallel=True,
    ),
    Command("phase2", "stages.phase2", report.phase2, key("checkpoint"), (FORCE, REBUILD, PLOT), **WRITER),
    Command("full", "stages.full", report.full, key("run_dir"), FULL, **WRITER),
    Command("generate", "stages.generate", report.generate, key("text"), GENERATE, lock="read"),
    Command(
        "eval",
        "use.evaluate.evaluate",
        report.evaluation,
        key("path"),
        EVAL,
        ("runtime",),
        **WRITER,
        own=("data.source", "data.path", "data.val_source", "data.val_path"),
    ),  # fmt: skip
    Command("export", "use.export.export", lambda result: None, key("path"), EXPORT, ("runtime",), lock="read"),
    Command("config", "settings.effective", lambda result: None, key("toml")),
    Command("replicate", "experiments.replicate.replicate", report.replicate, key("path"), REPLICATE),
    Command("sweep", "experiments.sweep.sweep", report.sweep, key("storage"), SWEEP, saved=False),
    Command("runs", "experiments.compare.runs", report.runs, report.run_names, CSV, ("runtime",), saved=False),
    Command(
        "compare", "experiments.compare.compare", report.compare, report.run_names, COMPARE, ("runtime",), saved=False
    ),
]
