"""How much a context remembers: the share of the variance of c_t that the current token does not explain.

A memoryless map c_t = g(x_t) settles in one sweep and counts as "converged", so the converged share
cannot tell it from a recurrent one. Grouping the contexts by their current token x_t, the variance
within the groups is what c_t holds beyond x_t (all of it carried over from c_{t-1}); as a share of
the total it is 0 for any memoryless map and near 1 when the token barely matters. Both variances
are the unbiased ones (within: N - K degrees of freedom for K distinct tokens; total: N - 1), so
tokens seen once do not pass for memoryless ones. One streamed pass, V x C sums: bounded memory.
"""

from __future__ import annotations

import numpy as np

from newllm_cli.evaluation.analysis import ROWS, chunks


def token_share(contexts: np.ndarray, tokens: np.ndarray) -> dict:
    """The within-token share of the contexts' variance, over the rows of `contexts` and their
    tokens (`contexts[t]` the context after reading `tokens[t]`)."""
    tokens = np.asarray(tokens, np.int64)
    n, width = contexts.shape
    if n < 2:
        return {"not_explained_by_token": None, "rows": int(n), "distinct_tokens": int(len(np.unique(tokens)))}
    vocab = int(tokens.max()) + 1
    sums = np.zeros((vocab, width))
    total = np.zeros(width)
    square = 0.0
    for s, block in chunks(contexts, ROWS, "memory"):
        ids = tokens[s : s + len(block)]
        for j in range(width):
            sums[:, j] += np.bincount(ids, weights=block[:, j], minlength=vocab)
        total += block.sum(0)
        square += float((block * block).sum())
    counts = np.bincount(tokens, minlength=vocab)
    seen = counts > 0
    between = float(((sums[seen] ** 2).sum(1) / counts[seen]).sum())
    spread = square - float(total @ total) / n  # total sum of squares about the mean
    within = square - between
    kinds = int(seen.sum())
    share = (within / (n - kinds)) / (spread / (n - 1)) if n > kinds and spread > 0 else 0.0
    # sampling noise takes the unbiased ratio past 1 when the token explains nothing: that is 1
    return {"not_explained_by_token": float(min(share, 1.0)), "rows": int(n), "distinct_tokens": kinds}
