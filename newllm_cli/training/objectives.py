"""Phase 1's objective: named terms of this iteration's contexts Q against the previous ones P.

loss = sum of weight(settings) * term over the registered terms. Each term gives three things:
- `value`: its value from corpus statistics (Comparison: per-dimension mean and variance of Q, the
  sum of squared changes, and for some terms the C x C scatter of Q), so one pass gives every loss;
- `gradient`: d term / dQ for some rows of Q in closed form from the same statistics, so training
  back-propagates chunk by chunk and memory stays bounded at any corpus size;
- `reference`: the definition on whole tensors, which tests differentiate with autograd to check
  `gradient`.
A `batched` term (the diversity terms) is taken over all tokens of an iteration, or with
--diversity-batch B over each batch of B consecutive rows of the stream and averaged over batches:
then its statistics are kept per batch (Comparison.batches) and each row's gradient reads its
batch's. A term whose weight is 0 costs nothing. A new term is one `register(Term(...))` here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from newllm_cli.runtime.distributed import Group
from newllm_cli.runtime.moments import merge_moments
from newllm_cli.settings import Phase1Settings
from newllm_cli.training import diversity


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
    scatter: np.ndarray | None = None  # sum of (q - mean)(q - mean)^T, when a weighted term needs it
    batches: dict[int, Comparison] | None = None  # per batch of `batch_rows` rows of the stream
    batch_rows: int = 0
    cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)  # what terms derive (eigenvectors)

    def add(self, q: np.ndarray, p: np.ndarray | None, threshold: float, scatter: bool = False) -> None:
        """Element-wise work in float32 (torch, all cores), every sum accumulated in float64."""
        qt = torch.from_numpy(np.ascontiguousarray(q))
        chunk = Comparison(rows=len(qt))
        if scatter:
            wide = qt.double()
            centred = wide - wide.mean(dim=0)
            chunk.scatter = (centred.T @ centred).numpy()
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

    def add_batches(self, q: np.ndarray, first_row: int, batch_rows: int, scatter: bool = False) -> None:
        """Q's moments per batch of the stream: rows first_row.. (global) cut at multiples of batch_rows."""
        self.batch_rows, self.batches = batch_rows, {} if self.batches is None else self.batches
        for s, e, b in batch_pieces(first_row, len(q), batch_rows):
            part = Comparison()
            part.add(q[s:e], None, 0.0, scatter)
            self.batches.setdefault(b, Comparison()).merge(part)

    def merge(self, other: Comparison) -> None:
        """Add another set of rows (a chunk, or another rank's rows)."""
        self.sq += other.sq
        self.converged += other.converged
        self.finite &= other.finite
        if other.mean is not None:
            seen = None if self.mean is None else (self.rows, self.mean, self.m2)
            if other.scatter is not None:
                before = None if self.scatter is None else (self.rows, self.mean, self.scatter)
                self.scatter = merge_moments(before, other.rows, other.mean, other.scatter)[2]
            self.rows, self.mean, self.m2 = merge_moments(seen, other.rows, other.mean, other.m2)
        if other.batches is not None:
            self.batch_rows, self.batches = other.batch_rows, {} if self.batches is None else self.batches
            for b, part in sorted(other.batches.items()):
                self.batches.setdefault(b, Comparison()).merge(part)
            self.finite &= all(part.finite for part in other.batches.values())

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

    def losses(self, cfg: Phase1Settings) -> dict[str, float | None]:
        """Every term's value (`NAME_loss`; None for an optional term of weight 0) and their weighted
        sum (`loss`)."""
        values: dict[str, float | None] = {}
        for t in TERMS.values():
            if t.optional and t.weight(cfg) == 0:
                values[f"{t.name}_loss"] = None
            elif t.batched and self.batches:  # the mean over batches, in stream order
                values[f"{t.name}_loss"] = float(np.mean([t.value(self.batches[b]) for b in sorted(self.batches)]))
            else:
                values[f"{t.name}_loss"] = t.value(self)
        used = {t.name: values[f"{t.name}_loss"] for t in TERMS.values() if values[f"{t.name}_loss"] is not None}
        return {**values, "loss": _weighted(cfg, used)}  # type: ignore[arg-type]


def batch_pieces(first_row: int, rows: int, batch_rows: int) -> Iterator[tuple[int, int, int]]:
    """(start, stop, batch) of the local rows 0..rows-1, global rows first_row.., cut at batch bounds."""
    s = 0
    while s < rows:
        b = (first_row + s) // batch_rows
        e = min(rows, (b + 1) * batch_rows - first_row)
        yield s, e, b
        s = e


