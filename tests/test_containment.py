"""Nothing outside the workspace is ever touched through it: links, FIFOs, devices and directories
planted at any workspace path (the list is generated from Workspace) are refused before the work,
never read, written or deleted through; a lock survives the deletion of its file."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import copy_run, finished_run, one_line, plant, sentinel

from newllm_cli.store.artifacts import Workspace


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny run, copied afresh for each test by `fresh`."""
    root = tmp_path_factory.mktemp("contain")
    return root, finished_run(root, docs=16)


@pytest.fixture
def fresh(finished, tmp_path):
    """(workspace, base args, outside): a copy of the finished run, and a sentinel tree outside it."""
    args = copy_run(*finished, tmp_path)
    outside = sentinel(tmp_path / "outside")
    (outside / "dir" / "phase1_val").mkdir()
    (outside / "dir" / "phase1_val" / "events").write_text("someone's events\n")
    return tmp_path / "ws", args, outside


def tree(path: Path) -> dict:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in path.rglob("*") if p.is_file()
    }


@contextlib.contextmanager
def no_hang(seconds: int = 60):
    def fail(*_):
        raise TimeoutError(f"the command hung for {seconds} s")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def refused(r, *needles: str) -> None:
    one_line(r, 3, *needles)


def run_dir(ws: Path) -> Path:
    return ws / "runs" / "default"


def data_dir(ws: Path) -> Path:
    return next((ws / "datasets").iterdir())


# --- the reproductions ---------------------------------------------------------------------


def test_the_run_lock_is_never_written_through_a_planted_link(cli, fresh):
    ws, args, outside = fresh
    before = tree(outside)
    lock = ws / "locks" / "run-default.lock"
    lock.unlink(missing_ok=True)
    lock.symlink_to(outside / "victim")
    refused(cli("phase1", "--split", "val", *args), "run-default.lock", "symbolic link")
    lock.unlink()
    dlock = ws / "locks" / f"dataset-{data_dir(ws).name}.lock"
    dlock.unlink(missing_ok=True)
    dlock.symlink_to(outside / "victim")
    shutil.rmtree(data_dir(ws))
    refused(cli("prepare-data", *args), "dataset-", "symbolic link")
    assert tree(outside) == before


def test_tensorboard_never_deletes_through_a_linked_directory(cli, fresh):
    pytest.importorskip("tensorboard")
    ws, args, outside = fresh
    before = tree(outside)
    board = run_dir(ws) / "tensorboard"
    shutil.rmtree(board, ignore_errors=True)
    board.symlink_to(outside / "dir")
    refused(cli("phase1", "--split", "val", "--tensorboard", *args), "tensorboard", "symbolic link")
    assert tree(outside) == before


def test_a_linked_or_fifo_log_is_never_written_and_never_hangs(cli, fresh):
    ws, args, outside = fresh
    before = tree(outside)
    log = run_dir(ws) / "log.txt"
    log.unlink()
    log.symlink_to(outside / "victim")
    refused(cli("phase1", "--split", "val", *args), "log.txt", "symbolic link")
    log.unlink()
    os.mkfifo(log)
    with no_hang():
        refused(cli("phase1", "--split", "val", *args), "log.txt", "FIFO")
        r = cli("generate", "--prompt", "The", "--max-new-tokens", "2", *args)  # a reader: the log is skipped
    assert r.code in (0, 3) and "Traceback" not in r.err, r.err[-500:]
    assert tree(outside) == before


def test_a_fifo_settings_json_and_a_dev_zero_metrics_never_hang(cli, fresh):
    ws, args, _ = fresh
    settings = run_dir(ws) / "settings.json"
    settings.unlink()
    os.mkfifo(settings)
    with no_hang():
        refused(cli("phase1", "--split", "val", *args), "settings.json", "FIFO")
    settings.unlink()
    metrics = run_dir(ws) / "metrics.csv"
    metrics.unlink()
    metrics.symlink_to("/dev/zero")
    with no_hang():
        refused(cli("phase1", "--split", "val", *args), "metrics.csv", "symbolic link")


