"""The package's shape: layers import only downwards, no module cycles, every command resolves."""

from __future__ import annotations

import ast
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

from newllm_cli import stages
from newllm_cli.cli.options import docstring
from newllm_cli.cli.table import COMMANDS
from newllm_cli.settings import Settings

PACKAGE = Path(__file__).resolve().parents[1] / "newllm_cli"
CONFIG = Path(__file__).resolve().parents[1] / "pyproject.toml"


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """import-linter's layers contract from pyproject.toml, on the package found under `root`."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [str(Path(sys.executable).parent / "lint-imports"), "--config", str(CONFIG), "--no-cache"],
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
    )


def test_layers_hold_and_a_planted_upward_import_breaks_them(tmp_path):
    ok = lint_imports(PACKAGE.parent)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    shutil.copytree(PACKAGE, tmp_path / "newllm_cli", ignore=shutil.ignore_patterns("__pycache__"))
    metrics = tmp_path / "newllm_cli" / "store" / "metrics.py"
    metrics.write_text(metrics.read_text() + "\n\ndef _late():\n    from newllm_cli.cli import report  # noqa\n")
    bad = lint_imports(tmp_path)
    assert bad.returncode != 0
    assert "newllm_cli.store is not allowed to import newllm_cli.cli" in bad.stdout, bad.stdout


def cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Every module that can reach itself, with one such path (lazy imports count)."""
    found, done = [], set()

    def visit(module: str, path: list[str]) -> None:
        for nxt in sorted(graph.find_modules_directly_imported_by(module)):
            if nxt in path:
                found.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in done:
                visit(nxt, path + [nxt])
        done.add(module)

    for module in sorted(graph.modules):
        if module not in done:
            visit(module, [module])
    return found


def test_no_module_imports_itself_through_others():
    graph = grimp.build_graph("newllm_cli")
    assert cycles(graph) == []
    graph.add_import(importer="newllm_cli.store.rowstore", imported="newllm_cli.store.metrics")
    graph.add_import(importer="newllm_cli.store.metrics", imported="newllm_cli.store.rowstore")
    assert {tuple(sorted(set(c))) for c in cycles(graph)} == {("newllm_cli.store.metrics", "newllm_cli.store.rowstore")}


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.name)
def test_every_command_resolves_to_a_stage_taking_its_options(command):
    """Each table entry names a function that exists and whose keyword parameters are exactly the
    command's own options (a mistake here would otherwise show only when the command runs)."""
    function = command.function()
    params = list(inspect.signature(function).parameters)
    assert params[0] == "s", f"{command.target} takes the settings first"
    own = {name.split(".")[1] for name in command.own}  # settings the command takes as its options
    assert set(params[1:]) == {p.name for p in command.options} | own, command.target
    assert callable(command.report) and callable(command.prints)


def test_no_module_rebinds_its_globals():
    """Process-wide state lives in the CLI's session (runtime/session.py), never in a `global`."""
    found = [
        f"{path.relative_to(PACKAGE)}:{node.lineno}"
        for path in PACKAGE.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Global)
    ]
    assert found == []


def test_a_stage_called_from_python_writes_no_log(cli, base_args, tmp_path):
    """Loading and sampling a trained run from a script leaves the run's log.txt as it was; the
    same stage run as a command appends to it."""
    args = [*base_args, "--num-layers", "1", "--context-dim", "8", "--embed-dim", "8"]
    assert cli("full", *args).code == 0
    log = tmp_path / "ws" / "runs" / "default" / "log.txt"
    before = log.read_bytes()
    saved = json.loads((tmp_path / "ws" / "runs" / "default" / "settings.json").read_text())
    settings = Settings.model_validate(saved)
    out = stages.generate(settings, "The", max_new_tokens=3)
    assert len(out["token_ids"]) == 3
    assert log.read_bytes() == before
    assert cli("generate", *args, "--prompt", "The", "--max-new-tokens", "3").code == 0
    assert len(log.read_bytes()) > len(before)


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.name)
def test_help_text_is_the_stage_functions_docstring(command):
    """Help reads docstrings from the source text (fast); it must equal what Python itself sees."""
    expected = inspect.getdoc(command.function()) or ""
    assert docstring(command.target) == re.sub(r"(?<!\n)\n(?!\n)", " ", expected)
