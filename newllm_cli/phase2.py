"""Phase 2 (SPEC §4): a next-token head trained on saved fixed contexts, beside honest baselines.

Pairs are (c_t, x_{t+1}) inside each document. The head's bias can start at the log-unigram
frequencies of the training tokens, so epoch 0 already equals the unigram baseline and training
only has to learn what the contexts add to it. Training is exact full-vocabulary softmax
regression, made cheap by training one row per class of tokens that the data cannot tell apart
(`VocabClasses`) and by a hand-written gradient over cache-sized chunks.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from .baselines import pair_positions
from . import interrupt
from .errors import Interrupted, NumericalError
from .settings import Phase2Settings

LOGIT_BUDGET = 1 << 20  # class scores per chunk (4 MB of float32): beyond cache size the head is memory-bound


class Head(nn.Module):
    """token_output: Linear(C, V), or Linear(C + E, V) reading the current token's embedding too.

    It starts at W = 0: the head is a convex softmax regression, so nothing needs breaking symmetry,
    and rows that training cannot tell apart stay tied (see `VocabClasses`).
    """

    def __init__(self, in_dim: int, vocab_size: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, vocab_size)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


@dataclass
class Split:
    """Inputs and targets of one split, in memory on the training device."""
    inputs: torch.Tensor
    targets: torch.Tensor


def make_split(contexts: np.ndarray, tokens: np.ndarray, offsets: np.ndarray, device: torch.device,
               token_features: Callable[[np.ndarray], torch.Tensor] | None = None) -> Split:
    pos = pair_positions(offsets)
    x = torch.from_numpy(np.asarray(contexts[pos], dtype=np.float32)).to(device)
    if not torch.isfinite(x).all():
        raise NumericalError("the saved contexts contain NaN or Inf; rerun phase1 (a lower learning rate "
                             "may be needed)")
    if token_features is not None:
        x = torch.cat([x, token_features(np.asarray(tokens[pos], dtype=np.int64)).to(device)], dim=1)
    y = torch.from_numpy(np.asarray(tokens[pos + 1], dtype=np.int64)).to(device)
    return Split(x, y)


@dataclass
class VocabClasses:
    """The vocabulary as classes of tokens whose head rows are provably equal throughout training.

    A token that is never a training target, with the same starting row as others like it, gets
    the same gradient at every step (only the softmax pushes it down), hence the same Adam update:
    such tokens stay tied forever. Training one row per class, with the softmax counting it
    `multiplicity` times, is exactly full-vocabulary training: with GPT-2's 50,257 tokens and a
    small corpus most rows are tied. Classes are ordered by their smallest token, so argmax ties
    resolve to the same token as over the full vocabulary.
    """
    token_class: torch.Tensor   # [V] class of each token
    representative: torch.Tensor  # [K] smallest token of each class, ascending
    multiplicity: torch.Tensor  # [K] float: tokens per class

    @staticmethod
    def build(train_targets: np.ndarray, start_bias: np.ndarray, device: torch.device) -> "VocabClasses":
        vocab = len(start_bias)
        is_target = np.zeros(vocab, dtype=bool)
        is_target[np.asarray(train_targets, dtype=np.int64)] = True
        key, tied = np.arange(vocab), ~is_target  # a target is its own class
        _, group = np.unique(np.asarray(start_bias, np.float64)[tied], return_inverse=True)
        key[tied] = vocab + group.reshape(-1)  # untargeted tokens: one class per starting bias
        _, first, token_class, counts = np.unique(key, return_index=True, return_inverse=True, return_counts=True)
        order = np.argsort(first, kind="stable")  # by smallest member
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        as_t = lambda a, dt: torch.as_tensor(np.ascontiguousarray(a), dtype=dt, device=device)
        return VocabClasses(as_t(rank[token_class.reshape(-1)], torch.int64), as_t(first[order], torch.int64),
                            as_t(counts[order], torch.float32))

    @staticmethod
    def identity(vocab: int, device: torch.device) -> "VocabClasses":
        ids = torch.arange(vocab, device=device)
        return VocabClasses(ids, ids, torch.ones(vocab, device=device))


def _with_ones(x: torch.Tensor) -> torch.Tensor:
    """Inputs with a constant 1 column, so one [in + 1, K] matrix holds weights and bias."""
    return torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], dim=1)


class _Scores:
    """One chunk's class scores in a reused buffer: fresh 4 MB tensors cost page faults every time."""

    def __init__(self, classes: VocabClasses, device: torch.device):
        self.classes, self.rows = classes, max(1, LOGIT_BUDGET // len(classes.representative))
        self.buffer = torch.empty(self.rows, len(classes.representative), device=device)

    def softmax(self, cols: torch.Tensor, xa: torch.Tensor, y: torch.Tensor):
        """Per-pair cross-entropy, top-1 hits, exp(score - top) per class and its normaliser z.

        z counts each class once per member token, so exp/z is each token's own probability. A hit is
        the full-vocabulary argmax: the target's class scores highest, no earlier class ties it, and
        the target is its class's smallest token.
        """
        c = self.classes
        yc = c.token_class[y]
        scores = torch.mm(xa, cols, out=self.buffer[:len(y)])
        top = scores.amax(1)
        target = scores.gather(1, yc[:, None])[:, 0]
        maybe = ((target == top) & (c.representative[yc] == y)).nonzero()[:, 0]
        hits = int((scores[maybe].argmax(1) == yc[maybe]).sum())
        probs = scores.sub_(top[:, None]).exp_()
        z = probs @ c.multiplicity
        return top + z.log() - target, hits, probs, z, yc


def _evaluate_cols(cols: torch.Tensor, scores: _Scores, split: Split, xa: torch.Tensor | None = None) -> dict:
    """Mean cross-entropy, perplexity exp(loss) and top-1 accuracy over every pair."""
    xa = _with_ones(split.inputs) if xa is None else xa
    total, correct = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(split.targets), scores.rows):
            loss, hits, *_ = scores.softmax(cols, xa[s:s + scores.rows], split.targets[s:s + scores.rows])
            total, correct = total + float(loss.sum()), correct + hits
    return _metrics(total, correct, len(split.targets))