def test_a_linked_metrics_csv_is_never_read_into_the_run(cli, fresh):
    ws, args, outside = fresh
    (outside / "rows.csv").write_text("stage,split,step\nforeign,train,1\n")
    metrics = run_dir(ws) / "metrics.csv"
    metrics.unlink()
    metrics.symlink_to(outside / "rows.csv")
    refused(cli("phase1", "--split", "val", *args), "metrics.csv")
    metrics.unlink()
    (run_dir(ws) / "phase1_val.json").unlink()  # so that the stage runs and records its rows
    assert cli("phase1", "--split", "val", *args).code == 0
    assert "foreign" not in metrics.read_text()


def test_a_linked_run_or_dataset_directory_is_refused(cli, fresh):
    ws, args, outside = fresh
    (ws / "runs" / "default").rename(outside / "moved")
    (ws / "runs" / "default").symlink_to(outside / "moved")
    before = tree(outside)
    refused(cli("phase1", "--split", "val", *args), "runs/default", "symbolic link")
    assert tree(outside) == before


def test_a_settings_json_or_metrics_csv_that_is_a_directory_is_refused_before_the_work(cli, fresh):
    ws, args, _ = fresh
    for name in ("settings.json", "metrics.csv"):
        path = run_dir(ws) / name
        saved = path.read_bytes()
        path.unlink()
        path.mkdir()
        r = cli("phase1", "--split", "val", *args)
        refused(r, str(path), "a directory")
        assert "phase1 val:" not in r.err  # refused before the work
        path.rmdir()
        path.write_bytes(saved)


# --- a link or special file at every artifact path -------------------------------------------------


def artifact_paths(ws: Path) -> list[tuple[Path, str]]:
    return Workspace(ws, "default", data_dir(ws).name).files()


def test_the_artifact_list_is_the_workspace_s_and_complete(fresh):
    ws, _, _ = fresh
    listed = {p for p, _ in artifact_paths(ws)}
    on_disk = {p for p in run_dir(ws).iterdir() if not p.name.startswith(".")} | set(data_dir(ws).iterdir())
    assert on_disk <= listed, sorted(map(str, on_disk - listed))
    assert len(listed) >= 28


@pytest.mark.parametrize("how", ["link", "dangling", "fifo", "dev-zero", "other"])
def test_something_planted_at_every_artifact_path_is_refused_and_nothing_outside_changes(cli, fresh, how):
    ws, args, outside = fresh
    before = tree(outside)
    for path, what in artifact_paths(ws):
        saved = {p: p.read_bytes() for p in [path] if p.is_file() and not p.is_symlink()}
        plant(path, ("directory" if what == "file" else "file") if how == "other" else how, outside)
        with no_hang(120):
            r = cli("phase1", "--split", "val", *args)
        name = path.name
        refused(r, name)
        assert tree(outside) == before, name
        plant(path, "directory" if what == "dir" else "file", outside)  # put a plain one back
        path.rmdir() if path.is_dir() else path.unlink()
        for p, blob in saved.items():
            p.write_bytes(blob)


# --- the lock survives the deletion of its file ----------------------------------------------------


def test_deleting_the_lock_file_under_a_writer_does_not_let_a_second_writer_in(fresh, tmp_path):
    ws, args, _ = fresh
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    slow = ["--phase1-max-iterations", "100000", "--phase1-min-iterations", "100000", "--phase1-stop-on-drops", "0"]
    cmd = [sys.executable, "-m", "newllm_cli", "phase1", *args, "--rebuild", *slow]
    log = run_dir(ws) / "log.txt"
    start = log.stat().st_size
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "  iteration " not in log.read_text()[start:]:
            time.sleep(0.2)
        assert first.poll() is None and "  iteration " in log.read_text()[start:]
        for lock in (ws / "locks").iterdir():
            lock.unlink()
        second = subprocess.run(
            [sys.executable, "-m", "newllm_cli", "phase1", "--split", "val", *args],
            capture_output=True, text=True, env=env, timeout=120,
        )  # fmt: skip
        assert second.returncode == 3 and "in use by PID" in second.stderr, second.stderr[-500:]
        assert first.poll() is None  # the first was running all along
    finally:
        first.kill()
        first.wait()
