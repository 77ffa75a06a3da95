"""How sure a comparison is: a bootstrap over validation documents of per-pair loss differences,
and over seeds (`pooled`) when several were trained.

Two models scored on the same validation pairs differ by d_i = loss_a_i - loss_b_i nats per pair;
their perplexity ratio is exp(mean d). Pairs inside a document are not independent, so whole
documents are resampled: each source's document is its natural unit (a conversation, a file, a
blank-line block), and smaller pieces of one would pass correlated pairs for independent ones (only
with fewer than MIN_UNITS documents, contiguous blocks of pairs, as the report says). The
verdict follows from the 95% interval of the ratio: "beats" when it lies below 1, "loses to" when it
lies above 1, "ties" when it covers 1.
"""

from __future__ import annotations

import math

import numpy as np

from newllm_cli.evaluation.controls import label

SAMPLES = 2000
MIN_UNITS = 5  # fewer documents than this: resample BLOCKS contiguous blocks of pairs instead
BLOCKS = 30


def units(groups: np.ndarray) -> tuple[np.ndarray, str]:
    """A resampling unit per pair: its document, or one of BLOCKS contiguous blocks (fewer than MIN_UNITS documents)."""
    groups = np.asarray(groups)
    n_groups = len(np.unique(groups))
    if n_groups >= MIN_UNITS or len(groups) < BLOCKS:
        return np.unique(groups, return_inverse=True)[1].reshape(-1), f"{n_groups} documents"
    return (np.arange(len(groups)) * BLOCKS) // len(groups), f"{BLOCKS} blocks of contiguous pairs"


