"""Phase 1, CVFP (docs/ARCHITECTURE.md): one loop for training and validation.

A solve is a loop over a state (SolveState: the previous contexts P, each document's last context,
the store for Q), one iteration at a time (Solver.iteration), until a stop rule (_stop_reason):
- the scheme of schemes.py computes Q from P (sequential: the recurrence from c_0 = P_N, the
  carry-over; parallel: Q = f(x, shift(P)));
- Q is compared with P in one pass (objectives.Comparison): losses, residual, converged share;
- training takes one Adam step on the objective of objectives.py. Incoming contexts are detached,
  so that gradient is exactly the gradient of one batched f over (x_t, incoming_t); dL/dQ follows
  in closed form from the whole-corpus statistics, and a second pass back-propagates it through f
  chunk by chunk: memory stays within a budget at any corpus size (MemoryPlan).
The saved contexts are always those of the saved weights: no step follows the last iteration, and
training that ends unconverged is followed by a second solve without updates.
In a distributed job each rank runs its shard of the documents; the statistics are merged across
ranks and the gradients summed, so every rank takes the same step as one process would.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypedDict

import numpy as np
import torch

from newllm_cli.model.architectures import compiled
from newllm_cli.model.network import ContextNetwork
from newllm_cli.model.recurrence import choose_kernel, embedding_table, token_input
from newllm_cli.runtime import interrupt
from newllm_cli.runtime.distributed import SOLO, Group, Shard
from newllm_cli.runtime.errors import Interrupted, NumericalError, UsageError
from newllm_cli.runtime.progress import progress, warn
from newllm_cli.settings import Phase1Settings
from newllm_cli.store.resume import BadResume
from newllm_cli.store.rowstore import Part, RowStore, save_rows
from newllm_cli.training import fixed_point
from newllm_cli.training.adam import Adam
from newllm_cli.training.objectives import TERMS, Comparison, diversity_weight, loss_gradient, needs_scatter
from newllm_cli.training.schemes import SCHEMES, Noise, Problem, block_chunks, gaussian_rows, incoming_rows

CHUNK = 65536  # most rows per statistics / gradient chunk: larger ones gain nothing measurable


def learning_rate(k: int, cfg: Phase1Settings) -> float:
    """By 0-based iteration index: k <= 3 warm-up, k <= 8 medium, then fine-tune."""
    return cfg.lr_warmup if k <= 3 else cfg.lr_medium if k <= 8 else cfg.lr_finetune


WORKING_SPACE = 1 << 28  # bytes for one statistics / gradient chunk's autograd state: fixed, not part of
# --memory-budget, because the chunk decides how float32 partial sums are grouped, and results must not
# depend on the budget (a budget only moves corpus-sized stores between memory and files)


@dataclass(frozen=True)
class MemoryPlan:
    """How Phase 1 fits its budget: contexts in memory or in files, and the rows handled at once."""

    in_memory: bool
    window: int  # rows per recurrence window
    chunk: int  # rows per statistics / gradient / Jacobi chunk: from the model alone


def plan_memory(tokens: int, model: ContextNetwork, budget: int) -> MemoryPlan:
    """Two N x C stores stay in memory when they take at most half the budget; recurrence windows take
    what is left of it. Chunks of the row-wise passes get WORKING_SPACE whatever the budget, so a
    budget never changes a result's bits. Per-row costs are estimates of what torch keeps alive
    (autograd's saved activations in the gradient pass; ids and outputs in a recurrence pass)."""
    C, E = model.context_dim, model.embed_dim
    depth = sum(isinstance(m, torch.nn.Linear) for m in model.blocks.modules())
    stores = 2 * tokens * C * 4
    in_memory = stores <= budget // 2
    free = max(budget - (stores if in_memory else 0) - model.embed.num_embeddings * E * 4, budget // 4)
    per_row_grad = 4 * (E + 6 * C + (3 * depth + 6 * len(model.blocks)) * (C + E))
    per_row_pass = 24 + 12 * C
    return MemoryPlan(
        in_memory,
        window=int(np.clip(free // (2 * per_row_pass), 1024, 1 << 20)),
        chunk=int(np.clip(WORKING_SPACE // per_row_grad, 256, CHUNK)),
    )


def accumulate_gradient(
    model: ContextNetwork,
    table: torch.Tensor,
    tokens: np.ndarray,
    offsets: np.ndarray,
    traj: RowStore | None,
    c0: np.ndarray,
    q: RowStore,
    p: RowStore,
    stats: Comparison,
    cfg: Phase1Settings,
    chunk: int,
    advance: Callable[[int], None] = lambda n: None,
    blocks: np.ndarray | None = None,
    first_row: int = 0,
    perturb: Noise | None = None,
) -> dict[str, torch.Tensor]:
    """d loss(Q, P) / d weights over these rows, per parameter name, in float64: Q = f(x, incoming.detach())
    recomputed chunk by chunk, each chunk back-propagating its rows of the closed-form dL/dQ. Rows
    go in `blocks` (row bounds; one block when None): float32 sums inside a block, float64 across
    blocks, so ranks cut between blocks add up to what one process gets (set_gradients).
    `first_row`: the global index of row 0 (batched terms); `perturb`: the noise the pass that
    computed Q added to the incoming contexts."""
    device = table.device
    bounds = np.array([0, len(q)]) if blocks is None else blocks
    sums: dict[str, torch.Tensor] = {}
    for block in zip(bounds[:-1], bounds[1:]):
        for s, e in block_chunks(block, chunk):
            x = token_input(table, tokens, offsets, np.arange(s, e), model.input_tokens)
            inc = torch.from_numpy(incoming_rows(traj, s, e, offsets, c0)).to(device)
            if perturb is not None:
                inc = perturb(s, e, inc)
            q_rows, p_rows = (torch.from_numpy(store.read(s, e)).to(device) for store in (q, p))
            grad = loss_gradient(q_rows, p_rows, stats, cfg, first_row + s)
            # sum(f * g) has gradient g with respect to f exactly; backward(g) would be the same but
            # imports torch's symbolic-shapes machinery (sympy) on first use, 0.5 s per command
            (model.step(x, inc) * grad).sum().backward()
            advance(e - s)
        for name, prm in model.named_parameters():
            if prm.grad is not None:
                sums[name] = prm.grad.double() if name not in sums else sums[name].add_(prm.grad)
                prm.grad = None
    return sums


def set_gradients(model: ContextNetwork, sums: dict[str, torch.Tensor], group: Group = SOLO) -> None:
    """.grad = every rank's float64 sums added up, rounded once to float32. The per-rank sums are
    over their own rows of a loss normalised by the global token count, so this is exactly the
    gradient of one process. A parameter with no gradient on any rank keeps none (Adam skips it)."""
    params = dict(model.named_parameters())
    used = [name for name, u in zip(params, group.any(*(name in sums for name in params))) if u]
    if not used:
        return
    flat = group.sum(
        torch.cat(
            [
                sums[n].reshape(-1)
                if n in sums
                else torch.zeros(params[n].numel(), dtype=torch.float64, device=params[n].device)
                for n in used
            ]
        )
    )
    for name, g in zip(used, flat.split([params[n].numel() for n in used])):
        params[name].grad = g.view_as(params[name]).to(params[name].dtype)


class SolveInfo(TypedDict):
    """How close the saved contexts are to a fixed point, whichever scheme solved it (the
    shape of torchdeq's solver info): over every token of the last iteration, the RMS change per
    element ||Q - P|| / sqrt(N C), the same relative to ||Q||, iterations run, converged share. For
    a solve of the carry-over, the same over documents of c_N - c_0 (relative to ||c_N||), passes, and
    the share of tokens in documents within the tolerance."""

    abs_residual: float | None
    rel_residual: float | None
    steps: int
    converged_ratio: float | None


@dataclass
class CVFPResult:
    contexts: RowStore  # this rank's rows (all of them in one process)
    shard: Shard | None = None
    group: Group = SOLO
    history: list[dict] = field(default_factory=list)
    optimizer_steps: int = 0
    stopped_by: str = ""
    warnings: list[str] = field(default_factory=list)
    solve: list[dict] = field(default_factory=list)  # no-update iterations after unconverged training
    info: SolveInfo | None = None  # of the saved contexts
    fixed_point: dict = field(default_factory=dict)  # both fixed-point conditions checked on them (carry_over)
    solve_report: dict = field(default_factory=dict)  # a solve to --fixed-point-tol: documents within, failing

    @property
    def converged_ratio(self) -> float | None:
        """Of the saved contexts: after the no-update solve when training ended unconverged."""
        last = (self.solve or self.history or [{"converged_ratio": None}])[-1]
        return last["converged_ratio"]

    def save_contexts(self, path: Path) -> Path:
        """The contexts as one .npy (every rank writes its rows; one process renames its file)."""
        assert self.shard is not None
        return save_rows(self.contexts, path, self.shard, self.group)

    @property
    def residual(self) -> float | None:
        """Mean squared change of the saved contexts in their last iteration: distance from a fixed point."""
        last = (self.solve or self.history or [{"residual": None}])[-1]
        return last["residual"]


DEFAULT_BUDGET = 1 << 30


@dataclass
class SolveState:
    """Where one solve stands; it owns its two row stores (this iteration's `q` and the previous
    one's `prev`) until `hand_over` gives `prev` to the caller. Leaving its `with` block on an
    error closes both."""

    prev: RowStore | None  # P: the previous iteration's contexts (None before the first)
    last: np.ndarray  # each document's final context in P: the next iteration's c_0
    q: RowStore  # where the next iteration writes Q
    next: int = 0  # 0-based index of the next iteration
    history: list[dict] = field(default_factory=list)
    optimizer_steps: int = 0
    stopped_by: str = ""
    info: SolveInfo | None = None

    def swap(self, last: np.ndarray, spare: RowStore) -> None:
        """Q becomes P; the old P (or a fresh store, the first time) takes the next Q."""
        self.prev, self.last, self.q = self.q, last, spare

    def hand_over(self) -> RowStore:
        """The previous contexts leave the state (to the result, or to a resume point)."""
        prev, self.prev = self.prev, None
        assert prev is not None, "no iteration has run"
        return prev

    def close(self) -> None:
        for store in (self.q, self.prev):
            if store is not None:
                store.close()

    def __enter__(self) -> SolveState:
        return self

    def __exit__(self, kind, error, trace) -> None:
        if kind is not None:
            self.close()


@dataclass
class Solver:
    """One solve's fixed parts: the documents and network (`problem`), this rank's shard, memory,
    how to report, and for training the optimizer."""

    problem: Problem
    cfg: Phase1Settings
    shard: Shard
    group: Group
    directory: Path | None  # where corpus-sized stores go (None: in memory)
    optimizer: Adam | None = None  # None: no updates (validation, the final solve)
    label: str = "phase1"
    on_iteration: Callable[[dict], None] | None = None
    save_resume: Callable[[dict, str], None] | None = None
    save_every: float = 0.0
    report: dict = field(default_factory=dict)  # of a solve to --fixed-point-tol
    seed: int = 0  # of a random iteration 0 and of the noise

    @property
    def rows(self) -> int:
        return len(self.problem.tokens)

    def store(self) -> RowStore:
        return RowStore(self.rows, self.problem.model.context_dim, self.directory, "contexts")

    def run(self, state: SolveState) -> None:
        """Iterate from `state` until the stop rule says so (or Ctrl-C: a resume point, then
        Interrupted). Afterwards `state.prev` holds the last iteration's contexts."""
        points = interrupt.SavePoints(self.save_every, self.group)
        for k in range(state.next, self.cfg.max_iterations):
            start = time.perf_counter()
            record, reason = self.iteration(k, state)
            record["seconds"] = time.perf_counter() - start
            state.history.append(record)
            if self.on_iteration:
                self.on_iteration(record)
            state.next = k + 1
            if reason is not None:
                state.stopped_by = reason
                return
            if self.save_resume is not None:
                stop, save = points.poll()
                if save:
                    self.save_resume(self.resume_point(state, keep=not stop), str(k + 1))
                if stop:
                    raise Interrupted(f"interrupted after Phase 1 iteration {k + 1}; rerun the same command to resume")

    def solve_to_tolerance(self, state: SolveState) -> None:
        """No updates: solve every document's carry-over c_0 = F(c_0) (F: one sequential pass, for
        either scheme) with the solver of --fixed-point-solver to --fixed-point-tol, within
        --phase1-max-iterations passes. Each pass is one history record (converged_ratio: the
        tokens of documents within the tolerance; residual: the worst relative carry-over)."""
        cfg, p = self.cfg, self.problem
        lengths = np.diff(p.offsets)
        total = max(self.shard.total, 1)
        ends: list[np.ndarray] = []
        sizes: list[float | None] = [None, None]  # the last pass's RMS carry-over per element, and relative to |c_N|
        cells = self.group.sum(state.last.size)  # every rank's documents x C

        def one_pass(c0: np.ndarray) -> np.ndarray:
            start = time.perf_counter()
            k = len(state.history)
            with progress(f"{self.label} pass {k + 1}", self.rows, "tok") as advance:
                last = p.recur(c0, state.q, advance)
            end = np.asarray(last, np.float64)
            gap = end - c0
            rel = np.linalg.norm(gap, axis=1) / np.maximum(np.linalg.norm(end, axis=1), 1e-12)
            within = self.group.sum(int(lengths[rel <= cfg.fixed_point_tol / 2].sum()))
            worst = max(self.group.gather(float(rel.max()) if len(rel) else 0.0))
            sq, norm = (float(self.group.sum(float(v))) for v in ((gap**2).sum(), (end**2).sum()))
            sizes[:] = [math.sqrt(sq / max(cells, 1)), math.sqrt(sq / norm) if norm > 0 else None]
            record = _record(k, converged_ratio=within / total, residual=worst)
            record["seconds"] = time.perf_counter() - start
            state.history.append(record)
            if self.on_iteration:
                self.on_iteration(record)
            ends[:] = [last]
            return last

        # solved to half the tolerance: the check of the saved rows (carry_over) recomputes c_1 from c_N
        # rather than from the c_0 the pass started at, one more step of f, and must land within it
        target = cfg.fixed_point_tol / 2
        start = state.last.copy()
        solve = fixed_point.from_zero if cfg.start == "zero" else fixed_point.SOLVERS[cfg.fixed_point_solver]
        solved, report = solve(one_pass, start, target, cfg.max_iterations, everywhere=self.everywhere)
        parts = (report.converged, report.residual, report.stalled, report.period, report.solved_at)
        counts = self.group.gather(parts)
        self.report = fixed_point.SolveReport(
            report.passes, *(np.concatenate([c[i] for c in counts]) for i in range(len(parts)))
        ).as_dict(target)
        if cfg.fixed_point_unique and cfg.start != "zero":  # from zero there is one solution
            self.report["unique"] = self.uniqueness(start, solved, target)
        state.stopped_by = "converged" if self.report["failing"] == 0 else "max_iterations"
        state.next = len(state.history)
        last = state.history[-1]
        state.info = SolveInfo(abs_residual=sizes[0], rel_residual=sizes[1], steps=report.passes,
                               converged_ratio=last["converged_ratio"])  # fmt: skip
        state.swap(ends[0], state.prev if state.prev is not None else self.store())

    def everywhere(self, done: bool) -> bool:
        """Whether every rank is done: all stop after the same pass."""
        return not self.group.any(not done)[0]

    def uniqueness(self, start: np.ndarray, found: np.ndarray, target: float) -> dict:
        """Solve again from another start (zeros; a Gaussian one when `start` was zeros) into a scratch
        store, and compare each document's c_0 with `found`: several fixed points show up as
        documents whose two solutions lie apart."""
        p, cfg = self.problem, self.cfg
        other = (
            np.random.default_rng(0).normal(size=start.shape).astype(np.float32)
            if not start.any()
            else np.zeros_like(start)
        )
        with self.store() as scratch:

            def one_pass(c0: np.ndarray) -> np.ndarray:
                with progress(f"{self.label} second start", self.rows, "tok") as advance:
                    return p.recur(c0, scratch, advance)

            again, report = fixed_point.SOLVERS[cfg.fixed_point_solver](
                one_pass, other, target, cfg.max_iterations, everywhere=self.everywhere
            )
        gap = np.abs(again - found).max(axis=1) if len(found) else np.zeros(0)
        both = report.converged
        parts = self.group.gather((gap, both))
        gap, both = np.concatenate([g for g, _ in parts]), np.concatenate([b for _, b in parts])
        return {
            "documents": int(len(gap)),
            "second_start_solved": int(both.sum()),
            "max_distance": float(gap.max()) if len(gap) else 0.0,
            "apart": int((gap > 1e-3).sum()),  # max-abs over C: solutions that are not one fixed point
        }

    def iteration(self, k: int, state: SolveState) -> tuple[dict, str | None]:
        """Iteration k: Q from P by the scheme, Q against P, the stop rule, and (training, not
        stopping) one optimizer step. Returns its record and the stop reason (None: go on)."""
        cfg, p, prev = self.cfg, self.problem, state.prev
        c0 = np.zeros_like(state.last) if cfg.start == "zero" else state.last
        train = self.optimizer is not None
        noise = Noise(cfg.noise, self.seed, k, self.shard.start) if train and cfg.noise > 0 else None
        q = state.q
        passes = 3 if train and prev is not None else 2  # recurrence, comparison, gradient
        scatter, batch = needs_scatter(cfg), cfg.diversity_batch if diversity_weight(cfg) > 0 else 0
        with progress(f"{self.label} iteration {k + 1}", passes * self.rows, "tok") as advance:
            if train and k == 0 and prev is None and cfg.first_iteration == "random":
                last, traj = self.random_start(q), None
                advance(self.rows)
            else:
                last, traj = SCHEMES[cfg.scheme](replace(p, perturb=noise), prev, c0, q, advance)
            stats = Comparison()
            for s, e in block_chunks(self.shard.blocks, p.chunk):
                rows = q.read(s, e)
                stats.add(
                    rows, None if prev is None else prev.read(s, e), cfg.convergence_threshold, scatter and not batch
                )
                if batch:
                    stats.add_batches(rows, self.shard.start + s, batch, scatter)
                advance(e - s)
            stats = stats.combined(self.group)
            if not stats.finite:
                raise NumericalError(f"non-finite contexts at iteration {k + 1}")
            record = _record(k)
            reason = None
            if prev is not None:
                total, width = self.shard.total, p.model.context_dim
                losses = stats.losses(cfg)
                ratio = stats.converged / total
                record.update(losses, converged_ratio=ratio, residual=stats.sq / (total * width))
                if not all(np.isfinite(v) for v in losses.values() if v is not None):
                    raise NumericalError(
                        f"non-finite Phase 1 loss at iteration {k + 1} "
                        f"(learning rate {learning_rate(k, cfg)} may be too high)"
                    )
                reason = _stop_reason(state.history, ratio, cfg, train, state.optimizer_steps)
                state.info = _info(stats, total, width, k + 1, ratio)
            if k == cfg.max_iterations - 1 and reason != "converged":
                reason = "max_iterations"
            if prev is not None and self.optimizer is not None and reason is None:
                record["lr"] = self.step(k, traj, c0, q, prev, stats, advance, noise)
                state.optimizer_steps += 1
        state.swap(last, prev if prev is not None else self.store())
        return record, reason

    def random_start(self, q: RowStore) -> np.ndarray:
        """Iteration 0 as sigma0 * N(0, 1) rows (--phase1-iteration0 random), seeded per global row;
        returns each document's last row."""
        C, first = q.shape[1], self.shard.start
        for s, e in block_chunks(self.shard.blocks, self.problem.chunk):
            q.write(s, self.cfg.first_sigma * gaussian_rows((self.seed, 1), first + s, first + e, C))
        ends = self.problem.offsets[1:] - 1
        last = q.gather(np.maximum(ends, 0))
        last[ends < self.problem.offsets[:-1]] = 0.0  # an empty document keeps c_0 = 0
        return last

    def step(self, k, traj, c0, q, prev, stats, advance, noise=None) -> float:
        """One Adam step on the objective's gradient, summed over every rank's rows (its norm clipped
        to --phase1-grad-clip when set: the same on every rank, whose gradients are equal)."""
        p, optimizer = self.problem, self.optimizer
        assert optimizer is not None
        lr = learning_rate(k, self.cfg)
        optimizer.lr = lr
        optimizer.zero_grad()
        sums = accumulate_gradient(
            p.model,
            p.table,
            p.tokens,
            p.offsets,
            traj,
            c0,
            q,
            prev,
            stats,
            self.cfg,
            p.chunk,
            advance,
            self.shard.blocks,
            self.shard.start,
            noise,
        )
        set_gradients(p.model, sums, self.group)
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([q for b in p.model.blocks for q in b.parameters()], self.cfg.grad_clip)
        optimizer.step()
        return lr

    def resume_point(self, state: SolveState, keep: bool) -> dict:
        """What `resume` takes back. Without `keep` (Ctrl-C: the solve stops) the contexts go with it."""
        assert state.prev is not None
        rows = state.prev if keep else state.hand_over()
        return {
            "next": state.next,
            "prev": Part(rows, self.shard, self.group, keep=keep),
            "history": state.history,
            "optimizer_steps": state.optimizer_steps,
            "model": self.problem.model.state_dict(),
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else {},
        }


def _record(k: int, converged_ratio: float | None = None, residual: float | None = None) -> dict:
    """Iteration k's history record before its losses are known (each term's, then their sum)."""
    return {
        "iteration": k + 1,
        "lr": None,
        **dict.fromkeys(f"{name}_loss" for name in TERMS),
        "loss": None,
        "converged_ratio": converged_ratio,
        "residual": residual,
    }


def _info(stats: Comparison, total: int, width: int, steps: int, ratio: float) -> SolveInfo:
    assert stats.mean is not None and stats.m2 is not None
    norm_sq = float((stats.m2 + stats.rows * stats.mean**2).sum())  # ||Q||^2 from its moments
    return SolveInfo(
        abs_residual=math.sqrt(stats.sq / (total * width)),
        rel_residual=math.sqrt(stats.sq / norm_sq) if norm_sq > 0 else None,
        steps=steps,
        converged_ratio=ratio,
    )


def run_cvfp(
    model: ContextNetwork,
    tokens: np.ndarray,
    offsets: np.ndarray,
    cfg: Phase1Settings,
    *,
    train: bool,
    device: torch.device,
    memory_budget: int = DEFAULT_BUDGET,
    scratch: Path | None = None,
    on_iteration: Callable[[dict], None] | None = None,
    resume: dict | None = None,
    save_resume: Callable[[dict, str], None] | None = None,
    label: str = "phase1",
    group: Group = SOLO,
    save_every: float = 0.0,
    seed: int = 0,
) -> CVFPResult:
    """Iterate to the fixed point; train=True also updates the context blocks (only them).

    Contexts live in two RowStores (this iteration's and the previous one's), in memory or, beyond
    half of `memory_budget` bytes, in files under `scratch`; every pass over them goes chunk by chunk.
    On Ctrl-C (see interrupt.py), and every `save_every` minutes, the state after the current
    iteration goes to `save_resume(state, tag)`; passing that state back as `resume` continues exactly
    where it stopped. Its "prev" is a RowStore or Part taken over, or the path of a saved .npy of
    every rank's rows, from which each rank reads its shard (so a job may resume on other ranks).
    With a `group` of several ranks, each runs its shard of the documents (distributed.py).
    Training that ends unconverged is followed by a second solve of the same loop without updates,
    so that the saved contexts are the final weights' fixed point (`solve` in the result).
    """
    offsets = np.array([0, len(tokens)], dtype=np.int64) if cfg.concat else np.asarray(offsets, np.int64)
    C = model.context_dim
    kernel = choose_kernel(cfg.kernel, device, C, offsets, compiled(model))  # from the whole corpus: alike on all ranks
    shard = group.shard(offsets)
    tokens, offsets = shard.local(tokens, offsets)
    plan = plan_memory(len(tokens), model, memory_budget)
    _check_batches(cfg, shard.total, C, memory_budget)
    directory = None if plan.in_memory else Path(scratch or tempfile.gettempdir())
    optimizer = Adam([p for b in model.blocks for p in b.parameters()], lr=cfg.lr_warmup) if train else None
    result = CVFPResult(contexts=RowStore(0, C), shard=shard, group=group)
    if cfg.concat and group.size > 1:
        result.warnings.append("--concat reads the corpus as one document, which one rank runs alone")
    if resume is not None:
        _check_resume(resume, model, optimizer, cfg)
    prev = _resumed_rows(resume["prev"], shard, C, directory, plan.chunk) if resume is not None else None
    state = SolveState(
        None, np.zeros((len(offsets) - 1, C), np.float32), RowStore(len(tokens), C, directory, "contexts")
    )
    if prev is not None:
        assert resume is not None
        model.load_state_dict(resume["model"])
        if optimizer is not None:
            optimizer.load_state_dict(resume["optimizer"])
        state.prev, state.last = prev, prev.gather(offsets[1:] - 1)
        state.history, state.optimizer_steps, state.next = (
            list(resume["history"]),
            resume["optimizer_steps"],
            resume["next"],
        )
    problem = Problem(
        model, kernel, embedding_table(model, device), tokens, offsets, plan.window, plan.chunk, blocks=shard.blocks
    )
    solver = Solver(
        problem, cfg, shard, group, directory, optimizer, label, on_iteration, save_resume, save_every, seed=seed
    )
    with state:
        solver.run(state) if train or cfg.fixed_point_solver == "iterate" else solver.solve_to_tolerance(state)
    result.solve_report = solver.report
    state.q.close()
    result.contexts = state.hand_over()
    result.history, result.optimizer_steps, result.stopped_by, result.info = (
        state.history,
        state.optimizer_steps,
        state.stopped_by,
        state.info,
    )
    tolerance = cfg.fixed_point_solver != "iterate"
    if result.stopped_by == "max_iterations" and (train or not tolerance):
        share = result.history[-1]["converged_ratio"] or 0.0
        result.warnings.append(
            f"{'training' if train else 'the fixed-point solve'} stopped at "
            f"--phase1-max-iterations {cfg.max_iterations} with {share:.1%} of tokens "
            f"converged (target {cfg.min_converged_ratio:.0%}); raise "
            "--phase1-max-iterations to let it settle"
        )
    if train and (result.stopped_by != "converged" or cfg.fixed_point_solver != "iterate"):
        # The last step moved the fixed point: solve the final weights' one, without updates, to the
        # same tolerance as validation (always, when that tolerance is the carry-over condition's).
        settle = Solver(problem, cfg, shard, group, directory, label=f"{label} solve")
        final = SolveState(prev=result.contexts, last=result.contexts.gather(offsets[1:] - 1), q=settle.store())
        with final:
            settle.run(final) if cfg.fixed_point_solver == "iterate" else settle.solve_to_tolerance(final)
        result.solve_report = settle.report
        final.q.close()
        result.contexts, result.solve, result.info = final.hand_over(), final.history, final.info
        if final.stopped_by != "converged" and not tolerance:
            ratio = final.history[-1]["converged_ratio"] if final.history else None
            result.warnings.append(
                f"the final weights' fixed point was not reached in {cfg.max_iterations} "
                f"no-update iterations (converged {ratio:.1%})"
            )
    if train and result.optimizer_steps == 0:
        result.warnings.append(
            "Phase 1 stopped before any optimizer step: the contexts are those of "
            "the untrained network (raise --phase1-min-iterations)"
        )
    result.fixed_point = carry_over(problem, result.contexts, group, cfg.fixed_point_tol, cfg.start == "zero")
    if tolerance and result.solve_report.get("failing"):
        r = result.solve_report
        result.warnings.append(
            f"{r['failing']} of {r['documents']} documents did not reach a fixed point within --fixed-point-tol "
            f"{cfg.fixed_point_tol:g} after {r['passes']} passes ({r['stalled']} stalled, {r['cycling']} "
            f"cycling; median residual {r['failing_residual_median']:.2g}): saved at their best iterate"
        )
    return result


def carry_over(problem: Problem, contexts: RowStore, group: Group, tol: float, zero_start: bool = False) -> dict:
    """Both fixed-point conditions checked on the saved contexts with their own weights, over every
    rank's documents: the share of documents whose relative carry-over residual is within `tol`."""
    found = fixed_point.check(problem.model.step, problem.table, problem.tokens, problem.offsets, contexts,
                              problem.spans(), problem.model.input_tokens, zero_start)  # fmt: skip
    parts = group.gather((found.relative, found.carry_max_abs, found.interior_max_abs))
    rel = np.concatenate([p[0] for p in parts])
    return {
        "tolerance": tol,
        "documents": int(len(rel)),
        "within_tolerance": float((rel <= tol).mean()) if len(rel) else 1.0,
        "carry_over_relative_max": float(rel.max()) if len(rel) else 0.0,
        "carry_over_relative_mean": float(rel.mean()) if len(rel) else 0.0,
        "carry_over_max_abs": max(p[1] for p in parts),
        "interior_max_abs": max(p[2] for p in parts),
    }


def _check_batches(cfg: Phase1Settings, rows: int, width: int, budget: int) -> None:
    """A term that reads the C x C scatter, taken per batch, keeps one such matrix per batch."""
    if not (needs_scatter(cfg) and cfg.diversity_batch and diversity_weight(cfg) > 0):
        return
    need = -(-rows // cfg.diversity_batch) * width * width * 8
    if need > budget // 2:
        raise UsageError(
            f"--phase1-diversity {cfg.diversity} per batch keeps a {width} x {width} matrix for each of "
            f"{-(-rows // cfg.diversity_batch):,} batches ({need / 2**30:.1f} GiB, over half of --memory-budget): "
            "raise --diversity-batch, set it to 0 (over all tokens) or raise --memory-budget"
        )


def _check_resume(resume: dict, model: torch.nn.Module, optimizer: Adam | None, cfg) -> None:
    """BadResume unless `resume` can be where a run of `cfg` stood: after iteration `next` of at
    most max_iterations, one history record each, the weights of this network (checked before any
    is loaded: a partial load would change the run that starts afresh instead)."""
    history, nxt, steps, weights = (resume.get(k) for k in ("history", "next", "optimizer_steps", "model"))
    if not isinstance(history, list) or not all(isinstance(r, dict) for r in history):
        raise BadResume("its history is not a list of records")
    if type(nxt) is not int or not 0 < nxt <= cfg.max_iterations or nxt != len(history):
        raise BadResume(f"its next iteration ({str(nxt)[:20]}) is not 1..{cfg.max_iterations} after its history")
    if type(steps) is not int or steps < 0:
        raise BadResume(f"its optimizer steps ({str(steps)[:20]}) are not a count")
    if not isinstance(resume.get("optimizer"), dict) or not isinstance(resume.get("prev"), (Path, Part, RowStore)):
        raise BadResume("it has no optimizer state or contexts")
    own = model.state_dict()
    if not isinstance(weights, dict) or set(weights) != set(own):
        raise BadResume("its weights are not this network's")
    for name, t in own.items():
        w = weights[name]
        if not isinstance(w, torch.Tensor) or w.shape != t.shape or not bool(torch.isfinite(w).all()):
            raise BadResume(f"its weight {name} is not one of this network's shape, finite")
    if optimizer is not None:
        saved, mine = resume["optimizer"], optimizer.state_dict()
        ok = all(isinstance(saved.get(k), list) and len(saved[k]) == len(mine[k]) for k in mine)
        ok = ok and all(type(n) is int and n >= 0 for n in saved["steps"])
        ok = ok and all(
            isinstance(a, torch.Tensor) and a.shape == b.shape
            for k in ("exp_avg", "exp_avg_sq")
            for a, b in zip(saved[k], mine[k])
        )
        if not ok:
            raise BadResume("its optimizer state is not this network's")


def _resumed_rows(prev, shard: Shard, width: int, directory: Path | None, chunk: int) -> RowStore | None:
    """A resume state's previous contexts as this rank's store: taken over when in memory, this
    rank's rows copied when saved in a file (None, with a warning, when that file is unusable)."""
    if isinstance(prev, Part):
        prev = prev.store
    if isinstance(prev, RowStore):
        return prev
    try:
        saved = RowStore.open(Path(prev))
    except (OSError, ValueError) as e:
        warn(f"ignoring the resume point: its contexts {prev} cannot be read ({e}); starting afresh")
        return None
    with saved:
        if saved.shape != (shard.total, width):
            warn(
                f"ignoring the resume point: its contexts hold {saved.shape}, not ({shard.total}, {width}); "
                "starting afresh"
            )
            return None
        store = RowStore(shard.stop - shard.start, width, directory, "contexts")
        for a, b in store.chunks(chunk):
            store.write(a, saved.read(shard.start + a, shard.start + b))
        return store


def _stop_reason(history: list[dict], ratio: float, cfg: Phase1Settings, train: bool, steps: int) -> str | None:
    """'converged', 'diverging' (training, when enabled: the converged share fell by more than one
    point `stop_on_drops` times in a row), or None to go on."""
    if ratio >= cfg.min_converged_ratio and (not train or steps >= cfg.min_iterations):
        return "converged"
    drops = cfg.stop_on_drops
    if train and drops:
        ratios = [h["converged_ratio"] for h in history if h["converged_ratio"] is not None] + [ratio]
        if len(ratios) > drops and all(ratios[-i] < ratios[-i - 1] - 0.01 for i in range(1, drops + 1)):
            return "diverging"
    return None


def prompt_context(model: ContextNetwork, ids: np.ndarray, cfg: Phase1Settings, device: torch.device) -> torch.Tensor:
    """c_N of the prompt's fixed-point trajectory."""
    res = run_cvfp(
        model, ids, np.array([0, len(ids)]), cfg.model_copy(update={"concat": False}), train=False, device=device
    )
    return torch.from_numpy(res.contexts.read(len(ids) - 1, len(ids))[0]).to(device)
