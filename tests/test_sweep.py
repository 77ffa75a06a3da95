"""Sweeps on Optuna: each grid point runs once across workers and processes, a killed worker's
point is run again by the next sweep, a bad point fails alone; compare's fits against numpy."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import make_corpus

FAST = [
    "--tokenizer",
    "byte",
    "--probe-rows",
    "0",
    "--phase2-max-iterations",
    "20",
    "--control",
    "--phase1-max-iterations",
    "6",
    "--force",  # 6 iterations do not converge: the gate would refuse every trial's Phase 2
]


def sweep_cmd(tmp_path: Path, name: str, *args: str) -> list[str]:
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        make_corpus(corpus, docs=60)
    return [
        sys.executable,
        "-m",
        "newllm_cli",
        "sweep",
        "--name",
        name,
        "--workspace",
        str(tmp_path / "ws"),
        "--source",
        "text_file",
        "--path",
        str(corpus),
        *FAST,
        *args,
    ]


def trials(storage: str, name: str) -> list:
    import optuna

    study = optuna.load_study(study_name=name, storage=storage)
    return [t for t in study.get_trials(deepcopy=False) if "run" in t.user_attrs]


def completed_once(found: list, expected: int) -> None:
    done = [t.user_attrs["run"] for t in found if t.state.name == "COMPLETE"]
    assert len(done) == expected and len(set(done)) == expected, done


def test_grid_with_two_workers_runs_each_point_once_and_survives_a_killed_worker(tmp_path):
    cmd = sweep_cmd(
        tmp_path,
        "g",
        "--grid",
        "num-samples=20,30",
        "--grid",
        "dist-reg-weight=0.1,0.3",
        "--jobs",
        "2",
        "--heartbeat",
        "1",
        "--phase1-max-iterations",
        "30",
    )
    storage = f"sqlite:///{tmp_path / 'ws' / 'sweeps.db'}"
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pids = []
    for line in proc.stderr:
        if "started 2 workers: pids" in line:
            pids = [int(p) for p in line.split("pids")[1].split(",")]
            break
    assert len(pids) == 2
    deadline, victim = time.time() + 120, None
    while victim is None and time.time() < deadline:  # kill a worker inside a trial, once one point is done
        try:
            found = trials(storage, "g")
        except Exception:  # the study is being created
            found = []
        running = [t for t in found if t.state.name == "RUNNING" and "worker" in t.user_attrs]
        if running and any(t.state.name == "COMPLETE" for t in found):
            victim = max(running, key=lambda t: t.datetime_start)  # the freshest: far from its end
            pid = int(victim.user_attrs["worker"].split(":")[1])
            os.kill(pid, signal.SIGSTOP)  # frozen, its trial cannot finish between the look and the kill
            if next(t for t in trials(storage, "g") if t.number == victim.number).state.name == "RUNNING":
                os.kill(pid, signal.SIGKILL)
                break
            os.kill(pid, signal.SIGCONT)  # it finished while we looked: choose again
            victim = None
        time.sleep(0.2)
    assert victim is not None
    proc.stderr.read()
    assert proc.wait() == 1  # the parent says a worker was killed
    before = {t.user_attrs["run"]: t.number for t in trials(storage, "g") if t.state.name == "COMPLETE"}
    assert victim.user_attrs["run"] not in before
    time.sleep(3.5)  # three heartbeats without news: the killed worker's trial is stale
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    after = trials(storage, "g")
    completed_once(after, 4)
    for t in after:  # finished points were not run again
        if t.state.name == "COMPLETE" and t.user_attrs["run"] in before:
            assert t.number == before[t.user_attrs["run"]]
    failed = [t for t in after if t.state.name == "FAIL"]
    why = [(t.number, t.user_attrs) for t in failed]
    assert [t.number for t in failed] == [victim.number], why  # the killed trial, failed as stale, then rerun
    assert len(list((tmp_path / "ws" / "runs").iterdir())) == 4


POP = """
import sys, time, optuna
from newllm_cli.experiments.sweep import open_storage
study = optuna.load_study(study_name="r", storage=open_storage(sys.argv[1], 10.0))
while time.time() < float(sys.argv[2]):
    time.sleep(0.001)
