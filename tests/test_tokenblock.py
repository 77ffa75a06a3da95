"""The TokenBlock predictor, its zero-context control, pretrained embeddings, the scaling fits and
the validation offset (issue 25)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import load_checkpoint
from torch.nn import functional as F

from newllm_cli.data import embeddings
from newllm_cli.evaluation import verdict
from newllm_cli.experiments import scaling
from newllm_cli.model import recurrence
from newllm_cli.model.network import NewLLM
from newllm_cli.model.token_block import TokenBlock
from newllm_cli.runtime.errors import NumericalError, UsageError
from newllm_cli.settings import DataSettings, ModelSettings, Phase2Settings
from newllm_cli.training import pairs as p2
from newllm_cli.training import predictors

CPU = torch.device("cpu")


def test_token_block_and_tied_output_equal_a_naive_computation():
    torch.manual_seed(0)
    emb = torch.randn(11, 4)
    block = TokenBlock(emb, context_width=3, layers=2, activation="gelu", init_bias_std=0.1)
    with torch.no_grad():
        block.embed_norm.weight.uniform_(0.5, 1.5)
    ctx, ids = torch.randn(5, 3), torch.tensor([0, 3, 10, 3, 7])

    def ln(x, norm):
        mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
        return (x - mu) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias

    h = ln(emb[ids], block.embed_norm)
    for layer in block.layers:
        z = torch.cat([ctx, h], 1) @ layer.linear.weight.t() + layer.linear.bias
        h = ln(h + 0.5 * z * (1 + torch.erf(z / 2**0.5)), layer.norm)
    want = h @ emb.t()  # tied: the logits are the hidden state against every embedding row
    assert torch.allclose(block(ctx, ids), want, atol=1e-5)
    untied = TokenBlock(emb, 3, untied=True)
    assert untied.out is not None and untied(ctx, ids).shape == (5, 11)


def _doubled(n_docs=40, length=60, vocab=16, seed=0):
    """x_{t+1} = x_{t-1} + 5 (mod V, 10% noise): x_t says nothing of x_{t+1}; x_{t-1} says it all."""
    rng = np.random.default_rng(seed)
    tokens = np.empty(n_docs * length, dtype=np.int64)
    for d in range(n_docs):
        doc = list(rng.integers(vocab, size=2))
        while len(doc) < length:
            doc.append((doc[-2] + 5) % vocab if rng.random() > 0.1 else rng.integers(vocab))
        tokens[d * length : (d + 1) * length] = doc
    return tokens, np.arange(0, n_docs * length + 1, length)


def _writer_contexts(tokens, offsets, vocab=16, width=8, seed=0):
    """A network built to write the current token into its context: c_t is a function of x_t."""
    torch.manual_seed(seed)
    model = NewLLM(vocab, width, width, 1)
    with torch.no_grad():
        lin = model.blocks[0].mlp[0]
        lin.weight.zero_()
        lin.weight[:width, width:] = 10 * torch.eye(width)
        model.embed.weight.normal_(0, 1)
    table = recurrence.embedding_table(model, CPU)
    n_docs = len(offsets) - 1
    return recurrence.recur_torch(model, table, torch.as_tensor(tokens), offsets, torch.zeros(n_docs, width)).numpy()


CFG = {"predictor": "tokenblock", "previous_contexts": 1, "epochs": 30, "lr": 1e-2, "batch_size": 64,
       "patience": 3, "embedding": "trained"}  # fmt: skip


def _fit(ctx, tokens, offsets, zero=False, cfg=None, **kw):
    cfg = cfg or Phase2Settings(**CFG)
    cut = offsets[30]
    train = p2.make_split(ctx[:cut], tokens[:cut], offsets[:31], CPU, previous=cfg.previous_contexts, zero=zero)
    val = p2.make_split(ctx[cut:], tokens[cut:], offsets[30:] - cut, CPU, previous=cfg.previous_contexts, zero=zero)
    emb = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    job = predictors.Job(cfg, ModelSettings(), emb, 0, CPU, **kw)
    return predictors.PREDICTORS["tokenblock"].fit(train, val, 16, np.zeros(16), job), val


@pytest.mark.parametrize("written", [True, False])
def test_tokenblock_beats_zero_context_only_when_the_contexts_carry_the_next_token(written):
    tokens, offsets = _doubled()
    ctx = (
        _writer_contexts(tokens, offsets)
        if written
        else np.random.default_rng(3).normal(size=(len(tokens), 8)).astype(np.float32)
    )
    res, val = _fit(ctx, tokens, offsets)
    zero, _ = _fit(ctx, tokens, offsets, zero=True)
    v = verdict.compare(res.val_losses, zero.val_losses, val.groups.numpy())
    if written:  # c_{t-1} holds x_{t-1}, which gives x_{t+1}: far below what x_t alone gives
        assert v["verdict"] == "beats" and v["ratio_high"] < 0.5, v
    else:
        assert v["ratio_low"] <= 1.02 and v["ratio_high"] >= 0.98, v  # Gaussian contexts: no better than zero


def test_zero_context_never_reads_the_contexts_and_previous_contexts_are_lagged_within_documents():
    tokens, offsets = np.arange(12) % 5, np.array([0, 5, 12])
    poisoned = np.full((12, 3), np.nan, dtype=np.float32)
    with pytest.raises(NumericalError):
        p2.make_split(poisoned, tokens, offsets, CPU)
    zero = p2.make_split(poisoned, tokens, offsets, CPU, previous=2, zero=True)
    assert zero.inputs.shape == (10, 9) and not zero.inputs.any()
    ctx = np.arange(36, dtype=np.float32).reshape(12, 3)
    got = p2.make_split(ctx, tokens, offsets, CPU, previous=2)
    pos = p2.pair_positions(offsets)
    for row, t in enumerate(pos):
        start = 0 if t < 5 else 5
        want = np.concatenate([ctx[t - lag] if t - lag >= start else np.zeros(3) for lag in range(3)])
        assert np.array_equal(got.inputs[row].numpy(), want)
        assert int(got.sources[row]) == tokens[t] and int(got.targets[row]) == tokens[t + 1]


def test_early_stopping_never_reads_validation_and_frozen_embeddings_stay_byte_identical():
    tokens, offsets = _doubled(n_docs=36)
    ctx = _writer_contexts(tokens, offsets)
    cfg = Phase2Settings(**{**CFG, "embedding": "frozen", "epochs": 4})
    a, _ = _fit(ctx, tokens, offsets, cfg=cfg)
    poisoned = tokens.copy()
    poisoned[offsets[30] :] = 0  # another validation text entirely
    b, _ = _fit(ctx, poisoned, offsets, cfg=cfg)
    assert a.history == [{**h, "seconds": a.history[i]["seconds"]} for i, h in enumerate(b.history)]
    assert all(torch.equal(x, y) for x, y in zip(a.module.state_dict().values(), b.module.state_dict().values()))
    emb = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.module.embed.weight, emb) and not a.module.embed.weight.requires_grad


def test_an_interrupted_tokenblock_resumes_to_the_uninterrupted_result():
    tokens, offsets = _doubled(n_docs=34)
    ctx = _writer_contexts(tokens, offsets)
    cfg = Phase2Settings(**{**CFG, "epochs": 3, "order": "shuffled"})
    whole, _ = _fit(ctx, tokens, offsets, cfg=cfg)
    saved: list[dict] = []
    _fit(ctx, tokens, offsets, cfg=cfg, save_resume=lambda st: saved.append(copy.deepcopy(st)), save_every=1e-9)
    middle = saved[len(saved) // 2]
    assert middle["epoch"] >= 1 and middle["module"] is not None
    resumed, _ = _fit(ctx, tokens, offsets, cfg=cfg, resume=middle)
    assert np.array_equal(whole.val_losses, resumed.val_losses) and whole.best_epoch == resumed.best_epoch


def test_embeddings_load_from_npy_and_safetensors_and_refuse_a_mismatch(tmp_path):
    from safetensors.numpy import save_file

    m = np.random.default_rng(0).normal(size=(7, 3)).astype(np.float32)
    np.save(tmp_path / "e.npy", m)
    save_file({"wte.weight": m, "other": m[:2]}, str(tmp_path / "e.safetensors"))
    a = embeddings.load(str(tmp_path / "e.npy"), None, 7, 3)
    b = embeddings.load(str(tmp_path / "e.safetensors"), "wte.weight", 7, 3)
    assert np.array_equal(a.matrix, m) and a.sha256 == b.sha256
    with pytest.raises(UsageError, match="2 tensors"):
        embeddings.load(str(tmp_path / "e.safetensors"), None, 7, 3)
    with pytest.raises(UsageError, match="7 embedding rows for a tokenizer of 8 tokens"):
        embeddings.load(str(tmp_path / "e.npy"), None, 8, 3)
    with pytest.raises(UsageError, match="--embed-dim 3"):
        embeddings.load(str(tmp_path / "e.npy"), None, 7, 4)


def test_tokenblock_run_with_pretrained_frozen_embeddings_end_to_end(cli, tmp_path, corpus):
    m = np.random.default_rng(0).normal(size=(256, 16)).astype(np.float32)
    np.save(tmp_path / "wte.npy", m)
    ws = tmp_path / "ws"
    args = ["--workspace", ws, "--source", "text_file", "--path", corpus, "--tokenizer", "byte", "--embeddings",
            tmp_path / "wte.npy", "--phase1-max-iterations", "3", "--predictor", "tokenblock", "--phase2-epochs",
            "2", "--force", "--threads", "1", "--quiet", "--json"]  # fmt: skip
    out = cli("full", *args)
    assert out.code == 0, out.err
    rep = json.loads((ws / "runs" / "default" / "phase2.json").read_text())
    assert {"zero_context", "untrained_network", "bigram_add_k"} <= set(rep["baselines"])
    assert "Beyond all three" in rep["finding"] and rep["provenance"]["predictor"] == "tokenblock"
    head = load_checkpoint(ws / "runs" / "default" / "phase2.safetensors")["state"]
    assert np.array_equal(head["embed.weight"].numpy(), m)  # frozen: the file's bytes
    ckpt = load_checkpoint(ws / "runs" / "default" / "phase1.safetensors")
    assert ckpt["provenance"]["embeddings"] == embeddings.load(str(tmp_path / "wte.npy"), None, 256, 16).sha256
    skipped = cli("phase2", *args[:-1], "--no-zero-ctx", "--no-control", "--json")
    assert (
        skipped.code == 0 and "skipped" in json.loads((ws / "runs" / "default" / "phase2.json").read_text())["finding"]
    )
    bad = cli("phase2", "--workspace", ws, "--run", "new", "--phase2-epochs", "2")  # linear refuses its options
    assert bad.code == 2 and "--predictor tokenblock" in bad.err and bad.err.count("\n") == 1


def test_saturation_fit_matches_curve_fit_and_flags_a_parameter_on_its_bound():
    optimize = pytest.importorskip("scipy.optimize")
    n = np.array([2e5, 4e5, 8e5, 1.6e6, 3.2e6, 6.4e6])
    noise = np.array([1.01, 0.99, 1.005, 0.995, 1.0, 1.002])
    ppl = (80 + 5e4 * n**-0.6) * noise
    fit = scaling.saturation(n, ppl)

    def law(x, m, a, e):
        return m + a * x**-e

    ref, _ = optimize.curve_fit(law, n, ppl, p0=[fit["ppl_min"] * 0.9, fit["A"] * 1.2, fit["a"]], sigma=ppl,
                                maxfev=20000)  # fmt: skip
    assert fit["ppl_min"] == pytest.approx(ref[0], rel=1e-3) and fit["a"] == pytest.approx(ref[2], rel=1e-3)
    assert fit["A"] == pytest.approx(ref[1], rel=1e-2) and fit["on_bound"] == []
    iv = fit["intervals"]["ppl_min"]
    assert iv["low"] < fit["ppl_min"] < iv["high"] and not fit["warnings"]
    # the research's bounded fit of 5 points: A lands on its bound, and the line says so
    r, n5 = [258.3, 187.6, 150.5, 127.4, 114.8], [200, 400, 800, 1600, 3200]
    bounded = scaling.saturation(n5, r, floor=(0, 150), amplitude=(0, 10000), exponent=(0, 2))
    assert bounded["on_bound"] == ["A"] and bounded["A"] == pytest.approx(10000)
    said = scaling.describe(bounded)
    assert "A = 1e+04" in said and "AT ITS BOUND" in said and "fewer than two per parameter" in said
    power = scaling.power(n, 3 * n**-0.25)
    assert power["alpha"] == pytest.approx(-0.25, abs=1e-6) and power["A"] == pytest.approx(3, rel=1e-5)


def test_val_offset_skips_documents_of_the_validation_source(tmp_path):
    from newllm_cli.data import sources

    f = tmp_path / "v.txt"
    f.write_text("\n\n".join(f"doc {i}" for i in range(10)) + "\n")
    docs = list(sources.documents("text_file", str(f), DataSettings(), 3, skip=4))
    assert docs == ["doc 4", "doc 5", "doc 6"]
    export = tmp_path / "chat.jsonl"  # an UltraChat export, read through `datasets` like the hub
    export.write_text(
        "".join(json.dumps({"messages": [{"content": f"q{i}"}, {"content": f"a{i}"}]}) + "\n" for i in range(6))
    )
    assert list(sources.documents("ultrachat", str(export), DataSettings(), 2, skip=3)) == ["q3\na3", "q4\na4"]


def test_bigram_reference_for_the_zero_context_is_a_bigram():
    """With ctx = 0 the TokenBlock's logits depend on x_t alone: one distribution per current token."""
    block = TokenBlock(torch.randn(6, 4), 2)
    ids = torch.tensor([1, 1, 4, 4])
    logits = block(torch.zeros(4, 2), ids)
    assert torch.equal(logits[0], logits[1]) and torch.equal(logits[2], logits[3])
    assert F.softmax(logits, 1).sum(1).allclose(torch.ones(4))
