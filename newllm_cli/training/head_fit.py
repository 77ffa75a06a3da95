"""The one protocol that turns features into a next-token (or current-token) verdict: a linear
softmax probe trained to the optimum of its convex problem.

Phase 2's head, the untrained-network control and every decodability probe of `analyze` go through
`fit`, so a difference between them comes from their features, never from their training.

    minimise  mean_i CE(W x_i + b, y_i) + (l2 / 2) * sum_v (|w_v|^2 + (b_v - prior_v)^2)

- Features are whitened on the training rows (centred, rotated to unit variance; directions with no
  variance, such as the one LayerNorm removes, are dropped). The probe is then invariant to any
  invertible affine map of the features and the problem is well conditioned.
- The penalty pulls the bias towards `prior` (add-one log-unigram by default), so a probe on features
  that carry nothing lands on the unigram model, and tokens never seen in training keep their
  add-one probability instead of falling towards zero.
- l2 is chosen on a held-out tenth of the training documents, from large to small, stopping when the
  held-out loss rises; the probe is then refitted on all training rows at that l2.
- Full-batch L-BFGS (torch.optim.LBFGS, strong Wolfe line search) over class rows (`VocabClasses`):
  tokens that are never training targets and share a prior stay tied at the optimum, by symmetry of
  a strictly convex problem. Each class's parameters are scaled by its expected curvature
  (add-one frequency + l2), which cuts the iterations needed about fivefold on text.
- Data-parallel (a `group` of ranks, each holding its documents' rows): the objective and its
  gradient are sums over rows, so each rank adds its own and the sums are combined; moments, target
  counts and metrics likewise. Every rank then runs the same L-BFGS on the same numbers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from newllm_cli.runtime import interrupt
from newllm_cli.runtime.distributed import SOLO, Group, block_size
from newllm_cli.runtime.errors import Interrupted, NumericalError, RankFailed
from newllm_cli.runtime.moments import merge_moments
from newllm_cli.runtime.progress import progress
from newllm_cli.store.resume import BadResume, state_of
from newllm_cli.store.rowstore import RowStore

LOGIT_BUDGET = 1 << 20  # class scores per chunk (4 MB of float32): beyond cache size the head is memory-bound
L2_GRID = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5)  # tried from strong to weak
FALLBACK_L2 = 1e-3  # when the training rows are too few to hold a tenth out
BLOCK = 10  # L-BFGS iterations between progress reports, stop checks and resume points
TOLERANCE = 1e-5  # stop when a block lowers the objective by less than this (nats per pair; 0.001% perplexity)


@dataclass
class Split:
    """Features, targets and the group (document) of each row, rows in corpus order (groups never
    decrease). Features are a tensor on the training device, or a RowStore file when the pairs do
    not fit the memory budget (pairs.make_split): then every pass reads them chunk by chunk, and
    `with split:` deletes that file at the end."""

    inputs: torch.Tensor | RowStore
    targets: torch.Tensor
    groups: torch.Tensor | None = None
    sources: torch.Tensor | None = None  # x_t of each row (the pair's current token), for predictors that read it

    def __enter__(self) -> Split:
        return self

    def __exit__(self, *exc: object) -> None:
        if isinstance(self.inputs, RowStore):
            self.inputs.close()


CHUNK = 65536  # raw feature rows per chunk when streaming


def raw_chunks(inputs: torch.Tensor | RowStore, device: torch.device):
    """The feature rows, chunk by chunk, as float32 tensors on the device."""
    for s in range(0, len(inputs), CHUNK):
        if isinstance(inputs, torch.Tensor):
            yield inputs[s : s + CHUNK]
        else:
            yield torch.from_numpy(inputs.read(s, min(s + CHUNK, len(inputs)))).to(device)


@dataclass
class VocabClasses:
    """The vocabulary as classes of tokens whose parameters are provably equal at the optimum.

    Tokens that are never training targets and share a prior enter the objective symmetrically, so
    the (unique) optimum gives them equal rows. Fitting one row per class, counted `multiplicity`
    times in the softmax and the penalty, is exactly full-vocabulary fitting: with GPT-2's 50,257
    tokens and a small corpus most rows are tied. Classes are ordered by their smallest token, so
    argmax ties resolve to the same token as over the full vocabulary.
    """

    token_class: torch.Tensor  # [V] class of each token
    representative: torch.Tensor  # [K] smallest token of each class, ascending
    multiplicity: torch.Tensor  # [K] float: tokens per class

    @staticmethod
    def build(train_targets: np.ndarray, prior: np.ndarray, device: torch.device) -> VocabClasses:
        is_target = np.zeros(len(prior), dtype=bool)
        is_target[np.asarray(train_targets, dtype=np.int64)] = True
        return VocabClasses.of_targets(is_target, prior, device)

    @staticmethod
    def of_targets(is_target: np.ndarray, prior: np.ndarray, device: torch.device) -> VocabClasses:
        """From the mask of tokens that are training targets (on any rank)."""
        vocab = len(prior)
        key, tied = np.arange(vocab), ~is_target  # a target is its own class
        _, group = np.unique(np.asarray(prior, np.float64)[tied], return_inverse=True)
        key[tied] = vocab + group.reshape(-1)  # untargeted tokens: one class per prior value
        _, first, token_class, counts = np.unique(key, return_index=True, return_inverse=True, return_counts=True)
        order = np.argsort(first, kind="stable")  # by smallest member
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))

        def as_t(a, dt):
            return torch.as_tensor(np.ascontiguousarray(a), dtype=dt, device=device)

        return VocabClasses(
            as_t(rank[token_class.reshape(-1)], torch.int64),
            as_t(first[order], torch.int64),
            as_t(counts[order], torch.float32),
        )


@dataclass
class Whitening:
    """x -> (x - mean) @ transform: unit covariance on the training rows, null directions dropped."""

    mean: torch.Tensor
    transform: torch.Tensor  # [d, r]

    @staticmethod
    def fit(inputs: torch.Tensor | RowStore, device: torch.device, group: Group = SOLO) -> Whitening:
        """Mean and covariance accumulated in float64 chunk by chunk, then rank by rank (merge_moments)."""
        part = None
        for x in raw_chunks(inputs, device):
            x64 = x.double()
            m = x64.mean(0)
            c = x64 - m
            part = merge_moments(part, len(x64), m, c.T @ c)
        if group.size > 1:
            parts = group.gather(None if part is None else (part[0], part[1].cpu(), part[2].cpu()))
            part = None
            for other in filter(None, parts):
                part = merge_moments(part, *other)
            assert part is not None
            part = (part[0], part[1].to(device), part[2].to(device))
        assert part is not None, "no rows"
        n, mean, scatter = part
        cov = scatter / max(n - 1, 1)
        values, vectors = torch.linalg.eigh(cov)
        keep = values > max(float(values.max()), 1e-30) * 1e-7
        transform = vectors[:, keep] / values[keep].sqrt()
        return Whitening(mean.float(), transform.float())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) @ self.transform


def _with_ones(x: torch.Tensor) -> torch.Tensor:
    """Inputs with a constant 1 column, so one [in + 1, K] matrix holds weights and bias."""
    return torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], dim=1)


class Design:
    """The design matrix [white(x), 1] over rows start..stop of a split: a slice of one tensor made
    once when the features are in memory, or whitened chunk by chunk as it is read from disk."""

    def __init__(self, source, white: Whitening | None, start: int, stop: int, device: torch.device):
        self.source, self.white, self.start, self.stop, self.device = source, white, start, stop, device

    @classmethod
    def of(cls, inputs: torch.Tensor | RowStore, white: Whitening, device: torch.device) -> Design:
        if isinstance(inputs, torch.Tensor):
            return cls(_with_ones(white(inputs)), None, 0, len(inputs), device)
        return cls(inputs, white, 0, len(inputs), device)

    def __len__(self) -> int:
        return self.stop - self.start

    def part(self, a: int, b: int) -> Design:
        return Design(self.source, self.white, self.start + a, self.start + b, self.device)

    def rows(self, a: int, b: int) -> torch.Tensor:
        a, b = self.start + a, self.start + min(b, len(self))
        if self.white is None:
            return self.source[a:b]
        return _with_ones(self.white(torch.from_numpy(self.source.read(a, b)).to(self.device)))


class _Scores:
    """One chunk's class scores in a reused buffer: fresh 4 MB tensors cost page faults every time."""

    def __init__(self, classes: VocabClasses, device: torch.device):
        self.classes, self.rows = classes, max(1, LOGIT_BUDGET // len(classes.representative))
        self.buffer = torch.empty(self.rows, len(classes.representative), device=device)

    def softmax(self, cols: torch.Tensor, xa: torch.Tensor, y: torch.Tensor):
        """Per-row cross-entropy, top-1 hits, exp(score - top) per class and its normaliser z.

        z counts each class once per member token, so exp/z is each token's own probability. A hit is
        the full-vocabulary argmax: the target's class scores highest, no earlier class ties it, and
        the target is its class's smallest token.
        """
        c = self.classes
        yc = c.token_class[y]
        scores = torch.mm(xa, cols, out=self.buffer[: len(y)])
        top = scores.amax(1)
        target = scores.gather(1, yc[:, None])[:, 0]
        maybe = ((target == top) & (c.representative[yc] == y)).nonzero()[:, 0]
        hits = int((scores[maybe].argmax(1) == yc[maybe]).sum())
        probs = scores.sub_(top[:, None]).exp_()
        z = probs @ c.multiplicity
        return top + z.log() - target, hits, probs, z, yc


def metrics(losses: np.ndarray, correct: int, group: Group = SOLO) -> dict:
    """Mean cross-entropy, perplexity exp(loss) and top-1 accuracy from per-row losses (of every rank)."""
    n = max(group.sum(len(losses)), 1)
    loss = group.sum(float(np.sum(losses, dtype=np.float64))) / n
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "accuracy": group.sum(correct) / n}


