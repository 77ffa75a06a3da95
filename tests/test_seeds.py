"""Verdicts over seeds: the pooled interval carries the spread between seeds, which a single
seed's document bootstrap cannot see."""

from __future__ import annotations

import json

import numpy as np
import pytest

from newllm_cli.evaluation import verdict

DOCS, PAIRS = 40, 50


def seed_losses(rng, effect: float, seed_sd: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-pair losses of two methods on the same DOCS x PAIRS validation pairs under one seed: a
    shared per-pair difficulty, a per-seed offset of the difference (what a change of seed moves),
    and small per-pair noise."""
    difficulty = np.random.default_rng(0).gamma(2.0, 2.0, DOCS * PAIRS)  # the same text for every seed
    offset = effect + rng.normal(0, seed_sd)
    a = difficulty + offset + rng.normal(0, 0.02, DOCS * PAIRS)
    return a, difficulty, np.repeat(np.arange(DOCS), PAIRS)


def run_seeds(effect: float, seeds: int = 8):
    rng = np.random.default_rng(11)
    single, sums, pairs = [], [], None
    for s in range(seeds):
        a, b, groups = seed_losses(rng, effect, 0.04)
        c = verdict.compare(a, b, groups, seed=s)
        single.append(c["verdict"])
        sums.append(c["unit_sums"])
        pairs = c["unit_pairs"]
    return single, verdict.pooled(sums, pairs)


def test_methods_differing_by_seed_noise_tie_when_pooled_though_single_seeds_disagree():
    single, pool = run_seeds(effect=0.0)
    assert {"beats", "loses to"} <= set(single)  # each seed alone is confidently wrong one way or the other
    assert pool["verdict"] == "ties" and pool["seeds"] == 8
    inside = [pool["ratio_low"] <= r <= pool["ratio_high"] for r in pool["per_seed"]]
    assert (pool["covers"] == "covers every seed's ratio") == all(inside)  # said as it is
    assert pool["between_seed_sd"] > 5 * pool["document_se"]  # the seed, not the documents, is the noise


def test_a_real_difference_beats_when_pooled():
    single, pool = run_seeds(effect=-0.1)
    assert pool["verdict"] == "beats" and pool["ratio_high"] < 1
    assert pool["ratio"] == pytest.approx(np.exp(np.mean(np.log(pool["per_seed"]))))


def test_pooled_interval_is_a_t_interval_over_seeds_by_hand():
    """Three seeds, one unit each of one pair: the document part vanishes (one unit resamples to
    itself), so the interval is mean +- t(2) sd / sqrt(3) exactly."""
    logs = [0.1, -0.05, 0.2]
    pool = verdict.pooled([[x] for x in logs], [1])
    half = 4.303 * np.std(logs, ddof=1) / np.sqrt(3)
    assert np.log(pool["ratio_low"]) == pytest.approx(np.mean(logs) - half, rel=1e-3)
    assert np.log(pool["ratio_high"]) == pytest.approx(np.mean(logs) + half, rel=1e-3)
    assert pool["df"] == pytest.approx(2)
    one = verdict.pooled([[0.1, 0.3]], [1, 1])
    assert one["covers"].startswith("one seed") and one["df"] is None


def test_t_quantile_against_the_table():
    for df, q in ((1, 12.706), (2, 4.303), (5, 2.571), (10, 2.228), (30, 2.042), (120, 1.980)):
        assert verdict.t975(df) == pytest.approx(q, abs=1e-3)


def test_replicate_runs_each_seed_as_a_run_and_pools_its_verdicts(cli, base_args, tmp_path):
    r = cli("replicate", "--seeds", "2", "--seed", "7", *base_args, "--run", "rep", "--probe-rows", "0", "--json")
    assert r.code == 0, r.err
    out = r.json()
    assert out["seeds"] == [7, 8] and [row["run"] for row in out["runs"]] == ["rep.seed-7", "rep.seed-8"]
    runs = tmp_path / "ws" / "runs"
    for seed in (7, 8):  # ordinary runs, each with its own seed
        settings = json.loads((runs / f"rep.seed-{seed}" / "settings.json").read_text())
        assert settings["runtime"]["seed"] == seed
    phase2 = [json.loads((runs / f"rep.seed-{s}" / "phase2.json").read_text())["baselines"] for s in (7, 8)]
    for key, pool in out["pooled"].items():  # the pooled figures are those of the two runs' own comparisons
        again = verdict.pooled([p[key]["unit_sums"] for p in phase2], phase2[0][key]["unit_pairs"], seed=7)
        assert pool["ratio"] == pytest.approx(again["ratio"]) and pool["ratio_low"] == pytest.approx(again["ratio_low"])
        assert pool["per_seed"] == pytest.approx([p[key]["ratio"] for p in phase2])
    assert {"untrained_network", "trigram_interpolated", "bigram_interpolated"} <= set(out["pooled"])
    assert (tmp_path / "ws" / "replicates" / "rep.json").exists() and "Over 2 seeds" in out["finding"]
    assert cli("replicate", "--seeds", "0", *base_args).code == 2


def test_replicate_leaves_out_a_seed_the_gate_refuses_and_says_so(cli, base_args, monkeypatch):
    from newllm_cli import stages
    from newllm_cli.runtime.errors import GateRefused

    fit = stages._fit_phase2

    def gated(s, *a, **k):
        if s.runtime.seed == 8:
            raise GateRefused("Phase-1 gate: planted for seed 8 (--force to train anyway)")
        return fit(s, *a, **k)

    monkeypatch.setattr(stages, "_fit_phase2", gated)
    r = cli("replicate", "--seeds", "3", "--seed", "7", *base_args, "--run", "g", "--probe-rows", "0", "--json")
    assert r.code == 0, r.err
    out = r.json()
    assert out["seeds"] == [7, 9] and [x["seed"] for x in out["refused"]] == [8]
    assert all(p["seeds"] == 2 for p in out["pooled"].values()) and "left out: seed 8" in out["finding"]
    assert "seed 8: Phase-1 gate: planted" in r.err
