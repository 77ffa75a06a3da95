"""Shared fixtures: a small deterministic corpus, a workspace, and the CLI run in-process."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import pytest

from newllm_cli.cli.app import main

CHECKOUT = Path(__file__).resolve().parents[1]

WORDS = [
    "the",
    "a",
    "river",
    "stone",
    "light",
    "quickly",
    "moves",
    "under",
    "over",
    "bright",
    "quiet",
    "garden",
    "code",
    "runs",
    "model",
    "context",
    "learns",
    "token",
    "fixed",
    "point",
    "small",
    "large",
    "green",
    "window",
    "cat",
    "reads",
    "writes",
    "memory",
    "table",
    "slowly",
    "north",
    "winter",
    "bread",
    "coffee",
    "test",
    "value",
]


def make_corpus(path: Path, docs: int = 24, seed: int = 0) -> Path:
    """Blank-line-separated paragraphs of pseudo-English with some repeated structure."""
    rng = random.Random(seed)
    paragraphs = []
    for _ in range(docs):
        sentences = []
        for _ in range(rng.randint(3, 6)):
            n = rng.randint(5, 11)
            sentences.append(" ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + ".")
        paragraphs.append(" ".join(sentences))
    path.write_text("\n\n".join(paragraphs) + "\n")
    return path


def _checkout_files() -> set[str]:
    """What lies in the checkout's own workspace (and any stray default one) besides the placeholder."""
    return {str(p.relative_to(CHECKOUT)) for p in (CHECKOUT / "cache").rglob("*") if p.name != ".gitkeep"}


@pytest.fixture(autouse=True, scope="session")
def _checkout_stays_clean():
    """No test may write into the checkout: a command run without --workspace must fail this suite."""
    before = _checkout_files()
    yield
    added = _checkout_files() - before
    assert not added, f"tests wrote into the checkout: {sorted(added)[:5]}"


@pytest.fixture(autouse=True)
def _in_scratch_directory(tmp_path_factory, monkeypatch):
    """Each test runs from a scratch directory, so a relative default (the workspace `cache`) lands
    there, never in the checkout."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> dict:
        return json.loads(self.out)


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return make_corpus(tmp_path / "corpus.txt")


@pytest.fixture
def cli(capsys):
    def run(*args: str) -> Result:
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return Result(code, out, err)

    return run


@pytest.fixture
def base_args(tmp_path: Path, corpus: Path) -> list[str]:
    """A fast run on the fixture corpus: byte tokenizer, tiny Phase 2."""
    return [
        "--workspace",
        str(tmp_path / "ws"),
        "--source",
        "text_file",
        "--path",
        str(corpus),
        "--tokenizer",
        "byte",
        "--phase2-max-iterations",
        "30",
    ]
