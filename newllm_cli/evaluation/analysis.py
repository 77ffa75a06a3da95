"""Fixed-point analysis (docs/ARCHITECTURE.md), streamed over memory-mapped contexts in bounded memory.

One pass accumulates the float64 Gram matrix, sums and norms; singular values come from the Gram's
eigenvalues (s_i = sqrt(lambda_i)), so N never meets N. Pairwise statistics use a seeded sample.
A second pass finds, for the top singular directions, the tokens whose contexts project most.
"""

from __future__ import annotations

import numpy as np

from newllm_cli.runtime.errors import NumericalError
from newllm_cli.runtime.progress import progress

ROWS = 1 << 18  # contexts per streamed chunk (16 MB of float32 at C = 16)
PAIR_SAMPLE = 2000  # contexts in the pairwise sample (about 2M pairs)
TOP_DIRECTIONS = 3
TOP_TOKENS = 5
LAGS = (1, 10, 100)


def _backing_file(contexts: np.ndarray) -> str | None:
    """The .npy file behind a C-ordered memmap, read with plain file I/O (see chunks)."""
    name = getattr(contexts, "filename", None)
    return name if isinstance(contexts, np.memmap) and name and contexts.flags.c_contiguous else None


def chunks(contexts: np.ndarray, rows: int, what: str = "analysis"):
    """(start, float64 block) over the rows, with a progress bar named `what`."""
    with progress(what, len(contexts), "rows") as advance:
        for s, block in _read_chunks(contexts, rows):
            yield s, block
            advance(len(block))


def _offset(contexts: np.ndarray) -> int:
    """Where a memory-mapped .npy's data starts in its file."""
    return int(contexts.offset) if isinstance(contexts, np.memmap) else 0


def _read_chunks(contexts: np.ndarray, rows: int):
    """A memory-mapped .npy is read with plain file reads, so the whole file never becomes resident
    memory of this process."""
    n, c = contexts.shape
    name = _backing_file(contexts)
    if name:
        with open(name, "rb") as f:
            f.seek(_offset(contexts))
            for s in range(0, n, rows):
                m = min(rows, n - s)
                block = np.fromfile(f, dtype=contexts.dtype, count=m * c).reshape(m, c)
                yield s, block.astype(np.float64)
        return
    for s in range(0, n, rows):
        yield s, np.asarray(contexts[s : s + rows], dtype=np.float64)


