"""The seams: a Phase 1 objective term, a predictor, a control, a network and a scheme each enter
as one registry entry, and the code that uses the registry picks them up."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from newllm_cli import stages
from newllm_cli.evaluation import controls
from newllm_cli.evaluation.controls import Control, Outcome
from newllm_cli.model import architectures
from newllm_cli.model.architectures import Architecture
from newllm_cli.model.network import ContextNetwork
from newllm_cli.settings import ModelSettings, Phase1Settings, Settings
from newllm_cli.store.artifacts import Workspace
from newllm_cli.training import head_fit, objectives, predictors, schemes
from newllm_cli.training.head_fit import FitState, Split, lbfgs_counters
from newllm_cli.training.objectives import Comparison, Term, loss_gradient, reference_losses
from newllm_cli.training.phase1 import run_cvfp
from newllm_cli.training.predictors import Predictor

CPU = torch.device("cpu")


def _norm_value(stats: Comparison) -> float:
    """mean over rows and dimensions of q^2, from the moments: (m2 + n mean^2) / (n C)."""
    return float((stats.m2 + stats.rows * stats.mean**2).sum() / (stats.rows * len(stats.mean)))


NORM = Term(
    name="norm",
    weight=lambda cfg: 0.25,
    value=_norm_value,
    gradient=lambda q, p, stats: 2.0 * q / (stats.rows * q.shape[1]),
    reference=lambda q, p: torch.mean(q**2),
)


@pytest.fixture
def norm_term(monkeypatch):
    monkeypatch.setitem(objectives.TERMS, "norm", NORM)  # the one entry a new term needs


def test_a_new_objective_term_joins_value_gradient_and_training(norm_term):
    g = torch.Generator().manual_seed(0)
    q, p = torch.randn(50, 4, generator=g, dtype=torch.float64), torch.randn(50, 4, generator=g, dtype=torch.float64)
    cfg = Phase1Settings()
    leaf = q.clone().requires_grad_(True)
    whole = reference_losses(leaf, p, cfg)
    w = cfg.dist_reg_weight
    assert float(whole["loss"].detach()) == pytest.approx(
        (1 - w) * float(whole["cvfp_loss"].detach())
        + w * float(whole["dist_loss"].detach())
        + 0.25 * float(torch.mean(q**2)),
        rel=1e-12,
    )
    whole["loss"].backward()
    stats = Comparison()
    stats.add(q.float().numpy(), p.float().numpy(), cfg.convergence_threshold)
    assert stats.losses(cfg)["norm_loss"] == pytest.approx(float(torch.mean(q**2)), rel=1e-5)
    assert torch.allclose(loss_gradient(q, p, stats, cfg), leaf.grad, rtol=1e-4, atol=1e-9)
    model, tokens = architectures.build("residual", 20, ModelSettings(context_dim=4, embed_dim=4, num_layers=1)), None
    tokens = np.random.default_rng(0).integers(0, 20, 60)
    res = run_cvfp(model, tokens, np.array([0, 30, 60]), Phase1Settings(max_iterations=4), train=True, device=CPU)
    assert all("norm_loss" in h for h in res.history)
    assert res.history[1]["loss"] == pytest.approx(
        (1 - w) * res.history[1]["cvfp_loss"] + w * res.history[1]["dist_loss"] + 0.25 * res.history[1]["norm_loss"]
    )


class Tanh(ContextNetwork):
    """A toy network: c_t = tanh(W [c_{t-1}, x_t] + b)."""

    def __init__(self, vocab: int, m: ModelSettings):
        super().__init__()
        self.context_dim, self.embed_dim = m.context_dim, m.embed_dim
        self.embed = nn.Embedding(vocab, m.embed_dim)
        self.blocks = nn.ModuleList([nn.Linear(m.context_dim + m.embed_dim, m.context_dim)])

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed(ids)

    def step(self, tok: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.blocks[0](torch.cat([ctx, tok], dim=-1)))


@pytest.mark.parametrize("scheme", sorted(schemes.SCHEMES))
def test_a_new_network_runs_phase1_to_its_own_fixed_point(monkeypatch, scheme):
    monkeypatch.setitem(architectures.ARCHITECTURES, "tanh", Architecture("tanh", Tanh))
    torch.manual_seed(0)
    model = architectures.build("tanh", 12, ModelSettings(context_dim=3, embed_dim=2))
    embedding = model.embed.weight.detach().clone()
    tokens, offsets = np.random.default_rng(1).integers(0, 12, 40), np.array([0, 15, 40])
    cfg = Phase1Settings(scheme=scheme, max_iterations=60, fixed_point_solver="iterate")  # info: Q against P
    res = run_cvfp(model, tokens, offsets, cfg, train=True, device=CPU)
    assert torch.equal(model.embed.weight, embedding)  # only the blocks learn
    q = torch.from_numpy(res.contexts.read(0, 40))
    with torch.no_grad():  # the saved contexts are f's fixed point with carry-over, recomputed by hand
        c = q[offsets[1:] - 1]  # each document starts from its own last context
        for d, (a, b) in enumerate(zip(offsets[:-1], offsets[1:])):
            ctx = c[d]
            for t in range(a, b):
                ctx = model.step(model.embed_tokens(torch.tensor(tokens[t])), ctx)
                assert float(((ctx - q[t]) ** 2).mean()) < 10 * cfg.convergence_threshold
    assert res.info["converged_ratio"] >= cfg.min_converged_ratio and res.info["steps"] >= 1
    assert res.info["rel_residual"] == pytest.approx(
        math.sqrt(res.info["abs_residual"] ** 2 * q.numel() / float((q.double() ** 2).sum())), rel=1e-3
    )
    with pytest.raises(Exception, match="residual network only"):
        run_cvfp(model, tokens, offsets, cfg.model_copy(update={"kernel": "numba"}), train=False, device=CPU)


def test_a_new_scheme_is_one_entry(monkeypatch):
    """A scheme that runs the sequential recurrence twice per iteration (two Gauss-Seidel sweeps)
    converges in no more iterations than one sweep, and its Q is a fixed point all the same."""

    def twice(problem, prev, c0, out, advance):
        last, _ = schemes.sequential(problem, prev, c0, out, advance)
        return schemes.sequential(problem, prev, last, out, advance)

    monkeypatch.setitem(schemes.SCHEMES, "twice", twice)
    model = architectures.build("residual", 20, ModelSettings(context_dim=4, embed_dim=4, num_layers=1))
    tokens, offsets = np.random.default_rng(2).integers(0, 20, 50), np.array([0, 20, 50])
    runs = {}
    for name in ("sequential", "twice"):
        cfg = Phase1Settings.model_construct(**{**Phase1Settings().model_dump(), "scheme": name})
        runs[name] = run_cvfp(model, tokens, offsets, cfg, train=False, device=CPU)
    assert runs["twice"].stopped_by == "converged"
    assert len(runs["twice"].history) <= len(runs["sequential"].history)


def test_a_new_predictor_is_fitted_by_the_stage_code(monkeypatch, tmp_path):
    """A predictor that ignores its features (add-one frequencies of the training targets) is fitted
    by the stage's own fit_head_on, pairs and all; its losses are checked by hand."""

    def frequencies(train: Split, val: Split, vocab: int, prior, job: predictors.Job):
        counts = torch.bincount(train.targets, minlength=vocab).double() + 1
        logp = torch.log(counts / counts.sum())
        losses = -logp[val.targets].numpy()
        return head_fit.ProbeResult(
            weight=torch.zeros(vocab, train.inputs.shape[1]), bias=logp.float(), l2=0.0,
            val={"loss": float(losses.mean()), "perplexity": float(np.exp(losses.mean()))}, val_losses=losses,
        )  # fmt: skip

    monkeypatch.setitem(
        predictors.PREDICTORS,
        "freq",
        Predictor("freq", frequencies, predictors.Head.from_probe, lambda r: {"l2": r.l2}, lambda r, label, cfg: []),
    )
    train_tokens, val_tokens = np.array([1, 1, 2, 1, 0, 1, 2, 1]), np.array([2, 1, 0, 1])
    splits = {  # (contexts, tokens, offsets): pairs inside documents only
        "train": (np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32), train_tokens, np.array([0, 5, 8])),
        "val": (np.random.default_rng(1).normal(size=(4, 3)).astype(np.float32), val_tokens, np.array([0, 4])),
    }
    s = Settings.model_validate({"runtime": {"workspace": str(tmp_path), "run": "r"}})
    ws = Workspace(tmp_path, "r")
    ws.run_dir.mkdir(parents=True)
    model = architectures.build("residual", 3, ModelSettings(context_dim=3, embed_dim=3, num_layers=1))
    fitted, groups, _ = stages.fit_head_on(model, splits, s, 3, CPU, "toy", ws, "net", predictor="freq")
    train_next = np.concatenate([train_tokens[1:5], train_tokens[6:8]])
    counts = np.bincount(train_next, minlength=3) + 1
    expected = -np.log(counts / counts.sum())[val_tokens[1:]]
    assert np.allclose(fitted.val_losses, expected) and groups.tolist() == [0, 0, 0]
    head = predictors.PREDICTORS["freq"].head(fitted)
    assert torch.allclose(
        torch.log_softmax(head(torch.zeros(1, 3)), 1)[0].double(), torch.log(torch.tensor(counts / counts.sum()))
    )


