"""Analysis figures on matrices whose answers are known."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from newllm_cli.evaluation import analysis


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
    assert analysis.spectrum(s**2)["effective_rank"] == pytest.approx(expected)


def test_constant_contexts_raise_global_attractor():
    x = np.full((500, 4), 0.7, dtype=np.float32)
    rep = analysis.analyze_contexts(x)
    assert rep["global_attractor"]["degenerate"]
    assert rep["centred"]["actual_rank"] == 0 and rep["centred"]["effective_rank"] == 0.0
    assert rep["information"]["effective_rank"] == pytest.approx(1.0)
    assert analysis.gate(rep, rep)


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


def test_gate_thresholds_are_shares_of_the_attainable_centred_rank():
    def rep(eff):  # C = 16: at most 15 centred directions; the uncentred rank plays no part
        return {
            "dim": 16,
            "centred": {"effective_rank": eff},
            "information": {"effective_rank": 0.5},
            "global_attractor": {"degenerate": False},
            "zero_solution": {"degenerate": False, "mean_norm": 1.0},
        }

    assert (
        analysis.gate(
            rep(3.0),
            rep(1.2),
        )
        == []
    )  # 20% and 8% of 15
    assert "train centred effective rank" in analysis.gate(rep(2.9), rep(1.2))[0]
    assert "val centred effective rank" in analysis.gate(rep(3.0), rep(1.1))[0]


def test_file_backed_streaming_equals_in_memory(tmp_path, monkeypatch):
    x = np.random.default_rng(5).normal(size=(3001, 6)).astype(np.float32) * 2 + 1
    np.save(tmp_path / "c.npy", x)
    monkeypatch.setattr(analysis, "ROWS", 500)
    a = analysis.analyze_contexts(np.load(tmp_path / "c.npy", mmap_mode="r"), seed=1)
    b = analysis.analyze_contexts(x, seed=1)
    assert a == b


def test_analyze_any_contexts_file(cli, tmp_path):
    from newllm_cli.data.tokenizer import byte_tokenizer

    x = np.random.default_rng(6).normal(size=(400, 8)).astype(np.float32)
    np.save(tmp_path / "ctx.npy", x)
    ids = (np.arange(400) % 26 + 97).astype(np.uint16)
    np.save(tmp_path / "ids.npy", ids)
    byte_tokenizer().save(str(tmp_path / "tok.json"))
    r = cli(
        "analyze",
        "--contexts",
        tmp_path / "ctx.npy",
        "--tokens",
        tmp_path / "ids.npy",
        "--tokenizer-file",
        tmp_path / "tok.json",
        "--json",
        "--workspace",
        tmp_path / "ws",
    )
    assert r.code == 0, r.err
    rep = r.json()["contexts"]
    assert rep["n"] == 400 and 7.0 < rep["information"]["effective_rank"] <= 8.0
    d = rep["directions"][0]
    assert d["tokens"] == [chr(ids[p]) for p in d["positions"]]
    assert (tmp_path / "ctx.analysis.json").exists() and "information" in r.err
    bad = cli("analyze", "--contexts", tmp_path / "ids.npy", "--workspace", tmp_path / "ws")
    assert bad.code == 2 and "N x C float" in bad.err
    short = cli("analyze", "--contexts", tmp_path / "ctx.npy", "--tokens", tmp_path / "tok.json")
    assert short.code == 2


def test_plots_are_valid_pngs(cli, base_args, tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.image

    assert cli("full", *base_args, "--force").code == 0
    r = cli("analyze", *base_args, "--plot", tmp_path / "plots", "--json")
    assert r.code == 0, r.err
    names = sorted(Path(p).name for p in r.json()["plots"])
    assert names == ["convergence.png", "spectrum.png"]
    for name in names:
        raw = (tmp_path / "plots" / name).read_bytes()
        assert raw[:8] == b"\x89PNG\r\n\x1a\n"
        img = matplotlib.image.imread(tmp_path / "plots" / name)
        assert img.shape[0] > 200 and img.shape[1] > 300


def test_gate_refuses_phase2_unless_forced(cli, base_args, monkeypatch):
    assert cli("full", *base_args, "--force").code == 0
    monkeypatch.setattr(analysis, "gate", lambda *a: ["train effective rank 1.00 < 20% of 16"])
    r = cli("phase2", *base_args)
    assert r.code == 3 and "train effective rank 1.00" in r.err and "--force" in r.err
    assert cli("phase2", *base_args, "--force").code == 0


def test_an_untrained_network_fails_the_gate_end_to_end(cli, base_args):
    """Two iterations end training before any Adam step: the saved contexts are the untrained
    network's own, the control itself, and Phase 2 must refuse them."""
    r = cli("full", *base_args, "--phase1-max-iterations", "2")
    assert r.code == 3 and "took no optimizer step" in r.err and "stopped at its cap" in r.err


def _naive_steps(x, offsets, lags=(1, 10, 100)):
    """Pair by pair inside documents: the definitions of the step statistics."""
    x = x.astype(np.float64)
    doc = np.searchsorted(offsets, np.arange(len(x)), side="right") - 1
    m = x.mean(0)
    out = {}
    for k in lags:
        a = [x[t - k] - m for t in range(k, len(x)) if doc[t] == doc[t - k]]
        b = [x[t] - m for t in range(k, len(x)) if doc[t] == doc[t - k]]
        a, b = np.array(a, np.float64), np.array(b, np.float64)
        out[k] = (a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum())
    cos = [
        x[t] @ x[t - 1] / np.linalg.norm(x[t]) / np.linalg.norm(x[t - 1])
        for t in range(1, len(x))
        if doc[t] == doc[t - 1]
    ]
    return out, float(np.mean(cos))


