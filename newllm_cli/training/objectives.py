"""Phase 1's objective: named terms of this iteration's contexts Q against the previous ones P.

loss = sum of weight(settings) * term over the registered terms. Each term gives three things:
- `value`: its value from whole-corpus statistics (Comparison: per-dimension mean and variance of Q,
  the sum of squared changes), so one pass over the corpus gives every loss;
- `gradient`: d term / dQ for some rows of Q in closed form from the same statistics, so training
  back-propagates chunk by chunk and memory stays bounded at any corpus size;
- `reference`: the definition on whole tensors, which tests differentiate with autograd to check
  `gradient`.
A term whose weight is 0 costs nothing in training. A new term is one `register(Term(...))` here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from newllm_cli.runtime.distributed import Group
from newllm_cli.runtime.moments import merge_moments
from newllm_cli.settings import Phase1Settings


@dataclass
class Comparison:
    """Q against P, accumulated chunk by chunk in float64: the squared changes, per-dimension mean and
    variance (merge_moments), and the converged share."""

    rows: int = 0
    sq: float = 0.0
    converged: int = 0
    mean: np.ndarray | None = None
    m2: np.ndarray | None = None
    finite: bool = True

    def add(self, q: np.ndarray, p: np.ndarray | None, threshold: float) -> None:
        """Element-wise work in float32 (torch, all cores), every sum accumulated in float64."""
        qt = torch.from_numpy(np.ascontiguousarray(q))
        chunk = Comparison(rows=len(qt))
        if p is not None:
            per_token = (qt - torch.from_numpy(np.ascontiguousarray(p))).square_().mean(dim=1)
            chunk.sq = float(per_token.sum(dtype=torch.float64)) * q.shape[1]
            chunk.converged = int((per_token < threshold).sum())
        mean = qt.sum(dim=0, dtype=torch.float64) / chunk.rows
        m2 = (qt - mean.float()).square_().sum(dim=0, dtype=torch.float64)
        m2 -= chunk.rows * (mean - mean.float().double()) ** 2  # the centre was rounded to float32
        chunk.mean, chunk.m2 = mean.numpy(), m2.numpy()
        chunk.finite = bool(np.isfinite(chunk.m2).all())  # a NaN or inf anywhere in q makes its sums so
        self.merge(chunk)

    def merge(self, other: Comparison) -> None:
        """Add another set of rows (a chunk, or another rank's rows)."""
        self.sq += other.sq
        self.converged += other.converged
        self.finite &= other.finite
        if other.mean is not None:
            seen = None if self.mean is None else (self.rows, self.mean, self.m2)
            self.rows, self.mean, self.m2 = merge_moments(seen, other.rows, other.mean, other.m2)

    def combined(self, group: Group) -> Comparison:
        """Over every rank's rows: each rank merges all parts in rank order, so all hold the same."""
        parts = group.gather(self)
        if len(parts) == 1:
            return self
        total = Comparison()
        for part in parts:
            total.merge(part)
        return total

    @property
    def var(self) -> np.ndarray:
        assert self.m2 is not None
        return self.m2 / self.rows

    def losses(self, cfg: Phase1Settings) -> dict[str, float]:
        """Every term's value (`NAME_loss`) and their weighted sum (`loss`)."""
        values = {f"{t.name}_loss": t.value(self) for t in TERMS.values()}
        return {**values, "loss": _weighted(cfg, {t.name: values[f"{t.name}_loss"] for t in TERMS.values()})}


@dataclass(frozen=True)
class Term:
    """One term of the Phase 1 loss (see the module docstring)."""

    name: str
    weight: Callable[[Phase1Settings], float]
    value: Callable[[Comparison], float]
    gradient: Callable[[torch.Tensor, torch.Tensor, Comparison], torch.Tensor]
    reference: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


TERMS: dict[str, Term] = {}


def register(term: Term) -> Term:
    TERMS[term.name] = term
    return term


def _weighted(cfg: Phase1Settings, parts: dict[str, float]) -> float:
    total: float | None = None
    for name, value in parts.items():
        part = TERMS[name].weight(cfg) * value
        total = part if total is None else total + part
    return 0.0 if total is None else total


def reference_losses(q: torch.Tensor, p: torch.Tensor, cfg: Phase1Settings) -> dict[str, torch.Tensor]:
    """The definition on whole tensors (differentiable); training uses Comparison and loss_gradient."""
    values = {f"{t.name}_loss": t.reference(q, p) for t in TERMS.values()}
    total: torch.Tensor | None = None
    for t in TERMS.values():
        part = t.weight(cfg) * values[f"{t.name}_loss"]
        total = part if total is None else total + part
    return {**values, "loss": torch.zeros(()) if total is None else total}


def loss_gradient(q: torch.Tensor, p: torch.Tensor, stats: Comparison, cfg: Phase1Settings) -> torch.Tensor:
    """d loss / dQ for rows of Q from the whole-corpus statistics (terms of weight 0 skipped)."""
    total: torch.Tensor | None = None
    for t in TERMS.values():
        w = t.weight(cfg)
        if w == 0:
            continue
        part = w * t.gradient(q, p, stats)
        total = part if total is None else total + part
    return torch.zeros_like(q) if total is None else total


def dist_weight(cfg: Phase1Settings) -> float:
    return cfg.dist_reg_weight if cfg.use_distribution_reg else 0.0


def dist_loss(q: torch.Tensor) -> torch.Tensor:
    """mean_d(mean_t q)^2 + mean_d(var_t q - 1)^2, population variance."""
    mean = q.mean(dim=0)
    var = q.var(dim=0, unbiased=False)
    return (mean**2).mean() + ((var - 1.0) ** 2).mean()


def _stat(values: np.ndarray | None, like: torch.Tensor) -> torch.Tensor:
    assert values is not None
    return torch.as_tensor(values, dtype=like.dtype, device=like.device)


def _cvfp_gradient(q: torch.Tensor, p: torch.Tensor, stats: Comparison) -> torch.Tensor:
    return 2.0 * (q - p) / (stats.rows * q.shape[1])


def _dist_gradient(q: torch.Tensor, p: torch.Tensor, stats: Comparison) -> torch.Tensor:
    mean, var = _stat(stats.mean, q), _stat(stats.var, q)
    return (2.0 * mean + 4.0 * (var - 1.0) * (q - mean)) / (stats.rows * q.shape[1])


def _cvfp_value(stats: Comparison) -> float:
    assert stats.mean is not None
    return stats.sq / (stats.rows * len(stats.mean))


def _dist_value(stats: Comparison) -> float:
    assert stats.mean is not None
    return float((stats.mean**2).mean() + ((stats.var - 1.0) ** 2).mean())


# CVFP: the mean squared change of every context from the previous iteration (the fixed-point term)
register(
    Term(
        name="cvfp",
        weight=lambda cfg: 1.0 - dist_weight(cfg),
        value=_cvfp_value,
        gradient=_cvfp_gradient,
        reference=lambda q, p: torch.mean((q - p) ** 2),
    )
)
# the distribution regularizer: each dimension's mean 0 and variance 1 over the corpus (no collapse)
register(
    Term(
        name="dist", weight=dist_weight, value=_dist_value, gradient=_dist_gradient, reference=lambda q, p: dist_loss(q)
    )
)
