"""Data parallelism under torchrun (gloo, 2 processes on this machine): the same artifacts as one
process, Ctrl-C and a killed rank end the job with a resume point that any world size continues."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_checkpoint, make_corpus

from newllm_cli.runtime import distributed
from newllm_cli.training.pairs import pair_block, pair_documents


class FakeRanks(distributed.Group):
    """Rank `rank` of `size`, for the pure functions that only ask who and how many."""

    def __init__(self, rank: int, size: int):
        self.rank, self.size = rank, size


def test_shards_are_contiguous_cover_every_document_and_balance_tokens():
    rng = np.random.default_rng(0)
    for docs, size in [(1, 2), (3, 4), (50, 2), (997, 3), (5000, 7)]:
        lengths = rng.integers(1, 400, docs)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        shards = [distributed.shard_of(offsets, r, size) for r in range(size)]
        assert shards[0].first == 0 and shards[-1].last == docs
        block = distributed.block_size(offsets[-1]) + lengths.max()
        for a, b in zip(shards, shards[1:]):
            assert a.last == b.first and a.stop == b.start  # contiguous, in corpus order
        for sh in shards:
            assert sh.start == offsets[sh.first] and sh.stop == offsets[sh.last] and sh.total == offsets[-1]
            assert abs((sh.stop - sh.start) - offsets[-1] / size) <= block  # within a block of the fair share
            assert sh.blocks[0] == 0 and sh.blocks[-1] == sh.stop - sh.start and np.all(np.diff(sh.blocks) > 0)
        starts = offsets[distributed.block_starts(offsets)]
        for sh in shards:  # a rank's blocks are the corpus's blocks
            assert set(sh.blocks + sh.start) <= set(starts)


def test_pair_blocks_of_the_ranks_are_all_pairs_in_order():
    rng = np.random.default_rng(1)
    lengths = np.concatenate([[1, 1], rng.integers(1, 3000, 40), [1]])  # one-token documents have no pair
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    whole = pair_documents(offsets)
    for size in (1, 2, 3, 5):
        parts = [pair_block(offsets, FakeRanks(r, size)) for r in range(size)]
        assert np.array_equal(np.concatenate([p[0] for p in parts]), whole[0])
        assert np.array_equal(np.concatenate([p[1] for p in parts]), whole[1])
        assert all(len(p[0]) % distributed.block_size(len(whole[0])) == 0 for p in parts[:-1])  # between blocks


# ---- the CLI under torchrun ---------------------------------------------------------------------


def torchrun(*args: str, nproc: int = 2, **kw) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "newllm_cli",
        "--",
        *args,
    ]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def one_process(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "newllm_cli", *args], capture_output=True, text=True, timeout=600)


def finished(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> Path:
    """31 documents of uneven lengths: no world size splits them evenly."""
    return make_corpus(tmp_path_factory.mktemp("corpus") / "uneven.txt", docs=31, seed=3)


def common(ws: Path, corpus: Path, *extra: str) -> list[str]:
    return [
        "--workspace",
        str(ws),
        "--source",
        "text_file",
        "--path",
        str(corpus),
        "--tokenizer",
        "byte",
        "--threads",
        "1",
        "--phase2-max-iterations",
        "40",
        "--quiet",
        *extra,
    ]


def close(a, b, what: str) -> None:
    """Numbers, lists and dicts equal, bit for bit (times, paths and the world size excepted): every
    world size, resume point and memory budget gives one process's bits with the same --threads."""
    if isinstance(a, dict):
        for k in a:
            if k not in (
                "seconds",
                "token_iterations_per_second",
                "wall_seconds",
                "path",
                "contexts",
                "checkpoint",
                "plots",
                "world_size",
            ):
                close(a[k], b[k], f"{what}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            close(x, y, f"{what}[{i}]")
    else:
        assert a == b, (what, a, b)


def same_artifacts(a: Path, b: Path, files=("phase1_train.json", "phase1_val.json", "phase2.json")) -> None:
    for name in files:
        close(json.loads((a / name).read_text()), json.loads((b / name).read_text()), name)
    for name in ("contexts_train.npy", "contexts_val.npy"):
        if (a / name).exists():
            assert np.array_equal(np.load(a / name), np.load(b / name)), name
    for name in ("phase1.safetensors", "phase2.safetensors"):
        if (a / name).exists():
            x = load_checkpoint(a / name)["state"]
            y = load_checkpoint(b / name)["state"]
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name


def test_two_ranks_give_the_artifacts_of_one_process(tmp_path, uneven):
    """Each training stage as its own torchrun job; then one process reads the distributed run."""
    ws = tmp_path / "ws"
    args = common(ws, uneven)
    assert one_process("full", *args, "--run", "one").returncode == 0
    for stage in (["phase1", "--split", "train"], ["phase1", "--split", "val"], ["phase2"]):
        code, out, err = finished(torchrun(*stage, *args, "--run", "two"))
        assert code == 0, err
        assert out.count("\n") == 1 and out.strip().endswith(
            ("runs/two/contexts_train.npy", "contexts_val.npy", "phase2.safetensors")
        ), out  # the leader's line only
        assert "rank 1" not in err  # the other rank is silent
    one, two = ws / "runs" / "one", ws / "runs" / "two"
    same_artifacts(one, two)  # each process with one thread, as the single one: the same bits
    report = json.loads((two / "phase1_train.json").read_text())
    assert report["provenance"]["world_size"] == 2 and report["documents"] == 25  # (31 - 20% held out)
    assert report["optimizer_steps"] >= 2 and report["history"][1]["converged_ratio"] is not None
    # the carry-over solve (the default) over both ranks' documents, as one process solves them
    assert report["fixed_point_solve"]["documents"] == 25 and report["fixed_point"]["documents"] == 25
    assert not [p.name for p in two.iterdir() if p.name.startswith(".")]  # no temporary left
    # analyze and generate read the distributed run as they read a single-process one
    analysis = one_process("analyze", "--json", *args, "--run", "two")
    assert analysis.returncode == 0, analysis.stderr
    close(json.loads((one / "analysis.json").read_text()), json.loads(analysis.stdout), "analysis")
    sample = ["generate", "--prompt", "The river", "--max-new-tokens", "12", "--json"]
    a, b = (one_process(*sample, *args, "--run", run) for run in ("one", "two"))
    assert a.returncode == b.returncode == 0, b.stderr
    assert json.loads(a.stdout) == json.loads(b.stdout)
    # eval on a text (here the training corpus as one more text) as a torchrun job: one process's result
    code, out, err = finished(torchrun("eval", *args, "--run", "one", "--json"))
    assert code == 0, err
    alone = one_process("eval", *args, "--run", "two", "--json")
    assert alone.returncode == 0, alone.stderr
    close(json.loads(out), json.loads(alone.stdout), "eval")


def slow(ws: Path, corpus: Path) -> list[str]:
    """A Phase 1 that never converges (the threshold is unreachable): 40 steps, then the solve."""
    return common(ws, corpus, "--convergence-threshold", "1e-12", "--phase1-max-iterations", "40")


def wait_for(path: Path, text: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if path.exists() and text in path.read_text():
            return
        time.sleep(0.05)
    raise AssertionError(f"{text!r} never appeared in {path}")


def workers(proc: subprocess.Popen) -> dict[int, int]:
    """torchrun's worker processes: rank -> PID."""
    out = {}
    for pid in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split():
        env = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in kv)
        if "RANK" in env:
            out[int(env["RANK"])] = int(pid)
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory, uneven):
    """The uninterrupted single-process Phase 1 of `slow` settings (and `extra` options)."""
    made = {}

    def run(*extra: str) -> Path:
        if extra not in made:
            ws = tmp_path_factory.mktemp("ref") / "ws"
            assert one_process("prepare-data", *slow(ws, uneven), "--run", "ref").returncode == 0
            r = one_process("phase1", *slow(ws, uneven), *extra, "--run", "ref")
            assert r.returncode == 0, r.stderr
            made[extra] = ws / "runs" / "ref"
        return made[extra]

    return run


