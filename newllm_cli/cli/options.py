"""CLI options generated from the settings model, so every field is an option of every command.

Options arrive as strings (or None when not given) and pydantic converts them, so a bad value
gives the same one-line error whether it came from an option, a config file or settings.json.
"""

from __future__ import annotations

import functools
import inspect
import re
from pathlib import Path
from typing import Any

import typer

from newllm_cli.settings import PROBE_ROWS as DEFAULT_PROBE_ROWS
from newllm_cli.settings import SECTIONS, cli_aliases, cli_name

SEP = "__"


def _metavar(annotation) -> str:
    text = str(annotation)
    for word in ("int", "float", "Literal", "str"):
        if word in text:
            return {"Literal": "CHOICE", "str": "TEXT"}.get(word, word.upper())
    return "TEXT"


def settings_parameters(sections: tuple[str, ...] = tuple(SECTIONS)) -> list[inspect.Parameter]:
    """Every setting as an option; those of sections the command does not use are accepted (so one
    set of flags can be passed along a whole pipeline) but hidden from its help, like older names."""
    params = []
    for section, model in SECTIONS.items():
        for name, f in model.model_fields.items():
            names = [cli_name(section, name), *cli_aliases(section, name)]
            for i, flag in enumerate(names):  # the name first: it wins over an alias given too
                key = f"{section}{SEP}{name}" + (f"{SEP}{i}" if i else "")
                params.append(
                    inspect.Parameter(
                        key,
                        inspect.Parameter.KEYWORD_ONLY,
                        **_option(f, flag, section, i > 0 or section not in sections),
                    )
                )
    return params


def _option(f, flag: str, section: str, hidden: bool) -> dict:
    common: dict[str, Any] = {"rich_help_panel": f"{section.title()} settings", "show_default": False, "hidden": hidden}
    if f.annotation is bool:
        return {
            "annotation": bool | None,
            "default": typer.Option(
                None,
                f"--{flag}/--no-{flag}",
                help=f"{f.description} (default: {'on' if f.default else 'off'})",
                **common,
            ),
        }
    return {
        "annotation": str | None,
        "default": typer.Option(
            None, f"--{flag}", help=f"{f.description} (default: {f.default})", metavar=_metavar(f.annotation), **common
        ),
    }


def extra(name: str, annotation, default, flag: str, help: str, *short: str) -> inspect.Parameter:
    """A command-specific option that is not a setting (what to do now, not how a run is made)."""
    return inspect.Parameter(
        name,
        inspect.Parameter.KEYWORD_ONLY,
        annotation=annotation,
        default=typer.Option(default, flag, *short, help=help),
    )


COMMON = [
    extra("config", Path | None, None, "--config", "Settings file (JSON or TOML), by section."),
    extra(
        "preset",
        str | None,
        None,
        "--preset",
        "Named recipe: seed, oacd, oacd-dual or mcdl (`newllm config --preset NAME` prints it); options and "
        "--config override it.",
    ),
    extra("json_output", bool, False, "--json", "Print the result as JSON on stdout."),
    extra(
        "quiet",
        bool,
        False,
        "--quiet",
        "No progress or summaries on stderr, only warnings and errors (the run's log.txt keeps everything).",
        "-q",
    ),
]
SPLIT = extra("split", str, "train", "--split", "train (learns) or val (weights frozen).")
REBUILD = extra(
    "rebuild", bool, False, "--rebuild", "Rerun the upstream stages first instead of refusing mismatched inputs."
)
FORCE = extra("force", bool, False, "--force", "Run Phase 2 even if the Phase-1 gate fails.")
GENERATE = [
    extra("prompt", str, ..., "--prompt", "Text to continue."),
    extra("max_new_tokens", int, 50, "--max-new-tokens", "Tokens to sample."),
    extra("temperature", float, 1.0, "--temperature", "Softmax temperature (0 = greedy)."),
    extra("top_k", int, 0, "--top-k", "Sample among the k most likely tokens (0 = all)."),
]
PLOT = extra(
    "plot", Path | None, None, "--plot", "Write PNG figures into this directory (needs matplotlib: the plot extra)."
)
PROBE_ROWS = extra(
    "probe_rows",
    int,
    DEFAULT_PROBE_ROWS,
    "--probe-rows",
    "Positions sampled per split for the decodability probes (0: none).",
)
FULL = [
    FORCE,
    PROBE_ROWS,
    extra(
        "rebuild",
        bool,
        False,
        "--rebuild",
        "Rerun every stage, even those whose inputs and settings are unchanged since they last succeeded.",
    ),
    PLOT,
]
REPLICATE = [
    extra("seeds", int, 4, "--seeds", "Seeds --seed, --seed + 1, ...: one run RUN.seed-S each, verdicts pooled."),
    FORCE,
    PROBE_ROWS,
]
EVAL = [  # the text itself comes as --source/--path or --val-source/--val-path (Command.own)
    extra("tokens", Path | None, None, "--tokens", "Or token ids (.npy) of the run's tokenizer, one document."),
    extra("split", str | None, None, "--split", "Or the run's own train or val split."),
]
EXPORT = [
    inspect.Parameter(
        "directory",
        inspect.Parameter.KEYWORD_ONLY,
        annotation=Path,
        default=typer.Argument(..., help="New (or empty) folder to write the run into."),
    )
]
ANALYZE = [
    extra("contexts", Path | None, None, "--contexts", "Analyse this N x C .npy instead of the run's contexts."),
    extra("tokens", Path | None, None, "--tokens", "Token ids .npy aligned with --contexts rows."),
    extra("tokenizer_file", Path | None, None, "--tokenizer-file", "tokenizer.json to decode --tokens."),
    PLOT,
    PROBE_ROWS,
    REBUILD,
]


