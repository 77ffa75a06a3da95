"""Per-dimension mean and spread merged over chunks and ranks, without cancellation."""

from __future__ import annotations


def merge_moments(part: tuple | None, n: int, mean, m2) -> tuple:
    """Chan's pairwise merge of (rows, mean, sum of squared deviations) of rows seen so far (`part`,
    None at first) with n more rows: no cancellation, however many chunks. m2 is per dimension (a
    vector) or a scatter matrix; numpy arrays and torch tensors alike."""
    if part is None:
        return n, mean, m2
    seen, seen_mean, seen_m2 = part
    total = seen + n
    delta = mean - seen_mean
    spread = delta[:, None] * delta[None, :] if m2.ndim == 2 else delta * delta
    return total, seen_mean + delta * (n / total), seen_m2 + m2 + spread * (seen * n / total)
