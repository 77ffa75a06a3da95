"""The carry-over condition, solved and checked: c_0 = c_N for every document.

With the weights fixed, a document's trajectory is a fixed point when c_t = f(x_t, c_{t-1}) for all
t and its starting context c_0 equals its last, c_N. The sequential pass makes the first condition
hold by construction, so the unknown is one C-vector per document: c_0 = F(c_0), F being one pass
over the document. Solvers (one signature, `SOLVERS[name](F, x0, tol, max_passes)`):
- plain: c_0 <- F(c_0), what the iterations of Phase 1 do;
- anderson: Anderson acceleration (type II, the last `m` differences; torchdeq's default solver),
  a small least-squares problem per document each pass.
Both stop a document once its relative residual |F(c_0) - c_0| / |F(c_0)| is within `tol` (it then
keeps its c_0), and report those that never get there: whether they stalled (no progress over the
last passes: a cycle, chaos, or a fixed point too weakly attracting to reach), and whether their
iterates repeat with a short period (a cycle).
`check` measures both conditions on saved contexts, from the contexts alone.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from newllm_cli.model.recurrence import token_input
from newllm_cli.training.schemes import incoming_rows

Pass = Callable[[np.ndarray], np.ndarray]  # c_0 of every document (D x C, float32) -> each one's c_N


@dataclass
class SolveReport:
    passes: int  # evaluations of F
    converged: np.ndarray  # per document: within tol
    residual: np.ndarray  # per document: |F(c_0) - c_0| / |F(c_0)| at the last pass
    stalled: np.ndarray  # per unconverged document: the residual stopped falling (then frozen at its best)
    period: np.ndarray  # per document: p when its iterates repeated with period p (2..PERIOD) at the stall, else 0
    solved_at: np.ndarray  # per document: the pass that brought it within tol (0: none)

    def as_dict(self, tol: float) -> dict:
        failing = ~self.converged
        return {
            "tolerance": tol,
            "passes": self.passes,
            "documents": int(len(self.converged)),
            "within_tolerance": float(self.converged.mean()) if len(self.converged) else 1.0,
            "failing": int(failing.sum()),
            "stalled": int(self.stalled.sum()),
            "cycling": int((self.period > 0).sum()),
            "periods": sorted({int(p) for p in self.period if p}),
            "worst_residual": float(self.residual.max()) if len(self.residual) else 0.0,
            "solved_at_median": float(np.median(self.solved_at[self.converged])) if self.converged.any() else None,
            "solved_at_max": int(self.solved_at.max()) if len(self.solved_at) else 0,
            "failing_residual_median": float(np.median(self.residual[failing])) if failing.any() else 0.0,
        }


def _relative(g: np.ndarray, fx: np.ndarray) -> np.ndarray:
    return np.linalg.norm(g, axis=1) / np.maximum(np.linalg.norm(fx, axis=1), 1e-12)


STALL = 25  # passes without a new lowest residual that mark a document as stalled
PERIOD = 4  # longest cycle of the iterates looked for at a stall
REPEAT = 1e-3  # relative distance under which two iterates count as the same point


def _alone(done: bool) -> bool:
    return done


def _period(recent: list[np.ndarray], rows: np.ndarray) -> np.ndarray:
    """For each of `rows`: the smallest p in 2..PERIOD with x_k = x_{k-p} (within REPEAT, relative)
    for the last p iterates, 0 when none (`recent`: the last iterates, oldest first)."""
    found = np.zeros(len(rows), np.int64)
    if not len(rows):
        return found
    hist = np.stack([r[rows] for r in recent], axis=0).astype(np.float64)  # k x d x C
    for p in range(PERIOD, 1, -1):  # smallest last
        if len(hist) < 2 * p:
            continue
        gap = np.linalg.norm(hist[-p:] - hist[-2 * p : -p], axis=2).max(axis=0)
        size = np.maximum(np.linalg.norm(hist[-p:], axis=2).max(axis=0), 1e-12)
        found = np.where(gap <= REPEAT * size, p, found)
    return found


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
    iteration. A row within `tol` keeps its x from then on; a row that stalls (no new lowest residual
    in STALL passes: a cycle, chaos, or a fixed point too weakly attracting to reach) goes back to
    the x of its lowest residual and stays there, so hopeless rows do not hold the solve to its cap.
    The returned x is the last point F was evaluated at, so the trajectory written by that pass
    starts from it exactly. `everywhere(done)` is True when every rank of a job is done (so all
    stop after the same pass: each document's iterates are those of one process)."""
    x = np.asarray(x0, np.float32).copy()
    rows = len(x)
    done = np.zeros(rows, bool)
    frozen = np.zeros(rows, bool)  # stalled, and set back to its best x
    period = np.zeros(rows, np.int64)
    solved_at = np.zeros(rows, np.int64)
    best = np.full(rows, np.inf)
    best_x = x.copy()
    since = np.zeros(rows, np.int64)
    xs: list[np.ndarray] = []
    gs: list[np.ndarray] = []
    recent: list[np.ndarray] = []  # the last 2 * PERIOD iterates, for the cycle check
    residual = np.zeros(rows)
    before = np.full(rows, np.inf)  # each row's residual at the previous pass
    age = np.zeros(rows, np.int64)  # passes each row's history has been used since its last restart
    passes = 0
    for passes in range(1, max_passes + 1):
        settled = frozen.copy()  # evaluated at their best x in this pass
        fx = np.asarray(F(x), np.float64)
        g = fx - x
        residual = _relative(g, fx)
        solved_at = np.where(~done & ~frozen & (residual <= tol), passes, solved_at)
        done |= ~frozen & (residual <= tol)
        improved = residual < best
        best_x = np.where((improved & ~frozen)[:, None], x, best_x)
        best = np.where(improved, residual, best)
        since = np.where(improved, 0, since + 1)
        recent = (recent + [x.copy()])[-2 * PERIOD :]
        stalls = ~done & ~frozen & (since >= STALL)
        if stalls.any():
            period[stalls] = _period(recent, np.flatnonzero(stalls))
            frozen |= stalls
        if everywhere(bool((done | settled).all())) or passes == max_passes:
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
            recent_k = (np.arange(k)[None, :] >= k - np.minimum(age, k)[:, None])[:, None, :]  # since its restart
            dg, dx = dg * recent_k, dx * recent_k
            gram = np.einsum("dck,dcl->dkl", dg, dg)
            scale = np.maximum(np.trace(gram, axis1=1, axis2=2), 1e-300)[:, None, None]
            gram += 1e-10 * scale * np.eye(gram.shape[1])  # ridge: differences may be nearly parallel
            gamma = np.linalg.solve(gram, np.einsum("dck,dc->dk", dg, g)[..., None])[..., 0]
            step = np.where(safe[:, None], step - np.einsum("dck,dk->dc", dx + beta * dg, gamma), step)
        x = np.where(done[:, None], x, np.where(frozen[:, None], best_x, step)).astype(np.float32)
    return x, SolveReport(passes, done, residual, frozen, period, solved_at)