class Objective:
    """The penalised mean cross-entropy over class rows, its gradient, and per-row evaluation."""

    def __init__(
        self, classes: VocabClasses, prior: torch.Tensor, l2: float, device: torch.device, group: Group = SOLO
    ):
        self.classes, self.prior, self.l2, self.group = classes, prior, l2, group
        self.scores = _Scores(classes, device)

    def __call__(
        self, cols: torch.Tensor, xa: Design, y: torch.Tensor, n: int | None = None, block: int | None = None
    ) -> tuple[float, torch.Tensor]:
        """The objective as a mean over `n` rows (every rank's; these rows when None). Rows go in
        blocks of `block_size(n)`: float32 sums inside a block, float64 across blocks and ranks. Ranks
        are cut at block boundaries (phase2.make_split), so every world size adds the same float32
        partial sums and gets the same result to float64 rounding."""
        rows, m = len(y), self.classes.multiplicity
        n = rows if n is None else n
        block = block or block_size(n)
        part = torch.empty_like(cols)
        grad = torch.zeros_like(cols, dtype=torch.float64)
        total = 0.0
        with torch.no_grad():
            for b in range(0, rows, block):
                part.zero_()
                for s in range(b, min(b + block, rows), self.scores.rows):
                    e = min(s + self.scores.rows, b + block, rows)
                    x = xa.rows(s, e)
                    loss, _, probs, z, yc = self.scores.softmax(cols, x, y[s:e])
                    part.addmm_((x / (z[:, None] * n)).t(), probs)  # softmax part: x^T exp / z
                    part.index_add_(1, yc, x.t(), alpha=-1.0 / n)  # minus the one-hot part
                    total += float(loss.sum(dtype=torch.float64))
                grad += part
            grad, total = self.group.sum(grad).to(cols.dtype), self.group.sum(total)  # the penalty once, below
            grad.mul_(m)  # a class's row stands for m tokens (targets are their own classes: m = 1)
            dev = cols.clone()
            dev[-1] -= self.prior
            penalty = 0.5 * self.l2 * float((dev.double() ** 2).sum(0) @ m.double())
            grad.add_(dev * m, alpha=self.l2)
        return total / max(n, 1) + penalty, grad

    def evaluate(self, cols: torch.Tensor, xa: Design, y: torch.Tensor) -> tuple[np.ndarray, int]:
        """Per-row cross-entropy (float64) and the number of top-1 hits."""
        losses, correct = [], 0
        with torch.no_grad():
            for s in range(0, len(y), self.scores.rows):
                loss, hits, *_ = self.scores.softmax(
                    cols, xa.rows(s, s + self.scores.rows), y[s : s + self.scores.rows]
                )
                losses.append(loss.double().cpu().numpy())
                correct += hits
        return (np.concatenate(losses) if losses else np.zeros(0)), correct


