"""Every artifact is bound to its content, inputs are read once, a real full disk loses nothing:
the data-loss and wrong-result reproductions of the second hardening round, one named test each."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import CHECKOUT, FAST, load_checkpoint, make_corpus, one_line, save_checkpoint

ENV = {**os.environ, "PYTHONPATH": str(CHECKOUT)}


def newllm(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "newllm_cli", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=600, **kw)  # fmt: skip


@pytest.fixture
def run(tmp_path):
    corpus = make_corpus(tmp_path / "c.txt", docs=40)
    return ["--workspace", str(tmp_path / "ws"), "--source", "text_file", "--path", str(corpus), *FAST]


def run_dir(args) -> Path:
    return Path(args[1]) / "runs" / "default"


def data_dir(args) -> Path:
    return next((Path(args[1]) / "datasets").iterdir())


# --- 5. an input read once, keyed by content --------------------------------------------------------


def test_a_piped_path_is_read_once_and_a_second_pipe_is_no_cache_hit(tmp_path):
    corpus = make_corpus(tmp_path / "c.txt", docs=131)
    other = make_corpus(tmp_path / "d.txt", docs=60, seed=3)
    ws = ["--workspace", tmp_path / "ws", "--source", "text_file", "--tokenizer", "byte", "--json"]
    plain = json.loads(newllm("prepare-data", *ws, "--path", corpus).stdout)

    def piped(path: Path) -> dict:
        command = f"{sys.executable} -m newllm_cli prepare-data {' '.join(map(str, ws))} --path <(cat {path})"
        return json.loads(subprocess.run(["bash", "-c", command], capture_output=True, text=True, env=ENV).stdout)

    first, second = piped(corpus), piped(other)
    count = first["train"]["documents"] + first["val"]["documents"]
    assert count == plain["train"]["documents"] + plain["val"]["documents"] == 131
    assert first["train"]["sha256"] == plain["train"]["sha256"]
    assert not second["cache_hit"] and second["key"] != first["key"]
    assert not list((tmp_path / "ws" / "datasets").glob(".pipe.*"))  # the copy went with its process


def test_an_edit_that_restores_the_modification_time_is_no_stale_cache_hit(cli, run):
    assert cli("prepare-data", *run).code == 0
    corpus = Path(run[run.index("--path") + 1])
    st = corpus.stat()
    text = corpus.read_text()
    corpus.write_text(text.replace("the", "THE", 1))
    os.utime(corpus, ns=(st.st_atime_ns, st.st_mtime_ns))
    r = cli("prepare-data", *run, "--json")
    assert r.code == 0 and not r.json()["cache_hit"]


# --- 6. swapped same-shape artifacts ---------------------------------------------------------------


def test_another_run_s_contexts_of_the_same_shape_are_refused(cli, run):
    assert cli("full", *run, "--force").code == 0
    assert cli("phase1", *run, "--run", "other", "--seed", "7").code == 0
    shutil.copy(run_dir(run).parent / "other" / "contexts_train.npy", run_dir(run) / "contexts_train.npy")
    one_line(cli("phase2", *run, "--force"), 3, "contexts_train.npy", "swapped or edited")


def test_a_permuted_token_array_is_refused(cli, run):
    assert cli("full", *run, "--force").code == 0
    path = data_dir(run) / "val.tokens.npy"
    a = np.load(path)
    np.save(path, np.random.default_rng(0).permutation(a))
    one_line(cli("phase1", *run, "--split", "val"), 3, "val.tokens.npy", "swapped or edited")


def test_another_valid_tokenizer_of_the_same_size_is_refused_by_generate(cli, run):
    assert cli("full", *run, "--force").code == 0
    path = data_dir(run) / "tokenizer.json"
    spec = json.loads(path.read_text())
    vocab = spec["model"]["vocab"]
    names = sorted(vocab, key=vocab.get)
    swapped = dict(zip(names, [vocab[n] for n in names[1:] + names[:1]]))  # every id moved by one
    spec["model"]["vocab"] = swapped
    path.write_text(json.dumps(spec))
    one_line(cli("generate", *run, "--prompt", "The", "--max-new-tokens", "2"), 3, "tokenizer.json")


def test_a_checkpoint_whose_weights_are_not_its_model_id_is_refused(cli, run):
    assert cli("full", *run, "--force").code == 0
    path = run_dir(run) / "phase1.safetensors"
    payload = load_checkpoint(path)
    name = sorted(payload["state"])[-1]
    payload["state"][name] = payload["state"][name] * 1.5
    save_checkpoint(path, payload)
    one_line(cli("phase1", *run, "--split", "val"), 3, "phase1.safetensors", "model_id")


# --- 8. a stage publishes all its outputs or none ---------------------------------------------------


def test_a_stage_that_fails_mid_publish_keeps_every_previous_artifact(cli, run, monkeypatch):
    assert cli("full", *run, "--force").code == 0
    files = ("phase1.safetensors", "contexts_train.npy", "phase1_train.json", "metrics.csv")
    before = {n: (run_dir(run) / n).read_bytes() for n in files}
    import newllm_cli.store.artifacts as artifacts

    real = artifacts.write_json

    def failing(path, data, private=False):  # the report is written after the contexts and checkpoint
        if Path(path).name == "phase1_train.json":
            raise OSError(28, "No space left on device", str(path))
        return real(path, data, private)

    monkeypatch.setattr("newllm_cli.stages.write_json", failing)
    r = cli("phase1", *run, "--seed", "9")
    one_line(r, 1, "No space left on device", "phase1_train.json")
    assert {n: (run_dir(run) / n).read_bytes() for n in files} == before
    assert not [p for p in run_dir(run).iterdir() if p.name.startswith(".")]


# --- 11. resume points are validated like every artifact --------------------------------------------


def interrupted_phase1(cli, run) -> Path:
    """A phase1 train stopped after its first iteration with a resume point on disk."""
    assert cli("prepare-data", *run).code == 0
    from newllm_cli.runtime import interrupt

    real, calls = interrupt.SavePoints.poll, {"n": 0}

    def stop_once(self):  # Ctrl-C at the first safe point
        calls["n"] += 1
        return (True, True) if calls["n"] == 1 else real(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(interrupt.SavePoints, "poll", stop_once)
        r = cli("phase1", *run, "--phase1-max-iterations", "6", "--phase1-min-iterations", "6")
    assert r.code == 130, r.err[-500:]
    path = run_dir(run) / "phase1_train.resume.pt"
    assert path.exists()
    return path


@pytest.mark.parametrize(
    "edit",
    [
        {"next": 10**6},
        {"next": -5},
        {"next": "x"},
        {"history": 5},
        {"optimizer_steps": -1},
        {"model": {"x": 1}},
        {"optimizer": None},
    ],
    ids=lambda e: "-".join(f"{k}={str(v)[:8]}" for k, v in e.items()),
)
def test_a_damaged_resume_point_is_ignored_with_a_warning(cli, run, edit):
    path = interrupted_phase1(cli, run)
    payload = load_checkpoint(path)
    payload["state"].update(edit)
    save_checkpoint(path, payload)
    r = cli("phase1", *run, "--phase1-max-iterations", "6", "--phase1-min-iterations", "6")
    assert r.code == 0 and "Traceback" not in r.err and "starting afresh" in r.err, r.err[-800:]
    fresh = cli("phase1", *run, "--run", "fresh", "--phase1-max-iterations", "6", "--phase1-min-iterations", "6")
    assert fresh.code == 0
    a = json.loads((run_dir(run) / "phase1_train.json").read_text())
    b = json.loads((run_dir(run).parent / "fresh" / "phase1_train.json").read_text())
    assert a["optimizer_steps"] == b["optimizer_steps"] and a["provenance"]["model_id"] == b["provenance"]["model_id"]


def test_a_resume_under_another_memory_budget_starts_afresh(cli, run):
    interrupted_phase1(cli, run)
    r = cli("phase1", *run, "--phase1-max-iterations", "6", "--phase1-min-iterations", "6", "--memory-budget", "0.001")
    assert r.code == 0 and "other settings; starting afresh" in r.err, r.err[-500:]


# --- 7. a real full disk ---------------------------------------------------------------------------


def _listing(root: Path) -> dict:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file() and p.name != "log.txt" and p.parent.name != "locks"  # who held the lock last
    }


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount"), reason="mounting a tmpfs needs root")
def test_a_real_full_disk_at_random_points_of_each_stage(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("this machine does not let us mount a tmpfs")
    try:
        corpus = make_corpus(tmp_path / "c.txt", docs=120)
        ws = disk / "ws"
        base = ["--workspace", ws, "--source", "text_file", "--path", corpus, *FAST, "--threads", "1"]
        assert newllm("full", *base, "--force").returncode == 0
        run = ws / "runs" / "default"
        stages = {  # each stage, and the outputs it rewrites (as large again): less room than those, it fails
            "prepare-data": (["prepare-data", "--val-ratio", "0.3"], list(next((ws / "datasets").iterdir()).iterdir())),
            "phase1": (["phase1", "--seed", "5"], [run / "contexts_train.npy", run / "phase1.safetensors"]),
            "phase1 val": (["phase1", "--split", "val", "--phase1-max-iterations", "5"], [run / "contexts_val.npy"]),
            "phase2": (
                ["phase2", "--force", "--phase2-max-iterations", "12"],
                [run / "phase2.safetensors", run / "phase2.json"],
            ),
        }
        rng = random.Random(0)
        for name, (cmd, outputs) in stages.items():
            most = int(0.9 * sum(p.stat().st_size for p in outputs))
            for _ in range(3):
                before = _listing(ws)
                free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
                room = rng.randint(0, most)
                filler = disk / "filler"
                with open(filler, "wb") as f:
                    os.posix_fallocate(f.fileno(), 0, max(free - room, 1))
                try:
                    r = newllm(cmd[0], *base, *cmd[1:])  # its own options last: they win
                finally:
                    filler.unlink()
                lines = r.stderr.strip().splitlines()
                assert r.returncode == 1, (name, r.returncode, r.stderr[-600:])
                assert "Traceback" not in r.stderr and lines[-1].startswith("Error: No space left on device"), lines[-1]
                named = lines[-1].rsplit(": ", 1)[-1]
                assert str(ws) in named and ".tmp" not in named and "/." not in named, named
                after = _listing(ws)
                assert after == before, (name, sorted(set(after) ^ set(before))[:5])
    finally:
        subprocess.run(["umount", "-l", str(disk)])