def from_zero(
    F: Pass, x0: np.ndarray, tol: float, max_passes: int, everywhere: Callable[[bool], bool] = _alone
) -> tuple[np.ndarray, SolveReport]:
    """Every document starts from c_0 = 0 (--phase1-start zero): its contexts are one pass from
    zeros, exactly, so there is nothing to iterate."""
    x = np.zeros_like(np.asarray(x0, np.float32))
    F(x)
    n = len(x)
    return x, SolveReport(
        1, np.ones(n, bool), np.zeros(n), np.zeros(n, bool), np.zeros(n, np.int64), np.ones(n, np.int64)
    )


SOLVERS: dict[str, Callable[..., tuple[np.ndarray, SolveReport]]] = {"plain": plain, "anderson": anderson}


@dataclass
class Check:
    relative: np.ndarray  # per document: |f(x_0, Q_N) - Q_0| / |Q_0|
    carry_max_abs: float  # largest element of those carry-over residuals
    interior_max_abs: float  # largest element of |f(x_t, Q_{t-1}) - Q_t| inside documents


def check(step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], table: torch.Tensor, tokens: np.ndarray,
          offsets: np.ndarray, contexts, spans=None, k: int = 1,
          zero_start: bool = False) -> Check:  # fmt: skip
    """Both conditions on saved contexts Q, recomputed by one batched f: the carry-over residual
    |f(x_0, Q_N) - Q_0| at each document's start (Q_N: its own last row; 0 with `zero_start`), the
    interior one |f(x_t, Q_{t-1}) - Q_t| elsewhere."""
    offsets = np.asarray(offsets, np.int64)
    starts = offsets[:-1][np.diff(offsets) > 0]
    c0 = (
        contexts.gather(np.maximum(offsets[1:] - 1, 0))
        if len(offsets) > 1 and not zero_start
        else np.zeros((max(len(offsets) - 1, 0), contexts.shape[1]), np.float32)
    )
    carry_abs, carry_rel, interior = [0.0], [], 0.0
    with torch.no_grad():
        if spans is None:
            spans = [(a, min(a + (1 << 16), len(tokens))) for a in range(0, len(tokens), 1 << 16)]
        for s, e in spans:
            q = contexts.read(s, e)
            inc = torch.from_numpy(incoming_rows(contexts, s, e, offsets, c0)).to(table.device)
            r = step(token_input(table, tokens, offsets, np.arange(s, e), k), inc).cpu().numpy().astype(np.float64) - q
            first = np.isin(np.arange(s, e), starts)
            if first.any():
                carry_abs.append(float(np.abs(r[first]).max()))
                carry_rel.append(np.linalg.norm(r[first], axis=1) / np.maximum(np.linalg.norm(q[first], axis=1), 1e-12))
            if (~first).any():
                interior = max(interior, float(np.abs(r[~first]).max()))
    return Check(np.concatenate(carry_rel) if carry_rel else np.zeros(0), max(carry_abs), interior)


