"""Analysis figures on matrices whose answers are known."""
from __future__ import annotations

import math

import numpy as np
import pytest

from newllm_cli import analysis


def test_identity_like_contexts_have_full_effective_rank():
    x = np.tile(np.eye(8, dtype=np.float32), (5, 1))  # equal singular values
    rep = analysis.analyze_contexts(x)
    assert rep["information"]["effective_rank"] == pytest.approx(8.0, rel=1e-9)
    assert rep["information"]["actual_rank"] == 8


def test_rank_one_contexts_have_effective_rank_one():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(300, 1)) @ rng.normal(size=(1, 6))).astype(np.float32)
    rep = analysis.analyze_contexts(x)
    assert rep["information"]["actual_rank"] == 1
    assert rep["information"]["effective_rank"] == pytest.approx(1.0, abs=1e-3)


def test_isotropic_gaussian_is_close_to_full_rank():
    x = np.random.default_rng(1).normal(size=(20000, 16)).astype(np.float32)
    rep = analysis.analyze_contexts(x)
    assert 15.5 < rep["information"]["effective_rank"] <= 16.0
    assert not rep["global_attractor"]["degenerate"] and not rep["zero_solution"]["degenerate"]


def test_effective_rank_is_entropy_of_normalised_singular_values():
    s = np.array([3.0, 2.0, 1.0])
    p = s / s.sum()
    expected = math.exp(-(p * np.log(p)).sum())
    assert analysis.spectrum(s ** 2)["effective_rank"] == pytest.approx(expected)


def test_constant_contexts_raise_global_attractor():
    x = np.full((500, 4), 0.7, dtype=np.float32)
    rep = analysis.analyze_contexts(x)
    assert rep["global_attractor"]["degenerate"]
    assert rep["centred"]["actual_rank"] == 0 and rep["centred"]["effective_rank"] == 0.0
    assert rep["information"]["effective_rank"] == pytest.approx(1.0)
    assert analysis.gate(rep, rep, 4)


def test_zero_contexts_raise_zero_solution():
    rep = analysis.analyze_contexts(np.zeros((100, 4), dtype=np.float32))
    assert rep["zero_solution"]["degenerate"] and rep["distribution"]["sparsity"] == 1.0


def test_streamed_result_equals_direct_computation(monkeypatch):
    rng = np.random.default_rng(2)
    x = (rng.normal(size=(1000, 5)) * [3, 2, 1, 0.5, 0.1] + 0.3).astype(np.float32)
    monkeypatch.setattr(analysis, "ROWS", 77)  # many chunks
    rep = analysis.analyze_contexts(x)
    s = np.linalg.svd(x.astype(np.float64), compute_uv=False)
    assert np.allclose(rep["information"]["singular_values"], s, rtol=1e-7)
    sc = np.linalg.svd(x - x.mean(0), compute_uv=False)
    assert np.allclose(rep["centred"]["singular_values"], sc, rtol=1e-6)
    norms = np.linalg.norm(x.astype(np.float64), axis=1)
    assert rep["distribution"]["norm_mean"] == pytest.approx(norms.mean())
    assert rep["distribution"]["norm_std"] == pytest.approx(norms.std())
    assert rep["distribution"]["norm_median"] == pytest.approx(np.median(norms), rel=1e-6)
    assert rep["distribution"]["sparsity"] == pytest.approx((np.abs(x) < 0.01).mean())
    # the top direction's best positions equal a direct projection on the same eigenvector
    top = np.linalg.eigh(x.T.astype(np.float64) @ x)[1][:, -1]
    assert set(rep["directions"][0]["positions"]) == set(np.argsort(-(x @ top))[:5].tolist())


def test_pairwise_statistics_match_direct_computation_and_seed():
    x = np.random.default_rng(3).normal(size=(50, 3))
    got = analysis.pairwise(x)
    d = [np.linalg.norm(x[i] - x[j]) for i in range(50) for j in range(i + 1, 50)]
    c = [x[i] @ x[j] / np.linalg.norm(x[i]) / np.linalg.norm(x[j]) for i in range(50) for j in range(i + 1, 50)]
    assert got["mean_l2"] == pytest.approx(np.mean(d)) and got["median_l2"] == pytest.approx(np.median(d))
    assert got["mean_cosine"] == pytest.approx(np.mean(c))
    big = np.random.default_rng(4).normal(size=(5000, 4)).astype(np.float32)
    a, b = analysis.analyze_contexts(big, seed=7), analysis.analyze_contexts(big, seed=7)
    assert a["global_attractor"] == b["global_attractor"]
    assert analysis.analyze_contexts(big, seed=8)["global_attractor"]["mean_l2"] != a["global_attractor"]["mean_l2"]


def test_gate_thresholds():
    def rep(eff):
        return {"information": {"effective_rank": eff}, "global_attractor": {"degenerate": False},
                "zero_solution": {"degenerate": False, "mean_norm": 1.0}}
    assert analysis.gate(rep(3.3), rep(1.3), 16) == []
    assert "train effective rank" in analysis.gate(rep(3.1), rep(1.3), 16)[0]
    assert "val effective rank" in analysis.gate(rep(3.3), rep(1.2), 16)[0]
