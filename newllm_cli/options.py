"""CLI options generated from the settings model, so every field is an option of every command.

Options arrive as strings (or None when not given) and pydantic converts them, so a bad value
gives the same one-line error whether it came from an option, a config file or settings.json.
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Optional

import typer

from .settings import SECTIONS, cli_name

SEP = "__"


def _metavar(annotation) -> str:
    text = str(annotation)
    for word in ("int", "float", "Literal", "str"):
        if word in text:
            return {"Literal": "CHOICE", "str": "TEXT"}.get(word, word.upper())
    return "TEXT"


def settings_parameters() -> list[inspect.Parameter]:
    params = []
    for section, model in SECTIONS.items():
        for name, f in model.model_fields.items():
            flag = cli_name(section, name)
            panel = f"{section.title()} settings"
            if f.annotation is bool:
                option = typer.Option(None, f"--{flag}/--no-{flag}", help=f"{f.description} (default: {'on' if f.default else 'off'})", rich_help_panel=panel,
                                      show_default=False)
                annotation = Optional[bool]
            else:
                option = typer.Option(None, f"--{flag}", help=f"{f.description} (default: {f.default})",
                                      metavar=_metavar(f.annotation), rich_help_panel=panel, show_default=False)
                annotation = Optional[str]
            params.append(inspect.Parameter(f"{section}{SEP}{name}", inspect.Parameter.KEYWORD_ONLY,
                                            default=option, annotation=annotation))
    return params


COMMON = [
    inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
                      default=typer.Option(None, "--config", help="Settings file (JSON or TOML), by section.")),
    inspect.Parameter("json_output", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                      default=typer.Option(False, "--json", help="Print the result as JSON on stdout.")),
]


def split_kwargs(kwargs: dict) -> tuple[dict, dict]:
    """(nested settings given on the command line, the other keyword arguments)."""
    nested: dict = {}
    rest = {}
    for key, value in kwargs.items():
        if SEP in key:
            if value is not None:
                section, name = key.split(SEP, 1)
                nested.setdefault(section, {})[name] = value
        else:
            rest[key] = value
    return nested, rest
