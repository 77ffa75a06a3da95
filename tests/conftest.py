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


FAST = ["--tokenizer", "byte", "--phase1-max-iterations", "4", "--phase2-max-iterations", "10", "--no-control"]


def finished_run(root: Path, docs: int) -> list[str]:
    """A finished tiny run (`full`) in root/ws; its arguments."""
    corpus = make_corpus(root / "corpus.txt", docs=docs)
    base = ["--workspace", str(root / "ws"), "--source", "text_file", "--path", str(corpus), *FAST]
    assert main(["full", *base, "--force"]) == 0
    return base


def copy_run(root: Path, base: list[str], into: Path) -> list[str]:
    """A copy of root/ws (links as links) in into/ws; the same arguments pointing at it."""
    import shutil

    shutil.copytree(root / "ws", into / "ws", symlinks=True)
    return [a if a != str(root / "ws") else str(into / "ws") for a in base]


def plant(path: Path, how: str, outside: Path) -> None:
    """Put at `path`, in place of what is there: a link to outside/victim ("link"), to outside/dir
    ("dir-link"), to nothing ("dangling"), to /dev/zero ("dev-zero"), a FIFO, a directory, a plain
    file, or a sparse 2 GiB file ("huge")."""
    import os
    import shutil

    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    links = {"link": outside / "victim", "dir-link": outside / "dir", "dangling": outside / "none"}
    if how in links or how == "dev-zero":
        path.symlink_to(links.get(how, Path("/dev/zero")))
    elif how == "fifo":
        os.mkfifo(path)
    elif how == "directory":
        path.mkdir()
    elif how == "file":
        path.write_text("x")
    else:  # huge
        with open(path, "wb") as f:
            f.truncate(1 << 31)  # takes no disk


def sentinel(outside: Path) -> Path:
    """A tree outside the workspace that no command may change: outside/victim, outside/dir/inner."""
    (outside / "dir").mkdir(parents=True)
    (outside / "victim").write_text("someone's file\n")
    (outside / "dir" / "inner").write_text("someone's other file\n")
    return outside


def one_line(r, code: int, *needles: str) -> None:
    """A command (a Result, or a subprocess's CompletedProcess) that ended with exit `code` and one
    error line, no traceback, holding every needle."""
    err = r.err if hasattr(r, "err") else r.stderr
    got = r.code if hasattr(r, "code") else r.returncode
    lines = err.strip().splitlines()
    assert got == code, err[-800:]
    assert "Traceback" not in err and sum(line.startswith("Error:") for line in lines) == 1, err[-800:]
    assert len(lines[-1]) < 1000 and all(n in lines[-1] for n in needles), lines[-1][:300]


def load_checkpoint(path: Path) -> dict:
    """A checkpoint as the dict its writer was given: safetensors weights or a torch resume point."""
    if Path(path).suffix == ".safetensors":
        from newllm_cli.store import weights

        return weights.decode(Path(path).read_bytes(), Path(path), "")
    import torch

    return torch.load(path, weights_only=True)


def save_checkpoint(path: Path, payload: dict) -> None:
    """Write `payload` in the format its path names (a test's edit of a checkpoint)."""
    if Path(path).suffix == ".safetensors":
        from newllm_cli.store import weights

        Path(path).write_bytes(weights.encode(payload))
        return
    import torch

    torch.save(payload, path)
