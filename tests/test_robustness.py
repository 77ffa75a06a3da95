"""Interrupted, corrupted, mismatched or non-finite runs: nothing lost, nothing mixed, one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from newllm_cli.model.network import NewLLM
from newllm_cli.runtime import interrupt
from newllm_cli.runtime.errors import Interrupted
from newllm_cli.settings import Phase1Settings
from newllm_cli.training.phase1 import run_cvfp


def prepared(cli, base_args) -> None:
    for stage in (["prepare-data"], ["phase1"], ["phase1", "--split", "val"]):
        r = cli(*stage, *base_args)
        assert r.code == 0, r.err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])  # SIGTERM: a batch system's notice
def test_signal_during_phase2_resumes_to_the_uninterrupted_result(cli, base_args, sig):
    prepared(cli, base_args)
    slow = ["--phase2-max-iterations", "200", "--no-control", "--force"]
    cmd = [sys.executable, "-m", "newllm_cli", "phase2", *base_args, *slow]
    proc = subprocess.Popen(
        cmd, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "200"}
    )
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if "after 10 iterations" in line:
            proc.send_signal(sig)
            break
    rest = proc.communicate(timeout=120)[1]
    err = "".join(lines) + (rest or "")
    assert proc.returncode == 130, err
    assert "rerun the same command to resume" in err and "Traceback" not in err
    run = Path(base_args[1]) / "runs" / "default"
    assert (run / "phase2_phase1.resume.pt").exists() and not (run / "phase2.json").exists()
    resumed = cli("phase2", *base_args, *slow)
    assert resumed.code == 0 and "resuming from" in resumed.err
    assert not (run / "phase2_phase1.resume.pt").exists()
    first = json.loads((run / "phase2.json").read_text())
    again = cli("phase2", *base_args, *slow)  # uninterrupted, same settings
    assert again.code == 0 and "resuming" not in again.err
    second = json.loads((run / "phase2.json").read_text())
    assert first["val"] == second["val"] and first["selection"] == second["selection"]
    assert first["iterations"] == second["iterations"]


def small_training():
    """Tokens, offsets, settings and a fresh network of a short Phase 1 that never converges."""

    def fresh():
        torch.manual_seed(1)
        return NewLLM(40, 6, 5, 2)

    return (
        np.random.default_rng(0).integers(0, 40, 200),
        np.array([0, 80, 200]),
        Phase1Settings(max_iterations=6, min_converged_ratio=1.0),
        fresh,
    )


def test_phase1_resume_is_exact(monkeypatch):
    tokens, offsets, cfg, fresh = small_training()
    whole = run_cvfp(fresh(), tokens, offsets, cfg, train=True, device=torch.device("cpu"))
    saved = {}
    with pytest.raises(Interrupted, match="iteration 3"):
        _interrupt_at(3, fresh(), tokens, offsets, cfg, saved, monkeypatch)
    monkeypatch.setattr(interrupt, "requested", lambda: False)
    model = fresh()  # a new process: fresh weights, then the saved state
    resumed = run_cvfp(model, tokens, offsets, cfg, train=True, device=torch.device("cpu"), resume=saved)
    assert np.array_equal(resumed.contexts.read(0, 200), whole.contexts.read(0, 200))
    assert resumed.optimizer_steps == whole.optimizer_steps
    assert [h["cvfp_loss"] for h in resumed.history] == [h["cvfp_loss"] for h in whole.history]


def test_periodic_resume_points_continue_exactly():
    """--save-every: a save after every Phase 1 iteration and every L-BFGS block (the run goes on);
    any of them, passed back, ends where the uninterrupted run ends."""
    import copy

    from newllm_cli.training import head_fit

    tokens, offsets, cfg, fresh = small_training()
    whole = run_cvfp(fresh(), tokens, offsets, cfg, train=True, device=torch.device("cpu"))
    saves = []
    run_cvfp(
        fresh(),
        tokens,
        offsets,
        cfg,
        train=True,
        device=torch.device("cpu"),
        save_every=1e-9,
        save_resume=lambda state, tag: saves.append(
            (tag, copy.deepcopy(dict(state, prev=state["prev"].store.read(0, 200))))
        ),
    )
    assert [tag for tag, _ in saves] == ["1", "2", "3", "4", "5"]  # after each iteration but the last
    tag, state = saves[2]
    resumed = run_cvfp(
        fresh(),
        tokens,
        offsets,
        cfg,
        train=True,
        device=torch.device("cpu"),
        resume=dict(state, prev=_store(state["prev"])),
    )
    assert np.array_equal(resumed.contexts.read(0, 200), whole.contexts.read(0, 200))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(600, 3, generator=gen)
    y = (x[:, 0] > 0).long() * 3 + torch.randint(0, 3, (600,), generator=gen)
    train, val = head_fit.Split(x[:400], y[:400], torch.arange(400) // 20), head_fit.Split(x[400:], y[400:])
    plain = head_fit.fit(train, val, 6, np.zeros(6), max_iterations=60)
    points = []
    head_fit.fit(
        train,
        val,
        6,
        np.zeros(6),
        max_iterations=60,
        save_every=1e-9,
        save_resume=lambda st: points.append(copy.deepcopy(st)),
    )
    assert len(points) >= 3
    again = head_fit.fit(train, val, 6, np.zeros(6), max_iterations=60, resume=copy.deepcopy(points[len(points) // 2]))
    assert again.val == plain.val and again.l2 == plain.l2 and again.iterations == plain.iterations


def _store(rows: np.ndarray):
    from newllm_cli.store.rowstore import RowStore

    store = RowStore(*rows.shape)
    store.write(0, rows)
    return store


def test_a_resume_point_is_never_paired_with_another_iteration_s_rows(tmp_path):
    """Rows are named by iteration and go first: a process killed after writing new rows but before
    the checkpoint naming them leaves the previous checkpoint with its own rows."""
    from newllm_cli.store.resume import Resumable
    from newllm_cli.store.rowstore import RowStore

    res = Resumable(tmp_path / "phase1_train.resume.pt", {"k": 1})
    first = RowStore(5, 2)
    first.write(0, np.ones((5, 2), np.float32))
    res.save({"next": 2, "prev": first}, "2")
    later = RowStore(5, 2)
    later.write(0, np.full((5, 2), 7, np.float32))
    later.save(res.path.with_name(res.path.name + ".prev.3.npy"))  # ... then killed
    state = res.load()
    assert state["next"] == 2 and np.array_equal(np.load(state["prev"]), np.ones((5, 2)))
    res.save({"next": 4, "prev": RowStore(5, 2)}, "4")  # the next save removes the rows of others
    assert sorted(p.name for p in tmp_path.iterdir()) == ["phase1_train.resume.pt", "phase1_train.resume.pt.prev.4.npy"]


def _interrupt_at(iteration, model, tokens, offsets, cfg, saved, monkeypatch):
    seen = []
    monkeypatch.setattr(interrupt, "requested", lambda: len(seen) >= iteration)
    run_cvfp(
        model,
        tokens,
        offsets,
        cfg,
        train=True,
        device=torch.device("cpu"),
        on_iteration=seen.append,
        save_resume=lambda state, tag: saved.update(state),
    )


def test_truncated_and_foreign_checkpoints_give_one_line(cli, base_args):
    prepared(cli, base_args)
    ckpt = Path(base_args[1]) / "runs" / "default" / "phase1.safetensors"
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    r = cli("phase1", *base_args, "--split", "val")
    assert r.code == 3 and "cannot be loaded" in r.err and len(r.err.strip().splitlines()) == 1
    torch.save({"state": {}, "provenance": {}}, ckpt)  # a torch pickle where safetensors belong
    r = cli("phase1", *base_args, "--split", "val")
    assert r.code == 3 and "cannot be loaded as safetensors" in r.err and len(r.err.strip().splitlines()) == 1
    from safetensors.torch import save_file

    save_file({"weights": torch.zeros(3)}, ckpt)  # safetensors, but not ours
    r = cli("phase1", *base_args, "--split", "val")
    assert r.code == 3 and "not a newllm checkpoint" in r.err


def test_val_contexts_from_another_run_are_refused(cli, base_args):
    prepared(cli, base_args)
    other = base_args + ["--run", "other", "--seed", "5"]
    assert cli("phase1", *other).code == 0 and cli("phase1", *other, "--split", "val").code == 0
    runs = Path(base_args[1]) / "runs"
    for name in ("contexts_val.npy", "phase1_val.json"):
        shutil.copy(runs / "other" / name, runs / "default" / name)
    r = cli("phase2", *base_args, "--force")
    assert r.code == 3 and "val contexts" in r.err and "model_id" in r.err
    r = cli("phase2", *base_args, "--force", "--rebuild")  # the user asks to rebuild instead
    assert r.code == 0, r.err
    assert (
        json.loads((runs / "default" / "phase1_val.json").read_text())["provenance"]["model_id"]
        == json.loads((runs / "default" / "phase1_train.json").read_text())["provenance"]["model_id"]
    )


def test_non_finite_values_stop_the_stage_and_save_nothing(cli, base_args, monkeypatch):
    prepared(cli, base_args)
    run = Path(base_args[1]) / "runs" / "default"
    ctx = np.load(run / "contexts_train.npy")
    ctx[5, 3] = np.nan
    np.save(run / "contexts_train.npy", ctx)
    r = cli("phase2", *base_args, "--force")  # a damaged artifact on disk: refused on read
    assert r.code == 3 and "NaN" in r.err and "newllm phase1 --split train" in r.err
    assert not (run / "phase2.safetensors").exists()
    import newllm_cli.training.phase1 as p1

    real = p1.Comparison.losses
    monkeypatch.setattr(p1.Comparison, "losses", lambda self, cfg: {**real(self, cfg), "loss": float("nan")})
    before = (run / "phase1.safetensors").read_bytes()
    r = cli("phase1", *base_args)
    assert r.code == 4 and "iteration 2" in r.err and "learning rate" in r.err
    assert (run / "phase1.safetensors").read_bytes() == before


def test_unusable_workspace_gives_one_line(cli, tmp_path, corpus):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    r = cli("prepare-data", "--workspace", blocker / "ws", "--source", "text_file", "--path", corpus)
    assert r.code != 0 and len(r.err.strip().splitlines()) == 1 and "Traceback" not in r.err
    if os.geteuid() != 0:  # root ignores permission bits
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        r = cli("prepare-data", "--workspace", ro, "--source", "text_file", "--path", corpus)
        assert r.code != 0 and len(r.err.strip().splitlines()) == 1


KEYS = {
    "model": ["context_dim", "embed_dim", "num_layers", "bogus"],
    "phase1": ["max_iterations", "dist_reg_weight", "scheme", "convergence_threshold"],
    "data": ["source", "path", "val_ratio", "tokenizer"],
    "runtime": ["seed", "device", "run"],
    "extra": ["x"],
}
values = st.one_of(
    st.integers(-5, 50),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.booleans(),
    st.none(),
    st.lists(st.integers(), max_size=3),
)
configs = st.dictionaries(
    st.sampled_from(sorted(KEYS)),
    st.dictionaries(st.sampled_from(sorted({k for ks in KEYS.values() for k in ks})), values, max_size=4),
    max_size=4,
)


def assert_clean(r) -> None:
    assert "Traceback" not in r.err
    if r.code != 0:
        lines = r.err.strip().splitlines()
        assert lines and lines[-1].startswith("Error:") and len([x for x in lines if x.startswith("Error:")]) == 1


@hsettings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(config=st.one_of(configs, st.text(max_size=40)))
def test_random_settings_files_never_crash(cli, tmp_path, config):
    path = tmp_path / "cfg.json"
    path.write_text(config if isinstance(config, str) else json.dumps(config))
    r = cli("phase1", "--config", path, "--workspace", tmp_path / "empty")
    assert_clean(r)
    assert r.code in (2, 3)


@hsettings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(suffix=st.sampled_from([".json", ".txt", ".npy", ".pt"]), blob=st.binary(max_size=64))
def test_malformed_token_files_never_crash(cli, tmp_path, corpus, suffix, blob):
    path = tmp_path / f"val{suffix}"
    path.write_bytes(blob)
    r = cli(
        "prepare-data",
        "--workspace",
        tmp_path / "ws",
        "--source",
        "text_file",
        "--path",
        corpus,
        "--tokenizer",
        "byte",
        "--val-source",
        "manual",
        "--val-path",
        path,
    )
    assert_clean(r)
    assert r.code in (0, 2)


@pytest.mark.parametrize("errno, text", [(13, "Permission denied"), (28, "No space left on device")])
def test_write_failures_give_one_line_and_keep_old_artifacts(cli, base_args, monkeypatch, errno, text):
    prepared(cli, base_args)
    run = Path(base_args[1]) / "runs" / "default"
    before = (run / "contexts_train.npy").read_bytes()
    import newllm_cli.store.publish as publish

    def refuse(*args, **kwargs):
        raise OSError(errno, text, str(run))

    monkeypatch.setattr(publish.tempfile, "mkstemp", refuse)
    r = cli("phase1", *base_args, "--seed", "7")  # another seed: the stage must run (and write) again
    assert r.code != 0 and text in r.err.strip().splitlines()[-1]
    assert_clean(r)
    assert (run / "contexts_train.npy").read_bytes() == before
    assert not list(run.glob(".*.tmp"))
