"""Training the TokenBlock predictor (model/token_block.py): Adam on minibatches, early stopping.

The problem is not convex, so unlike head_fit.py there is no optimum to reach: the recipe is the
research's (Adam, gradient clipping, about 20 epochs, patience 1), with two changes that keep the
verdicts honest. Early stopping reads the last tenth of the *training* documents, never validation;
and the network kept is the epoch with the lowest held-out loss.

- Order: rows are taken in chunks of whole minibatches; `stream` keeps the corpus order, `shuffled`
  permutes the chunks and the rows within each chunk with a generator seeded by (seed, epoch), so a
  split streamed from a file is read one chunk at a time and a resumed run draws the same order.
- Memory: the logits of a minibatch are computed (and back-propagated) in slices of at most
  LOGIT_BUDGET scores, so V = 50,257 costs a few slices, never a [batch, V] block beyond the budget.
- Resume: at every minibatch boundary, on Ctrl-C or every `save_every` minutes, the state (weights,
  Adam's moments, position, best epoch so far) goes to `save_resume`; passing it back as `resume`
  gives exactly the uninterrupted result.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.nn import functional

from newllm_cli.model.token_block import TokenBlock
from newllm_cli.runtime import interrupt
from newllm_cli.runtime.distributed import SOLO, Group
from newllm_cli.runtime.errors import Interrupted, NumericalError, UsageError, first_line
from newllm_cli.runtime.progress import progress
from newllm_cli.store.resume import BadResume, state_of
from newllm_cli.training.head_fit import CHUNK, CPU, Split, holdout_start, metrics

LOGIT_BUDGET = 1 << 22  # class scores per slice (16 MB of float32)


@dataclass
class TokenFit:
    module: TokenBlock
    train: dict
    val: dict
    val_losses: np.ndarray  # per val pair, nats
    history: list[dict] = field(default_factory=list)  # per epoch: held-out loss, steps, seconds
    best_epoch: int = 0
    steps: int = 0  # Adam steps over every epoch
    capped: bool = False  # stopped at --phase2-epochs while the held-out loss still fell
    held_out_rows: int = 0


def _rows(split: Split, a: int, b: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ctx, x_t, x_{t+1}) of rows a..b."""
    assert split.sources is not None, "the predictor reads x_t: make_split records it"
    x = split.inputs[a:b] if isinstance(split.inputs, torch.Tensor) else torch.from_numpy(split.inputs.read(a, b))
    return x.to(device), split.sources[a:b].to(device), split.targets[a:b].to(device)


