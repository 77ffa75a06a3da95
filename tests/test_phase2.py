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


def test_vocab_classes_tie_untargeted_tokens_with_equal_start():
    # targets 1 and 3; tokens 0, 2, 4 share a starting bias, token 5 starts elsewhere
    bias = np.array([-5.0, -1.0, -5.0, -2.0, -5.0, -4.0])
    classes = p2.VocabClasses.build(np.array([3, 1, 3]), bias, CPU)
    assert classes.representative.tolist() == [0, 1, 3, 5]
    assert classes.multiplicity.tolist() == [3.0, 1.0, 1.0, 1.0]
    assert classes.token_class.tolist() == [0, 1, 0, 2, 0, 3]


def _reference_training(train, val, vocab, cfg, seed, bias):
    """The plain full-vocabulary loop: Linear(in, V) from W = 0, autograd, clip_grad_norm_, Adam."""
    head = torch.nn.Linear(train.inputs.shape[1], vocab)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))
    opt = torch.optim.Adam(head.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(seed)
    val_losses, val_accuracy = [], []
    with torch.no_grad():
        best = (F.cross_entropy(head(val.inputs), val.targets).item(), torch.cat([head.weight, head.bias[:, None]], 1))
    for _ in range(cfg.epochs):
        order = torch.randperm(len(train.targets), generator=gen)
        for s in range(0, len(order), cfg.batch_size):
            idx = order[s:s + cfg.batch_size]
            loss = F.cross_entropy(head(train.inputs[idx]), train.targets[idx])
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), cfg.gradient_clip)
            opt.step()
        with torch.no_grad():
            logits = head(val.inputs)
            val_losses.append(F.cross_entropy(logits, val.targets).item())
            val_accuracy.append((logits.argmax(1) == val.targets).float().mean().item())
        if val_losses[-1] < best[0]:
            best = (val_losses[-1], torch.cat([head.weight, head.bias[:, None]], 1).detach().clone())
    return val_losses, val_accuracy, best[1]


def test_tied_class_training_equals_full_vocabulary_training(monkeypatch):
    """Tied rows, the hand-written gradient, chunking and the counted clipping norm change nothing."""
    monkeypatch.setattr(p2, "LOGIT_BUDGET", 100)  # several chunks per batch
    vocab, rng = 40, np.random.default_rng(1)  # rows 23-39 never counted: one tied class
    x = torch.randn(300, 3, generator=torch.Generator().manual_seed(1))
    noise = torch.as_tensor(rng.integers(0, 2, 300))
    y = (((x[:, 0] + 2) * 3).long() + noise).clamp(0, 14)  # learnable targets among 0..14
    stream = np.concatenate([y.numpy(), [20, 21, 22, 22]])  # 20-22: counted, never targets
    bias = baselines.unigram_log_probs(stream, vocab)
    train = p2.Split(x[:240], y[:240])
    val = p2.Split(x[240:], torch.where(torch.arange(60) % 7 == 0, 30, y[240:]))  # 30: an unseen token
    cfg = Phase2Settings(lr=0.05, epochs=4, batch_size=16, patience=10, gradient_clip=0.5)
    res = p2.train_head(train, val, vocab, cfg, seed=3, bias=bias, device=CPU)
    ref_losses, ref_accuracy, ref_best = _reference_training(train, val, vocab, cfg, 3, bias)
    assert [e["val"]["loss"] for e in res.epochs] == pytest.approx(ref_losses, rel=1e-5)
    assert [e["val"]["accuracy"] for e in res.epochs] == pytest.approx(ref_accuracy)
    got = torch.cat([res.head.proj.weight, res.head.proj.bias[:, None]], 1)
    assert torch.allclose(got, ref_best, atol=1e-5)
    assert res.best_epoch > 0 and torch.equal(got[23], got[39]) and not torch.equal(got[22], got[23])


def test_accuracy_over_tied_classes_is_the_full_vocabulary_argmax():
    # tokens 5-9 are never targets and start highest: the full argmax is token 5, never 7
    bias = np.array([0.0] * 5 + [2.0] * 5)
    train = p2.Split(torch.randn(20, 2), torch.arange(20) % 5)
    val = p2.Split(torch.randn(6, 2), torch.tensor([5, 7, 5, 0, 9, 5]))
    res = p2.train_head(train, val, 10, Phase2Settings(epochs=1, lr=1e-12), seed=0, bias=bias, device=CPU)
    with torch.no_grad():
        expected = (res.head(val.inputs).argmax(1) == val.targets).float().mean().item()
    assert expected == 0.5 and res.best["val"]["accuracy"] == pytest.approx(expected)