def docstring(target: str) -> str:
    """The help of `<module>.<function>` under newllm_cli: its docstring, read from the source text
    so that help never imports torch (seconds), and found by text rather than parsed (parsing the
    modules costs a tenth of a second; tests check it against the parser's docstring)."""
    module, function = target.rsplit(".", 1)
    text = _source(module)
    start = re.search(rf"^def {function}\(", text, re.M)
    if start is None:
        raise LookupError(f"no function {function} in {module}")
    first = text.index('"""', start.end())
    doc = inspect.cleandoc(text[first + 3 : text.index('"""', first + 3)])
    return re.sub(r"(?<!\n)\n(?!\n)", " ", doc)  # rich keeps single line breaks


@functools.cache
def _source(module: str) -> str:
    return (Path(__file__).parents[1] / f"{module.replace('.', '/')}.py").read_text()


def split_kwargs(kwargs: dict) -> tuple[dict, dict]:
    """(nested settings given on the command line, the other keyword arguments)."""
    nested: dict = {}
    rest = {}
    for key, value in kwargs.items():
        if SEP in key:
            if value is not None:
                section, name = key.split(SEP)[:2]
                nested.setdefault(section, {}).setdefault(name, value)
        else:
            rest[key] = value
    return nested, rest


SWEEP = [
    extra("name", str, ..., "--name", "The sweep's name: its study, and the prefix of its runs."),
    extra(
        "grid",
        list[str],
        [],
        "--grid",
        "NAME=v1,v2,... (any setting by its option name), or NAME=LOW:HIGH[:log] for a search; repeat for more axes.",
    ),
    extra("sampler", str, "grid", "--sampler", "grid (every point), random or tpe (a search of --trials points)."),
    extra("trials", int | None, None, "--trials", "Points of a search."),
    extra(
        "storage",
        str | None,
        None,
        "--storage",
        "Optuna storage URL shared by workers, e.g. "
        "postgresql+psycopg://user@host/db (default: sqlite WORKSPACE/sweeps.db).",
    ),
    extra("jobs", int, 1, "--jobs", "Local worker processes."),
    extra("seeds", int, 1, "--seeds", "Seeds per point: runs POINT.seed-S, verdicts pooled (as `replicate`)."),
    extra(
        "probe_rows",
        int,
        DEFAULT_PROBE_ROWS,
        "--probe-rows",
        "Decodability probe rows of each trial's analysis (0: none).",
    ),
    extra(
        "heartbeat",
        float,
        10.0,
        "--heartbeat",
        "Seconds between a worker's heartbeats; a trial silent for 3 of them counts as killed.",
    ),
    FORCE,
    inspect.Parameter(
        "worker", inspect.Parameter.KEYWORD_ONLY, annotation=bool, default=typer.Option(False, "--worker", hidden=True)
    ),
]
CSV = [
    extra("csv_output", bool, False, "--csv", "Print the rows as CSV on stdout."),
    extra("markdown", bool, False, "--markdown", "Print the rows (and fits) as Markdown on stdout."),
]
COMPARE = [
    inspect.Parameter(
        "names",
        inspect.Parameter.KEYWORD_ONLY,
        annotation=list[str] | None,
        default=typer.Argument(None, help="Runs to compare.", show_default=False),
    ),
    extra("sweep", str | None, None, "--sweep", "Compare the finished trials of this sweep."),
    extra("storage", str | None, None, "--storage", "The sweep's Optuna storage URL (default: the workspace's)."),
    PLOT,
    *CSV,
]