@dataclass(frozen=True)
class Term:
    """One term of the Phase 1 loss (see the module docstring)."""

    name: str
    weight: Callable[[Phase1Settings], float]
    value: Callable[[Comparison], float]
    gradient: Callable[[torch.Tensor, torch.Tensor, Comparison], torch.Tensor]
    reference: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    optional: bool = False  # reported as None (not computed) while its weight is 0
    batched: bool = False  # per batch of --diversity-batch rows when that is set
    scatter: bool = False  # needs the C x C scatter of Q


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
    used = [t for t in TERMS.values() if not (t.optional and t.weight(cfg) == 0)]
    B = cfg.diversity_batch
    values = {
        f"{t.name}_loss": torch.stack([t.reference(q[s : s + B], p[s : s + B]) for s in range(0, len(q), B)]).mean()
        if t.batched and B
        else t.reference(q, p)
        for t in used
    }
    total: torch.Tensor | None = None
    for t in used:
        part = t.weight(cfg) * values[f"{t.name}_loss"]
        total = part if total is None else total + part
    return {**values, "loss": torch.zeros(()) if total is None else total}


def loss_gradient(
    q: torch.Tensor, p: torch.Tensor, stats: Comparison, cfg: Phase1Settings, first_row: int = 0
) -> torch.Tensor:
    """d loss / dQ for rows of Q (global rows first_row..) from the statistics (terms of weight 0
    skipped); a batched term's rows read their batch's statistics, divided by the number of batches."""
    total: torch.Tensor | None = None
    for t in TERMS.values():
        w = t.weight(cfg)
        if w == 0:
            continue
        if t.batched and stats.batches:
            part = torch.empty_like(q)
            for s, e, b in batch_pieces(first_row, len(q), stats.batch_rows):
                part[s:e] = t.gradient(q[s:e], p[s:e], stats.batches[b]) / len(stats.batches)
            part *= w
        else:
            part = w * t.gradient(q, p, stats)
        total = part if total is None else total + part
    return torch.zeros_like(q) if total is None else total


def needs_scatter(cfg: Phase1Settings) -> bool:
    """Whether a weighted term reads the C x C scatter of Q."""
    return any(t.scatter and t.weight(cfg) != 0 for t in TERMS.values())


def diversity_weight(cfg: Phase1Settings) -> float:
    """w of (1 - w) (CVFP and regularizer) + w D; 0 without a diversity term."""
    return 0.0 if cfg.diversity == "none" else cfg.diversity_weight


def _kept(cfg: Phase1Settings, weight: float) -> float:
    """A CVFP-side weight scaled by 1 - w (unchanged, bit for bit, without a diversity term)."""
    w = diversity_weight(cfg)
    return weight if w == 0 else (1.0 - w) * weight


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
        weight=lambda cfg: _kept(cfg, 1.0 - dist_weight(cfg)),
        value=_cvfp_value,
        gradient=_cvfp_gradient,
        reference=lambda q, p: torch.mean((q - p) ** 2),
    )
)
# the distribution regularizer: each dimension's mean 0 and variance 1 over the corpus (no collapse)
register(
    Term(
        name="dist",
        weight=lambda cfg: _kept(cfg, dist_weight(cfg)),
        value=_dist_value,
        gradient=_dist_gradient,
        reference=lambda q, p: dist_loss(q),
    )
)


def _diversity(
    *names: str, factor: Callable[[Phase1Settings], float] = lambda cfg: 1.0
) -> Callable[[Phase1Settings], float]:
    """The weight of a diversity term: w (times `factor`) while --phase1-diversity is one of `names`."""
    return lambda cfg: diversity_weight(cfg) * factor(cfg) if cfg.diversity in names else 0.0


def _rows(
    gradient: Callable[[torch.Tensor, Comparison], torch.Tensor],
) -> Callable[[torch.Tensor, torch.Tensor, Comparison], torch.Tensor]:
    return lambda q, p, stats: gradient(q, stats)


# the diversity losses (training/diversity.py), each over all tokens or per batch; OACD is mcdl + centroid
for _name, _weight, _scatter in (
    ("mcdl", _diversity("mcdl", "oacd"), False),
    ("centroid", _diversity("oacd", factor=lambda cfg: cfg.centroid_weight), False),
    ("odcm", _diversity("odcm"), True),
    ("sdl", _diversity("sdl"), True),
    ("nuc", _diversity("nuc"), True),
):
    register(
        Term(
            name=_name,
            weight=_weight,
            value=getattr(diversity, f"{_name}_value"),
            gradient=_rows(getattr(diversity, f"{_name}_gradient")),
            reference=(lambda ref: lambda q, p: ref(q))(getattr(diversity, f"{_name}_reference")),
            optional=True,
            batched=True,
            scatter=_scatter,
        )
    )


def objective_weights(cfg: Phase1Settings) -> dict[str, Any]:
    """The terms in force and their weights, and how batched terms are taken (for reports)."""
    weights = {t.name: t.weight(cfg) for t in TERMS.values() if t.weight(cfg) != 0}
    batched = any(t.batched for t in TERMS.values() if t.name in weights)
    return {"weights": weights, "batch": cfg.diversity_batch if batched and cfg.diversity_batch else "all tokens"}