def test_ctrl_c_ends_every_rank_with_a_resume_point_the_same_world_size_continues(tmp_path, uneven, reference):
    """With contexts in files (a tiny --memory-budget): each rank's rows go from its own file into
    the one resume file."""
    ws = tmp_path / "ws"
    assert one_process("prepare-data", *slow(ws, uneven)).returncode == 0
    run = ws / "runs" / "default"
    tight = ("--memory-budget", "0.0001")  # contexts in files
    job = torchrun("phase1", *slow(ws, uneven), *tight)
    wait_for(run / "log.txt", "iteration  3:", job)
    job.send_signal(signal.SIGINT)  # torchrun passes it to every rank
    code, _, err = finished(job, timeout=60)
    assert code != 0
    stopped = re.findall(r"Error: interrupted after Phase 1 iteration (\d+)", err)
    assert len(stopped) == 2 and stopped[0] == stopped[1], err  # every rank, after the same iteration
    assert (run / "phase1_train.resume.pt").exists() and not (run / "phase1.safetensors").exists()
    code, _, err = finished(torchrun("phase1", *slow(ws, uneven), *tight))
    assert code == 0, err
    assert "resuming from" in (run / "log.txt").read_text()
    same_artifacts(reference(), run, files=("phase1_train.json",))  # a budget changes no bits
    assert not list(run.glob("*.resume*"))


