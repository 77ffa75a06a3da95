"""One line, not a traceback: the odd values, files and devices of the second hardening round,
each a named case, each ending with one error line and its exit code (or a warning and the work)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST, copy_run, finished_run, make_corpus, one_line


def clean(r) -> None:
    assert r.code == 0 and "Traceback" not in r.err and "Error:" not in r.err, r.err[-800:]


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    root = tmp_path_factory.mktemp("oneline")
    return root, finished_run(root, docs=20)


@pytest.fixture
def run(done, tmp_path):
    return copy_run(*done, tmp_path)


def rundir(args) -> Path:
    return Path(args[1]) / "runs" / "default"


def nested(depth: int) -> str:
    return '{"data": ' + '{"a": ' * depth + "1" + "}" * depth + "}"


@pytest.mark.parametrize(
    "text, needle",
    [('{"data": [1]}', "must be a table"), ('{"model": 3}', "must be a table"), (nested(100_000), "not valid JSON")],
    ids=["section-a-list", "section-a-number", "deeply-nested"],
)
def test_a_config_that_is_not_tables_of_settings_is_one_line(cli, tmp_path, text, needle):
    config = tmp_path / "c.json"
    config.write_text(text)
    one_line(cli("config", "--config", config, "--workspace", tmp_path / "ws"), 2, needle)


def test_a_deeply_nested_settings_json_is_ignored_with_a_warning(cli, run):
    (rundir(run) / "settings.json").write_text(nested(100_000))
    r = cli("phase1", "--split", "val", *run)
    assert r.code == 0 and "ignoring damaged" in r.err and "Traceback" not in r.err, r.err[-500:]


@pytest.mark.parametrize(
    "option, value",
    [("--seed", str(2**64)), ("--lr-warmup", "1e300"), ("--phase2-l2", "1e300"), ("--phase1-noise", "-1e39")],
)
def test_numbers_the_arithmetic_cannot_hold_are_usage_errors(cli, run, option, value):
    one_line(cli("phase1", *run, option, value), 2, option)


@pytest.mark.parametrize("top_k", ["0", "1"])
def test_a_tiny_temperature_samples_greedily(cli, run, top_k):
    args = ["generate", *run, "--prompt", "The", "--max-new-tokens", "3", "--json"]
    r = cli(*args, "--temperature", "1e-300", "--top-k", top_k)
    clean(r)
    assert r.json()["token_ids"] == cli(*args, "--temperature", "0").json()["token_ids"]


def test_a_prompt_that_is_not_utf8_is_a_usage_error(cli, run):
    one_line(cli("generate", *run, "--prompt", "caf\udce9", "--max-new-tokens", "2"), 2, "UTF-8")


def test_a_network_larger_than_the_machine_is_refused_before_allocating(cli, run):
    big = ["--context-dim", "4096", "--embed-dim", "4096", "--num-layers", "64", "--layers-per-block", "16"]
    one_line(cli("phase1", *run, *big), 2, "GiB", "more than this machine's")


@pytest.mark.parametrize(
    "contexts, tokens, needle",
    [
        (np.zeros((5, 0), np.float32), None, "non-empty"),
        (np.ones((5, 3), np.float32), -np.arange(5), "ids outside"),
        (np.ones((5, 3), np.float32), np.full(5, 2**63, np.uint64), "ids outside"),
        (np.ones((5, 3), np.float32), np.ones(5, np.float32), "integer token ids"),
    ],
    ids=["n-by-0", "negative-ids", "ids-2**63", "float-ids"],
)
def test_odd_arrays_given_to_analyze_are_usage_errors(cli, tmp_path, contexts, tokens, needle):
    np.save(tmp_path / "c.npy", contexts)
    args = ["analyze", "--contexts", tmp_path / "c.npy", "--workspace", tmp_path / "ws"]
    if tokens is not None:
        np.save(tmp_path / "t.npy", tokens)
        args += ["--tokens", tmp_path / "t.npy"]
    one_line(cli(*args), 2, needle)


def test_runs_and_compare_on_report_fields_of_the_wrong_type(cli, run):
    for name, edit in (("phase2.json", {"val": "x", "baselines": [1]}), ("phase1_train.json", {"tokens": "many"})):
        path = rundir(run) / name
        path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    clean(cli("runs", "--workspace", run[1]))
    clean(cli("compare", "default", "--workspace", run[1]))


@pytest.mark.parametrize("how", ["latin-1", "300 MB"])
def test_a_metrics_csv_that_is_not_text_or_too_large_is_rewritten_with_a_warning(cli, run, how):
    path = rundir(run) / "metrics.csv"
    if how == "latin-1":
        path.write_bytes("stage,split\ncaf\xe9,train\n".encode("latin-1"))
    else:
        with open(path, "wb") as f:
            f.truncate(300 << 20)  # sparse: no disk used
    (rundir(run) / "phase1_val.json").unlink()  # so that phase1 val runs and records its rows
    r = cli("phase1", "--split", "val", *run)
    assert r.code == 0 and "ignoring damaged" in r.err and "Traceback" not in r.err, r.err[-500:]
    assert path.stat().st_size < 1 << 20 and path.read_text().startswith("stage,split")


def test_dev_zero_as_path_config_or_settings_json_is_bounded(cli, run, tmp_path):
    one_line(cli("prepare-data", *run, "--path", "/dev/zero", "--run", "z"), 2, "/dev/zero")
    one_line(cli("config", "--config", "/dev/zero", "--workspace", tmp_path / "w"), 2, "/dev/zero")
    (tmp_path / "big.json").write_text(" " * (2 << 20) + "{}")
    one_line(cli("config", "--config", tmp_path / "big.json", "--workspace", tmp_path / "w"), 2, "big.json", "bytes")
    settings = rundir(run) / "settings.json"
    settings.unlink()
    settings.symlink_to("/dev/zero")
    one_line(cli("phase1", "--split", "val", *run), 3, "settings.json")


@pytest.mark.parametrize("value", ["1e12", "inf", "nan"])
def test_an_odd_sweep_heartbeat_is_blamed_on_the_heartbeat(cli, tmp_path, value):
    corpus = make_corpus(tmp_path / "c.txt", docs=6)
    r = cli("sweep", "--name", "s", "--grid", "seed=1,2", "--heartbeat", value, "--workspace", tmp_path / "ws",
            "--source", "text_file", "--path", corpus)  # fmt: skip
    one_line(r, 2, "--heartbeat")


def test_a_ten_megabyte_bad_value_is_cut_in_the_error_line(cli, tmp_path):
    r = cli("prepare-data", "--source", "x" * 10_000_000, "--workspace", tmp_path / "ws")
    one_line(r, 2, "characters cut")


def test_finite_values_near_float32_max_are_not_called_nan_or_inf(cli, run):
    path = rundir(run) / "contexts_train.npy"
    a = np.load(path)
    a[0, 0] = 3e38
    np.save(path, a)
    r = cli("phase2", "--force", *run)
    one_line(r, 3, "contexts_train.npy", "too large to square")
    assert "NaN or Inf" not in r.err


def test_a_sweep_whose_database_dies_mid_run_exits_1_naming_the_storage_error(cli, tmp_path, monkeypatch):
    import optuna
    import sqlalchemy.exc

    corpus = make_corpus(tmp_path / "c.txt", docs=8)
    real, state = optuna.storages.RDBStorage.set_trial_user_attr, {"dead": False}

    def first_trial_then_death(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        state["dead"] = True  # the first trial has started: now the server goes away
        return out

    def gone(*args, **kwargs):
        if state["dead"]:
            raise sqlalchemy.exc.OperationalError("SELECT", {}, Exception("server closed the connection"))

    monkeypatch.setattr(optuna.storages.RDBStorage, "set_trial_user_attr", first_trial_then_death)
    sqlalchemy.event.listen(sqlalchemy.engine.Engine, "before_cursor_execute", gone)
    request_cleanup = lambda: sqlalchemy.event.remove(sqlalchemy.engine.Engine, "before_cursor_execute", gone)  # noqa: E731
    try:
        r = cli("sweep", "--name", "s", "--grid", "seed=1,2,3", "--workspace", tmp_path / "ws", "--source",
                "text_file", "--path", corpus, *FAST, "--force", "--probe-rows", "0")  # fmt: skip
    finally:
        request_cleanup()
    one_line(r, 1, "storage failed", "OperationalError")


def test_workers_that_exit_1_fail_the_sweep(monkeypatch):
    import subprocess
    import sys

    from newllm_cli.experiments import sweep
    from newllm_cli.runtime.errors import NewLLMError

    real = subprocess.Popen

    def failing(cmd, **kwargs):
        return real([sys.executable, "-c", "raise SystemExit(1)"], **kwargs)

    monkeypatch.setattr(sweep.subprocess, "Popen", failing)
    with pytest.raises(NewLLMError, match=r"exit 1.*rerun the same command"):
        sweep.spawn_workers(["sweep"], 2, 1)
