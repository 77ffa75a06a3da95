"""Every stage through the CLI: artifacts, chaining, settings precedence, errors and exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from newllm_cli.settings import Settings


def run_dir(args: list[str], run: str = "default") -> Path:
    return Path(args[args.index("--workspace") + 1]) / "runs" / run


def test_help_reads_well(cli):
    top = cli("--help")
    assert top.code == 0
    for name in ("prepare-data", "phase1", "analyze", "phase2", "full"):
        assert name in top.out
    for name in ("prepare-data", "phase1", "analyze", "phase2", "full"):
        r = cli(name, "--help")
        assert r.code == 0 and "--workspace" in r.out and "--source" in r.out
        assert ("--context-dim" in r.out) == (name != "prepare-data")
    r = cli("prepare-data", "--help")  # only the settings the command uses
    assert "Phase1 settings" not in r.out and "--scheme" not in r.out and "--phase2-l2" not in r.out
    assert "--phase2-l2" not in cli("phase1", "--help").out
    assert (
        cli("config", "--no-use-distribution-reg", "--json").json()["settings"]["phase1"]["use_distribution_reg"]
        is False
    )


def test_no_option_name_is_cut_at_80_columns(cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    for name in (
        None,
        "prepare-data",
        "phase1",
        "analyze",
        "phase2",
        "full",
        "generate",
        "config",
        "sweep",
        "runs",
        "compare",
    ):
        r = cli(*([name] if name else []), "--help")
        assert r.code == 0 and max(map(len, r.out.splitlines())) <= 80, name
        assert "\u2026" not in r.out, (name, [line for line in r.out.splitlines() if "\u2026" in line])


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--context-dim", "-3"], "--context-dim -3: must be greater than 0 (model.context_dim)"),
        (["--context-dim", "abc"], "--context-dim abc: expected a whole number"),
        (["--scheme", "nope"], "--scheme nope: must be one of 'sequential' or 'parallel'"),
        (["--dist-reg-weight", "1.5"], "--dist-reg-weight 1.5: must be at most 1"),
        (["--bogus"], "No such option"),
        (["--lr-warmup", "inf"], "--lr-warmup inf: expected a finite number"),
        (["--source", "text_file"], "--source text_file needs --path"),
    ],
)
def test_bad_values_exit_2_with_one_line(cli, tmp_path, args, needle):
    r = cli("phase1", "--workspace", tmp_path, *args)
    assert r.code == 2
    assert len(r.err.strip().splitlines()) == 1 and needle in r.err and "Traceback" not in r.err
    assert "Input should" not in r.err and "Value error" not in r.err  # our words, not pydantic's


def test_full_leaves_every_artifact(cli, base_args):
    r = cli("full", *base_args, "--json", "--force")
    assert r.code == 0, r.err
    out = r.json()
    run = run_dir(base_args)
    for name in (
        "settings.json",
        "phase1.safetensors",
        "contexts_train.npy",
        "contexts_val.npy",
        "phase1_train.json",
        "phase1_val.json",
        "analysis.json",
        "phase2.safetensors",
        "phase2.json",
    ):
        assert (run / name).exists(), name
    data_dir = Path(out["prepare_data"]["dataset_dir"])
    for name in ("tokenizer.json", "train.tokens.npy", "train.offsets.npy", "val.tokens.npy", "dataset.json"):
        assert (data_dir / name).exists(), name
    ctx = np.load(run / "contexts_train.npy")
    assert ctx.dtype == np.float32 and ctx.shape == (out["phase1_train"]["tokens"], 16)
    hist = out["phase1_train"]["history"]
    assert hist[1]["cvfp_loss"] > 0  # carry-over: iteration 2 is not a copy of iteration 1
    train_tokens = np.load(data_dir / "train.tokens.npy")
    report = json.loads((run / "phase2.json").read_text())  # a row per target; unseen tokens share one
    assert 1 < report["head_rows"] <= len(np.unique(train_tokens)) + 1
    assert set(hist[1]) >= {"cvfp_loss", "dist_loss", "loss", "converged_ratio", "lr", "seconds"}
    probes = out["analysis"]["decodability"]["probes"]  # what the contexts encode, beside references
    assert set(probes) == {"token_from_context", "token_from_step", "next_from_context"}
    assert all(set(p) == {"phase1", "untrained", "gaussian"} for p in probes.values())
    assert set(out["analysis"]["train"]["steps"]["autocorrelation"]) == {"lag_1", "lag_10", "lag_100"}
    for b in report["baselines"].values():  # every comparison carries its interval and its verdict
        assert b["verdict"] in ("beats", "ties", "loses to") and b["ratio_low"] <= b["ratio"] <= b["ratio_high"]
    base = report["baselines"]
    assert all(0 <= b["accuracy"] <= 1 for b in base.values())  # every figure filled
    assert {"bigram_interpolated", "trigram_interpolated"} <= set(base) and "lambdas" in base["trigram_interpolated"]
    assert all(
        b["size"].startswith(b["verdict"].split()[0]) and "%" in b["size"] or "x (" in b["size"]
        for b in report["baselines"].values()
    ) and isinstance(report["warnings"], list)


def test_stage_by_stage_equals_full(cli, base_args):
    chain = base_args + ["--run", "chain"]
    for stage in (
        ["prepare-data"],
        ["phase1", "--split", "train"],
        ["phase1", "--split", "val"],
        ["analyze"],
        ["phase2", "--force"],
    ):
        r = cli(*stage, *chain)
        assert r.code == 0, (stage, r.err)
    assert cli("full", *base_args, "--run", "whole", "--force").code == 0
    a, b = run_dir(base_args, "chain"), run_dir(base_args, "whole")
    for split in ("train", "val"):
        assert np.array_equal(np.load(a / f"contexts_{split}.npy"), np.load(b / f"contexts_{split}.npy"))
    pa, pb = json.loads((a / "phase2.json").read_text()), json.loads((b / "phase2.json").read_text())
    assert pa["val"] == pb["val"] and pa["selection"] == pb["selection"] and pa["baselines"] == pb["baselines"]
    assert (
        json.loads((a / "analysis.json").read_text())["train"]["information"]
        == json.loads((b / "analysis.json").read_text())["train"]["information"]
    )


def test_stdout_is_a_path_without_json(cli, base_args):
    r = cli("prepare-data", *base_args)
    assert r.code == 0 and Path(r.out.strip()).is_dir()
    r = cli("phase1", *base_args)
    assert Path(r.out.strip()).name == "contexts_train.npy"


def test_later_stage_without_inputs_is_refused(cli, base_args):
    r = cli("phase1", *base_args)
    assert r.code == 3 and "prepare-data" in r.err
    assert cli("prepare-data", *base_args).code == 0
    r = cli("phase2", *base_args)
    assert r.code == 3 and "Phase 1 checkpoint" in r.err
    r = cli("phase1", *base_args, "--split", "val")
    assert r.code == 3 and "phase1 --split train" in r.err


def test_val_with_another_model_size_is_refused(cli, base_args):
    assert cli("prepare-data", *base_args).code == 0
    assert cli("phase1", *base_args).code == 0
    r = cli("phase1", *base_args, "--split", "val", "--context-dim", "8")
    assert r.code == 3 and "context_dim" in r.err and "16" in r.err and "8" in r.err
    saved = Settings.model_validate_json((run_dir(base_args) / "settings.json").read_text())
    assert saved.model.context_dim == 16  # a refused stage leaves the run's settings alone
    assert cli("phase1", "--workspace", base_args[1], "--split", "val").code == 0


def test_settings_precedence(cli, base_args, tmp_path):
    cfg = tmp_path / "cfg.toml"
    cfg.write_text("[model]\ncontext_dim = 8\nembed_dim = 6\n[phase1]\nmax_iterations = 3\n")
    assert cli("prepare-data", *base_args, "--config", cfg, "--embed-dim", "4").code == 0
    saved = Settings.model_validate_json((run_dir(base_args) / "settings.json").read_text())
    assert (saved.model.context_dim, saved.model.embed_dim, saved.phase1.max_iterations) == (8, 4, 3)
    # a later stage inherits the run's saved settings; an option still wins over them
    r = cli("phase1", "--workspace", base_args[1], "--phase1-max-iterations", "2", "--json")
    assert r.code == 0, r.err
    assert len(r.json()["history"]) == 2  # training iterations; a no-update solve may follow
    saved = Settings.model_validate_json((run_dir(base_args) / "settings.json").read_text())
    assert (saved.model.context_dim, saved.model.embed_dim, saved.data.source) == (8, 4, "text_file")


def test_bad_config_file_exits_2(cli, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"model": {"context_dim": 0}}')
    r = cli("phase1", "--config", bad, "--workspace", tmp_path)
    assert r.code == 2 and "model.context_dim" in r.err
    bad.write_text("{not json")
    r = cli("phase1", "--config", bad, "--workspace", tmp_path)
    assert r.code == 2 and "not valid JSON" in r.err
    r = cli("phase1", "--config", tmp_path / "missing.toml", "--workspace", tmp_path)
    assert r.code == 2


def test_defaults_are_the_seed_values():
    s = Settings()
    assert (s.model.num_layers, s.model.context_dim, s.model.embed_dim) == (2, 16, 16)
    p = s.phase1
    # 100 iterations without the "diverging" stop, not 10 with it, on measurement (docs/EXPERIMENTS.md)
    assert (p.max_iterations, p.stop_on_drops, p.convergence_threshold, p.min_converged_ratio) == (100, 0, 0.02, 0.95)
    assert (p.lr_warmup, p.lr_medium, p.lr_finetune, p.dist_reg_weight, p.use_distribution_reg) == (
        0.002,
        0.0005,
        0.0001,
        0.2,
        True,
    )
    # Phase 2 is fitted to its optimum: only the penalty (chosen on held-out documents) and a cap remain
    assert (s.phase2.l2, s.phase2.max_iterations, s.phase2.head_init) == (None, 200, "unigram")


def test_artifacts_honour_the_umask(cli, base_args):
    """Under umask 022 a teammate can read a shared workspace: temporary files (0600 by mkstemp) and
    the staged dataset directory (0700 by mkdtemp) get the umask's modes before they are renamed,
    including contexts that Phase 1 kept in files (a tiny --memory-budget)."""
    import os

    old = os.umask(0o022)
    try:
        assert cli("prepare-data", *base_args).code == 0
        r = cli("phase1", *base_args, "--memory-budget", "0.00001", "--phase1-max-iterations", "3")
        assert r.code == 0, r.err
    finally:
        os.umask(old)
    root = Path(base_args[1])
    paths = list(root.rglob("*"))
    assert any(p.name == "contexts_train.npy" for p in paths)
    for p in paths:
        mode = p.stat().st_mode & 0o777
        assert mode == (0o755 if p.is_dir() else 0o644), (p, oct(mode))


def test_phase1_capped_below_its_target_says_which_option_to_raise(cli, base_args):
    assert cli("prepare-data", *base_args).code == 0
    r = cli("phase1", *base_args, "--phase1-max-iterations", "2", "--min-converged-ratio", "1.0")
    assert r.code == 0, r.err
    assert "--phase1-max-iterations 2" in r.err
    report = json.loads((run_dir(base_args) / "phase1_train.json").read_text())
    assert any("--phase1-max-iterations" in w for w in report["warnings"])


def test_version(cli):
    from newllm_cli import __version__

    r = cli("--version")
    assert r.code == 0 and r.out.strip() == f"newllm {__version__}"


@pytest.mark.parametrize("args", [["--help"], ["phase1", "--help"], ["--version"]])
def test_help_imports_no_torch(args):
    """Help and --version answer without importing torch, numba or numpy (a second of start-up)."""
    import subprocess
    import sys

    code = (
        f"import sys; from newllm_cli.cli.app import main; code = main({args!r}); "
        "print('heavy:', [m for m in ('torch', 'numba', 'numpy') if m in sys.modules], code)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "heavy: [] 0"


def test_mistyped_run_lists_the_runs_and_a_mismatch_mentions_rebuild(cli, base_args):
    assert cli("prepare-data", *base_args).code == 0
    r = cli("analyze", "--workspace", base_args[1], "--run", "defualt")
    assert r.code == 3 and "'defualt'" in r.err and "default" in r.err.split("runs there:")[1]
    assert cli("phase1", *base_args, "--phase1-max-iterations", "2").code == 0
    r = cli("phase1", *base_args, "--split", "val", "--context-dim", "8")
    assert r.code == 3 and "--rebuild" in r.err


def test_config_prints_the_effective_settings_as_toml_that_config_accepts(cli, base_args, tmp_path):
    assert cli("prepare-data", *base_args, "--run", "cfg").code == 0
    assert cli("phase1", *base_args, "--run", "cfg", "--context-dim", "8", "--phase1-max-iterations", "2").code == 0
    r = cli("config", "--workspace", base_args[1], "--run", "cfg")  # the run's saved settings
    assert r.code == 0 and "[model]" in r.out and "context_dim = 8" in r.out
    toml = tmp_path / "edited.toml"
    toml.write_text(r.out.replace("context_dim = 8", "context_dim = 12"))
    again = cli("config", "--config", toml, "--json")
    settings = json.loads(again.out)["settings"]
    assert settings["model"]["context_dim"] == 12 and settings["phase1"]["max_iterations"] == 2
    assert settings["data"]["source"] == "text_file"


def test_full_writes_a_log_and_metrics_matching_the_reports(cli, base_args):
    import csv

    assert cli("full", *base_args, "--force").code == 0
    run = run_dir(base_args)
    log = (run / "log.txt").read_text()
    assert "newllm" in log and "phase1 train:" in log and "\x1b[" not in log  # plain text
    assert "verdict" in log.lower() or "beats" in log or "ties" in log or "loses" in log  # the tables too
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    history = json.loads((run / "phase1_train.json").read_text())["history"]
    mine = [r for r in rows if r["stage"] == "phase1" and r["split"] == "train"]
    assert len(mine) == len(history)
    for r, h in zip(mine, history):
        assert int(r["step"]) == h["iteration"]
        for key in ("cvfp_loss", "converged_ratio", "lr", "seconds"):
            assert (r[key] == "" and h[key] is None) or float(r[key]) == h[key], key
    assert {r["stage"] for r in rows} >= {"phase1", "phase2_phase1", "phase2_untrained"}
    assert cli("phase1", *base_args, "--split", "val").code == 0  # a rerun replaces its own rows
    again = list(csv.DictReader((run / "metrics.csv").open()))
    assert len([r for r in again if r["stage"] == "phase1" and r["split"] == "val"]) == len(
        [r for r in rows if r["stage"] == "phase1" and r["split"] == "val"]
    )


def test_tensorboard_events_hold_the_reported_figures(cli, base_args):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert cli("prepare-data", *base_args).code == 0
    assert cli("phase1", *base_args, "--phase1-max-iterations", "4", "--tensorboard").code == 0
    history = json.loads((run_dir(base_args) / "phase1_train.json").read_text())["history"]
    events = EventAccumulator(str(run_dir(base_args) / "tensorboard" / "phase1_train"))
    events.Reload()
    got = [(e.step, e.value) for e in events.Scalars("converged_ratio")]
    want = [(h["iteration"], h["converged_ratio"]) for h in history if h["converged_ratio"] is not None]
    assert [s for s, _ in got] == [s for s, _ in want]
    assert np.allclose([v for _, v in got], [v for _, v in want], rtol=1e-6)
