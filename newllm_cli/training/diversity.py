"""The diversity losses of the research's later Phase 1, from moments of a set of rows Q (n x C).

Each loss comes as `value(stats)` and `gradient(q, stats)` in closed form from the set's moments
(objectives.Comparison: rows n, mean mu, per-dimension m2, scatter S = Qc^T Qc with Qc = Q - mu), and
`reference(q)`, the definition on a whole tensor. With Qc's column sums zero, a function of Qc has
the same gradient with respect to Q as to Qc, which is why centring adds no term below.
- mcdl: -|Qc|_F / n                                   (gradient -Qc / (n |Qc|_F))
- centroid: |mu|^2, OACD's second term                (gradient 2 mu / n)
- odcm: mean_d relu(1 - sqrt(var_d + 1e-4)) + 0.04 sum_{i != j} cov_ij^2 / C, cov = S / (n - 1)
- sdl: -H(s / sum s) over the singular values s of Q (not centred)
- nuc: -|Qc|_* / n, the nuclear norm
Singular values come from the eigenvalues of the C x C Gram matrix; a gradient through them is
Q V diag(g / s) V^T, where g is d loss / d s (directions of s = 0 carry none).
"""

from __future__ import annotations

import math

import numpy as np
import torch

EPS = 1e-4  # inside ODCM's square root
COV_WEIGHT = 0.04  # ODCM's off-diagonal weight
TINY = 1e-12  # a singular value below TINY times the largest counts as 0


def _t(values: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(values, dtype=like.dtype, device=like.device)


def mcdl_value(stats) -> float:
    return -math.sqrt(max(float(stats.m2.sum()), 0.0)) / stats.rows


def mcdl_gradient(q: torch.Tensor, stats) -> torch.Tensor:
    norm = math.sqrt(max(float(stats.m2.sum()), 0.0))
    if norm == 0:
        return torch.zeros_like(q)
    return -(q - _t(stats.mean, q)) / (stats.rows * norm)


def mcdl_reference(q: torch.Tensor) -> torch.Tensor:
    return -torch.linalg.norm(q - q.mean(dim=0)) / len(q)


def centroid_value(stats) -> float:
    return float((stats.mean**2).sum())


def centroid_gradient(q: torch.Tensor, stats) -> torch.Tensor:
    return (2.0 / stats.rows) * _t(stats.mean, q).expand_as(q)


def centroid_reference(q: torch.Tensor) -> torch.Tensor:
    return (q.mean(dim=0) ** 2).sum()


def _odcm_parts(stats) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """cov, the derivative of the variance part by var_d, and cov's off-diagonal part."""
    if "odcm" not in stats.cache:
        n, C = stats.rows, len(stats.mean)
        cov = stats.scatter / max(n - 1, 1)
        std = np.sqrt(np.diag(cov) + EPS)
        dvar = np.where(1.0 - std > 0, -0.5 / std, 0.0) / C
        off = cov - np.diag(np.diag(cov))
        stats.cache["odcm"] = cov, dvar, off
    return stats.cache["odcm"]


def odcm_value(stats) -> float:
    cov, _, off = _odcm_parts(stats)
    C = len(stats.mean)
    return float(np.maximum(1.0 - np.sqrt(np.diag(cov) + EPS), 0).mean() + COV_WEIGHT * (off**2).sum() / C)


def odcm_gradient(q: torch.Tensor, stats) -> torch.Tensor:
    _, dvar, off = _odcm_parts(stats)
    n, C = stats.rows, len(stats.mean)
    qc = q - _t(stats.mean, q)
    return (qc * _t(dvar, q) * 2.0 + (4.0 * COV_WEIGHT / C) * qc @ _t(off, q)) / max(n - 1, 1)


def odcm_reference(q: torch.Tensor) -> torch.Tensor:
    n, C = q.shape
    qc = q - q.mean(dim=0)
    cov = qc.T @ qc / (n - 1)
    off = cov - torch.diag(torch.diag(cov))
    return torch.relu(1.0 - torch.sqrt(torch.diag(cov) + EPS)).mean() + COV_WEIGHT * (off**2).sum() / C


def _spectrum(stats, centred: bool) -> tuple[np.ndarray, np.ndarray]:
    """Singular values (ascending) and right singular vectors of Qc (centred) or Q."""
    key = "centred" if centred else "raw"
    if key not in stats.cache:
        gram = stats.scatter if centred else stats.scatter + stats.rows * np.outer(stats.mean, stats.mean)
        lam, vec = np.linalg.eigh((gram + gram.T) / 2)
        stats.cache[key] = np.sqrt(np.maximum(lam, 0.0)), vec
    return stats.cache[key]


def _through_singular_values(q: torch.Tensor, s: np.ndarray, vec: np.ndarray, g: np.ndarray) -> torch.Tensor:
    """sum_k g_k u_k v_k^T = q V diag(g / s) V^T, leaving out the directions where s is 0."""
    live = s > TINY * max(float(s.max(initial=0.0)), 1e-300)
    scale = np.where(live, g / np.where(live, s, 1.0), 0.0)
    return q @ _t((vec * scale) @ vec.T, q)


def sdl_value(stats) -> float:
    s, _ = _spectrum(stats, centred=False)
    p = s / max(float(s.sum()), 1e-300)
    return float((p[p > 0] * np.log(p[p > 0])).sum())


def sdl_gradient(q: torch.Tensor, stats) -> torch.Tensor:
    s, vec = _spectrum(stats, centred=False)
    total = float(s.sum())
    if total == 0:
        return torch.zeros_like(q)
    p = s / total
    logp = np.log(np.where(p > 0, p, 1.0))
    g = (logp - float((p * logp).sum())) / total  # d sum p log p / d s_k
    return _through_singular_values(q, s, vec, g)


def sdl_reference(q: torch.Tensor) -> torch.Tensor:
    s = torch.linalg.svdvals(q)
    p = s / s.sum()
    return (p * torch.log(p)).sum()


def nuc_value(stats) -> float:
    s, _ = _spectrum(stats, centred=True)
    return -float(s.sum()) / stats.rows


def nuc_gradient(q: torch.Tensor, stats) -> torch.Tensor:
    s, vec = _spectrum(stats, centred=True)
    return _through_singular_values(q - _t(stats.mean, q), s, vec, -np.ones_like(s) / stats.rows)


def nuc_reference(q: torch.Tensor) -> torch.Tensor:
    return -torch.linalg.matrix_norm(q - q.mean(dim=0), ord="nuc") / len(q)
