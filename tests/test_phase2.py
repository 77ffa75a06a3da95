"""Phase 2: the head, its metrics and the baselines against direct computations."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from newllm_cli import baselines, phase2 as p2
from newllm_cli.settings import Phase2Settings

CPU = torch.device("cpu")


def test_pair_positions_stay_inside_documents():
    assert baselines.pair_positions(np.array([0, 3, 4, 7])).tolist() == [0, 1, 4, 5]


def test_unigram_baseline_equals_hand_computation():
    train = np.array([0, 0, 1, 2])  # counts 2, 1, 1, 0 over V = 4: add-one gives 3/8, 2/8, 2/8, 1/8
    targets = np.array([0, 3])
    expected = math.exp(-(math.log(3 / 8) + math.log(1 / 8)) / 2)
    assert baselines.unigram_perplexity(train, targets, 4) == pytest.approx(expected)


def test_perplexity_is_exp_of_mean_cross_entropy():
    torch.manual_seed(0)
    head = p2.Head(3, 5)
    split = p2.Split(torch.randn(40, 3), torch.randint(0, 5, (40,)))
    got = p2.evaluate(head, split)
    with torch.no_grad():
        logits = head(split.inputs)
        ce = F.cross_entropy(logits, split.targets).item()
        acc = (logits.argmax(1) == split.targets).float().mean().item()
    assert got["loss"] == pytest.approx(ce, rel=1e-6)
    assert got["perplexity"] == pytest.approx(math.exp(ce), rel=1e-6)
    assert got["accuracy"] == pytest.approx(acc)


def test_head_learns_a_deterministic_sequence():
    # context i (one-hot) is always followed by token (i + 1) % 6
    x = torch.eye(6).repeat(50, 1)
    y = (torch.arange(300) % 6 + 1) % 6
    split = p2.Split(x, y)
    cfg = Phase2Settings(lr=0.05, epochs=60, batch_size=32, patience=60)
    res = p2.train_head(split, split, 6, cfg, seed=0, bias=None, device=CPU)
    assert res.best["val"]["loss"] < 0.05 and res.best["val"]["accuracy"] == 1.0


def test_early_stopping_restores_the_best_epoch():
    rng = np.random.default_rng(0)
    train = p2.Split(torch.randn(400, 4), torch.as_tensor(rng.integers(0, 50, 400)))
    val = p2.Split(torch.randn(200, 4), torch.as_tensor(rng.integers(0, 50, 200)))  # unrelated: overfits
    cfg = Phase2Settings(lr=0.05, epochs=30, batch_size=16, patience=2)
    res = p2.train_head(train, val, 50, cfg, seed=0, bias=None, device=CPU)
    assert len(res.epochs) < 30  # stopped early
    best = min([res.best] + [{"val": e["val"]} for e in res.epochs], key=lambda r: r["val"]["loss"])
    assert p2.evaluate(res.head, val)["loss"] == pytest.approx(best["val"]["loss"], rel=1e-6)


def test_unigram_bias_starts_at_the_baseline():
    tokens = np.array([0, 1, 1, 2, 2, 2, 3])
    bias = baselines.unigram_log_probs(tokens, 5)
    head = p2.Head(2, 5)
    with torch.no_grad():
        head.proj.weight.zero_()
        head.proj.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))
    targets = np.array([2, 4, 1])
    split = p2.Split(torch.randn(3, 2), torch.as_tensor(targets))
    assert p2.evaluate(head, split)["perplexity"] == pytest.approx(baselines.unigram_perplexity(tokens, targets, 5), rel=1e-5)


def test_bigram_baseline_equals_hand_computation():
    # pairs inside documents [0 1 0 1] and [1 1]: (0,1) x2, (1,0) x1, (1,1) x1; V = 3, k = 0.5
    tokens = np.array([0, 1, 0, 1, 1, 1])
    model = baselines.Bigram(np.array([0, 1, 0, 1]), np.array([1, 0, 1, 1]), 3)
    # p(1|0) = (2 + .5) / (2 + 1.5); p(2|1) = (0 + .5) / (2 + 1.5)
    got = model.log_probs(np.array([0, 1]), np.array([1, 2]), 0.5)
    assert np.allclose(np.exp(got), [2.5 / 3.5, 0.5 / 3.5])
    offsets = np.array([0, 4, 6])
    val = baselines.bigram_perplexity(tokens, offsets, np.array([0, 1, 2]), np.array([0, 3]), 3)
    k = val["k"]
    p01 = (2 + k) / (2 + 3 * k)  # refitted on all training pairs: (0,1) x2, (1,0), (1,1)
    p12 = (0 + k) / (2 + 3 * k)
    assert val["val_perplexity"] == pytest.approx(math.exp(-(math.log(p01) + math.log(p12)) / 2))
    assert k in baselines.K_GRID


def test_unigram_head_starts_exactly_at_the_baseline():
    tokens = np.array([0, 1, 1, 2, 2, 2, 3])
    split = p2.Split(torch.randn(7, 3), torch.as_tensor(tokens))
    cfg = Phase2Settings(epochs=1, lr=1e-12)
    res = p2.train_head(split, split, 5, cfg, seed=0, bias=baselines.unigram_log_probs(tokens, 5), device=CPU)
    assert res.best["val"]["perplexity"] == pytest.approx(baselines.unigram_perplexity(tokens, tokens, 5), rel=1e-5)