CONTRACTION_DOCS = 8  # documents sampled per split for dc_N/dc_0
CONTRACTION_TOKENS = 64  # tokens sampled per split for df/dc
CONTRACTION_LENGTH = 2048  # longest document whose pass is linearised
CONTRACTION_WIDTH = 64  # up to this C the Jacobians are formed; above, power iteration with JVPs
POWER_STEPS = 30  # power iterations above CONTRACTION_WIDTH
POWER_LENGTH = 512  # longest document for power iteration: its cost is one batched call per token and step
CHUNK = 256  # tokens per batched Jacobian call


def _jvp(step, tok: torch.Tensor, ctx: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """df/dc v at each row's (tok, ctx): one batched forward-mode call."""
    return torch.func.jvp(lambda c: step(tok, c), (ctx,), (v,))[1]


def _step_jacobians(step, tok: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
    """df/dc at each of the L rows (tok_t, ctx_t), L x C x C in float64: the C unit tangents of every
    row go through one batched JVP per chunk (f works on any batch shape)."""
    width = ctx.shape[-1]
    eye = torch.eye(width, dtype=ctx.dtype, device=ctx.device)
    out = []
    for s in range(0, len(ctx), CHUNK):
        c, x = ctx[s : s + CHUNK], tok[s : s + CHUNK]
        rep = c[:, None, :].repeat(1, width, 1)  # copies: forward-mode AD writes into its inputs' duals
        cols = _jvp(step, x[:, None, :].repeat(1, width, 1), rep, eye.repeat(len(c), 1, 1))
        out.append(cols.transpose(1, 2).double())  # row k of cols is J e_k: column k of J
    return torch.cat(out)


def _pass_radius_power(model, toks: list[torch.Tensor], ctxs: list[torch.Tensor], seed: int) -> list[float]:
    """Spectral radius of each document's J = J_N ... J_1 by power iteration, documents in lockstep:
    the mean growth of |J^k v| per pass over the last third of POWER_STEPS (a dominant complex pair
    makes single passes oscillate, their mean does not). Each J_t v is a central difference of f in
    float64 (a copy of the network), v renormalised after every step and its growth summed in logs,
    so neither a long document nor a torch.func call per token (milliseconds each) costs much."""
    net = copy.deepcopy(model).double()
    h = 1e-6
    lengths = torch.tensor([len(x) for x in toks])
    longest, width = int(lengths.max()), ctxs[0].shape[1]
    tok = torch.zeros((len(toks), longest, toks[0].shape[1]), dtype=torch.float64, device=ctxs[0].device)
    ctx = torch.zeros((len(toks), longest, width), dtype=torch.float64, device=ctxs[0].device)
    for d, (x, c) in enumerate(zip(toks, ctxs)):
        tok[d, : len(x)], ctx[d, : len(c)] = x, c
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn((len(toks), width), generator=gen, dtype=torch.float64).to(ctx.device)
    v = v / v.norm(dim=1, keepdim=True)
    growth = []
    for _ in range(POWER_STEPS):
        logs = torch.zeros(len(toks), dtype=torch.float64, device=ctx.device)
        for t in range(longest):
            on = (lengths > t).to(ctx.device)
            x, c = tok[:, t], ctx[:, t]
            jv = (net.step(x, c + h * v) - net.step(x, c - h * v)) / (2 * h)
            size = jv.norm(dim=1).clamp_min(1e-300)
            logs = torch.where(on, logs + size.log(), logs)
            v = torch.where(on[:, None], jv / size[:, None], v)
        growth.append(logs)
    return [float(r) for r in torch.stack(growth[2 * POWER_STEPS // 3 :]).mean(0).exp()]


def _norms_power(step, tok: torch.Tensor, ctx: torch.Tensor, seed: int) -> torch.Tensor:
    """Largest singular value of df/dc at each row: power iteration on J^T J (a JVP, then a VJP)."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(ctx.shape, generator=gen).to(ctx)
    pull = torch.func.vjp(lambda c: step(tok, c), ctx)[1]
    for _ in range(POWER_STEPS):
        u = u / u.norm(dim=1, keepdim=True).clamp_min(1e-300)
        u = pull(_jvp(step, tok, ctx, u))[0]
    return u.norm(dim=1).double().sqrt()


def _scaled(value: float, log_scale: float) -> float:
    """value * exp(log_scale), capped at e^700 (past that, any figure says "diverges")."""
    return math.exp(min(math.log(value) + log_scale, 700.0)) if value > 0 else 0.0


def contraction(model, table: torch.Tensor, tokens: np.ndarray, offsets: np.ndarray, contexts,
                seed: int = 0) -> dict | None:  # fmt: skip
    """What decides whether iterating converges, linearised at the saved contexts: the spectral
    radius and the largest singular value of J = dc_N/dc_0 (one pass over a sampled document from
    its c_0 = c_N: the product of the step Jacobians along its rows), and the largest singular value
    of df/dc at sampled tokens. Plain iteration converges near a fixed point when the spectral
    radius is below 1; a slowly contracting map has it near 1. Up to CONTRACTION_WIDTH the
    Jacobians are formed; above, power iteration gives the radius and the step norms (no pass norm).
    `contexts`: an N x C array or RowStore (rows are sliced)."""
    if len(tokens) == 0:
        return None
    exact = contexts.shape[1] <= CONTRACTION_WIDTH
    offsets = np.asarray(offsets, np.int64)
    lengths = np.diff(offsets)
    rng = np.random.default_rng(seed)
    candidates = np.flatnonzero((lengths > 0) & (lengths <= (CONTRACTION_LENGTH if exact else POWER_LENGTH)))
    docs = np.sort(rng.choice(candidates, size=min(CONTRACTION_DOCS, len(candidates)), replace=False))

    def incoming(a: int, b: int) -> torch.Tensor:  # c_{t-1} of rows a..b-1: c_0 = c_N, then the saved rows
        rows = np.asarray(contexts[a:b], np.float32)
        return torch.from_numpy(np.concatenate([rows[-1:], rows[:-1]])).to(table.device)

    def embedded(a: int, b: int) -> torch.Tensor:
        return token_input(table, tokens, offsets, np.arange(a, b), model.input_tokens)

    step = model.step
    radius, norm = [], []
    with torch.no_grad():
        spans = [(int(offsets[d]), int(offsets[d + 1])) for d in docs]
        if exact:
            for a, b in spans:
                jac = torch.eye(contexts.shape[1], dtype=torch.float64, device=table.device)
                scale = 0.0  # log of the factor taken out of the product, so a long pass cannot overflow
                for j in _step_jacobians(step, embedded(a, b), incoming(a, b)):
                    jac = j @ jac
                    size = float(jac.abs().max())
                    if not math.isfinite(size) or size == 0:
                        break
                    jac, scale = jac / size, scale + math.log(size)
                if not bool(torch.isfinite(jac).all()):
                    continue  # contexts too large for a finite Jacobian: no figure for this document
                radius.append(_scaled(float(torch.linalg.eigvals(jac).abs().max()), scale))
                norm.append(_scaled(float(torch.linalg.matrix_norm(jac, ord=2)), scale))
        elif spans:
            radius = _pass_radius_power(model, [embedded(*s) for s in spans], [incoming(*s) for s in spans], seed)
        picks = np.sort(rng.choice(len(tokens), size=min(CONTRACTION_TOKENS, len(tokens)), replace=False))
        # c_{t-1}: the previous row, or at a document's start its own last one (c_0 = c_N)
        ends = offsets[np.searchsorted(offsets, picks, side="right")] - 1
        prev = np.where(np.isin(picks, offsets[:-1]), ends, picks - 1)
        rows = np.stack([np.asarray(contexts[r : r + 1][0], np.float32) for r in prev])
        ctx = torch.from_numpy(rows).to(table.device)
        tok = token_input(table, tokens, offsets, picks, model.input_tokens)
        if exact:
            jacs = _step_jacobians(step, tok, ctx)
            steps = torch.linalg.matrix_norm(jacs[torch.isfinite(jacs).flatten(1).all(1)], ord=2)
        else:
            with torch.enable_grad():
                steps = _norms_power(step, tok, ctx, seed)
    steps_list = [float(s) for s in steps.detach() if math.isfinite(float(s))]
    radius, norm = [r for r in radius if math.isfinite(r)], [n for n in norm if math.isfinite(n)]
    return {
        "method": "jacobian" if exact else f"power iteration ({POWER_STEPS} steps)",
        "documents": int(len(docs)),
        "pass_spectral_radius_median": float(np.median(radius)) if radius else None,
        "pass_spectral_radius_max": float(np.max(radius)) if radius else None,
        "pass_norm_max": float(np.max(norm)) if norm else None,
        "tokens": int(len(steps_list)),
        "step_norm_median": float(np.median(steps_list)) if steps_list else None,
        "step_norm_max": float(np.max(steps_list)) if steps_list else None,
    }
