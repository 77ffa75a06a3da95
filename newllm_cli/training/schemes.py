"""Iteration schemes of the Phase 1 fixed-point solve: how one iteration computes Q from P.

One signature, `scheme(problem, prev, c0, out, advance) -> (last, trajectory)`: `out` receives Q,
one row per token; `last` holds each document's final context (the next iteration's c_0: the
carry-over); `trajectory` holds the rows each token's incoming context is read from, shifted by
one inside each document, which the gradient pass reads again.
- sequential (Gauss-Seidel): Q is the recurrence itself, run from c_0 = P_N without autograd, so
  each token reads Q's own previous row;
- parallel (Jacobi): Q = f(x, shift(P)), one batched call per chunk; each token reads P's row (zeros
  in the first iteration, when there is no P yet).
A new scheme is one `SCHEMES[name] = function` here (and the name in Phase1Settings.scheme).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from newllm_cli.model.network import ContextNetwork
from newllm_cli.model.recurrence import recur, shifted
from newllm_cli.store.rowstore import RowStore


@dataclass(frozen=True)
class Problem:
    """What every iteration of one solve reads: this rank's documents and the network."""

    model: ContextNetwork
    kernel: str  # recurrence kernel (model/recurrence.py)
    table: torch.Tensor  # LayerNorm(Emb(v)) per vocabulary entry
    tokens: np.ndarray
    offsets: np.ndarray  # document bounds, local to this rank
    window: int  # rows per recurrence window
    chunk: int  # rows per batched chunk


Advance = Callable[[int], None]
Scheme = Callable[[Problem, RowStore | None, np.ndarray, RowStore, Advance], tuple[np.ndarray, RowStore | None]]


def incoming_rows(traj: RowStore | None, s: int, e: int, offsets: np.ndarray, c0: np.ndarray) -> np.ndarray:
    """The context each token of rows s..e reads: traj shifted by one inside each document, c0 at
    each start (zeros when there is no trajectory yet: the Jacobi scheme's first iteration)."""
    if traj is None:
        return np.zeros((e - s, c0.shape[1]), np.float32)
    first, last = np.searchsorted(offsets[:-1], [s, e], side="left")
    before = traj.read(s - 1, s)[0] if s > 0 else None
    return shifted(traj.read(s, e), before, offsets[first:last] - s, c0[first:last])


def sequential(
    problem: Problem, prev: RowStore | None, c0: np.ndarray, out: RowStore, advance: Advance
) -> tuple[np.ndarray, RowStore | None]:
    p = problem
    last = recur(p.model, p.kernel, p.table, p.tokens, p.offsets, c0, out, p.window, advance)
    return last, out


def parallel(
    problem: Problem, prev: RowStore | None, c0: np.ndarray, out: RowStore, advance: Advance
) -> tuple[np.ndarray, RowStore | None]:
    p, device = problem, problem.table.device
    with torch.no_grad():
        for s, e in out.chunks(p.chunk):
            ids = torch.as_tensor(np.asarray(p.tokens[s:e], dtype=np.int64), device=device)
            inc = torch.from_numpy(incoming_rows(prev, s, e, p.offsets, c0)).to(device)
            out.write(s, p.model.step(p.table[ids], inc).cpu().numpy())
            advance(e - s)
    return out.gather(p.offsets[1:] - 1), prev


SCHEMES: dict[str, Scheme] = {"sequential": sequential, "parallel": parallel}