def _bootstrap(sums: np.ndarray, counts: np.ndarray, seed: int) -> np.ndarray:
    """SAMPLES means of resampled units (sum of their sums / sum of their pairs), in bounded memory."""
    rng = np.random.default_rng(seed)
    means = np.empty(SAMPLES)
    batch = max(1, 2_000_000 // max(len(sums), 1))  # bounded memory for any number of documents
    for s in range(0, SAMPLES, batch):
        draw = rng.integers(0, len(sums), size=(min(batch, SAMPLES - s), len(sums)))
        means[s : s + len(draw)] = sums[draw].sum(1) / counts[draw].sum(1)
    return means


def _verdict(lo: float, hi: float) -> str:
    return "beats" if hi < 0 else "loses to" if lo > 0 else "ties"


def compare(losses_a: np.ndarray, losses_b: np.ndarray, groups: np.ndarray, seed: int = 0) -> dict:
    """Perplexity ratio a / b with its bootstrap 95% interval, and the verdict for a against b. Also
    each unit's sum of loss differences and the units' pair counts, which `pooled` combines over seeds."""
    diff = np.asarray(losses_a, np.float64) - np.asarray(losses_b, np.float64)
    unit, how = units(groups)
    sums = np.bincount(unit, weights=diff)
    counts = np.bincount(unit).astype(np.float64)
    lo, hi = np.percentile(_bootstrap(sums, counts, seed), [2.5, 97.5])
    out = {
        "ratio": math.exp(diff.mean()),
        "ratio_low": math.exp(lo),
        "ratio_high": math.exp(hi),
        "verdict": _verdict(lo, hi),
        "resampled": how,
    }
    return {**out, "size": size(out), "unit_sums": sums.tolist(), "unit_pairs": counts.astype(int).tolist()}


def t975(df: float) -> float:
    """The 97.5% quantile of Student's t with `df` degrees of freedom (the normal one for infinite df):
    bisection on its distribution function, integrated by Simpson's rule over [0, q]."""
    if math.isinf(df):
        return 1.959964
    scale = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def upper_half(q: float) -> float:  # P(0 < T < q)
        x = np.linspace(0.0, q, 2001)
        f = scale * (1 + x**2 / df) ** (-(df + 1) / 2)
        return float((f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum()) * (q / 2000) / 3)

    lo, hi = 1.9, 13.0  # the quantile lies between the normal's and df = 1's (12.706)
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if upper_half(mid) < 0.475 else (lo, mid)
    return (lo + hi) / 2


def pooled(unit_sums: list, unit_pairs: list, seed: int = 0) -> dict:
    """One comparison over S seeds, each seed a separately trained pair of models scored on the same
    validation units: the mean over seeds of the per-seed log ratios, with a t-interval whose
    variance adds the spread between seeds (var / S) to the document bootstrap's variance of the
    seed-averaged differences; degrees of freedom by Welch-Satterthwaite (the seed part has S - 1,
    the document part many). A t-interval rather than a bootstrap over seeds: with a handful of seeds
    a resampled set has few distinct values and its percentiles are too narrow. One seed: the
    document bootstrap alone, said so."""
    sums = np.asarray(unit_sums, np.float64).reshape(len(unit_sums), -1)
    pairs = np.asarray(unit_pairs, np.float64)
    logs = sums.sum(1) / pairs.sum()
    mean, n = float(logs.mean()), len(logs)
    boots = _bootstrap(sums.mean(0), pairs, seed)
    if n == 1:
        lo, hi = (float(x) for x in np.percentile(boots, [2.5, 97.5]))
        df, covers = None, "one seed: the interval covers documents, not seeds"
    else:
        seeds_var, docs_var = float(logs.var(ddof=1)) / n, float(boots.var(ddof=1))
        total = seeds_var + docs_var
        df = total**2 / (seeds_var**2 / (n - 1)) if seeds_var > 0 else math.inf
        half = t975(df) * math.sqrt(total)
        lo, hi = mean - half, mean + half
        outside = [i for i, r in enumerate(logs) if not lo <= r <= hi]
        covers = "covers every seed's ratio" if not outside else f"does not cover seed {', '.join(map(str, outside))}"
    out = {
        "seeds": n,
        "ratio": math.exp(mean),
        "ratio_low": math.exp(lo),
        "ratio_high": math.exp(hi),
        "verdict": _verdict(lo, hi),
        "per_seed": [math.exp(r) for r in logs],
        "between_seed_sd": float(logs.std(ddof=1)) if n > 1 else None,
        "document_se": float(boots.std(ddof=1)),
        "df": df,
        "covers": covers,
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


COUNT_MODELS = ("trigram_interpolated", "bigram_interpolated", "bigram_add_k")  # the n-gram baselines


def strongest_count_model(baselines: dict) -> str | None:
    """The count baseline with the lowest val perplexity: the one the contexts must beat."""
    present = [k for k in COUNT_MODELS if k in baselines and "val_perplexity" in baselines[k]]
    return min(present, key=lambda k: baselines[k]["val_perplexity"]) if present else None


def finding(baselines: dict) -> str:
    """One plain sentence: do the Phase 1 contexts carry next-token information a linear head can use
    beyond the untrained network and the strongest count model? With each interval, and what it covers."""
    parts = []
    counts = strongest_count_model(baselines)
    for key in ("untrained_network", counts or ""):
        if key in baselines:
            b = baselines[key]
            unsolved = "" if b.get("solve", {}).get("converged", True) else ", a control whose solve did not converge"
            parts.append(
                f"against the {label(key)}{unsolved}, it {b['size']} (perplexity ratio {b['ratio']:.3f}, "
                f"95% interval {b['ratio_low']:.3f}-{b['ratio_high']:.3f})"
            )
    control = baselines.get("untrained_network", {}).get("verdict")
    ngram = baselines.get(counts, {}).get("verdict") if counts else None
    name = label(counts) if counts else "count models"
    if control == "beats" and ngram == "beats":
        claim = f"carry next-token information beyond both the untrained network and the {name}"
    elif control == "beats":
        claim = f"carry more next-token information than the untrained network, but not beyond the {name}"
    elif control is None:
        claim = (
            f"carry next-token information beyond the {name}"
            if ngram == "beats"
            else f"show no next-token information beyond the {name}"
        ) + " (no control was fitted)"
    else:
        claim = "show no next-token information beyond what the untrained network's contexts carry"
    unit = next(iter(baselines.values()))["resampled"] if baselines else "documents"
    return (
        f"Finding: the Phase 1 contexts {claim}. The head on them: {'; '.join(parts)}. The intervals resample "
        f"the {unit} of the validation set under one seed; they do not cover other seeds."
    )


THREE = ("zero_context", "untrained_network", "bigram_add_k")  # what a predictor reading x_t must beat


def beyond_three(baselines: dict) -> str:
    """One sentence: do the contexts add next-token information beyond zero context, the untrained
    network and the add-k bigram (all three), with the closest one's interval; skipped ones named."""
    ran = [k for k in THREE if k in baselines]
    skipped = [label(k) for k in THREE if k not in baselines]
    left = f" ({', '.join(skipped)} skipped: this says nothing about {'it' if len(skipped) == 1 else 'them'})"
    if not ran:
        return "Beyond all three controls: not measured (all skipped)."
    failing = [k for k in ran if baselines[k]["verdict"] != "beats"]
    if not failing:
        closest = max(ran, key=lambda k: baselines[k]["ratio"])
        said = f"the closest, the {label(closest)}, it {baselines[closest]['size']}"
        claim = "add" if not skipped else "add, against those run,"
        return f"Beyond all three: the contexts {claim} next-token information: {said}{left if skipped else ''}."
    shown = "; ".join(f"against the {label(k)} it {baselines[k]['size']}" for k in failing)
    return f"Beyond all three: not shown: {shown}{left if skipped else ''}."