def sample_rows(contexts: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Rows at sorted positions `idx`; from a memory-mapped file by seek and read (indexing the map
    would fault in read-ahead around every row: hundreds of MB for a few thousand rows)."""
    name = _backing_file(contexts)
    if not name:
        return np.asarray(contexts[idx])
    c = contexts.shape[1]
    row = c * contexts.dtype.itemsize
    out = np.empty((len(idx), c), dtype=contexts.dtype)
    with open(name, "rb") as f:
        for k, i in enumerate(idx):
            f.seek(_offset(contexts) + int(i) * row)
            out[k] = np.frombuffer(f.read(row), dtype=contexts.dtype)
    return out


def spectrum(eigenvalues: np.ndarray, scale: float | None = None) -> dict:
    """Singular values from Gram eigenvalues; actual rank and effective rank exp(H(s / sum s)).

    Values below 1e-6 of `scale` (default: the largest) are rounding noise of the float32 data and
    count as zero; the centred spectrum passes the uncentred largest value, so constant contexts
    have centred rank 0 rather than a rank made of noise.
    """
    s = np.sqrt(np.clip(np.sort(eigenvalues)[::-1], 0.0, None))
    ref = scale if scale is not None else (s[0] if len(s) else 0.0)
    s = np.where(s > ref * 1e-6, s, 0.0)
    total = s.sum()
    rank = int((s > 0).sum())
    if total > 0:
        p = s / total
        p = p[p > 0]
        eff = float(np.exp(-(p * np.log(p)).sum()))
    else:
        eff = 0.0
    return {"singular_values": s.tolist(), "actual_rank": rank, "effective_rank": eff}


def pairwise(sample: np.ndarray) -> dict:
    """Mean / median L2 distance and mean cosine over all distinct pairs of the sample."""
    x = sample.astype(np.float64)
    m = len(x)
    if m < 2:
        return {"mean_l2": 0.0, "median_l2": 0.0, "mean_cosine": 1.0, "sample_size": m}
    sq = (x**2).sum(1)
    d2 = np.clip(sq[:, None] + sq[None, :] - 2.0 * x @ x.T, 0.0, None)
    iu = np.triu_indices(m, k=1)
    dist = np.sqrt(d2[iu])
    norms = np.sqrt(sq)
    safe = np.where(norms > 0, norms, 1.0)
    u = x / safe[:, None]
    cos = (u @ u.T)[iu]
    zero = (norms[iu[0]] == 0) | (norms[iu[1]] == 0)
    cos = np.where(zero, np.where((norms[iu[0]] == 0) & (norms[iu[1]] == 0), 1.0, 0.0), cos)
    return {
        "mean_l2": float(dist.mean()),
        "median_l2": float(np.median(dist)),
        "mean_cosine": float(cos.mean()),
        "sample_size": m,
    }


def step_statistics(contexts: np.ndarray, mean: np.ndarray, offsets: np.ndarray | None = None) -> dict:
    """How contexts move along a text: mean cosine of consecutive contexts, and the autocorrelation
    sum<c_t - m, c_{t+k} - m> / sqrt(sum|c_t - m|^2 sum|c_{t+k} - m|^2) at each lag k, over pairs
    inside one document (all rows are one stream without `offsets`). Streamed in chunks."""
    n = len(contexts)
    offsets = np.array([0, n]) if offsets is None else np.asarray(offsets, np.int64)
    keep = max(LAGS)
    tail, tail_doc = np.zeros((0, contexts.shape[1])), np.zeros(0, dtype=np.int64)
    cos_sum, cos_n = 0.0, 0
    acc = {k: np.zeros(3) for k in LAGS}  # cross, left energy, right energy
    for s, x in chunks(contexts, ROWS, "analysis: steps"):
        doc = np.searchsorted(offsets, np.arange(s, s + len(x)), side="right") - 1
        block, block_doc = np.concatenate([tail, x]), np.concatenate([tail_doc, doc])
        first = len(tail)  # rows before this index were paired in an earlier chunk
        for k in LAGS:
            j = np.arange(max(first, k), len(block))
            j = j[block_doc[j] == block_doc[j - k]]
            a, b = block[j - k] - mean, block[j] - mean
            acc[k] += [(a * b).sum(), (a * a).sum(), (b * b).sum()]
            if k == 1:
                na, nb = np.linalg.norm(block[j - 1], axis=1), np.linalg.norm(block[j], axis=1)
                ok = (na > 0) & (nb > 0)
                cos_sum += float(((block[j - 1] * block[j]).sum(1)[ok] / (na[ok] * nb[ok])).sum())
                cos_n += int(ok.sum())
        tail, tail_doc = block[-keep:], block_doc[-keep:]
    auto = {f"lag_{k}": (float(c / np.sqrt(a * b)) if a > 0 and b > 0 else None) for k, (c, a, b) in acc.items()}
    return {"consecutive_cosine": cos_sum / cos_n if cos_n else None, "autocorrelation": auto}


def _steps(
    contexts: np.ndarray, norm_mean: float, norm_std: float, mean: np.ndarray, offsets: np.ndarray | None
) -> dict:
    """Norm spread (std / mean of the context norms) and the step statistics."""
    spread = float(norm_std / norm_mean) if norm_mean > 0 else None
    return {"norm_spread": spread, **step_statistics(contexts, mean, offsets)}


def _norm_moments(sums: np.ndarray, n: int) -> tuple[float, float]:
    """Mean and population std of the norms from their float64 sum and sum of squares."""
    m = sums[0] / max(n, 1)
    return float(m), float(np.sqrt(max(sums[1] / max(n, 1) - m * m, 0.0)))


def steps(contexts: np.ndarray, offsets: np.ndarray | None = None) -> dict:
    """The "steps" figures of `analyze_contexts` alone: one pass for the norms and mean, one for the steps."""
    sums, total = np.zeros(2), np.zeros(contexts.shape[1])
    for _, x in chunks(contexts, ROWS, "analysis: norms"):
        r = np.sqrt((x**2).sum(1))
        sums += [r.sum(), (r * r).sum()]
        total += x.sum(0)
    return _steps(contexts, *_norm_moments(sums, len(contexts)), total / max(len(contexts), 1), offsets)


def analyze_contexts(
    contexts: np.ndarray,
    seed: int = 0,
    tokens: np.ndarray | None = None,
    decode=None,
    offsets: np.ndarray | None = None,
) -> dict:
    """Every analysis figure for one N x C context matrix (may be a read-only memmap)."""
    n, c = contexts.shape
    if n == 0:
        raise ValueError("no contexts to analyse")
    gram = np.zeros((c, c))
    total = np.zeros(c)
    norms = np.empty(n, dtype=np.float32)  # kept only for their median: 4 bytes per row
    norm_sums = np.zeros(2)
    near_zero = 0
    for s, x in chunks(contexts, ROWS, "analysis: spectrum"):
        bad = ~np.isfinite(x).all(axis=1)
        if bad.any():
            raise NumericalError(f"contexts contain NaN or Inf (first at row {s + int(np.argmax(bad))}); rerun phase1")
        gram += x.T @ x
        total += x.sum(0)
        r = np.sqrt((x**2).sum(1))
        norms[s : s + len(x)] = r
        norm_sums += [r.sum(), (r * r).sum()]
        near_zero += int((np.abs(x) < 0.01).sum())
    mean = total / n
    centred = gram - n * np.outer(mean, mean)
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(n, size=min(n, PAIR_SAMPLE), replace=False))
    pairs = pairwise(sample_rows(contexts, idx))
    eigenvalues, eigenvectors = np.linalg.eigh(gram)
    raw = spectrum(eigenvalues)
    centred_eigenvalues = np.linalg.eigvalsh(centred)
    cen = spectrum(centred_eigenvalues, scale=raw["singular_values"][0])
    norm_mean, norm_std = _norm_moments(norm_sums, n)
    report = {
        "n": n,
        "dim": c,
        "global_attractor": {
            "mean_l2": pairs["mean_l2"],
            "mean_cosine": pairs["mean_cosine"],
            "sample_size": pairs["sample_size"],
            "degenerate": bool(pairs["mean_l2"] < 0.1 and pairs["mean_cosine"] > 0.99),
        },
        "zero_solution": {"mean_norm": norm_mean, "degenerate": bool(norm_mean < 0.1)},
        "distribution": {
            "norm_mean": norm_mean,
            "norm_median": float(np.median(norms, overwrite_input=True)),
            "norm_std": norm_std,
            "pairwise_l2_mean": pairs["mean_l2"],
            "pairwise_l2_median": pairs["median_l2"],
            "sparsity": near_zero / (n * c),
        },
        "information": {**raw, "top_singular_values": raw["singular_values"][:5]},
        "centred": {**cen, "top_singular_values": cen["singular_values"][:5]},
        "attainable_rank": attainable_rank(c, centred_eigenvalues),
        "steps": _steps(contexts, norm_mean, norm_std, mean, offsets),
    }
    report["directions"] = top_tokens(contexts, eigenvectors, tokens, decode)
    return report


def top_tokens(contexts: np.ndarray, eigenvectors: np.ndarray, tokens, decode) -> list[dict]:
    """For the top singular directions (Gram eigenvectors, ascending), the positions (and tokens)
    whose contexts project most."""
    dirs = eigenvectors[:, ::-1][:, :TOP_DIRECTIONS]
    best = [(np.empty(0), np.empty(0, dtype=np.int64)) for _ in range(dirs.shape[1])]
    for s, x in chunks(contexts, ROWS, "analysis: directions"):
        proj = x @ dirs
        for j in range(dirs.shape[1]):
            vals = np.concatenate([best[j][0], proj[:, j]])
            pos = np.concatenate([best[j][1], np.arange(s, s + len(proj))])
            keep = np.argsort(-vals, kind="stable")[:TOP_TOKENS]
            best[j] = (vals[keep], pos[keep])
    out = []
    for j, (vals, pos) in enumerate(best):
        entry = {"direction": j + 1, "positions": pos.tolist(), "projections": vals.tolist()}
        if tokens is not None:
            ids = [int(tokens[p]) for p in pos]
            entry["token_ids"] = ids
            if decode is not None:
                entry["tokens"] = [decode([i]) for i in ids]
        out.append(entry)
    return out


PLANE = 1e-8  # smallest / largest centred eigenvalue below which the rows lie on a hyperplane


def attainable_rank(context_dim: int, centred_eigenvalues: np.ndarray) -> int:
    """C - 1 when the contexts lie on a (C-1)-dimensional affine plane, as the final LayerNorm puts
    the model's own (their centred Gram matrix is singular); C for any other array."""
    ev = np.asarray(centred_eigenvalues)
    on_plane = ev.size and ev.min() <= PLANE * max(float(ev.max()), np.finfo(float).tiny)
    return max(context_dim - 1, 1) if on_plane else context_dim


MEMORY_FLOOR = 0.2  # least share of the contexts' variance not explained by the current token (docs/EXPERIMENTS.md)
SOLVED_FLOOR = 0.5  # least share of val documents whose contexts meet the carry-over condition


def gate(train: dict | None, val: dict | None) -> list[str]:
    """Reasons to refuse Phase 2 (empty = pass):
    - a centred effective rank below 20% (train) or 8% (val) of the attainable rank (C - 1 for
      layer-normed contexts), or a degenerate flag: the centred rank measures the spread of the
      contexts; the uncentred one is dominated by their mean (see docs/ARCHITECTURE.md);
    - memory: less than MEMORY_FLOOR of the variance beyond what the current token explains (a
      memoryless map c_t = g(x_t) has none, yet converges in one sweep);
    - learning and convergence: a network that took no optimizer step (the untrained control
      itself), training that stopped at its cap short of its converged share, or fewer than
      SOLVED_FLOOR of the val documents meeting the carry-over condition."""
    problems = []
    for name, rep, share in (("train", train, 0.20), ("val", val, 0.08)):
        if rep is None:
            continue
        eff, top = rep["centred"]["effective_rank"], rep.get("attainable_rank", max(rep["dim"] - 1, 1))
        if eff < share * top:
            problems.append(f"{name} centred effective rank {eff:.2f} < {share:.0%} of the attainable {top}")
        if rep["global_attractor"]["degenerate"]:
            problems.append(f"{name} contexts collapsed to one point (global attractor)")
        if rep["zero_solution"]["degenerate"]:
            problems.append(f"{name} contexts collapsed to zero (mean norm {rep['zero_solution']['mean_norm']:.3f})")
        kept = (rep.get("memory") or {}).get("not_explained_by_token")
        if kept is not None and kept < MEMORY_FLOOR:
            problems.append(
                f"{name} contexts are nearly memoryless: the current token explains {1 - kept:.0%} of their "
                f"variance (a map c_t = g(x_t) explains all of it)"
            )
        if name == "train" and rep.get("optimizer_steps") == 0:
            problems.append("the contexts are the untrained network's: Phase 1 took no optimizer step")
        if name == "train" and rep.get("stopped_by") == "max_iterations":
            problems.append("Phase 1 training stopped at its cap short of its converged share")
        solved = (rep.get("fixed_point") or {}).get("within_tolerance")
        if name == "val" and solved is not None and solved < SOLVED_FLOOR:
            problems.append(f"only {solved:.0%} of the val documents meet the carry-over condition c_0 = c_N")
    return problems


def remembers_less(val: dict | None, control: dict | None) -> str | None:
    """A warning when the val contexts remember no more than the untrained network's (memory share
    at most the control's): training then added no memory the control lacks."""
    mine = ((val or {}).get("memory") or {}).get("not_explained_by_token")
    theirs = ((control or {}).get("memory") or {}).get("not_explained_by_token")
    if mine is None or theirs is None or mine > theirs:
        return None
    return (
        f"the val contexts remember no more than the untrained network's ({mine:.1%} of their variance "
        f"beyond the current token, against {theirs:.1%})"
    )
