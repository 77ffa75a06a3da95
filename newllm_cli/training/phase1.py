"""Phase 1, CVFP (docs/ARCHITECTURE.md): one function for training and validation.

Each iteration k produces, for every token, its incoming context and its new context Q:
- sequential (Gauss-Seidel): Q is the recurrence run from c_0 = P_N (carry-over), no autograd;
- parallel (Jacobi): Q = f(x, shift(P)) with wrap-around, one batched call per chunk.
Training then takes one Adam step on (1-w) MSE(Q, P) + w dist_loss(Q). Incoming contexts are
detached, so that gradient is exactly the gradient of one batched f over (x_t, incoming_t). The
losses depend on Q only through per-token differences and the per-dimension mean and variance, so
one pass accumulates those, dL/dQ follows in closed form, and a second pass back-propagates it
through f chunk by chunk: memory stays within a budget at any corpus size (MemoryPlan).
The saved contexts are always those of the saved weights: no step follows the final sweep.
In a distributed job each rank runs its shard of the documents; the statistics are merged across
ranks and the gradients summed, so every rank takes the same step as one process would.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from newllm_cli.model.network import NewLLM
from newllm_cli.model.recurrence import choose_kernel, embedding_table, shifted, sweep
from newllm_cli.runtime import interrupt
from newllm_cli.runtime.distributed import SOLO, Group, Shard
from newllm_cli.runtime.errors import Interrupted, NumericalError
from newllm_cli.runtime.moments import merge_moments
from newllm_cli.runtime.progress import progress, warn
from newllm_cli.settings import Phase1Settings
from newllm_cli.store.rowstore import Part, RowStore, save_rows
from newllm_cli.training.adam import Adam

CHUNK = 65536  # most rows per statistics / gradient chunk: larger ones gain nothing measurable


def dist_loss(q: torch.Tensor) -> torch.Tensor:
    """mean_d(mean_t q)^2 + mean_d(var_t q - 1)^2, population variance."""
    mean = q.mean(dim=0)
    var = q.var(dim=0, unbiased=False)
    return (mean**2).mean() + ((var - 1.0) ** 2).mean()


def phase1_losses(q: torch.Tensor, p: torch.Tensor, cfg: Phase1Settings) -> dict[str, torch.Tensor]:
    """The definition on whole arrays; training uses Comparison and loss_gradient, chunk by chunk."""
    cvfp = torch.mean((q - p) ** 2)
    dist = dist_loss(q)
    w = dist_weight(cfg)
    return {"cvfp_loss": cvfp, "dist_loss": dist, "loss": (1.0 - w) * cvfp + w * dist}


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
    window: int  # rows per sweep window
    chunk: int  # rows per statistics / gradient / Jacobi chunk: from the model alone


def plan_memory(tokens: int, model: NewLLM, budget: int) -> MemoryPlan:
    """Two N x C stores stay in memory when they take at most half the budget; sweep windows take
    what is left of it. Chunks of the row-wise passes get WORKING_SPACE whatever the budget, so a
    budget never changes a result's bits. Per-row costs are estimates of what torch keeps alive
    (autograd's saved activations in the gradient pass; ids and outputs in a sweep)."""
    C, E = model.context_dim, model.embed_dim
    depth = sum(isinstance(m, torch.nn.Linear) for b in model.blocks for m in b.mlp)
    stores = 2 * tokens * C * 4
    in_memory = stores <= budget // 2
    free = max(budget - (stores if in_memory else 0) - model.embed.num_embeddings * E * 4, budget // 4)
    per_row_grad = 4 * (E + 6 * C + (3 * depth + 6 * len(model.blocks)) * (C + E))
    per_row_sweep = 24 + 12 * C
    return MemoryPlan(
        in_memory,
        window=int(np.clip(free // (2 * per_row_sweep), 1024, 1 << 20)),
        chunk=int(np.clip(WORKING_SPACE // per_row_grad, 256, CHUNK)),
    )


def incoming_rows(traj: RowStore | None, s: int, e: int, offsets: np.ndarray, c0: np.ndarray) -> np.ndarray:
    """The context each token of rows s..e reads: traj shifted by one inside each document, c0 at
    each start (zeros when there is no trajectory yet: the Jacobi scheme's first iteration)."""
    if traj is None:
        return np.zeros((e - s, c0.shape[1]), np.float32)
    first, last = np.searchsorted(offsets[:-1], [s, e], side="left")
    before = traj.read(s - 1, s)[0] if s > 0 else None
    return shifted(traj.read(s, e), before, offsets[first:last] - s, c0[first:last])


@dataclass
class Comparison:
    """Q against P, accumulated chunk by chunk in float64: losses, per-dimension mean and variance
    (merge_moments), and the converged share."""

    rows: int = 0
    sq: float = 0.0
    converged: int = 0
    mean: np.ndarray | None = None
    m2: np.ndarray | None = None
    finite: bool = True

    def add(self, q: np.ndarray, p: np.ndarray | None, threshold: float) -> None:
        """Element-wise work in float32 (torch, all cores), every sum accumulated in float64."""
        qt = torch.from_numpy(np.ascontiguousarray(q))
        chunk = Comparison(rows=len(qt))
        if p is not None:
            per_token = (qt - torch.from_numpy(np.ascontiguousarray(p))).square_().mean(dim=1)
            chunk.sq = float(per_token.sum(dtype=torch.float64)) * q.shape[1]
            chunk.converged = int((per_token < threshold).sum())
        mean = qt.sum(dim=0, dtype=torch.float64) / chunk.rows
        m2 = (qt - mean.float()).square_().sum(dim=0, dtype=torch.float64)
        m2 -= chunk.rows * (mean - mean.float().double()) ** 2  # the centre was rounded to float32
        chunk.mean, chunk.m2 = mean.numpy(), m2.numpy()
        chunk.finite = bool(np.isfinite(chunk.m2).all())  # a NaN or inf anywhere in q makes its sums so
        self.merge(chunk)

    def merge(self, other: Comparison) -> None:
        """Add another set of rows (a chunk, or another rank's rows)."""
        self.sq += other.sq
        self.converged += other.converged
        self.finite &= other.finite
        if other.mean is not None:
            seen = None if self.mean is None else (self.rows, self.mean, self.m2)
            self.rows, self.mean, self.m2 = merge_moments(seen, other.rows, other.mean, other.m2)

    def combined(self, group: Group) -> Comparison:
        """Over every rank's rows: each rank merges all parts in rank order, so all hold the same."""
        parts = group.gather(self)
        if len(parts) == 1:
            return self
        total = Comparison()
        for part in parts:
            total.merge(part)
        return total

    @property
    def var(self) -> np.ndarray:
        return self.m2 / self.rows

    def losses(self, cfg: Phase1Settings) -> dict[str, float]:
        cvfp = self.sq / (self.rows * len(self.mean))
        dist = float((self.mean**2).mean() + ((self.var - 1.0) ** 2).mean())
        w = dist_weight(cfg)
        return {"cvfp_loss": cvfp, "dist_loss": dist, "loss": (1.0 - w) * cvfp + w * dist}


def dist_weight(cfg: Phase1Settings) -> float:
    return cfg.dist_reg_weight if cfg.use_distribution_reg else 0.0


def loss_gradient(q: torch.Tensor, p: torch.Tensor, stats: Comparison, cfg: Phase1Settings) -> torch.Tensor:
    """d loss / dQ for rows of Q, in closed form from the whole-corpus mean and variance, so the
    gradient can be formed chunk by chunk (tests check it against autograd on phase1_losses)."""
    n, c = stats.rows, q.shape[1]
    mean = torch.as_tensor(stats.mean, dtype=q.dtype, device=q.device)
    var = torch.as_tensor(stats.var, dtype=q.dtype, device=q.device)
    w = dist_weight(cfg)
    cvfp = 2.0 * (q - p) / (n * c)
    dist = (2.0 * mean + 4.0 * (var - 1.0) * (q - mean)) / (n * c)
    return (1.0 - w) * cvfp + w * dist


def block_chunks(bounds, chunk: int):
    """(start, stop) of chunks of at most `chunk` rows from each block's start, none across a bound.
    The blocks and the chunk size depend on the corpus alone, so every world size (distributed.py)
    takes the same float32 partial sums; one process with the same --threads gets identical bits."""
    for a, b in zip(bounds[:-1], bounds[1:]):
        for s in range(int(a), int(b), chunk):
            yield s, min(s + chunk, int(b))


def accumulate_gradient(
    model: NewLLM,
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
) -> dict[str, torch.Tensor]:
    """d loss(Q, P) / d weights over these rows, per parameter name, in float64: Q = f(x, incoming.detach())
    recomputed chunk by chunk, each chunk back-propagating its rows of the closed-form dL/dQ. Rows
    go in `blocks` (row bounds; one block when None): float32 sums inside a block, float64 across
    blocks, so ranks cut between blocks add up to what one process gets (set_gradients)."""
    device = table.device
    bounds = np.array([0, len(q)]) if blocks is None else blocks
    sums: dict[str, torch.Tensor] = {}
    for block in zip(bounds[:-1], bounds[1:]):
        for s, e in block_chunks(block, chunk):
            ids = torch.as_tensor(np.asarray(tokens[s:e], dtype=np.int64), device=device)
            inc = torch.from_numpy(incoming_rows(traj, s, e, offsets, c0)).to(device)
            grad = loss_gradient(
                torch.from_numpy(q.read(s, e)).to(device), torch.from_numpy(p.read(s, e)).to(device), stats, cfg
            )
            # sum(f * g) has gradient g with respect to f exactly; backward(g) would be the same but
            # imports torch's symbolic-shapes machinery (sympy) on first use, 0.5 s per command
            (model.step(table[ids], inc) * grad).sum().backward()
            advance(e - s)
        for name, prm in model.named_parameters():
            if prm.grad is not None:
                sums[name] = prm.grad.double() if name not in sums else sums[name].add_(prm.grad)
                prm.grad = None
    return sums


def set_gradients(model: NewLLM, sums: dict[str, torch.Tensor], group: Group = SOLO) -> None:
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


def jacobi(
    model: NewLLM,
    table: torch.Tensor,
    tokens: np.ndarray,
    offsets: np.ndarray,
    prev: RowStore | None,
    c0: np.ndarray,
    out: RowStore,
    chunk: int,
    advance: Callable[[int], None] = lambda n: None,
) -> np.ndarray:
    """Q = f(x, shift(P)) with wrap-around, chunk by chunk; returns each document's last context."""
    device = table.device
    with torch.no_grad():
        for s, e in out.chunks(chunk):
            ids = torch.as_tensor(np.asarray(tokens[s:e], dtype=np.int64), device=device)
            inc = torch.from_numpy(incoming_rows(prev, s, e, offsets, c0)).to(device)
            out.write(s, model.step(table[ids], inc).cpu().numpy())
            advance(e - s)
    return out.gather(offsets[1:] - 1)


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

    @property
    def converged_ratio(self) -> float | None:
        """Of the saved contexts: after the no-update solve when training ended unconverged."""
        last = (self.solve or self.history or [{"converged_ratio": None}])[-1]
        return last["converged_ratio"]

    def save_contexts(self, path: Path) -> Path:
        """The contexts as one .npy (every rank writes its rows; one process renames its file)."""
        return save_rows(self.contexts, path, self.shard, self.group)

    @property
    def residual(self) -> float | None:
        """Mean squared change of the saved contexts in their last iteration: distance from a fixed point."""
        last = (self.solve or self.history or [{"residual": None}])[-1]
        return last["residual"]


DEFAULT_BUDGET = 1 << 30


def run_cvfp(
    model: NewLLM,
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
) -> CVFPResult:
    """Iterate to the fixed point; train=True also updates the context blocks (only them).

    Contexts live in two RowStores (this iteration's and the previous one's), in memory or, beyond
    half of `memory_budget` bytes, in files under `scratch`; every pass over them goes chunk by chunk.
    On Ctrl-C (see interrupt.py), and every `save_every` minutes, the state after the current
    iteration goes to `save_resume(state, tag)`; passing that state back as `resume` continues exactly
    where it stopped. Its "prev" is a RowStore or Part taken over, or the path of a saved .npy of
    every rank's rows, from which each rank reads its shard (so a job may resume on other ranks).
    With a `group` of several ranks, each runs its shard of the documents (distributed.py).
    """
    corpus = (tokens, offsets)
    offsets = np.array([0, len(tokens)], dtype=np.int64) if cfg.concat else np.asarray(offsets, np.int64)
    C = model.context_dim
    kernel = choose_kernel(cfg.kernel, device, C, offsets)  # from the whole corpus: the same on every rank
    shard = group.shard(offsets)
    tokens, offsets = shard.local(tokens, offsets)
    n_docs, n, total = len(offsets) - 1, len(tokens), shard.total
    plan = plan_memory(n, model, memory_budget)
    directory = None if plan.in_memory else Path(scratch or tempfile.gettempdir())
    optimizer = Adam([p for b in model.blocks for p in b.parameters()], lr=cfg.lr_warmup) if train else None
    result = CVFPResult(contexts=RowStore(0, C), shard=shard, group=group)
    if cfg.concat and group.size > 1:
        result.warnings.append("--concat reads the corpus as one document, which one rank runs alone")
    prev: RowStore | None = None
    prev_last = np.zeros((n_docs, C), np.float32)
    first = 0
    if resume is not None:
        prev = _resumed_rows(resume["prev"], shard, C, directory, plan.chunk)
    if prev is not None:
        model.load_state_dict(resume["model"])
        if train:
            optimizer.load_state_dict(resume["optimizer"])
        prev_last = prev.gather(offsets[1:] - 1)
        result.history, result.optimizer_steps, first = (
            list(resume["history"]),
            resume["optimizer_steps"],
            resume["next"],
        )
    table = embedding_table(model, device)
    q = RowStore(n, C, directory, "contexts")
    points = interrupt.SavePoints(save_every, group)
    try:
        for k in range(first, cfg.max_iterations):
            start = time.perf_counter()
            c0 = prev_last
            passes = 3 if train and prev is not None else 2  # sweep, comparison, gradient
            with progress(f"{label} iteration {k + 1}", passes * n, "tok") as advance:
                if cfg.scheme == "sequential":
                    last = sweep(model, kernel, table, tokens, offsets, c0, q, plan.window, advance)
                    traj = q
                else:
                    last = jacobi(model, table, tokens, offsets, prev, c0, q, plan.chunk, advance)
                    traj = prev
                stats = Comparison()
                for s, e in block_chunks(shard.blocks, plan.chunk):
                    stats.add(q.read(s, e), None if prev is None else prev.read(s, e), cfg.convergence_threshold)
                    advance(e - s)
                stats = stats.combined(group)
                if not stats.finite:
                    raise NumericalError(f"non-finite contexts at iteration {k + 1}")
                record = {
                    "iteration": k + 1,
                    "lr": None,
                    "cvfp_loss": None,
                    "dist_loss": None,
                    "loss": None,
                    "converged_ratio": None,
                    "residual": None,
                }
                reason = None
                if prev is not None:
                    losses = stats.losses(cfg)
                    ratio = stats.converged / total
                    record.update(losses, converged_ratio=ratio, residual=stats.sq / (total * C))
                    if not all(np.isfinite(v) for v in losses.values()):
                        raise NumericalError(
                            f"non-finite Phase 1 loss at iteration {k + 1} "
                            f"(learning rate {learning_rate(k, cfg)} may be too high)"
                        )
                    reason = _stop_reason(result.history, ratio, cfg, train, result.optimizer_steps)
                if k == cfg.max_iterations - 1 and reason != "converged":
                    reason = "max_iterations"
                if prev is not None and train and reason is None:
                    lr = learning_rate(k, cfg)
                    optimizer.lr = lr
                    optimizer.zero_grad()
                    set_gradients(
                        model,
                        accumulate_gradient(
                            model,
                            table,
                            tokens,
                            offsets,
                            traj,
                            c0,
                            q,
                            prev,
                            stats,
                            cfg,
                            plan.chunk,
                            advance,
                            shard.blocks,
                        ),
                        group,
                    )
                    optimizer.step()
                    result.optimizer_steps += 1
                    record["lr"] = lr
            record["seconds"] = time.perf_counter() - start
            result.history.append(record)
            if on_iteration:
                on_iteration(record)
            spare = prev if prev is not None else RowStore(n, C, directory, "contexts")
            prev, prev_last, q = q, last, spare
            if reason is not None:
                result.stopped_by = reason
                break
            if save_resume is not None:
                stop, save = points.poll()
                if save:
                    state = {
                        "next": k + 1,
                        "prev": Part(prev, shard, group, keep=not stop),
                        "history": result.history,
                        "optimizer_steps": result.optimizer_steps,
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict() if train else {},
                    }
                    if stop:
                        prev = None  # the state owns it now
                    save_resume(state, str(k + 1))
                if stop:
                    raise Interrupted(f"interrupted after Phase 1 iteration {k + 1}; rerun the same command to resume")
    except BaseException:
        for store in (q, prev):
            if store is not None:
                store.close()
        raise
    q.close()
    result.contexts = prev
    if result.stopped_by == "max_iterations":
        share = result.history[-1]["converged_ratio"] or 0.0
        result.warnings.append(
            f"{'training' if train else 'the fixed-point solve'} stopped at "
            f"--phase1-max-iterations {cfg.max_iterations} with {share:.1%} of tokens "
            f"converged (target {cfg.min_converged_ratio:.0%}); raise "
            "--phase1-max-iterations to let it settle"
        )
    if train and result.stopped_by != "converged":
        # The last step moved the fixed point: iterate the final weights, without updates, until the
        # saved contexts are their fixed point to the same tolerance as validation.
        settled = run_cvfp(
            model,
            *corpus,
            cfg,
            train=False,
            device=device,
            memory_budget=memory_budget,
            scratch=scratch,
            label=f"{label} solve",
            group=group,
            resume={"next": 0, "prev": prev, "history": [], "optimizer_steps": 0, "model": model.state_dict()},
        )
        result.contexts, result.solve = settled.contexts, settled.history
        if settled.stopped_by != "converged":
            result.warnings.append(
                f"the final weights' fixed point was not reached in {cfg.max_iterations} "
                f"no-update iterations (converged {settled.converged_ratio:.1%})"
            )
    if train and result.optimizer_steps == 0:
        result.warnings.append(
            "Phase 1 stopped before any optimizer step: the contexts are those of "
            "the untrained network (raise --phase1-min-iterations)"
        )
    return result


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
    try:
        if saved.shape != (shard.total, width):
            warn(
                f"ignoring the resume point: its contexts hold {saved.shape}, not ({shard.total}, {width}); "
                "starting afresh"
            )
            return None
        store = RowStore(shard.stop - shard.start, width, directory, "contexts")
        for s, e in store.chunks(chunk):
            store.write(s, saved.read(shard.start + s, shard.start + e))
        return store
    finally:
        saved.close()


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


def prompt_context(model: NewLLM, ids: np.ndarray, cfg: Phase1Settings, device: torch.device) -> torch.Tensor:
    """c_N of the prompt's fixed-point trajectory."""
    res = run_cvfp(
        model, ids, np.array([0, len(ids)]), cfg.model_copy(update={"concat": False}), train=False, device=device
    )
    return torch.from_numpy(res.contexts.read(len(ids) - 1, len(ids))[0]).to(device)