def test_a_killed_rank_ends_the_job_and_a_rerun_on_one_process_resumes(tmp_path, uneven, reference):
    """SIGKILL one rank mid-iteration: the job exits non-zero at once (the other rank's collective
    fails or torchrun stops it); the periodic resume point (--save-every) is whole, and a rerun on
    one process (another world size: it re-shards) ends as the uninterrupted run."""
    ws = tmp_path / "ws"
    assert one_process("prepare-data", *slow(ws, uneven)).returncode == 0
    run = ws / "runs" / "default"
    job = torchrun("phase1", *slow(ws, uneven), "--save-every", "0.0001")
    wait_for(run / "log.txt", "iteration  6:", job)
    os.kill(workers(job)[1], signal.SIGKILL)
    killed = time.monotonic()
    code, _, err = finished(job, timeout=60)
    assert code != 0 and time.monotonic() - killed < 30
    assert not (run / "phase1.safetensors").exists() and not (run / "contexts_train.npy").exists()
    resume = load_checkpoint(run / "phase1_train.resume.pt")  # whole, never half-written
    assert (run / resume["state"]["prev"]["rows"]).exists()
    r = one_process("phase1", *slow(ws, uneven))
    assert r.returncode == 0, r.stderr
    assert "resuming from" in (run / "log.txt").read_text()
    same_artifacts(reference(), run, files=("phase1_train.json",))
    assert not [p.name for p in run.iterdir() if p.name.startswith(".") or ".resume" in p.name]


def test_commands_that_are_not_stages_refuse_torchrun(tmp_path):
    code, _, err = finished(torchrun("runs", "--workspace", str(tmp_path)))
    assert code != 0 and "`newllm runs` runs in one process: start it without torchrun" in err


def test_a_user_error_under_torchrun_is_one_line_and_exit_2(tmp_path):
    """What newllm controls: a rank says the mistake in one line and exits 2. torchrun stops the other
    ranks at the first failure (SIGTERM: a rank not yet done says nothing, or "interrupted"), adds its
    own failure report (a traceback of its agent) and exits 1; torch offers no way to change that."""
    code, _, err = finished(torchrun("phase1", "--context-dim", "-3", "--workspace", str(tmp_path)))
    usage = "Error: --context-dim -3: must be greater than 0 (model.context_dim)"
    lines = [line for line in err.splitlines() if line.startswith("Error:")]
    assert usage in lines and set(lines) <= {usage, "Error: interrupted"}, err
    codes = re.findall(r"exitcode\s*:\s*(-?\d+)", err)  # torchrun's report may list a rank twice
    assert "2" in codes and set(codes) <= {"2", "-15", "130"} and code == 1, err