def test_step_statistics_equal_the_pairwise_definition_across_chunks(monkeypatch):
    rng = np.random.default_rng(3)
    x = np.cumsum(rng.normal(size=(1500, 5)), axis=0).astype(np.float32) * 0.1 + 1.0  # a slow walk
    offsets = np.array([0, 250, 251, 900, 1500])
    monkeypatch.setattr(analysis, "ROWS", 173)  # lags span chunk boundaries
    got = analysis.step_statistics(x, x.astype(np.float64).mean(0), offsets)
    auto, cos = _naive_steps(x, offsets)
    assert got["consecutive_cosine"] == pytest.approx(cos, rel=1e-9)
    for k, v in auto.items():
        assert got["autocorrelation"][f"lag_{k}"] == pytest.approx(v, rel=1e-9)
    assert auto[1] > 0.9 and auto[100] < auto[10] < auto[1]


def test_decodability_reads_what_the_contexts_encode():
    """Contexts that are the one-hot of the current token: x_t decodes exactly from c_t; the next
    token (drawn independently) and Gaussian features decode at chance."""
    from newllm_cli.evaluation import decodability

    rng = np.random.default_rng(0)
    vocab = 6

    def split(n, docs):
        tokens = rng.integers(0, vocab, n)
        offsets = np.linspace(0, n, docs + 1).astype(np.int64)
        return (
            tokens,
            offsets,
            np.eye(vocab, dtype=np.float32)[tokens] + rng.normal(0, 0.01, (n, vocab)).astype(np.float32),
        )

    (tt, to, tc), (vt, vo, vc) = split(3000, 40), split(1000, 10)
    pos, docs = decodability.positions(to, 10**9, 0)
    assert not np.isin(pos, to[:-1]).any() and not np.isin(pos, to[1:] - 1).any()
    assert len(pos) == 3000 - 2 * 40 and (docs == np.searchsorted(to, pos, side="right") - 1).all()
    out = decodability.probe_all(
        {"phase1": (tc, vc)}, (tt, to), (vt, vo), vocab, rows=2000, seed=0, device=torch.device("cpu")
    )
    p = out["probes"]
    assert p["token_from_context"]["phase1"]["val_accuracy"] == 1.0
    assert p["next_from_context"]["phase1"]["val_perplexity"] > 0.95 * vocab
    assert p["token_from_context"]["gaussian"]["val_accuracy"] < 0.3
    assert out["rows"] == {"train": 2000, "val": 1000 - 2 * 10}


def test_memory_share_is_the_within_token_variance_by_hand():
    from newllm_cli.evaluation import memory

    tokens = np.array([0, 0, 1, 1, 1, 2])
    ctx = np.array([[1.0], [3.0], [0.0], [1.0], [2.0], [5.0]], np.float32)
    # within-token sum of squares: token 0: 2, token 1: 2, token 2: 0 -> 4 over 6 - 3 degrees of freedom
    total = float(((ctx - ctx.mean()) ** 2).sum())
    got = memory.token_share(ctx, tokens)
    assert got["not_explained_by_token"] == pytest.approx((4 / 3) / (total / 5))
    assert got["distinct_tokens"] == 3


def planted(contexts: np.ndarray, tokens: np.ndarray) -> dict:
    from newllm_cli.evaluation import memory

    rep = analysis.analyze_contexts(contexts)
    rep["memory"] = memory.token_share(contexts, tokens)
    return rep


def test_gate_fails_collapsed_memoryless_and_the_control_itself():
    """Three context sets that 'converge' without remembering anything useful must fail the gate;
    recurrent contexts that remember more than the control pass."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50, 4000)
    table = rng.normal(size=(50, 16))
    memoryless = table[tokens]  # c_t = g(x_t): every token always the same context
    recurrent = np.zeros((4000, 16))
    c = np.zeros(16)
    for t, x in enumerate(tokens):  # c_t = 0.9 c_{t-1} + g(x_t): memory of the past tokens
        c = 0.9 * c + 0.3 * table[x]
        recurrent[t] = c
    control = planted(0.5 * recurrent + 0.5 * memoryless, tokens)  # stand-in for an untrained network's
    collapsed = planted(np.full((4000, 16), 0.3) + 1e-7 * rng.normal(size=(4000, 16)), tokens)
    assert any("nearly memoryless" in p for p in analysis.gate(None, planted(memoryless, tokens)))
    assert analysis.gate(collapsed, collapsed)
    untrained = {**control, "optimizer_steps": 0}  # the control's own contexts, as Phase 1 would report them
    assert any("took no optimizer step" in p for p in analysis.gate(untrained, control))
    good = planted(recurrent, tokens)
    assert good["memory"]["not_explained_by_token"] > control["memory"]["not_explained_by_token"]
    assert analysis.gate({**good, "optimizer_steps": 5}, good) == []
    assert analysis.remembers_less(good, control) is None
    assert "no more than the untrained" in analysis.remembers_less(control, good)


def test_gate_refuses_unconverged_training_and_unsolved_val():
    rep = planted(np.random.default_rng(1).normal(size=(500, 8)), np.arange(500) % 7)
    assert analysis.gate(rep, rep) == []
    assert "stopped at its cap" in analysis.gate({**rep, "stopped_by": "max_iterations"}, rep)[0]
    unsolved = {**rep, "fixed_point": {"within_tolerance": 0.25}}
    assert "25% of the val documents" in analysis.gate(rep, unsolved)[0]
