"""Phase 2: the head, its metrics and the baselines against direct computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from newllm_cli.evaluation import baselines, verdict
from newllm_cli.model import recurrence
from newllm_cli.model.head import Head
from newllm_cli.model.network import NewLLM
from newllm_cli.store.rowstore import RowStore
from newllm_cli.training import head_fit
from newllm_cli.training import pairs as p2

CPU = torch.device("cpu")


def test_pair_positions_stay_inside_documents():
    assert p2.pair_positions(np.array([0, 3, 4, 7])).tolist() == [0, 1, 4, 5]


def test_unigram_baseline_equals_hand_computation():
    train = np.array([0, 0, 1, 2])  # counts 2, 1, 1, 0 over V = 4: add-one gives 3/8, 2/8, 2/8, 1/8
    targets = np.array([0, 3])
    expected = math.exp(-(math.log(3 / 8) + math.log(1 / 8)) / 2)
    assert baselines.unigram_perplexity(train, targets, 4) == pytest.approx(expected)


def test_perplexity_is_exp_of_mean_cross_entropy():
    torch.manual_seed(0)
    head = p2.Head(3, 5)
    split = head_fit.Split(torch.randn(40, 3), torch.randint(0, 5, (40,)))
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
    split = head_fit.Split(x, y, torch.arange(300) // 30)
    res = head_fit.fit(split, split, 6, np.zeros(6))
    assert res.val["accuracy"] == 1.0 and res.val["loss"] < 0.1
    assert p2.evaluate(Head.from_probe(res), split)["loss"] == pytest.approx(res.val["loss"], abs=1e-6)


def test_a_huge_penalty_gives_exactly_the_unigram_baseline():
    tokens = np.array([0, 1, 1, 2, 2, 2, 3])
    split = head_fit.Split(torch.randn(7, 3), torch.as_tensor(tokens))
    res = head_fit.fit(split, split, 5, baselines.unigram_log_probs(tokens, 5), l2=1e6)
    assert res.val["perplexity"] == pytest.approx(baselines.unigram_perplexity(tokens, tokens, 5), rel=1e-4)


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
    # most frequent successor: 0 -> 1; after 1 a tie between 0 and 1 -> 0 (argmax's smallest id)
    assert val["accuracy"] == pytest.approx(0.5)  # val pairs (0,1) right, (1,2) wrong
    assert k in baselines.K_GRID


def naive_interpolated(train: list[list[int]], val: list[list[int]], vocab: int, lambdas: dict) -> list[float]:
    """Jelinek-Mercer written out with dictionaries: log p(x_{t+1} | history) for each val pair."""
    uni = dict.fromkeys(range(vocab), 1.0)
    total = vocab
    for doc in train:
        for w in doc:
            uni[w] += 1
            total += 1
    joint: dict[tuple, int] = {}
    hist: dict[tuple, int] = {}
    for doc in train:
        for p in range(len(doc) - 1):
            for n in lambdas:
                if p - (n - 2) >= 0:
                    h = tuple(doc[p - (n - 2) : p + 1])
                    joint[h + (doc[p + 1],)] = joint.get(h + (doc[p + 1],), 0) + 1
                    hist[h] = hist.get(h, 0) + 1
    out = []
    for doc in val:
        for p in range(len(doc) - 1):
            prob = uni[doc[p + 1]] / total
            for n in sorted(lambdas):
                h = tuple(doc[p - (n - 2) : p + 1]) if p - (n - 2) >= 0 else None
                if h is not None and hist.get(h, 0) > 0:
                    prob = lambdas[n] * joint.get(h + (doc[p + 1],), 0) / hist[h] + (1 - lambdas[n]) * prob
            out.append(math.log(prob))
    return out


def test_interpolated_ngrams_equal_a_naive_computation_and_never_see_val():
    rng = np.random.default_rng(5)
    docs = [list(rng.integers(0, 5, rng.integers(2, 12))) for _ in range(20)]
    val = [list(rng.integers(0, 5, rng.integers(2, 12))) for _ in range(6)]

    def flat(ds):
        return np.concatenate([np.array(d) for d in ds]), np.cumsum([0] + [len(d) for d in ds])

    (tt, to), (vt, vo) = flat(docs), flat(val)
    for order in (2, 3):
        got = baselines.interpolated(tt, to, vt, vo, 5, order)
        lambdas = {int(n): lam for n, lam in got["lambdas"].items()}
        assert sorted(lambdas) == list(range(2, order + 1))
        assert np.allclose(got["log_probs"], naive_interpolated(docs, val, 5, lambdas), atol=1e-12)
        # the weights: the grid's best on the last two training documents, counts from the other 18
        fit, held = docs[:18], docs[18:]
        best = {}
        for n in range(2, order + 1):
            best[n] = min(baselines.LAMBDAS, key=lambda lam: -sum(naive_interpolated(fit, held, 5, {**best, n: lam})))
        assert best == lambdas
        other = baselines.interpolated(tt, to, (vt + 1) % 5, vo, 5, order)  # another val set: same weights
        assert other["lambdas"] == got["lambdas"]
        # top-1: the predicted token is a most likely one under the naive distribution of each pair
        pred = baselines.Interpolated(tt, to, 5, order).predict(vt, vo, lambdas, chunk=7)
        i, hits = 0, []
        for doc in val:
            for p in range(len(doc) - 1):
                probs = [naive_interpolated(docs, [doc[max(0, p - 1) : p + 1] + [w]], 5, lambdas)[-1] for w in range(5)]
                assert probs[pred[i]] >= max(probs) - 1e-12, (doc, p, probs, pred[i])
                hits.append(pred[i] == doc[p + 1])
                i += 1
        assert i == len(pred) and got["accuracy"] == pytest.approx(np.mean(hits))
    # hand case: train "0 1 0 1 2", bigram with lam = 0.5: p(1 | 0) = 0.5 * 2/2 + 0.5 * 3/8
    one = baselines.Interpolated(np.array([0, 1, 0, 1, 2]), np.array([0, 5]), 3, 2)
    base, parts = one.parts(np.array([0, 1]), np.array([0, 2]))
    assert baselines.Interpolated.mix(base, parts, {2: 0.5})[0] == pytest.approx(0.5 + 0.5 * 3 / 8)


def test_bigram_prediction_is_the_argmax_of_the_count_matrix():
    rng = np.random.default_rng(3)
    prev, nxt = rng.integers(0, 7, 300), rng.integers(0, 9, 300)
    prev[prev == 5] = 4  # token 5 is never followed: the fallback
    dense = np.zeros((9, 9), int)
    np.add.at(dense, (prev, nxt), 1)
    expected = np.where(dense.sum(1) > 0, dense.argmax(1), 8)
    got = baselines.Bigram(prev, nxt, 9).predict(np.arange(9), fallback=8)
    assert got.tolist() == expected.tolist()


def test_vocab_classes_tie_untargeted_tokens_with_equal_start():
    # targets 1 and 3; tokens 0, 2, 4 share a prior, token 5 has its own
    bias = np.array([-5.0, -1.0, -5.0, -2.0, -5.0, -4.0])
    classes = head_fit.VocabClasses.build(np.array([3, 1, 3]), bias, CPU)
    assert classes.representative.tolist() == [0, 1, 3, 5]
    assert classes.multiplicity.tolist() == [3.0, 1.0, 1.0, 1.0]
    assert classes.token_class.tolist() == [0, 1, 0, 2, 0, 3]


def _reference_optimum(train, val, vocab, prior, l2):
    """The same convex problem solved naively: whitening by numpy, a full [V, r + 1] parameter matrix,
    autograd and float64 L-BFGS run far past convergence."""
    x = train.inputs.double().numpy()
    mean = x.mean(0)
    values, vectors = np.linalg.eigh(np.cov(x, rowvar=False))
    keep = values > values.max() * 1e-7
    t = torch.as_tensor(vectors[:, keep] / np.sqrt(values[keep]))

    def white(z):
        return (z.double() - torch.as_tensor(mean)) @ t

    prior = torch.as_tensor(prior, dtype=torch.float64)
    w = torch.zeros(vocab, t.shape[1], dtype=torch.float64, requires_grad=True)
    b = prior.clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [w, b],
        max_iter=2000,
        tolerance_grad=1e-12,
        tolerance_change=1e-15,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(white(train.inputs) @ w.t() + b, train.targets) + 0.5 * l2 * (
            (w**2).sum() + ((b - prior) ** 2).sum()
        )
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return (
            F.cross_entropy(white(val.inputs) @ w.t() + b, val.targets).item(),
            w @ t.t(),
            b - (w @ t.t()) @ torch.as_tensor(mean),
        )


def test_tied_classes_whitening_and_scaling_reach_the_naive_optimum(monkeypatch):
    """Tied rows, whitening, the per-class scaling, the hand-written gradient and chunking change
    nothing: the fit equals a plain full-vocabulary solve of the same problem."""
    monkeypatch.setattr(head_fit, "LOGIT_BUDGET", 100)  # several chunks per pass
    vocab, rng = 40, np.random.default_rng(1)  # rows 23-39 never counted: one tied class
    x = torch.randn(300, 3, generator=torch.Generator().manual_seed(1)) * torch.tensor([3.0, 0.5, 1.0]) + 2.0
    noise = torch.as_tensor(rng.integers(0, 2, 300))
    y = (((x[:, 0] / 3 + 2) * 3).long() + noise).clamp(0, 14)  # learnable targets among 0..14
    stream = np.concatenate([y.numpy(), [20, 21, 22, 22]])  # 20-22: counted, never targets
    prior = baselines.unigram_log_probs(stream, vocab)
    train = head_fit.Split(x[:240], y[:240], torch.arange(240) // 24)
    val = head_fit.Split(x[240:], torch.where(torch.arange(60) % 7 == 0, 30, y[240:]))  # 30: an unseen token
    res = head_fit.fit(train, val, vocab, prior, l2=0.01, max_iterations=500)
    ref_loss, ref_w, ref_b = _reference_optimum(train, val, vocab, prior, 0.01)
    assert res.val["loss"] == pytest.approx(ref_loss, rel=1e-4)
    assert torch.allclose(res.weight.double(), ref_w, atol=2e-3) and torch.allclose(res.bias.double(), ref_b, atol=2e-3)
    assert res.head_rows < vocab and torch.equal(res.bias[23], res.bias[39]) and res.bias[22] != res.bias[23]


def test_penalty_is_chosen_on_held_out_documents_not_on_val():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(600, 2, generator=gen)
    y = (x[:, 0] > 0).long() * 3 + torch.randint(0, 3, (600,), generator=gen)  # half-learnable
    train = head_fit.Split(x[:400], y[:400], torch.arange(400) // 20)
    junk = head_fit.Split(torch.randn(200, 2, generator=gen), torch.randint(0, 6, (200,), generator=gen))
    a = head_fit.fit(train, head_fit.Split(x[400:], y[400:]), 6, np.zeros(6))
    b = head_fit.fit(train, junk, 6, np.zeros(6))  # another val set changes no choice
    assert a.l2 == b.l2 and a.selection == b.selection and torch.equal(a.weight, b.weight)
    assert len(a.selection) >= 2 and a.l2 == min(a.selection, key=lambda r: r["heldout_loss"])["l2"]


def test_accuracy_over_tied_classes_is_the_full_vocabulary_argmax():
    # tokens 5-9 are never targets and start highest: the full argmax is token 5, never 7
    prior = np.array([0.0] * 5 + [2.0] * 5)
    train = head_fit.Split(torch.randn(20, 2), torch.arange(20) % 5)
    val = head_fit.Split(torch.randn(6, 2), torch.tensor([5, 7, 5, 0, 9, 5]))
    res = head_fit.fit(train, val, 10, prior, l2=1e6)
    head = Head.from_probe(res)
    with torch.no_grad():
        expected = (head(val.inputs).argmax(1) == val.targets).float().mean().item()
    assert expected == 0.5 and res.val["accuracy"] == pytest.approx(expected)


def test_bootstrap_verdict_against_hand_cases():
    groups = np.repeat(np.arange(40), 5)
    same = verdict.compare(np.full(200, 2.0), np.full(200, 2.5), groups)
    assert same["ratio"] == pytest.approx(math.exp(-0.5)) and same["verdict"] == "beats"
    assert same["ratio_low"] == pytest.approx(math.exp(-0.5)) == pytest.approx(same["ratio_high"])
    noisy = np.random.default_rng(0).normal(0, 1, 200)
    tie = verdict.compare(2.0 + noisy, np.full(200, 2.0), groups)
    assert tie["verdict"] == "ties" and tie["ratio_low"] < 1 < tie["ratio_high"]
    assert verdict.compare(np.full(200, 3.0), np.full(200, 2.0), groups)["verdict"] == "loses to"
    assert verdict.units(np.zeros(90, dtype=int))[1] == "30 blocks of contiguous pairs"
    assert verdict.units(np.repeat(np.arange(16), 40))[1] == "16 documents"  # never pieces of a document
    # the size in words: exp(-0.5) = 0.6065, so 39.3% lower perplexity, a degenerate interval
    assert same["size"] == "beats by 39.3% (39.3%-39.3%)"
    assert (
        verdict.size({"verdict": "loses to", "ratio_low": 1.01, "ratio": 1.017, "ratio_high": 1.025})
        == "loses by 1.7% (1.0%-2.5%)"
    )
    assert (
        verdict.size({"verdict": "ties", "ratio_low": 0.992, "ratio": 1.001, "ratio_high": 1.012})
        == "ties (-0.8% to +1.2%)"
    )
    assert (
        verdict.size({"verdict": "loses to", "ratio_low": 9.052, "ratio": 11.409, "ratio_high": 14.209})
        == "loses by 1040.9% (805.2%-1320.9%)"
    )  # one wording at every size


def test_probe_advice_says_what_to_do():
    def result(**kw):
        return head_fit.ProbeResult(weight=torch.zeros(1), bias=torch.zeros(1), **kw)

    assert (
        head_fit.advice(
            result(l2=1e-3, selection=[{"l2": 1e-1}, {"l2": 3e-2}, {"l2": 1e-2}, {"l2": 3e-3}, {"l2": 1e-3}]),
            "head",
            200,
        )
        == []
    )
    capped = head_fit.advice(result(l2=1e-3, capped=True), "head", 200)
    assert len(capped) == 1 and "--phase2-max-iterations 200" in capped[0]
    weakest = head_fit.advice(
        result(l2=head_fit.L2_GRID[-1], selection=[{"l2": v} for v in head_fit.L2_GRID]), "head", 200
    )
    assert len(weakest) == 1 and f"--phase2-l2 {head_fit.L2_GRID[-1] / 10:g}" in weakest[0]
    strongest = head_fit.advice(
        result(l2=head_fit.L2_GRID[0], selection=[{"l2": v} for v in head_fit.L2_GRID[:2]]), "head", 200
    )
    assert len(strongest) == 1 and "unigram start" in strongest[0]


def _synthetic(encode: bool, n_docs=60, length=80, vocab=24, seed=0):
    """A text whose next token follows from the current one (x_{t+1} = 3 x_t + 1 mod V, 10% noise),
    and contexts from a network built to write the current token into the context (encode=True) or
    Gaussian contexts independent of the text (encode=False)."""
    rng = np.random.default_rng(seed)
    tokens = np.empty(n_docs * length, dtype=np.int64)
    for d in range(n_docs):
        t = rng.integers(vocab)
        for i in range(length):
            tokens[d * length + i] = t
            t = (3 * t + 1) % vocab if rng.random() > 0.1 else rng.integers(vocab)
    offsets = np.arange(0, n_docs * length + 1, length)
    if not encode:
        return tokens, offsets, rng.normal(size=(len(tokens), 8)).astype(np.float32)
    torch.manual_seed(seed)
    model = NewLLM(vocab, 8, 8, 1)
    with torch.no_grad():  # y_ctx = ReLU(10 tok) dominates ctx: c_t is a function of x_t
        lin = model.blocks[0].mlp[0]
        lin.weight.zero_()
        lin.weight[:8, 8:] = 10 * torch.eye(8)
        model.embed.weight.normal_(0, 1)
    table = recurrence.embedding_table(model, CPU)
    ctx = recurrence.recur_torch(model, table, torch.as_tensor(tokens), offsets, torch.zeros(n_docs, 8))
    return tokens, offsets, ctx.numpy()


@pytest.mark.parametrize("encode", [True, False])
def test_verdict_follows_the_information_in_the_contexts(encode):
    tokens, offsets, ctx = _synthetic(encode)
    cut = offsets[45]
    train = p2.make_split(ctx[:cut], tokens[:cut], offsets[:46], CPU)
    val = p2.make_split(ctx[cut:], tokens[cut:], offsets[45:] - cut, CPU)
    prior = baselines.unigram_log_probs(tokens[:cut], 24)
    res = head_fit.fit(train, val, 24, prior)
    unigram = -prior[val.targets.numpy()]
    v = verdict.compare(res.val_losses, unigram, val.groups.numpy())
    if encode:  # the head knows the rule: far below unigram (24 tokens, ~3.2 nats)
        assert v["verdict"] == "beats" and v["ratio_high"] < 0.3
    else:
        assert v["verdict"] == "ties" and v["ratio_low"] <= 1 <= v["ratio_high"]


def test_pairs_streamed_from_disk_give_the_same_head(tmp_path):
    """A budget too small for the pairs puts them in a file, read in the same chunks as from memory:
    the fit is the one from memory, bit for bit."""
    tokens, offsets, ctx = _synthetic(True)
    path = tmp_path / "ctx.npy"
    np.save(path, ctx)
    mapped = np.load(path, mmap_mode="r")
    cut = offsets[45]
    prior = baselines.unigram_log_probs(tokens[:cut], 24)
    fits = []
    for budget in (None, 1):
        train = p2.make_split(mapped[:cut], tokens[:cut], offsets[:46], CPU, memory_budget=budget, scratch=tmp_path)
        val = p2.make_split(mapped[cut:], tokens[cut:], offsets[45:] - cut, CPU, memory_budget=budget, scratch=tmp_path)
        fits.append(head_fit.fit(train, val, 24, prior))
    memory, disk = fits
    assert isinstance(train.inputs, RowStore) and train.inputs.path.parent == tmp_path
    assert disk.l2 == memory.l2 and [r["l2"] for r in disk.selection] == [r["l2"] for r in memory.selection]
    assert np.array_equal(disk.val_losses, memory.val_losses)
    assert torch.equal(disk.weight, memory.weight)
    whole = p2.make_split(mapped, tokens, offsets, CPU, memory_budget=1, scratch=tmp_path)  # read by pread
    assert np.array_equal(whole.inputs.read(0, len(whole.targets)), ctx[p2.pair_documents(offsets)[0]])