def holdout_start(split: Split, group: Group = SOLO) -> int:
    """First held-out row (of this rank's rows): the last tenth of the groups (documents) form the
    tail of the rows, or the last tenth of the rows when there is a single group. Ranks hold
    consecutive blocks of the rows (a group may span two)."""
    n = len(split.targets)
    groups = split.groups
    if groups is not None and len(groups) and bool((groups[1:] < groups[:-1]).any()):
        raise ValueError("probe rows must be in corpus order (groups never decreasing)")
    ids = np.unique(group.cat(torch.unique(groups).cpu().numpy())) if groups is not None else np.zeros(1)
    if len(ids) >= 2 and groups is not None:
        cut = torch.as_tensor(ids[len(ids) - max(1, len(ids) // 10)], dtype=groups.dtype, device=groups.device)
        return int(torch.searchsorted(groups.contiguous(), cut))
    before = sum(group.gather(n)[: group.rank])
    return int(np.clip(int(group.sum(n) * 0.9) - before, 0, n))


@dataclass
class ProbeResult:
    weight: torch.Tensor  # [V, d] on the raw features
    bias: torch.Tensor  # [V]
    l2: float
    selection: list[dict] = field(default_factory=list)  # held-out loss per l2 tried
    train: dict = field(default_factory=dict)
    val: dict = field(default_factory=dict)
    val_losses: np.ndarray = field(default_factory=lambda: np.zeros(0))  # per val row, nats
    head_rows: int = 0  # rows fitted: one per class of tied tokens
    iterations: int = 0  # L-BFGS iterations over every solve
    capped: bool = False  # some solve hit max_iterations before its tolerance


CPU = torch.device("cpu")


@dataclass
class FitState:
    """Where a fit stands: the l2 being tried (`stage`, an index into the grid while selecting), the
    current class columns, L-BFGS's own state and blocks done within the current solve, the
    selection so far and its best. `as_dict` is the resume format (the keys of earlier releases)."""

    stage: int = 0
    cols: torch.Tensor | None = None
    lbfgs: dict | None = None
    block: int = 0
    last: float | None = None  # objective after the previous block of this solve
    selection: list[dict] = field(default_factory=list)
    best: dict | None = None
    iterations: int = 0
    capped: bool = False
    phi: torch.Tensor | None = None  # scaled parameters, mid-solve
    best_cols: torch.Tensor | None = None

    def as_dict(self, **override) -> dict:
        out = {k: v for k, v in vars(self).items() if v is not None or k not in ("phi", "best_cols")}
        return {**out, **override}

    @staticmethod
    def of(saved: dict) -> FitState:
        """The saved state, each field checked (BadResume when it cannot be one)."""
        return state_of(FitState, saved)


def lbfgs_counters(opt: torch.optim.LBFGS, param: torch.nn.Parameter) -> tuple[int, int, float | None]:
    """(iterations, closure evaluations, objective) that torch's L-BFGS keeps in its state for
    `param`. The objective (prev_loss) is the one where the last iteration started, one iteration
    behind the parameters the step leaves. torch does not document these keys: tests pin them."""
    state = opt.state.get(param, {})
    prev = state.get("prev_loss")
    return state.get("n_iter", 0), state.get("func_evals", 0), None if prev is None else float(prev)


def _chosen(st: FitState) -> float:
    assert st.best is not None
    return float(st.best["l2"])


def _best_cols(st: FitState) -> torch.Tensor:
    assert st.best_cols is not None
    return st.best_cols


def _solve(st, objective, rows, cols, scale, max_iterations, group, advance, safe_point, on_block, what):
    """One convex solve by blocks of L-BFGS iterations, from `st` (resumed mid-solve when it holds
    `phi`), until a block gains less than TOLERANCE or max_iterations. Returns (columns, objective)."""
    phi = torch.nn.Parameter(st.phi if st.phi is not None else cols / scale)
    st.phi = None
    opt = torch.optim.LBFGS(
        [phi],
        lr=1.0,
        max_iter=BLOCK,
        max_eval=4 * BLOCK,
        history_size=20,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-10,
        tolerance_change=1e-12,
    )
    if st.lbfgs is not None:
        opt.load_state_dict(st.lbfgs)

    def closure():
        value, grad = objective(phi.detach() * scale, *rows)
        if not math.isfinite(value):
            raise NumericalError("non-finite probe loss; the features may be too large")
        phi.grad = grad * scale
        return torch.tensor(value)

    advance(st.block * BLOCK)  # resumed mid-solve
    while True:
        t0 = time.perf_counter()
        iters, evals, _ = lbfgs_counters(opt, phi)
        opt.step(closure)
        now_iters, now_evals, value = lbfgs_counters(opt, phi)
        done_iters = now_iters - iters
        st.iterations += done_iters
        st.block += 1
        advance(BLOCK)
        cols = phi.detach() * scale
        # L-BFGS ending a block early without running out of evaluations means no change was
        # measurable any more in float32; otherwise compare with the previous block
        stalled = done_iters < BLOCK and now_evals - evals < 4 * BLOCK
        converged = stalled or (st.last is not None and st.last - value < TOLERANCE)
        capped = st.block * BLOCK >= max_iterations
        st.last = value
        if group.size > 1 and len(set(group.gather(value))) > 1:
            raise RankFailed(
                "the ranks' L-BFGS runs disagree: every rank must run the same arithmetic "
                "(the same hardware and --threads)"
            )
        if on_block:
            on_block({**what, "objective": value, "iterations": st.block * BLOCK, "seconds": time.perf_counter() - t0})
        if converged or capped:
            st.capped = st.capped or (capped and not converged)
            return cols, value
        safe_point(lambda: st.as_dict(cols=cols.clone(), phi=phi.detach().clone(), lbfgs=opt.state_dict()))  # noqa: B023 (called at once)


def fit(
    train: Split,
    val: Split,
    vocab: int,
    prior: np.ndarray,
    *,
    l2: float | None = None,
    max_iterations: int = 200,
    device: torch.device = CPU,
    on_block: Callable[[dict], None] | None = None,
    resume: dict | None = None,
    save_resume: Callable[[dict], None] | None = None,
    label: str = "probe",
    group: Group = SOLO,
    save_every: float = 0.0,
) -> ProbeResult:
    """The protocol of the module docstring; `l2` given skips the selection. `label` names its
    progress bars. With a `group`, `train` and `val` are this rank's rows (consecutive blocks of
    both splits, in rank order) and the result is that of all rows, on every rank.

    On Ctrl-C, and every `save_every` minutes, the state at the next block boundary goes to
    `save_resume`; passing it back as `resume` gives exactly the uninterrupted result.
    """
    n_train, n_val = group.sum(len(train.targets)), group.sum(len(val.targets))
    if n_train == 0 or n_val == 0:
        raise ValueError("a probe needs at least one training and one validation row")
    finite = all(
        bool(torch.isfinite(x).all()) for inputs in (train.inputs, val.inputs) for x in raw_chunks(inputs, device)
    )
    if group.any(not finite)[0]:
        raise NumericalError("the features contain NaN or Inf (or overflow float32); rerun the stage that made them")
    white = Whitening.fit(train.inputs, device, group)
    xa, val_xa = Design.of(train.inputs, white, device), Design.of(val.inputs, white, device)
    targets = group.sum(torch.bincount(train.targets, minlength=vocab))  # training targets per token
    classes = VocabClasses.of_targets((targets > 0).cpu().numpy(), prior, device)
    prior_c = torch.as_tensor(np.asarray(prior, np.float32), device=device)[classes.representative]
    counts = torch.zeros(len(classes.representative), device=device)
    counts.index_add_(0, classes.token_class, targets.to(counts.dtype))
    frequency = (counts + classes.multiplicity) / (n_train + vocab)  # add-one, per class
    cut, n = holdout_start(train, group), len(train.targets)
    n_fit, block = group.sum(cut), block_size(n_train)  # ranks are cut between blocks of n_train's size
    fit_rows = (xa.part(0, cut), train.targets[:cut], n_fit, block)  # (design, targets, rows of all ranks)
    held_rows = (xa.part(cut, n), train.targets[cut:], n_train - n_fit)
    if l2 is None and n_fit in (0, n_train):
        l2 = FALLBACK_L2  # too few rows to hold any out
    grid = [l2] if l2 is not None else list(L2_GRID)
    # the plan: one solve per l2 on the fitting rows (selection), then the refit on all rows
    points = interrupt.SavePoints(save_every, group)

    def safe_point(state: Callable[[], dict]) -> None:
        """Save `state()` when asked (Ctrl-C, then stop) or due (--save-every, then go on)."""
        if save_resume is None:
            return
        stop, save = points.poll()
        if save:
            save_resume(state())
        if stop:
            raise Interrupted("interrupted while fitting a probe; rerun the same command to resume")

    st = FitState.of(resume) if resume else FitState()
    shape = (white.transform.shape[1] + 1, len(classes.representative))
    if (st.cols is not None and tuple(st.cols.shape) != shape) or st.stage >= len(grid):
        raise BadResume("its columns or its place in the penalty grid are not this fit's")
    cols = st.cols
    if cols is None:
        cols = torch.zeros(white.transform.shape[1] + 1, len(classes.representative), device=device)
        cols[-1] = prior_c
    while True:
        selecting = l2 is None and st.best is None
        lam = grid[st.stage] if selecting else l2 if l2 is not None else _chosen(st)
        rows = fit_rows if selecting else (xa, train.targets, n_train, block)
        objective = Objective(classes, prior_c, lam, device, group)
        scale = 1.0 / torch.sqrt(frequency + lam * classes.multiplicity)  # per-class curvature
        what = "selection" if selecting else "refit"
        with progress(f"{label} l2={lam:g} ({what})", max_iterations, "it") as advance:
            cols, value = _solve(st, objective, rows, cols, scale, max_iterations, group, advance, safe_point,
                                 on_block, {"l2": lam, "stage": "select" if selecting else "refit"})  # fmt: skip
        st.lbfgs, st.block, st.last, st.cols = None, 0, None, cols
        if not selecting:
            break
        held_losses, _ = objective.evaluate(cols, *held_rows[:2])
        record = {"l2": lam, "heldout_loss": group.sum(float(np.sum(held_losses))) / held_rows[2], "objective": value}
        st.selection.append(record)
        if record["heldout_loss"] <= min(r["heldout_loss"] for r in st.selection):
            st.best_cols = cols.clone()
        worse = len(st.selection) >= 2 and record["heldout_loss"] > st.selection[-2]["heldout_loss"]
        if worse or st.stage == len(grid) - 1:  # held-out loss rose: the previous l2 was the best
            st.best = min(st.selection, key=lambda r: r["heldout_loss"])
            cols, st.best_cols = _best_cols(st), None
        else:
            st.stage += 1
        safe_point(lambda: st.as_dict(cols=cols.clone()))  # noqa: B023 (called at once)
    final = Objective(classes, prior_c, lam, device)
    train_losses, train_hits = final.evaluate(cols, xa, train.targets)
    val_losses, val_hits = final.evaluate(cols, val_xa, val.targets)
    full = cols[:, classes.token_class]  # every token gets its class's column: [r + 1, V]
    weight = white.transform @ full[:-1]  # back to raw features: [d, V]
    bias = full[-1] - white.mean @ weight
    return ProbeResult(
        weight=weight.t().contiguous(),
        bias=bias,
        l2=lam,
        selection=st.selection,
        train=metrics(train_losses, train_hits, group),
        val=metrics(val_losses, val_hits, group),
        val_losses=group.cat(val_losses),
        head_rows=len(classes.representative),
        iterations=st.iterations,
        capped=st.capped,
    )


def advice(res: ProbeResult, label: str, max_iterations: int) -> list[str]:
    """What a fit's ending means and what to do about it, in words."""
    out = []
    if res.capped:
        out.append(
            f"{label}: a fit stopped at --phase2-max-iterations {max_iterations} while its objective "
            "was still falling; raise it for the optimum"
        )
    tried = [r["l2"] for r in res.selection]
    if len(tried) == len(L2_GRID) and res.l2 == L2_GRID[-1]:
        out.append(
            f"{label}: the held-out loss still fell at the weakest penalty tried (l2 {res.l2:g}); "
            f"try --phase2-l2 {res.l2 / 10:g}"
        )
    if len(tried) > 1 and res.l2 == L2_GRID[0]:
        out.append(
            f"{label}: the held-out loss was lowest at the strongest penalty tried (l2 {res.l2:g}): "
            "the head stays close to its unigram start, so the features add little it can use"
        )
    return out
