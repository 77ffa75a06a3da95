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

from newllm_cli.evaluation.controls import label

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
        means[s : s + len(draw)] = sums[draw].sum(1) / counts[draw].sum(1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    verdict = "beats" if hi < 0 else "loses to" if lo > 0 else "ties"
    out = {
        "ratio": math.exp(diff.mean()),
        "ratio_low": math.exp(lo),
        "ratio_high": math.exp(hi),
        "verdict": verdict,
        "resampled": how,
    }
    return {**out, "size": size(out)}


def size(c: dict) -> str:
    """The verdict with its size in perplexity, one wording for every size: 'beats by 4.4% (3.1%-5.8%)',
    'loses by 1.7% (0.9%-2.5%)', 'loses by 349.0% (305.2%-390.3%)', 'ties (-0.8% to +1.2%)'."""
    lo, mid, hi = (c[k] - 1 for k in ("ratio_low", "ratio", "ratio_high"))
    if c["verdict"] == "beats":
        return f"beats by {-mid:.1%} ({-hi:.1%}-{-lo:.1%})"
    if c["verdict"] == "loses to":
        return f"loses by {mid:.1%} ({lo:.1%}-{hi:.1%})"
    return f"ties ({lo:+.1%} to {hi:+.1%})"


def finding(baselines: dict) -> str:
    """One plain sentence: do the Phase 1 contexts carry next-token information a linear head can use
    beyond the untrained network and the bigram? With each interval, and what it covers."""
    parts = []
    for key in ("untrained_network", "bigram_add_k"):
        if key in baselines:
            b = baselines[key]
            parts.append(
                f"against the {label(key)}, it {b['size']} (perplexity ratio {b['ratio']:.3f}, "
                f"95% interval {b['ratio_low']:.3f}-{b['ratio_high']:.3f})"
            )
    control = baselines.get("untrained_network", {}).get("verdict")
    bigram = baselines.get("bigram_add_k", {}).get("verdict")
    if control == "beats" and bigram == "beats":
        claim = "carry next-token information beyond both the untrained network and the bigram"
    elif control == "beats":
        claim = "carry more next-token information than the untrained network, but not beyond the bigram"
    elif control is None:
        claim = (
            "carry next-token information beyond the bigram"
            if bigram == "beats"
            else "show no next-token information beyond the bigram"
        ) + " (no control was fitted)"
    else:
        claim = "show no next-token information beyond what the untrained network's contexts carry"
    unit = next(iter(baselines.values()))["resampled"] if baselines else "documents"
    return (
        f"Finding: the Phase 1 contexts {claim}. The head on them: {'; '.join(parts)}. The intervals resample "
        f"the {unit} of the validation set under one seed; they do not cover other seeds."
    )
