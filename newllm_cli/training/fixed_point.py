"""The carry-over condition, solved and checked: c_0 = c_N for every document.

With the weights fixed, a document's trajectory is a fixed point when c_t = f(x_t, c_{t-1}) for all
t and its starting context c_0 equals its last, c_N. The sequential pass makes the first condition
hold by construction, so the unknown is one C-vector per document: c_0 = F(c_0), F being one pass
over the document. Solvers (one signature, `SOLVERS[name](F, x0, tol, max_passes)`):
- plain: c_0 <- F(c_0), what the iterations of Phase 1 do;
- anderson: Anderson acceleration (type II, the last `m` differences; torchdeq's default solver),
  a small least-squares problem per document each pass.
Both stop a document once its relative residual |F(c_0) - c_0| / |F(c_0)| is within `tol` (it then
keeps its c_0), and report those that never get there, and whether they stalled (no progress over
the last passes: a cycle, chaos, or a fixed point too weakly attracting to reach).
`check` measures both conditions on saved contexts, from the contexts alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from newllm_cli.training.schemes import incoming_rows

Pass = Callable[[np.ndarray], np.ndarray]  # c_0 of every document (D x C, float32) -> each one's c_N


@dataclass
class SolveReport:
    passes: int  # evaluations of F
    converged: np.ndarray  # per document: within tol
    residual: np.ndarray  # per document: |F(c_0) - c_0| / |F(c_0)| at the last pass
    stalled: np.ndarray  # per unconverged document: the residual stopped falling

    def as_dict(self, tol: float) -> dict:
        failing = ~self.converged
        return {
            "tolerance": tol,
            "passes": self.passes,
            "documents": int(len(self.converged)),
            "within_tolerance": float(self.converged.mean()) if len(self.converged) else 1.0,
            "failing": int(failing.sum()),
            "stalled": int(self.stalled.sum()),
            "worst_residual": float(self.residual.max()) if len(self.residual) else 0.0,
        }


def _relative(g: np.ndarray, fx: np.ndarray) -> np.ndarray:
    return np.linalg.norm(g, axis=1) / np.maximum(np.linalg.norm(fx, axis=1), 1e-12)


STALL = 10  # passes without a new lowest residual that mark a document as stalled


def _alone(done: bool) -> bool:
    return done


def plain(
    F: Pass, x0: np.ndarray, tol: float, max_passes: int, everywhere: Callable[[bool], bool] = _alone
) -> tuple[np.ndarray, SolveReport]:
    return anderson(F, x0, tol, max_passes, m=0, everywhere=everywhere)


def anderson(
    F: Pass,
    x0: np.ndarray,
    tol: float,
    max_passes: int,
    m: int = 5,
    beta: float = 1.0,
    everywhere: Callable[[bool], bool] = _alone,
) -> tuple[np.ndarray, SolveReport]:
    """Anderson acceleration of x = F(x), each row (document) its own problem; m = 0 is plain
    iteration. The returned x is the last point F was evaluated at, so the trajectory written by
    that pass starts from it exactly. `everywhere(done)` is True when every rank of a job is done
    (so all stop after the same pass: each document's iterates are those of one process)."""
    x = np.asarray(x0, np.float32).copy()
    rows = len(x)
    done = np.zeros(rows, bool)
    best = np.full(rows, np.inf)
    since = np.zeros(rows, np.int64)
    xs: list[np.ndarray] = []
    gs: list[np.ndarray] = []
    residual = np.zeros(rows)
    before = np.full(rows, np.inf)  # each row's residual at the previous pass
    age = np.zeros(rows, np.int64)  # passes each row's history has been used since its last restart
    passes = 0
    for passes in range(1, max_passes + 1):
        fx = np.asarray(F(x), np.float64)
        g = fx - x
        residual = _relative(g, fx)
        done |= residual <= tol
        improved = residual < best
        best = np.where(improved, residual, best)
        since = np.where(improved, 0, since + 1)
        if everywhere(bool(done.all())) or passes == max_passes:
            break
        xs.append(x.astype(np.float64))
        gs.append(g)
        xs, gs = xs[-(m + 1) :], gs[-(m + 1) :]
        step = x + beta * g
        # safeguard: a row whose residual grew restarts, taking the plain step and forgetting its history
        safe = residual < before
        age = np.where(safe, age + 1, 0)
        before = residual
        if m and len(gs) > 1:
            dg = np.stack([b - a for a, b in zip(gs[:-1], gs[1:])], axis=2)  # D x C x k, oldest first
            dx = np.stack([b - a for a, b in zip(xs[:-1], xs[1:])], axis=2)
            k = dg.shape[2]
            recent = (np.arange(k)[None, :] >= k - np.minimum(age, k)[:, None])[:, None, :]  # since its restart
            dg, dx = dg * recent, dx * recent
            gram = np.einsum("dck,dcl->dkl", dg, dg)
            scale = np.maximum(np.trace(gram, axis1=1, axis2=2), 1e-300)[:, None, None]
            gram += 1e-10 * scale * np.eye(gram.shape[1])  # ridge: differences may be nearly parallel
            gamma = np.linalg.solve(gram, np.einsum("dck,dc->dk", dg, g)[..., None])[..., 0]
            step = np.where(safe[:, None], step - np.einsum("dck,dk->dc", dx + beta * dg, gamma), step)
        x = np.where(done[:, None], x, step).astype(np.float32)  # a solved document keeps its c_0
    stalled = ~done & (since >= STALL)
    return x, SolveReport(passes, done, residual, stalled)


SOLVERS: dict[str, Callable[..., tuple[np.ndarray, SolveReport]]] = {"plain": plain, "anderson": anderson}


@dataclass
class Check:
    relative: np.ndarray  # per document: |f(x_0, Q_N) - Q_0| / |Q_0|
    carry_max_abs: float  # largest element of those carry-over residuals
    interior_max_abs: float  # largest element of |f(x_t, Q_{t-1}) - Q_t| inside documents


def check(step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], table: torch.Tensor, tokens: np.ndarray,
          offsets: np.ndarray, contexts, chunk: int = 1 << 16) -> Check:  # fmt: skip
    """Both conditions on saved contexts Q, recomputed by one batched f: the carry-over residual
    |f(x_0, Q_N) - Q_0| at each document's start (Q_N: its own last row), the interior one
    |f(x_t, Q_{t-1}) - Q_t| elsewhere."""
    offsets = np.asarray(offsets, np.int64)
    starts = offsets[:-1][np.diff(offsets) > 0]
    c0 = contexts.gather(np.maximum(offsets[1:] - 1, 0)) if len(offsets) > 1 else np.zeros((0, contexts.shape[1]))
    carry_abs, carry_rel, interior = [0.0], [], 0.0
    with torch.no_grad():
        for s in range(0, len(tokens), chunk):
            e = min(s + chunk, len(tokens))
            q = contexts.read(s, e)
            ids = torch.as_tensor(np.asarray(tokens[s:e], dtype=np.int64), device=table.device)
            inc = torch.from_numpy(incoming_rows(contexts, s, e, offsets, c0)).to(table.device)
            r = step(table[ids], inc).cpu().numpy().astype(np.float64) - q
            first = np.isin(np.arange(s, e), starts)
            if first.any():
                carry_abs.append(float(np.abs(r[first]).max()))
                carry_rel.append(np.linalg.norm(r[first], axis=1) / np.maximum(np.linalg.norm(q[first], axis=1), 1e-12))
            if (~first).any():
                interior = max(interior, float(np.abs(r[~first]).max()))
    return Check(np.concatenate(carry_rel) if carry_rel else np.zeros(0), max(carry_abs), interior)


