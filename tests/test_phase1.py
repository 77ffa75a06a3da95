"""Phase 1 maths against hand computations and naive token-by-token references."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from newllm_cli.model.network import NewLLM
from newllm_cli.model.recurrence import embedding_table, recur_numba, recur_torch
from newllm_cli.settings import Phase1Settings
from newllm_cli.store.rowstore import RowStore
from newllm_cli.training.objectives import Comparison, dist_loss, reference_losses
from newllm_cli.training.phase1 import accumulate_gradient, learning_rate, run_cvfp, set_gradients

CPU = torch.device("cpu")


def tiny(seed=0, vocab=50, c=6, e=5, layers=2, depth=1):
    torch.manual_seed(seed)
    return NewLLM(vocab, c, e, layers, depth)


def corpus(n=120, docs=(0, 30, 31, 75, 120), vocab=50, seed=1):
    tokens = np.random.default_rng(seed).integers(0, vocab, n)
    return tokens, np.array(docs, dtype=np.int64)


def rows(res) -> torch.Tensor:
    """A result's contexts as one tensor (small test corpora only)."""
    return torch.from_numpy(np.array(res.contexts.read(0, len(res.contexts))))


def kernel_sweep(sweep, model, tokens, offsets, c0):
    table = embedding_table(model, CPU)
    return sweep(model, table, torch.as_tensor(tokens), offsets, c0)


def incoming_contexts(traj, offsets, c0):
    """Naive shift: the previous row inside each document, c0 at each start."""
    inc = torch.cat([traj[:1], traj[:-1]])
    for d in range(len(offsets) - 1):
        inc[offsets[d]] = c0[d]
    return inc


def naive_sweep(model, tokens, offsets, c0):
    """Token by token, one document at a time: the definition c_t = f(x_t, c_{t-1})."""
    out = []
    with torch.no_grad():
        for d in range(len(offsets) - 1):
            c = c0[d]
            for t in range(offsets[d], offsets[d + 1]):
                tok = model.embed_tokens(torch.tensor([int(tokens[t])]))[0]
                c = model.step(tok, c)
                out.append(c)
    return torch.stack(out)


def no_worse_than_float32(got32: torch.Tensor, naive32: torch.Tensor, exact: torch.Tensor) -> None:
    """A kernel that stores float32 (numba keeps float64 state, but its embedding table and outputs are
    float32) may round differently from the naive float32 recurrence, not worse: within twice the
    naive run's distance from the float64 result, plus a few ulps. A constant tolerance would be
    right on one machine's rounding and wrong on another's."""
    ulp = np.finfo(np.float32).eps * float(exact.abs().max())
    assert float((got32.double() - exact).abs().max()) <= 2 * float((naive32.double() - exact).abs().max()) + 4 * ulp


def two_iterations(model, tokens, offsets) -> tuple[torch.Tensor, torch.Tensor]:
    """The naive second iteration (each document from its own last context of the first), in
    float32 and in float64."""
    out = []
    for m in (model, copy.deepcopy(model).double()):
        dtype = next(m.parameters()).dtype
        first = naive_sweep(m, tokens, offsets, torch.zeros(len(offsets) - 1, m.context_dim, dtype=dtype))
        out.append(naive_sweep(m, tokens, offsets, first[torch.as_tensor(offsets[1:] - 1)]))
    return out[0], out[1]


def test_dist_loss_matches_hand_computation():
    q = torch.tensor([[1.0, 0.0], [3.0, 2.0], [2.0, 4.0]])
    # column means 2 and 2; population variances 2/3 and 8/3
    expected = ((2.0**2 + 2.0**2) / 2) + (((2 / 3 - 1) ** 2 + (8 / 3 - 1) ** 2) / 2)
    assert dist_loss(q).item() == pytest.approx(expected, rel=1e-6)
    sample_var = ((2.0**2 + 2.0**2) / 2) + (((1.0 - 1) ** 2 + (4.0 - 1) ** 2) / 2)
    assert dist_loss(q).item() != pytest.approx(sample_var, rel=1e-3)