print(" ".join(str(i) for i in iter(study._pop_waiting_trial_id, None)))
"""


def test_workers_popping_queued_trials_at_once_on_sqlite_never_take_one_twice(tmp_path):
    import optuna

    from newllm_cli.experiments.sweep import open_storage

    url = f"sqlite:///{tmp_path / 'race.db'}"  # without BEGIN IMMEDIATE, 4 processes took 23 of 200 twice
    study = optuna.create_study(study_name="r", storage=open_storage(url, 10.0))
    for i in range(120):
        study.enqueue_trial({"x": i})
    start = str(time.time() + 3)  # all four pop at the same moment
    procs = [
        subprocess.Popen([sys.executable, "-c", POP, url, start], stdout=subprocess.PIPE, text=True) for _ in range(4)
    ]
    popped = [int(i) for p in procs for i in p.communicate()[0].split()]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(popped) == sorted(t._trial_id for t in study.get_trials())


def test_a_bad_point_fails_with_its_message_and_the_others_finish(tmp_path, cli):
    args = [str(a) for a in sweep_cmd(tmp_path, "bad", "--grid", "dist-reg-weight=0.2,1.5", "--json")[3:]]
    r = cli(*args)
    assert r.code == 0, r.err
    out = r.json()
    states = {t["params"]["dist-reg-weight"]: t for t in out["trials"]}
    assert states["0.2"]["state"] == "COMPLETE" and states["0.2"]["value"] > 1
    assert states["1.5"]["state"] == "FAIL" and "--dist-reg-weight 1.5: must be at most 1" in states["1.5"]["error"]
    again = cli(*args).json()  # a rerun skips the finished point and retries the failed one
    assert sum(t["state"] == "COMPLETE" for t in again["trials"]) == 1
    assert sum(t["state"] == "FAIL" for t in again["trials"]) == 2


def test_usage_errors(cli, tmp_path):
    for args, needle in (
        (["--grid", "nope=1,2"], "no setting --nope"),
        (["--grid", "context-dim"], "NAME=v1"),
        (["--grid", "dist-reg-weight=0:1"], "needs a search"),
        (["--grid", "context-dim=4,8", "--sampler", "tpe"], "needs --trials"),
    ):
        r = cli("sweep", "--name", "u", "--workspace", tmp_path, *args)
        assert r.code == 2 and needle in r.err, r.err


def synthetic_run(root: Path, name: str, samples: int, tokens: int, ppl: float, rank: float, weight: float) -> None:
    run = root / "runs" / name
    run.mkdir(parents=True)
    (run / "settings.json").write_text(
        json.dumps({"data": {"num_samples": samples}, "phase1": {"dist_reg_weight": weight}, "runtime": {"run": name}})
    )
    (run / "phase1_train.json").write_text(json.dumps({"tokens": tokens, "converged_ratio": 0.96, "seconds": 1.0}))
    (run / "analysis.json").write_text(
        json.dumps({"val": {"centred": {"effective_rank": rank}, "attainable_rank": 15}})
    )
    (run / "phase2.json").write_text(json.dumps({"val": {"perplexity": ppl}, "baselines": {}}))


def test_compare_recovers_the_scaling_law_and_the_correlation(cli, tmp_path):
    rng = np.random.default_rng(0)
    tokens = np.array([5_000, 11_000, 23_000, 52_000, 98_000])
    ppl = 900 * tokens**-0.4 * np.exp(rng.normal(0, 0.05, len(tokens)))
    rank = rng.uniform(3, 12, len(tokens))
    names = []
    for i, (n, p, r) in enumerate(zip(tokens, ppl, rank)):
        names.append(f"s.n{i}")
        synthetic_run(tmp_path, names[-1], 10 * (i + 1), int(n), float(p), float(r), 0.2)
    out = cli("compare", *names, "--workspace", tmp_path, "--json").json()
    (fit,) = out["scaling"]
    alpha, log_a = np.polyfit(np.log(tokens), np.log(ppl), 1)  # direct least squares
    residual = np.log(ppl) - (log_a + alpha * np.log(tokens))
    r2 = 1 - (residual**2).sum() / ((np.log(ppl) - np.log(ppl).mean()) ** 2).sum()
    assert abs(fit["alpha"] - alpha) < 1e-6 and abs(fit["r2"] - r2) < 1e-6
    assert abs(fit["A"] - np.exp(log_a)) < 1e-6 * np.exp(log_a)
    assert abs(out["rank_perplexity"]["r"] - np.corrcoef(rank, ppl)[0, 1]) < 1e-6
    assert out["settings"] == ["data.num_samples"]
    listed = cli("runs", "--workspace", tmp_path, "--csv")
    assert listed.code == 0 and listed.out.splitlines()[0].startswith("run,") and len(listed.out.splitlines()) == 6


@pytest.fixture
def postgres():
    """A throwaway PostgreSQL server from Debian's package (as user postgres when run as root)."""
    import glob
    import shutil
    import socket
    import tempfile

    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not bins:
        pytest.skip("PostgreSQL server binaries not installed (Debian package postgresql)")
    bindir = Path(bins[-1]).parent
    data = Path(tempfile.mkdtemp(prefix="newllm-pg-", dir="/tmp"))
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_user:
        shutil.chown(data, "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run(
        [*as_user, str(bindir / "initdb"), "-D", str(data / "db"), "-A", "trust", "-U", "postgres"],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [
            *as_user,
            str(bindir / "pg_ctl"),
            "-D",
            str(data / "db"),
            "-l",
            str(data / "log"),
            "-w",
            "-o",
            f"-p {port} -k {data} -c listen_addresses=127.0.0.1",
            "start",
        ],
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [*as_user, str(bindir / "pg_ctl"), "-D", str(data / "db"), "-m", "immediate", "stop"], capture_output=True
        )
        shutil.rmtree(data, ignore_errors=True)


