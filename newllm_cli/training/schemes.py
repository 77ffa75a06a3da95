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

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from newllm_cli.model.network import ContextNetwork
from newllm_cli.model.recurrence import recur, shifted, token_input
from newllm_cli.store.rowstore import RowStore

NOISE_ROWS = 4096  # rows per seeded block of Gaussian rows: any chunking or world size reads the same


def gaussian_rows(key: tuple[int, ...], first: int, stop: int, width: int) -> np.ndarray:
    """Standard normal rows first..stop-1 (global) of an endless array seeded by `key`: drawn in
    blocks of NOISE_ROWS rows, each from its own seed, so a row's value depends on its index only."""
    parts = []
    for j in range(first // NOISE_ROWS, -(-stop // NOISE_ROWS)):
        block = np.random.default_rng([*key, j]).standard_normal((NOISE_ROWS, width), dtype=np.float32)
        a, b = max(first - j * NOISE_ROWS, 0), min(stop - j * NOISE_ROWS, NOISE_ROWS)
        parts.append(block[a:b])
    return np.concatenate(parts) if parts else np.zeros((0, width), np.float32)


@dataclass(frozen=True)
class Noise:
    """sigma * N(0, 1) added to the incoming contexts of training iteration `iteration` (both its
    passes read the same): a function of the seed, the iteration and the global row only."""

    sigma: float
    seed: int
    iteration: int
    first_row: int  # this rank's first global row

    def __call__(self, s: int, e: int, inc: torch.Tensor) -> torch.Tensor:
        rows = gaussian_rows((self.seed, 2, self.iteration), self.first_row + s, self.first_row + e, inc.shape[1])
        return inc + self.sigma * torch.from_numpy(rows).to(inc)


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
    perturb: Noise | None = None  # on the incoming contexts of a training iteration (parallel scheme)
    blocks: np.ndarray | None = None  # row bounds of the corpus's blocks here (distributed.py; None: one)

    def spans(self) -> Iterator[tuple[int, int]]:
        """(start, stop) of the row-wise chunks: within the corpus's blocks, so alike on every world size."""
        return block_chunks(np.array([0, len(self.tokens)]) if self.blocks is None else self.blocks, self.chunk)

    def recur(self, c0: np.ndarray, out: RowStore, advance: Advance) -> np.ndarray:
        """The recurrence over every document from c0 into `out`; each document's last context."""
        return recur(self.model, self.kernel, self.table, self.tokens, self.offsets, c0, out, self.window, advance)

    def inputs(self, s: int, e: int) -> torch.Tensor:
        """The token input of rows s..e (k tokens for a network that reads k)."""
        return token_input(self.table, self.tokens, self.offsets, np.arange(s, e), self.model.input_tokens)


Advance = Callable[[int], None]


def block_chunks(bounds: Sequence[int] | np.ndarray, chunk: int) -> Iterator[tuple[int, int]]:
    """(start, stop) of chunks of at most `chunk` rows from each block's start, none across a bound.
    The blocks and the chunk size depend on the corpus alone, so every world size (distributed.py)
    takes the same float32 partial sums; one process with the same --threads gets identical bits."""
    for a, b in zip(bounds[:-1], bounds[1:]):
        for s in range(int(a), int(b), chunk):
            yield s, min(s + chunk, int(b))


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
    return problem.recur(c0, out, advance), out


def parallel(
    problem: Problem, prev: RowStore | None, c0: np.ndarray, out: RowStore, advance: Advance
) -> tuple[np.ndarray, RowStore | None]:
    p, device = problem, problem.table.device
    with torch.no_grad():
        for s, e in p.spans():
            inc = torch.from_numpy(incoming_rows(prev, s, e, p.offsets, c0)).to(device)
            if p.perturb is not None:
                inc = p.perturb(s, e, inc)
            out.write(s, p.model.step(p.inputs(s, e), inc).cpu().numpy())
            advance(e - s)
    return out.gather(p.offsets[1:] - 1), prev


SCHEMES: dict[str, Scheme] = {"sequential": sequential, "parallel": parallel}