def test_loss_weights_and_schedule():
    q, p = torch.ones(4, 3), torch.zeros(4, 3)
    cfg = Phase1Settings(dist_reg_weight=0.25)
    losses = reference_losses(q, p, cfg)
    assert losses["cvfp_loss"].item() == pytest.approx(1.0)
    assert losses["loss"].item() == pytest.approx(0.75 * 1.0 + 0.25 * losses["dist_loss"].item())
    off = reference_losses(q, p, Phase1Settings(use_distribution_reg=False))
    assert off["loss"].item() == pytest.approx(1.0)
    assert [learning_rate(k, cfg) for k in (0, 3, 4, 8, 9, 20)] == [0.002, 0.002, 0.0005, 0.0005, 0.0001, 0.0001]


@pytest.mark.parametrize("sweep", [recur_torch, recur_numba])
def test_sweeps_match_naive_reference(sweep):
    model = tiny().double()
    tokens, offsets = corpus()
    c0 = torch.randn(len(offsets) - 1, model.context_dim, dtype=torch.float64)
    got = kernel_sweep(sweep, model, tokens, offsets, c0)
    ref = naive_sweep(model, tokens, offsets, c0)
    if sweep is recur_numba:  # float32 out
        no_worse_than_float32(got, naive_sweep(tiny().float(), tokens, offsets, c0.float()), ref)
    else:  # float64 throughout, the same operations in another order: float64 rounding only
        assert torch.allclose(got, ref, atol=1e-12, rtol=0)


def test_numba_matches_torch_in_float32_with_deep_blocks():
    model = tiny(depth=2, c=8, e=4)
    tokens, offsets = corpus()
    c0 = torch.zeros(len(offsets) - 1, 8)
    exact = naive_sweep(model.double(), tokens, offsets, c0.double())
    model.float()
    naive32 = naive_sweep(model, tokens, offsets, c0)
    for sweep in (recur_numba, recur_torch):
        no_worse_than_float32(kernel_sweep(sweep, model, tokens, offsets, c0), naive32, exact)


def test_iteration_two_carries_over_and_has_positive_loss():
    model = tiny()
    tokens, offsets = corpus()
    cfg = Phase1Settings(max_iterations=2, fixed_point_solver="iterate")  # the iterations themselves
    res = run_cvfp(model, tokens, offsets, cfg, train=False, device=CPU)
    assert res.history[1]["cvfp_loss"] > 0
    # iteration 2 must start each document from its own last context of iteration 1
    no_worse_than_float32(rows(res), *two_iterations(model, tokens, offsets))


def test_sequential_convergence_reaches_the_fixed_point_equations():
    model = tiny()
    tokens, offsets = corpus()
    cfg = Phase1Settings(max_iterations=60, min_converged_ratio=1.0, convergence_threshold=1e-4)
    res = run_cvfp(model, tokens, offsets, cfg, train=False, device=CPU)
    assert res.stopped_by == "converged"
    q = rows(res)
    # c_t = f(x_t, c_{t-1}) for all t, with c_0 = c_N of the same document
    c0 = q[torch.as_tensor(offsets[1:] - 1)]
    inc = incoming_contexts(q, offsets, c0)
    with torch.no_grad():
        again = model.step(model.embed_tokens(torch.as_tensor(tokens)), inc)
    residual = ((again - q) ** 2).mean(dim=1)
    assert residual.max().item() < cfg.convergence_threshold