def _slice(vocab: int) -> int:
    return max(1, LOGIT_BUDGET // vocab)


def evaluate(block: TokenBlock, split: Split, a: int, b: int, device: torch.device) -> tuple[np.ndarray, int]:
    """Cross-entropy of rows a..b (nats, float64) and the number of top-1 hits."""
    losses, hits, step = [], 0, _slice(block.embed.num_embeddings)
    with torch.no_grad():
        for s in range(a, b, CHUNK):
            ctx, ids, y = _rows(split, s, min(s + CHUNK, b), device)
            for m in range(0, len(y), step):
                logits = block(ctx[m : m + step], ids[m : m + step])
                losses.append(functional.cross_entropy(logits, y[m : m + step], reduction="none").double().cpu())
                hits += int((logits.argmax(1) == y[m : m + step]).sum())
    out = torch.cat(losses).numpy() if losses else np.zeros(0)
    if not np.isfinite(out).all():
        raise NumericalError("non-finite TokenBlock loss; a lower --phase2-lr may help")
    return out, hits


def _order(rows: int, batch: int, shuffled: bool, seed: int, epoch: int) -> list[np.ndarray]:
    """Each chunk's row indices (chunks of whole minibatches), in the order they are visited."""
    size = batch * max(1, CHUNK // batch)
    chunks = [np.arange(s, min(s + size, rows)) for s in range(0, rows, size)]
    if not shuffled:
        return chunks
    g = np.random.default_rng([seed, epoch])
    return [chunks[i][g.permutation(len(chunks[i]))] for i in g.permutation(len(chunks))]


@dataclass
class _State:
    epoch: int = 0
    chunk: int = 0  # position in the epoch's chunk order
    batch: int = 0  # minibatch within that chunk
    steps: int = 0
    best: float | None = None
    best_epoch: int = 0
    best_state: dict | None = None
    stale: int = 0  # epochs since a gain of at least min_gain
    history: list[dict] = field(default_factory=list)
    module: dict | None = None
    adam: dict | None = None


def fit(
    train: Split,
    val: Split,
    make: Callable[[], TokenBlock],
    cfg: Any,  # the Phase2Settings
    *,
    seed: int = 0,
    device: torch.device = CPU,
    on_block: Callable[[dict], None] | None = None,
    resume: dict | None = None,
    save_resume: Callable[[dict], None] | None = None,
    label: str = "tokenblock",
    group: Group = SOLO,
    save_every: float = 0.0,
) -> TokenFit:
    """Train `make()` (built under `seed`) on the training rows before the held-out tail, keep the
    epoch with the lowest held-out loss, and score every training and validation row with it."""
    if group.size > 1:
        raise UsageError("--predictor tokenblock trains in one process: run phase2 without torchrun")
    torch.manual_seed(seed)
    block = make().to(device)
    cut, n = holdout_start(train), len(train.targets)
    if cut in (0, n):
        raise UsageError("tokenblock's early stopping needs two training documents or more (it holds a tenth out)")
    params = [p for p in block.parameters() if p.requires_grad]
    adam = torch.optim.Adam(params, lr=cfg.lr)
    st = state_of(_State, resume) if resume else _State()
    if st.epoch > cfg.epochs:
        raise BadResume(f"its epoch {st.epoch} is beyond --phase2-epochs {cfg.epochs}")
    if st.module is not None and st.adam is not None:
        try:
            block.load_state_dict(st.module)
            adam.load_state_dict(st.adam)
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise BadResume(f"its weights are not this predictor's ({first_line(e)[:80]})") from None
    points, step = interrupt.SavePoints(save_every), _slice(block.embed.num_embeddings)

    def safe_point() -> None:
        """Save the state when asked (Ctrl-C, then stop) or due (--save-every, then go on)."""
        stop, save = points.poll()
        if save and save_resume is not None:
            save_resume({**vars(st), "module": block.state_dict(), "adam": adam.state_dict()})
        if stop:
            raise Interrupted("interrupted while training the TokenBlock; rerun the same command to resume")

    batches = -(-cut // cfg.batch_size)
    while st.epoch < cfg.epochs and st.stale < cfg.patience:
        t0, order = time.perf_counter(), _order(cut, cfg.batch_size, cfg.order == "shuffled", seed, st.epoch)
        with progress(f"{label} epoch {st.epoch + 1}", batches, "batch") as advance:
            advance(sum(-(-len(c) // cfg.batch_size) for c in order[: st.chunk]) + st.batch)
            while st.chunk < len(order):
                rows = order[st.chunk]
                lo, hi = int(rows.min()), int(rows.max()) + 1
                ctx, ids, y = _rows(train, lo, hi, device)
                while st.batch * cfg.batch_size < len(rows):
                    pick = torch.as_tensor(rows[st.batch * cfg.batch_size : (st.batch + 1) * cfg.batch_size] - lo)
                    pick = pick.to(device)
                    adam.zero_grad(set_to_none=True)
                    for m in range(0, len(pick), step):  # the mean loss, slice by slice
                        p = pick[m : m + step]
                        loss = functional.cross_entropy(block(ctx[p], ids[p]), y[p], reduction="sum") / len(pick)
                        loss.backward()
                    if cfg.grad_clip > 0:
                        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                    adam.step()
                    st.batch, st.steps = st.batch + 1, st.steps + 1
                    advance(1)
                    safe_point()
                st.chunk, st.batch = st.chunk + 1, 0
        held, _ = evaluate(block, train, cut, n, device)
        mean = float(held.mean())
        gained = st.best is None or st.best - mean >= cfg.min_gain
        record = {"epoch": st.epoch + 1, "heldout_loss": mean, "steps": st.steps, "seconds": time.perf_counter() - t0}
        st.history.append(record)
        if st.best is None or mean < st.best:
            st.best, st.best_epoch = mean, st.epoch + 1
            st.best_state = {k: v.detach().clone() for k, v in block.state_dict().items()}
        st.stale = 0 if gained else st.stale + 1
        st.epoch, st.chunk = st.epoch + 1, 0
        if on_block:
            on_block({"stage": "train", **record})
        if st.epoch < cfg.epochs:
            safe_point()
    assert st.best_state is not None
    block.load_state_dict(st.best_state)
    train_losses, train_hits = evaluate(block, train, 0, n, device)
    val_losses, val_hits = evaluate(block, val, 0, len(val.targets), device)
    return TokenFit(
        module=block,
        train=metrics(train_losses, train_hits),
        val=metrics(val_losses, val_hits),
        val_losses=val_losses,
        history=st.history,
        best_epoch=st.best_epoch,
        steps=st.steps,
        capped=st.stale < cfg.patience,
        held_out_rows=n - cut,
    )


def advice(res: TokenFit, label: str, epochs: int) -> list[str]:
    """What the training's ending means, in words."""
    if res.capped:
        return [f"{label}: training stopped at --phase2-epochs {epochs} while the held-out loss still fell; raise it"]
    return []