def _metrics(total_loss: float, correct: int, n: int) -> dict:
    """Mean cross-entropy, perplexity exp(loss) and top-1 accuracy from sums over n pairs."""
    n = max(n, 1)
    loss = total_loss / n
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "accuracy": correct / n}


def evaluate(head: Head, split: Split) -> dict:
    """Mean cross-entropy, perplexity exp(loss) and top-1 accuracy of a full head over every pair."""
    cols = torch.cat([head.proj.weight, head.proj.bias[:, None]], dim=1).detach().t().contiguous()
    return _evaluate_cols(cols, _Scores(VocabClasses.identity(head.proj.out_features, cols.device), cols.device), split)


@dataclass
class Phase2Result:
    head: Head
    epochs: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best: dict = field(default_factory=dict)
    head_rows: int = 0  # rows trained: one per class of tied tokens


def train_head(train: Split, val: Split, vocab_size: int, cfg: Phase2Settings, *, seed: int,
               bias: np.ndarray | None, device: torch.device,
               on_epoch: Callable[[dict], None] | None = None, resume: dict | None = None,
               save_resume: Callable[[dict], None] | None = None) -> Phase2Result:
    """Adam with clipping and shuffled batches; early stopping on val loss; best epoch restored.

    The head starts at W = 0 and bias `bias` (zeros if None). It is trained one row per
    `VocabClasses` class with a hand-written gradient, (softmax - onehot)^T [x, 1], which is the
    full-vocabulary gradient of each member token; the clipping norm counts every member.
    On Ctrl-C the state after the current epoch (weights, Adam, shuffling RNG, best so far) goes to
    `save_resume`; passing it back as `resume` gives exactly the uninterrupted result.
    """
    start_bias = np.zeros(vocab_size) if bias is None else np.asarray(bias, dtype=np.float64)
    classes = VocabClasses.build(train.targets.cpu().numpy(), start_bias, device)
    in_dim = train.inputs.shape[1]
    cols = torch.zeros(in_dim + 1, len(classes.representative), device=device)  # x @ cols: weights as columns
    cols[-1] = torch.as_tensor(start_bias, dtype=torch.float32, device=device)[classes.representative]
    cols = nn.Parameter(cols)
    opt = torch.optim.Adam([cols], lr=cfg.lr)
    gen = torch.Generator().manual_seed(seed)
    xa, val_xa, scores = _with_ones(train.inputs), _with_ones(val.inputs), _Scores(classes, device)
    start_val = _evaluate_cols(cols.detach(), scores, val, val_xa)
    result = Phase2Result(head=Head(in_dim, vocab_size), best_epoch=0, best={"val": start_val},
                          head_rows=len(classes.representative))
    best_cols, best_loss, waited = cols.detach().clone(), start_val["loss"], 0
    n, first, grad = len(train.targets), 1, torch.zeros_like(cols)  # grad: reused, like the score buffer
    if resume is not None:
        with torch.no_grad():
            cols.copy_(resume["cols"])
        opt.load_state_dict(resume["optimizer"])
        gen.set_state(resume["rng"])
        best_cols, best_loss, waited = resume["best_cols"], resume["best_loss"], resume["waited"]
        result.epochs, result.best_epoch, result.best = list(resume["epochs"]), resume["best_epoch"], resume["best"]
        first = resume["next"]
    for epoch in range(first, cfg.epochs + 1):
        t0 = time.perf_counter()
        order = torch.randperm(n, generator=gen).to(device)
        total, correct = 0.0, 0
        for s in range(0, n, cfg.batch_size):
            idx = order[s:s + cfg.batch_size]
            grad.zero_()
            batch_loss = 0.0
            with torch.no_grad():
                for c in range(0, len(idx), scores.rows):  # the whole batch's gradient, chunk by chunk
                    part = idx[c:c + scores.rows]
                    x = xa[part]
                    loss, hits, probs, z, yc = scores.softmax(cols, x, train.targets[part])
                    grad.addmm_((x / (z[:, None] * len(idx))).t(), probs)  # softmax part: x^T exp / z
                    grad.index_add_(1, yc, x.t(), alpha=-1.0 / len(idx))  # minus the one-hot part
                    batch_loss += float(loss.sum())
                    correct += hits
            total += batch_loss
            if not math.isfinite(batch_loss):
                raise NumericalError(f"non-finite Phase 2 loss in epoch {epoch} (--phase2-lr {cfg.lr} may be too high)")
            if cfg.gradient_clip > 0:  # the norm of the full-vocabulary gradient, as clip_grad_norm_ computes it
                norm = float(((grad * grad).sum(0) @ classes.multiplicity).sqrt())
                grad.mul_(min(1.0, cfg.gradient_clip / (norm + 1e-6)))
            cols.grad = grad
            opt.step()
        record = {"epoch": epoch, "val": _evaluate_cols(cols.detach(), scores, val, val_xa),
                  "train": _metrics(total, correct, n),  # the epoch's running means: no second pass over train
                  "seconds": time.perf_counter() - t0}
        result.epochs.append(record)
        if on_epoch:
            on_epoch(record)
        if record["val"]["loss"] < best_loss:
            best_loss, waited = record["val"]["loss"], 0
            best_cols = cols.detach().clone()
            result.best_epoch, result.best = epoch, {"train": record["train"], "val": record["val"]}
        else:
            waited += 1
            if waited >= cfg.patience:
                break
        if interrupt.requested() and save_resume is not None and epoch < cfg.epochs:
            save_resume({"next": epoch + 1, "cols": cols.detach().clone(), "optimizer": opt.state_dict(),
                         "rng": gen.get_state(), "best_cols": best_cols, "best_loss": best_loss,
                         "waited": waited, "epochs": result.epochs, "best_epoch": result.best_epoch,
                         "best": result.best})
            raise Interrupted(f"interrupted after Phase 2 epoch {epoch}; rerun the same command to resume")
    full = best_cols[:, classes.token_class]  # every token gets its class's column
    with torch.no_grad():
        result.head.proj.weight.copy_(full[:-1].t())
        result.head.proj.bias.copy_(full[-1])
    result.head.to(device)
    return result