def test_training_gradient_equals_token_by_token_reference():
    model = tiny(c=4, e=3)
    ref_model = tiny(c=4, e=3)
    tokens, offsets = corpus(n=40, docs=(0, 13, 40))
    cfg = Phase1Settings(dist_reg_weight=0.3)
    p = torch.randn(40, 4)
    c0 = torch.randn(2, 4)
    # ours: recurrence without autograd, then the closed-form dL/dQ back-propagated in chunks of 7
    # inside blocks of rows (float64 sums across blocks)
    q = kernel_sweep(recur_torch, model, tokens, offsets, c0)
    qs, ps = RowStore(40, 4), RowStore(40, 4)
    qs.write(0, q.numpy())
    ps.write(0, p.numpy())
    stats = Comparison()
    for s, e in qs.chunks(7):
        stats.add(qs.read(s, e), ps.read(s, e), 0.02)
    model.zero_grad()
    set_gradients(
        model,
        accumulate_gradient(
            model,
            embedding_table(model, CPU),
            tokens,
            offsets,
            qs,
            c0.numpy(),
            qs,
            ps,
            stats,
            cfg,
            7,
            blocks=np.array([0, 13, 20, 40]),
        ),
    )
    # reference: token by token with autograd, incoming context detached at every step
    outs = []
    for d in range(2):
        c = c0[d]
        for t in range(offsets[d], offsets[d + 1]):
            tok = ref_model.embed_tokens(torch.tensor([int(tokens[t])]))[0].detach()
            c = ref_model.step(tok, c.detach())
            outs.append(c)
    ref_model.zero_grad()
    checked = 0
    reference_losses(torch.stack(outs), p, cfg)["loss"].backward()
    for (name, a), (_, b) in zip(model.named_parameters(), ref_model.named_parameters()):
        if name.startswith("blocks"):
            ga = torch.zeros_like(a) if a.grad is None else a.grad  # the last block's token norm
            gb = torch.zeros_like(b) if b.grad is None else b.grad  # does not reach the context
            assert torch.allclose(ga, gb, atol=1e-6, rtol=1e-4), name
            checked += int(a.grad is not None)
    assert checked >= 6
    assert model.embed.weight.grad is None


def test_validation_leaves_every_parameter_bitwise_unchanged():
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tokens, offsets = corpus()
    run_cvfp(model, tokens, offsets, Phase1Settings(), train=False, device=CPU)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_training_updates_only_the_context_blocks():
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tokens, offsets = corpus()
    res = run_cvfp(
        model, tokens, offsets, Phase1Settings(max_iterations=4, min_converged_ratio=1.0), train=True, device=CPU
    )
    assert res.optimizer_steps == 2  # iterations 2 and 3; none after the final sweep
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("blocks.") for k in changed)


def test_saved_contexts_are_those_of_the_final_weights():
    """No optimizer step follows the final sweep: inside each document c_t = f(x_t, c_{t-1}) exactly."""
    model = tiny()
    tokens, offsets = corpus()
    res = run_cvfp(
        model, tokens, offsets, Phase1Settings(max_iterations=5, min_converged_ratio=1.0), train=True, device=CPU
    )
    assert res.optimizer_steps == 3 and res.history[-1]["lr"] is None
    q = rows(res)
    with torch.no_grad():
        again = model.step(model.embed_tokens(torch.as_tensor(tokens[1:])), q[:-1])
    inside = np.ones(len(tokens) - 1, dtype=bool)
    inside[offsets[1:-1] - 1] = False  # positions whose next token starts a new document
    assert torch.allclose(again[inside], q[1:][inside], atol=1e-5)


@pytest.mark.parametrize("scheme", ["sequential", "parallel"])
def test_same_seed_same_contexts(scheme):
    tokens, offsets = corpus()
    runs = []
    for _ in range(2):
        model = tiny(seed=3)
        cfg = Phase1Settings(scheme=scheme, max_iterations=4)
        runs.append(rows(run_cvfp(model, tokens, offsets, cfg, train=True, device=CPU)))
    assert torch.equal(runs[0], runs[1])


def test_parallel_iteration_is_one_jacobi_step_with_wraparound():
    model = tiny()
    tokens, offsets = corpus()
    cfg = Phase1Settings(scheme="parallel", max_iterations=2, fixed_point_solver="iterate")  # Jacobi steps themselves
    two = run_cvfp(model, tokens, offsets, cfg, train=False, device=CPU)
    emb = model.embed_tokens(torch.as_tensor(tokens)).detach()
    with torch.no_grad():
        p = model.step(emb, torch.zeros(len(tokens), model.context_dim))  # iteration 1 from zeros
        inc = torch.cat([p[-1:], p[:-1]])
        for d in range(len(offsets) - 1):  # wrap-around inside each document
            inc[offsets[d]] = p[offsets[d + 1] - 1]
        q = model.step(emb, inc)
    assert torch.equal(rows(two), q)  # the same float32 operations on the same rows: the same bits
    assert two.stopped_by != "converged" or two.converged_ratio >= 0.95


