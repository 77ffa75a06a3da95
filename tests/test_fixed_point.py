"""Fixed points solved to a tolerance: the solvers on maps whose answer is known, and saved contexts
checked against a naive recurrence written here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from newllm_cli.model import architectures
from newllm_cli.settings import ModelSettings, Phase1Settings
from newllm_cli.training.fixed_point import SOLVERS, anderson, plain
from newllm_cli.training.phase1 import run_cvfp

CPU = torch.device("cpu")


def affine(seed: int, rows: int = 6, width: int = 4, radius: float = 0.95):
    """x -> A_d x + b_d per row, each A_d of spectral norm `radius` < 1: the fixed point
    x* = (I - A_d)^-1 b_d is unique and plain iteration converges at rate `radius`."""
    rng = np.random.default_rng(seed)
    mats = []
    for _ in range(rows):
        u, _, vt = np.linalg.svd(rng.normal(size=(width, width)))
        mats.append(u @ np.diag(np.linspace(radius, radius / 3, width)) @ vt)
    a, b = np.stack(mats), rng.normal(size=(rows, width))
    exact = np.stack([np.linalg.solve(np.eye(width) - m, v) for m, v in zip(a, b)])
    calls = []

    def F(x):
        calls.append(1)
        return np.einsum("dij,dj->di", a, x.astype(np.float64)) + b

    return F, exact, calls


def test_plain_and_anderson_reach_a_known_fixed_point_anderson_in_fewer_passes():
    tol = 1e-6
    counts = {}
    for name in ("plain", "anderson"):
        F, exact, calls = affine(0)
        x, report = SOLVERS[name](F, np.zeros_like(exact, dtype=np.float32), tol, 2000)
        assert report.converged.all() and report.passes == len(calls)
        assert np.abs(x - exact).max() < 1e-4 * np.abs(exact).max()  # float32 iterates
        counts[name] = report.passes
    assert counts["anderson"] * 4 <= counts["plain"], counts  # several times fewer passes


def test_a_rotation_has_no_attracting_fixed_point_and_is_reported():
    """x -> R x + b with R a rotation by 90 degrees: the fixed point exists but iteration circles
    it forever; plain iteration must say so (not converged, stalled), not report success."""
    r = np.array([[0.0, -1.0], [1.0, 0.0]])
    b = np.array([1.0, 0.0])

    def F(x):
        return x.astype(np.float64) @ r.T + b

    x, report = plain(F, np.array([[3.0, 2.0]], np.float32), 1e-6, 60)
    assert not report.converged.any() and report.stalled.all() and report.residual[0] > 0.1
    assert report.as_dict(1e-6)["failing"] == 1


def test_a_solved_row_keeps_its_value_while_others_go_on():
    F, exact, _ = affine(1, rows=3)
    x, report = anderson(F, exact.astype(np.float32), 1e-5, 50)  # already at the fixed point
    assert report.passes == 1 and np.array_equal(x, exact.astype(np.float32))


@pytest.mark.parametrize("solver", ["plain", "anderson"])
@pytest.mark.parametrize("scheme", ["sequential", "parallel"])
def test_saved_contexts_satisfy_both_conditions_by_a_naive_recurrence(solver, scheme):
    """After training, and for validation, the saved contexts are the fixed point: recomputed here
    token by token from each document's own last context, both conditions hold to the tolerance."""
    torch.manual_seed(0)
    model = architectures.build("residual", 30, ModelSettings(context_dim=6, embed_dim=6, num_layers=2))
    tokens = np.random.default_rng(3).integers(0, 30, 120)
    offsets = np.array([0, 17, 60, 61, 120])
    cfg = Phase1Settings(scheme=scheme, fixed_point_solver=solver, fixed_point_tol=1e-5, max_iterations=400)
    for train in (True, False):
        res = run_cvfp(model, tokens, offsets, cfg, train=train, device=CPU)
        q = torch.from_numpy(res.contexts.read(0, len(tokens)))
        with torch.no_grad():
            for a, b in zip(offsets[:-1], offsets[1:]):
                c = q[b - 1]  # c_0 = c_N
                for t in range(a, b):
                    c = model.step(model.embed_tokens(torch.tensor(tokens[t])), c)
                    if t == a:
                        carry = float(torch.linalg.norm((c - q[t]).double()) / torch.linalg.norm(q[t].double()))
                        assert carry < 1e-5 * 1.5 + 1e-6, (a, carry)
                    assert float((c - q[t]).abs().max()) < 1e-4
        fp = res.fixed_point
        assert fp["within_tolerance"] == 1.0 and fp["documents"] == 4 and fp["interior_max_abs"] < 1e-5
        assert res.solve_report["failing"] == 0