def test_two_sweep_processes_share_a_grid_on_postgresql(tmp_path, postgres):
    cmd = sweep_cmd(
        tmp_path, "pg", "--grid", "num-samples=20,30", "--grid", "dist-reg-weight=0.1,0.3", "--storage", postgres
    )
    procs = [
        subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    found = trials(postgres, "pg")
    completed_once(found, 4)
    assert len(found) == 4  # no point queued or run twice


def test_a_point_under_several_seeds_is_replicated_and_compare_lists_every_seed(tmp_path, cli):
    args = sweep_cmd(tmp_path, "sd", "--grid", "dist-reg-weight=0.1,0.3", "--seeds", "2", "--json")[3:]
    r = cli(*args)
    assert r.code == 0, r.err
    trials = r.json()["trials"]
    assert [t["state"] for t in trials] == ["COMPLETE", "COMPLETE"]
    for t in trials:  # each point's value: the geometric mean of its seeds' head perplexities
        rep = json.loads((tmp_path / "ws" / "replicates" / f"{t['run']}.json").read_text())
        assert [x["run"] for x in rep["runs"]] == [f"{t['run']}.seed-42", f"{t['run']}.seed-43"]
        assert t["value"] == pytest.approx(math.exp(np.mean([math.log(x["perplexity"]) for x in rep["runs"]])))
    shown = cli("compare", "--sweep", "sd", "--workspace", tmp_path / "ws", "--json")
    assert shown.code == 0, shown.err
    assert len(shown.json()["runs"]) == 4 and all(".seed-4" in row["run"] for row in shown.json()["runs"])
