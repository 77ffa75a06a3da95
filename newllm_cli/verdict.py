"""How sure a comparison is: a bootstrap over validation documents of per-pair loss differences.

Two models scored on the same validation pairs differ by d_i = loss_a_i - loss_b_i nats per pair;
their perplexity ratio is exp(mean d). Pairs inside a document are not independent, so whole
documents are resampled (or, with fewer than MIN_UNITS documents, contiguous blocks of pairs). The
verdict follows from the 95% interval of the ratio: "beats" when it lies below 1, "loses to" when it
lies above 1, "ties" when it covers 1.
"""
from __future__ import annotations

import math

import numpy as np

SAMPLES = 2000
MIN_UNITS = 30  # fewer documents than this: resample contiguous blocks of pairs instead


def units(groups: np.ndarray) -> tuple[np.ndarray, str]:
    """A resampling unit per pair: its document, or one of MIN_UNITS contiguous blocks."""
    groups = np.asarray(groups)
    n_groups = len(np.unique(groups))
    if n_groups >= MIN_UNITS or len(groups) < MIN_UNITS:
        return np.unique(groups, return_inverse=True)[1].reshape(-1), f"{n_groups} documents"
    return (np.arange(len(groups)) * MIN_UNITS) // len(groups), f"{MIN_UNITS} blocks of contiguous pairs"


def compare(losses_a: np.ndarray, losses_b: np.ndarray, groups: np.ndarray, seed: int = 0) -> dict:
    """Perplexity ratio a / b with its bootstrap 95% interval, and the verdict for a against b."""
    diff = np.asarray(losses_a, np.float64) - np.asarray(losses_b, np.float64)
    unit, how = units(groups)
    sums = np.bincount(unit, weights=diff)
    counts = np.bincount(unit).astype(np.float64)
    rng = np.random.default_rng(seed)
    means = np.empty(SAMPLES)
    batch = max(1, 2_000_000 // max(len(sums), 1))  # bounded memory for any number of documents
    for s in range(0, SAMPLES, batch):
        draw = rng.integers(0, len(sums), size=(min(batch, SAMPLES - s), len(sums)))
        means[s:s + len(draw)] = sums[draw].sum(1) / counts[draw].sum(1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    verdict = "beats" if hi < 0 else "loses to" if lo > 0 else "ties"
    out = {"ratio": math.exp(diff.mean()), "ratio_low": math.exp(lo), "ratio_high": math.exp(hi),
           "verdict": verdict, "resampled": how}
    return {**out, "size": size(out)}


def size(c: dict) -> str:
    """The verdict with its size in perplexity: 'beats by 4.4% (3.1-5.8%)', 'loses by 1.7% (...)',
    'loses: 11.41x (9.05-14.21x)' from twice the perplexity up, 'ties (-0.8% to +1.2%)'."""
    lo, mid, hi = (c[k] - 1 for k in ("ratio_low", "ratio", "ratio_high"))
    if c["verdict"] == "beats":
        return f"beats by {-mid:.1%} ({-hi:.1%}-{-lo:.1%})"
    if c["verdict"] == "loses to" and mid >= 1:  # percentages past 100% read badly
        return f"loses: {mid + 1:.2f}x ({lo + 1:.2f}-{hi + 1:.2f}x)"
    if c["verdict"] == "loses to":
        return f"loses by {mid:.1%} ({lo:.1%}-{hi:.1%})"
    return f"ties ({lo:+.1%} to {hi:+.1%})"