@pytest.fixture
def uniform_control():
    """A toy control: every token equally likely, so its perplexity is the vocabulary size."""
    saved = list(controls.CONTROLS)
    controls.register(
        Control(
            "uniform",
            "uniform guess",
            "uniform",
            "uniform",
            "unif",
            lambda b: Outcome(np.full(len(b.targets), math.log(b.vocab)), {"vocabulary": b.vocab}),
        )
    )
    yield
    controls.CONTROLS[:] = saved


def test_a_new_control_reaches_phase2_the_tables_and_compare(uniform_control, cli, base_args, tmp_path):
    r = cli("full", *base_args, "--num-layers", "1", "--context-dim", "8", "--embed-dim", "8", "--json")
    assert r.code == 0, r.err
    report = json.loads((Path(r.json()["run_dir"]) / "phase2.json").read_text())
    entry = report["baselines"]["uniform"]
    assert entry["val_perplexity"] == pytest.approx(entry["vocabulary"], rel=1e-9)
    assert entry["verdict"] == "beats" and "size" in entry  # the head beats a uniform guess
    assert "uniform guess" in r.err  # the printed table
    rows = list(csv.DictReader(io.StringIO(cli("runs", "--workspace", base_args[1], "--csv").out)))
    assert float(rows[0]["uniform"]) == pytest.approx(entry["val_perplexity"])