CONTRACTION_DOCS = 8  # documents sampled per split for dc_N/dc_0
CONTRACTION_TOKENS = 64  # tokens sampled per split for df/dc
CONTRACTION_LENGTH = 2048  # longest document whose whole pass is differentiated
CONTRACTION_WIDTH = 64  # above this C the Jacobians are not formed (C backward passes each)


def contraction(model, table: torch.Tensor, tokens: np.ndarray, offsets: np.ndarray, contexts,
                seed: int = 0) -> dict | None:  # fmt: skip
    """What decides whether iterating converges, at the saved contexts: the spectral radius and the
    largest singular value of J = dc_N/dc_0 (one pass over a sampled document, linearised at its
    saved c_0 = c_N), and the largest singular value of df/dc at sampled tokens. Plain iteration
    converges near a fixed point when the spectral radius is below 1; a slowly contracting map has it
    near 1. Exact Jacobians (C backward passes), so only for C <= CONTRACTION_WIDTH. `contexts`: an
    N x C array or RowStore (rows are sliced)."""
    width = contexts.shape[1]
    if width > CONTRACTION_WIDTH or len(tokens) == 0:
        return None
    offsets = np.asarray(offsets, np.int64)
    lengths = np.diff(offsets)
    rng = np.random.default_rng(seed)
    candidates = np.flatnonzero((lengths > 0) & (lengths <= CONTRACTION_LENGTH))
    docs = np.sort(rng.choice(candidates, size=min(CONTRACTION_DOCS, len(candidates)), replace=False))
    radius, norm = [], []
    for d in docs:
        a, b = int(offsets[d]), int(offsets[d + 1])
        emb = table[torch.as_tensor(np.asarray(tokens[a:b], dtype=np.int64), device=table.device)]
        c0 = torch.from_numpy(np.array(contexts[b - 1 : b][0], dtype=np.float32)).to(table.device)

        def one_pass(c: torch.Tensor, emb: torch.Tensor = emb) -> torch.Tensor:
            for x in emb:
                c = model.step(x, c)
            return c

        jac = torch.autograd.functional.jacobian(one_pass, c0).double()
        radius.append(float(torch.linalg.eigvals(jac).abs().max()))
        norm.append(float(torch.linalg.matrix_norm(jac, ord=2)))
    steps = []
    picks = np.sort(rng.choice(len(tokens), size=min(CONTRACTION_TOKENS, len(tokens)), replace=False))
    first = np.isin(picks, offsets[:-1])
    for t, starts in zip(picks, first):
        # c_{t-1}: the previous row, or at a document's start its own last one (c_0 = c_N)
        row = int(t) - 1 if not starts else int(offsets[np.searchsorted(offsets, t, side="right")]) - 1
        c = torch.from_numpy(np.array(contexts[row : row + 1][0], dtype=np.float32)).to(table.device)
        x = table[int(tokens[t])]
        jac = torch.autograd.functional.jacobian(lambda c, x=x: model.step(x, c), c).double()
        steps.append(float(torch.linalg.matrix_norm(jac, ord=2)))
    return {
        "documents": int(len(docs)),
        "pass_spectral_radius_median": float(np.median(radius)) if radius else None,
        "pass_spectral_radius_max": float(np.max(radius)) if radius else None,
        "pass_norm_max": float(np.max(norm)) if norm else None,
        "tokens": int(len(steps)),
        "step_norm_median": float(np.median(steps)) if steps else None,
        "step_norm_max": float(np.max(steps)) if steps else None,
    }
