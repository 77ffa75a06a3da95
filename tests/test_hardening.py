"""The reproductions of the hardening issue, one named test each: damaged or tampered artifacts,
concurrent writers, left-over temporary files, odd option values, Ctrl-C at start-up."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from conftest import load_checkpoint, make_corpus, save_checkpoint


def finished(cli, base_args) -> Path:
    assert cli("full", *base_args, "--force").code == 0
    return Path(base_args[1])


def one_error(r, code: int, *needles: str) -> None:
    lines = r.err.strip().splitlines()
    assert r.code == code, r.err
    assert (
        "Traceback" not in r.err
        and lines[-1].startswith("Error:")
        and sum(line.startswith("Error:") for line in lines) == 1
    )
    assert all(n in lines[-1] for n in needles), lines[-1]


def dataset_dir(ws: Path) -> Path:
    return next((ws / "datasets").iterdir())


def test_empty_npy_is_refused_not_an_interrupt(cli, base_args, tmp_path):
    ws = finished(cli, base_args)
    (ws / "runs/default/contexts_train.npy").write_bytes(b"")
    one_error(cli("phase2", *base_args, "--force"), 3, "contexts_train.npy", "newllm phase1 --split train")
    (tmp_path / "zero.npy").write_bytes(b"")
    one_error(cli("analyze", "--contexts", tmp_path / "zero.npy", "--workspace", ws), 2, "zero.npy")


def test_damaged_settings_json_is_ignored_and_rewritten(cli, base_args):
    ws = finished(cli, base_args)
    settings = ws / "runs/default/settings.json"
    for text in ("{x", "[]", '{"runtime": 5}', '{"data": []}'):
        settings.write_text(text)
        r = cli("phase1", *base_args, "--split", "val")
        assert r.code == 0 and "ignoring damaged" in r.err, r.err
        assert json.loads(settings.read_text())["model"]["context_dim"] == 16  # the stage wrote it again


def test_tampered_upstream_artifacts_exit_3(cli, base_args):
    ws = finished(cli, base_args)
    data, run = dataset_dir(ws), ws / "runs/default"
    meta = json.loads((data / "dataset.json").read_text())
    (data / "dataset.json").write_text(json.dumps({**meta, "vocab_size": 10}))
    one_error(cli("phase1", *base_args, "--split", "val"), 3, "ids outside 0..9", "newllm prepare-data")
    (data / "dataset.json").write_text(json.dumps(meta))
    good_tok = (data / "tokenizer.json").read_text()
    (data / "tokenizer.json").write_text('{"garbage": true}')
    one_error(cli("generate", *base_args, "--prompt", "The"), 3, "tokenizer.json", "newllm prepare-data")
    (data / "tokenizer.json").write_text(good_tok)
    report = json.loads((run / "phase1_val.json").read_text())
    (run / "phase1_val.json").write_text(json.dumps({k: v for k, v in report.items() if k != "provenance"}))
    one_error(cli("analyze", *base_args, "--probe-rows", "0"), 3, "phase1_val.json", "provenance")
    (run / "phase1_val.json").write_text(json.dumps(report))
    ckpt = load_checkpoint(run / "phase1.safetensors")
    save_checkpoint(run / "phase1.safetensors", {k: v for k, v in ckpt.items() if k != "state"})
    one_error(cli("phase1", *base_args, "--split", "val"), 3, "phase1.safetensors", "no state")
    bad = dict(ckpt, state={**ckpt["state"], "embed.weight": torch.zeros(3, 3)})
    save_checkpoint(run / "phase1.safetensors", bad)
    one_error(cli("phase1", *base_args, "--split", "val"), 3, "phase1.safetensors", "size mismatch")
    save_checkpoint(run / "phase1.safetensors", ckpt)
    head = load_checkpoint(run / "phase2.safetensors")
    head["state"] = {k: torch.full_like(v, float("nan")) for k, v in head["state"].items()}
    save_checkpoint(run / "phase2.safetensors", head)
    one_error(cli("generate", *base_args, "--prompt", "The"), 3, "phase2.safetensors", "NaN")


def test_contexts_of_the_wrong_width_are_refused(cli, base_args):
    ws = finished(cli, base_args)
    path = ws / "runs/default/contexts_train.npy"
    np.save(path, np.load(path)[:, :8])
    one_error(cli("phase2", *base_args, "--force"), 3, "contexts_train.npy", "8 columns, expected 16")


def test_a_full_disk_during_a_checkpoint_write_is_one_line_exit_1(cli, base_args, monkeypatch):
    import errno

    assert cli("prepare-data", *base_args).code == 0

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_bytes", full)
    one_error(cli("phase1", *base_args, "--phase1-max-iterations", "2"), 1, "No space left on device")


def test_two_writers_on_one_run(base_args, tmp_path):
    ws = Path(base_args[1])
    big = make_corpus(tmp_path / "big.txt", docs=1500)
    base_args = [a if a != base_args[base_args.index("--path") + 1] else str(big) for a in base_args]
    cmd = [
        sys.executable,
        "-m",
        "newllm_cli",
        "phase1",
        *base_args,
        "--phase1-min-iterations",
        "40",
        "--phase1-max-iterations",
        "40",
        "--json",
    ]
    assert (
        subprocess.run([sys.executable, "-m", "newllm_cli", "prepare-data", *base_args], capture_output=True).returncode
        == 0
    )
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = ws / "locks" / "run-default.lock"
    deadline = time.time() + 60
    while time.time() < deadline and not (lock.exists() and lock.read_text().startswith(str(first.pid))):
        time.sleep(0.05)
    second = subprocess.run(cmd, capture_output=True, text=True)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert second.returncode == 3 and f"in use by PID {first.pid}" in second.stderr, second.stderr
    saved = np.load(ws / "runs/default/contexts_train.npy")  # the run's artifacts are the first command's
    report = json.loads(out)
    assert (
        len(saved) == report["tokens"]
        and json.loads((ws / "runs/default/phase1_train.json").read_text())["seconds"] == report["seconds"]
    )


def test_temporary_files_of_dead_processes_are_swept(cli, base_args):
    assert cli("prepare-data", *base_args).code == 0
    run = Path(base_args[1]) / "runs/default"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = [run / f".contexts.{dead.pid}.abcd1234.npy", run / f".phase1.safetensors.{dead.pid}.xyz.tmp"]
    alive = run / f".contexts.{os.getppid()}.abcd1234.npy"  # pytest's parent: alive
    for p in (*stale, alive):
        p.write_bytes(b"x")
    datasets = Path(base_args[1]) / "datasets"
    half_built = datasets / f".{next(datasets.iterdir()).name}.{dead.pid}.k2j4x9"  # a killed prepare-data's
    half_built.mkdir()
    (half_built / "train.docs.jsonl").write_text("a copy of the corpus\n")
    assert cli("phase1", *base_args, "--phase1-max-iterations", "2").code == 0
    assert not any(p.exists() for p in stale) and alive.exists()
    assert cli("prepare-data", *base_args).code == 0 and not half_built.exists()


def test_odd_values_are_usage_errors(cli, base_args, tmp_path, monkeypatch):
    one_error(cli("generate", *base_args, "--prompt", "x", "--temperature", "nan"), 2, "--temperature")
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"[model]\ncontext_dim = 8 # \xff\xfe\n")
    one_error(cli("config", "--config", bad), 2, "not UTF-8")
    bad.write_text("[model]\ncontext_dim = true\n")
    one_error(cli("config", "--config", bad), 2, "--context-dim", "not true or false")
    for name in (".", ".."):
        one_error(cli("phase1", *base_args, "--run", name), 2, "names a directory")
    monkeypatch.setenv("HOME", str(tmp_path))
    r = cli("config", "--workspace", "~/wsx", "--json")
    assert r.json()["settings"]["runtime"]["workspace"] == str(tmp_path / "wsx")


def test_ctrl_c_during_start_up_and_prepare_data_is_one_line_exit_130(tmp_path):
    corpus = make_corpus(tmp_path / "big.txt", docs=40000)
    for delay, args in (
        (0.3, ["phase1", "--workspace", str(tmp_path / "a")]),
        (
            0.0,
            [
                "prepare-data",
                "--workspace",
                str(tmp_path / "b"),
                "--source",
                "text_file",
                "--path",
                str(corpus),
                "--tokenizer-vocab-size",
                "30000",
            ],
        ),
    ):
        p = subprocess.Popen(
            [sys.executable, "-m", "newllm_cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        time.sleep(delay)
        building = tmp_path / "b" / "datasets"  # prepare-data: once it is at work (a fast machine is done in 3 s)
        while args[0] == "prepare-data" and p.poll() is None and not any(building.glob("*/train.docs.jsonl")):
            time.sleep(0.05)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
        assert p.returncode == 130 and err.strip().splitlines()[-1] == "Error: interrupted", err
        assert "Traceback" not in err


def test_sigkill_at_random_moments_then_a_rerun_gives_the_uninterrupted_result(tmp_path):
    """kill -9 in the middle of each stage; the same command again yields exactly what an
    uninterrupted run yields, and no temporary file of the killed process stays behind."""
    import random

    corpus = make_corpus(tmp_path / "corpus.txt", docs=400)
    rng = random.Random(7)

    def newllm(ws: Path, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "newllm_cli",
                *args,
                "--workspace",
                str(ws),
                "--source",
                "text_file",
                "--path",
                str(corpus),
                "--phase1-max-iterations",
                "30",
                "--phase2-max-iterations",
                "30",
                "--no-control",
            ],
            capture_output=True,
            text=True,
        )

    stages = [["prepare-data"], ["phase1"], ["phase1", "--split", "val"], ["phase2", "--force"]]
    for stage in stages:  # the reference
        assert newllm(tmp_path / "ref", *stage).returncode == 0, stage
    for stage in stages:
        cmd = [
            sys.executable,
            "-m",
            "newllm_cli",
            *stage,
            "--workspace",
            str(tmp_path / "k"),
            "--source",
            "text_file",
            "--path",
            str(corpus),
            "--phase1-max-iterations",
            "30",
            "--phase2-max-iterations",
            "30",
            "--no-control",
        ]
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(2.0, 4.0))
        p.send_signal(signal.SIGKILL)
        p.wait()
        again = newllm(tmp_path / "k", *stage)
        assert again.returncode == 0, (stage, again.stderr)
    ref_run, run = tmp_path / "ref/runs/default", tmp_path / "k/runs/default"
    for name in ("contexts_train.npy", "contexts_val.npy"):
        assert np.array_equal(np.load(ref_run / name), np.load(run / name)), name
    for name in ("phase1_train.json", "phase2.json"):
        a, b = (json.loads((d / name).read_text()) for d in (ref_run, run))
        assert (
            a["converged_ratio" if "phase1" in name else "val"] == b["converged_ratio" if "phase1" in name else "val"]
        )
    leftovers = [p for p in (tmp_path / "k").rglob(".*") if p.name not in (".lock",) and "locks" not in p.parts]
    assert not leftovers, leftovers


def test_prepare_data_rebuilds_its_own_damaged_output(cli, base_args):
    assert cli("prepare-data", *base_args).code == 0
    meta = dataset_dir(Path(base_args[1])) / "dataset.json"
    meta.write_text("{garbage")
    r = cli("prepare-data", *base_args)
    assert r.code == 0 and "rebuilding dataset" in r.err
    assert json.loads(meta.read_text())["vocab_size"] == 256


def test_parallel_commands_do_not_trip_over_the_writability_probe(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from newllm_cli.store.artifacts import Workspace

    ws = Workspace(tmp_path, "r")
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: ws.ensure(), range(800)))  # raised "not writable" before
    assert [p.name for p in ws.run_dir.iterdir()] == []