def test_lbfgs_keeps_the_counters_the_head_fit_reads():
    """torch does not document L-BFGS's state keys; the fit reads n_iter, func_evals and prev_loss
    (lbfgs_counters). Pinned here on a quadratic whose closure calls are recorded by hand."""
    x = torch.nn.Parameter(torch.tensor([3.0, -2.0]))
    opt = torch.optim.LBFGS([x], lr=1.0, max_iter=5, max_eval=20, line_search_fn="strong_wolfe")
    calls, values = 0, []

    def closure():
        nonlocal calls
        calls += 1
        opt.zero_grad()
        loss = ((x - torch.tensor([1.0, 1.0])) ** 2 * torch.tensor([1.0, 10.0])).sum()
        loss.backward()
        values.append(float(loss.detach()))
        return loss

    assert lbfgs_counters(opt, x) == (0, 0, None)
    opt.step(closure)
    iters, evals, last = lbfgs_counters(opt, x)
    assert evals == calls and 1 <= iters <= 5
    # the objective where the step's last iteration started: one iteration behind the parameters
    # the step leaves (what the fit's stop rule compares between blocks)
    assert last == values[-2] and values[-1] < last


def test_a_fit_resumes_from_the_dict_format_of_earlier_releases():
    old = {"stage": 2, "cols": None, "lbfgs": None, "block": 0, "last": None, "selection": [{"l2": 1.0}],
           "best": None, "iterations": 40, "capped": False, "best_cols": torch.ones(2)}  # fmt: skip
    state = FitState.of(old)
    assert (state.stage, state.iterations, state.selection) == (2, 40, [{"l2": 1.0}])
    again = state.as_dict()
    assert set(again) == set(old) and torch.equal(again["best_cols"], old["best_cols"])