def test_concat_is_one_stream():
    model = tiny()
    tokens, offsets = corpus()
    res = run_cvfp(model, tokens, offsets, Phase1Settings(concat=True, max_iterations=2), train=False, device=CPU)
    no_worse_than_float32(rows(res), *two_iterations(model, tokens, np.array([0, len(tokens)])))


def test_diverging_training_stops_after_two_drops():
    from newllm_cli.training.phase1 import _stop_reason as _should_stop  # a reason is truthy, None is not

    cfg = Phase1Settings(stop_on_drops=2)  # the seed's rule; off by default
    hist = [{"converged_ratio": None}, {"converged_ratio": 0.9}, {"converged_ratio": 0.8}]
    assert _should_stop(hist, 0.7, cfg, train=True, steps=3)
    assert not _should_stop(hist, 0.7, Phase1Settings(), train=True, steps=3)
    assert not _should_stop(hist, 0.7, Phase1Settings(stop_on_drops=3), train=True, steps=3)
    assert not _should_stop(hist, 0.795, cfg, train=True, steps=3)
    assert not _should_stop(hist, 0.7, cfg, train=False, steps=0)
    assert not _should_stop(hist, 0.96, cfg, train=True, steps=0)  # min_iterations=1 step first
    assert _should_stop(hist, 0.96, cfg, train=True, steps=1)
    assert _should_stop(hist, 0.96, cfg, train=False, steps=0)


def test_unconverged_training_ends_with_a_no_update_solve_to_the_fixed_point():
    """The seed's rule (--fixed-point-solver iterate): training cut off at its cap (never reached in 3
    iterations), the saved contexts are still the fixed point of the saved weights, measured by one
    more sweep from their own carry-over, to the convergence threshold for the share the report states."""
    model = tiny(layers=1)
    tokens, offsets = corpus()
    cfg = Phase1Settings(max_iterations=3, min_converged_ratio=0.9, lr_warmup=0.05, fixed_point_solver="iterate")
    res = run_cvfp(model, tokens, offsets, cfg, train=True, device=CPU)
    assert res.stopped_by != "converged" and res.solve, res.history
    assert res.solve[-1]["lr"] is None and res.converged_ratio == res.solve[-1]["converged_ratio"]
    q = rows(res)
    c0 = q[torch.as_tensor(offsets[1:] - 1)]  # the carry-over into a next reading
    again = kernel_sweep(recur_torch, model, tokens, offsets, c0)
    per_token = ((again - q) ** 2).mean(1)
    share = float((per_token < cfg.convergence_threshold).float().mean())
    assert share >= res.converged_ratio >= 0.9
    assert res.residual == pytest.approx(res.solve[-1]["residual"])


def test_adam_is_torch_adam_bit_for_bit():
    """Our Adam against torch.optim.Adam: same updates, with a parameter that has no gradient and a
    learning rate that changes between steps, as in Phase 1."""
    from newllm_cli.training.adam import Adam

    torch.manual_seed(0)
    ours = [torch.randn(5, 3), torch.randn(4), torch.randn(2)]
    ref = [p.clone() for p in ours]
    opt, torch_opt = Adam(ours, lr=0.002), torch.optim.Adam(ref, lr=0.002)
    for k, lr in enumerate([0.002, 0.002, 0.0005, 0.0001, 0.0001]):
        grads = [torch.randn_like(p) for p in ours]
        opt.lr = lr
        for group in torch_opt.param_groups:
            group["lr"] = lr
        for p, q, g in zip(ours, ref, grads):
            p.grad, q.grad = (None, None) if (p.numel() == 2 and k % 2) else (g.clone(), g.clone())
        opt.step()
        torch_opt.step()
        for p, q in zip(ours, ref):
            assert torch.equal(p, q)
    state = opt.state_dict()
    again = Adam([p.clone() for p in ours], lr=0.0001)
    again.load_state_dict(state)
    assert again.steps == opt.steps and all(torch.equal(a, b) for a, b in zip(again.exp_avg_sq, opt.exp_avg_sq))
