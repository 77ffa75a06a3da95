"""Fixed points solved to a tolerance: the solvers on maps whose answer is known, and saved contexts
checked against a naive recurrence written here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from newllm_cli.model import architectures
from newllm_cli.model.network import ContextNetwork
from newllm_cli.model.recurrence import embedding_table
from newllm_cli.settings import ModelSettings, Phase1Settings
from newllm_cli.store.rowstore import RowStore
from newllm_cli.training import fixed_point
from newllm_cli.training.fixed_point import SOLVERS, STALL, anderson, contraction, plain
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

    start = np.array([[3.0, 2.0]], np.float32)
    x, report = plain(F, start, 1e-6, 60)
    assert not report.converged.any() and report.stalled.all() and report.residual[0] > 0.1
    summary = report.as_dict(1e-6)
    assert summary["failing"] == 1 and summary["cycling"] == 1 and summary["periods"] == [4]
    orbit = [start[0].astype(np.float64)]
    for _ in range(3):
        orbit.append(F(orbit[-1][None])[0])
    rel = [np.linalg.norm(F(o[None])[0] - o) / np.linalg.norm(F(o[None])[0]) for o in orbit]
    assert np.allclose(x[0], orbit[int(np.argmin(rel))], atol=1e-6)  # saved at its lowest residual
    # frozen at the stall, not held to the cap: the best pass, STALL passes without a new best, one at the best
    assert report.passes == int(np.argmin(rel)) + 1 + STALL + 1
    assert report.residual[0] == pytest.approx(min(rel), rel=1e-6)


def test_a_solved_row_keeps_its_value_while_others_go_on():
    F, exact, _ = affine(1, rows=3)
    x, report = anderson(F, exact.astype(np.float32), 1e-5, 50)  # already at the fixed point
    assert report.passes == 1 and np.array_equal(x, exact.astype(np.float32))
    start = np.zeros_like(exact, dtype=np.float32)
    start[0] = exact[0]  # one row solved from the first pass, the others not
    x, report = anderson(F, start, 1e-5, 200)
    assert report.passes > 1 and report.converged.all()
    assert np.array_equal(x[0], start[0])  # never moved while the others iterated


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


class Linear(ContextNetwork):
    """c_t = A c_{t-1} + e(x_t): one document's pass has Jacobian A^L, its step A."""

    def __init__(self, a: torch.Tensor, vocab: int = 5):
        super().__init__()
        self.context_dim = self.embed_dim = a.shape[0]
        self.embed = torch.nn.Embedding(vocab, a.shape[0])
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(a.shape[0], a.shape[0], bias=False)])
        with torch.no_grad():
            self.blocks[0].weight.copy_(a)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed(ids)

    def step(self, tok: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        return self.blocks[0](ctx) + tok


def test_contraction_is_the_jacobians_of_a_pass_and_a_step():
    a = torch.tensor([[0.5, 0.2, 0.0], [0.0, -0.6, 0.1], [0.0, 0.0, 0.3]])  # eigenvalues 0.5, -0.6, 0.3
    model = Linear(a)
    tokens, offsets = np.array([1, 2, 3, 4, 0, 1, 2]), np.array([0, 3, 7])
    contexts = RowStore(7, 3)
    contexts.write(0, np.random.default_rng(0).normal(size=(7, 3)).astype(np.float32))
    got = contraction(model, embedding_table(model, CPU), tokens, offsets, contexts)
    radii = [0.6**3, 0.6**4]  # documents of 3 and 4 tokens: A^3, A^4
    assert got["documents"] == 2
    assert got["pass_spectral_radius_median"] == pytest.approx(np.median(radii), rel=1e-5)
    assert got["pass_spectral_radius_max"] == pytest.approx(max(radii), rel=1e-5)
    assert got["step_norm_max"] == pytest.approx(float(torch.linalg.matrix_norm(a.double(), ord=2)), rel=1e-6)


def test_power_iteration_estimates_the_same_radius_and_norm_above_the_jacobian_width(monkeypatch):
    """Above CONTRACTION_WIDTH the Jacobians are not formed: power iteration with JVPs (and VJPs for
    the norm) must give the exact figures of the small case."""
    a = torch.tensor([[0.5, 0.2, 0.0], [0.0, -0.6, 0.1], [0.0, 0.0, 0.3]])
    model = Linear(a)
    tokens, offsets = np.array([1, 2, 3, 4, 0, 1, 2]), np.array([0, 3, 7])
    contexts = np.random.default_rng(0).normal(size=(7, 3)).astype(np.float32)
    exact = contraction(model, embedding_table(model, CPU), tokens, offsets, contexts)
    monkeypatch.setattr(fixed_point, "CONTRACTION_WIDTH", 2)
    power = contraction(model, embedding_table(model, CPU), tokens, offsets, contexts)
    assert exact["method"] == "jacobian" and power["method"].startswith("power")
    for key in ("pass_spectral_radius_median", "pass_spectral_radius_max", "step_norm_max"):
        assert power[key] == pytest.approx(exact[key], rel=1e-3), key
    norms = [np.linalg.norm(np.linalg.matrix_power(a.double().numpy(), k), 2) for k in (3, 4)]  # A^3, A^4
    assert exact["pass_norm_max"] == pytest.approx(max(norms), rel=1e-5) and power["pass_norm_max"] is None


class Bistable(ContextNetwork):
    """c_t = tanh(3 c_{t-1}) (the token is ignored): fixed points 0 (repelling) and +-0.995 per
    dimension, so the fixed point found depends on where the solve starts."""

    def __init__(self, width: int = 2, vocab: int = 4):
        super().__init__()
        self.context_dim = self.embed_dim = width
        self.embed = torch.nn.Embedding(vocab, width)
        self.blocks = torch.nn.ModuleList([torch.nn.Identity()])

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed(ids)

    def step(self, tok: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        return torch.tanh(3 * ctx)


def test_a_second_start_finds_the_other_fixed_points():
    cfg = Phase1Settings(fixed_point_solver="plain", fixed_point_unique=True, fixed_point_tol=1e-6, max_iterations=100)
    res = run_cvfp(Bistable(), np.array([0, 1, 2, 3]), np.array([0, 1, 2, 3, 4]), cfg, train=False, device=CPU)
    assert res.solve_report["failing"] == 0  # from zeros: the repelling fixed point 0, exactly
    assert np.abs(res.contexts.read(0, 4)).max() == 0
    u = res.solve_report["unique"]
    assert u["documents"] == 4 and u["second_start_solved"] == 4 and u["apart"] == 4
    root = 1.0
    for _ in range(100):
        root = float(np.tanh(3 * root))  # the positive root of c = tanh(3c), in float64
    assert u["max_distance"] == pytest.approx(root, rel=1e-5)
