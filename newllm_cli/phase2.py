"""Phase 2 (SPEC §4): a next-token head trained on saved fixed contexts, beside honest baselines.

Pairs are (c_t, x_{t+1}) inside each document. The head's bias can start at the log-unigram
frequencies of the training tokens, so epoch 0 already equals the unigram baseline and training
only has to learn what the contexts add to it.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .baselines import pair_positions
from . import interrupt
from .errors import Interrupted, NumericalError
from .settings import Phase2Settings

EVAL_BATCH = 8192
LOGIT_BUDGET = 1 << 21  # logits per chunk (8 MB of float32): beyond cache size the head is memory-bound


class Head(nn.Module):
    """token_output: Linear(C, V), or Linear(C + E, V) reading the current token's embedding too."""

    def __init__(self, in_dim: int, vocab_size: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, vocab_size)
        nn.init.normal_(self.proj.weight, 0.0, 0.02)
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


def evaluate(head: Head, split: Split) -> dict:
    """Mean cross-entropy, perplexity exp(loss) and top-1 accuracy over every pair."""
    total, correct = 0.0, 0
    with torch.no_grad():
        step = max(1, min(EVAL_BATCH, LOGIT_BUDGET // head.proj.out_features))
        for s in range(0, len(split.targets), step):
            logits = head(split.inputs[s:s + step])
            y = split.targets[s:s + step]
            total += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
    n = max(len(split.targets), 1)
    loss = total / n
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "accuracy": correct / n}


@dataclass
class Phase2Result:
    head: Head
    epochs: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best: dict = field(default_factory=dict)


def train_head(train: Split, val: Split, vocab_size: int, cfg: Phase2Settings, *, seed: int,
               bias: np.ndarray | None, device: torch.device,
               on_epoch: Callable[[dict], None] | None = None, resume: dict | None = None,
               save_resume: Callable[[dict], None] | None = None) -> Phase2Result:
    """Adam with clipping and shuffled batches; early stopping on val loss; best epoch restored.

    On Ctrl-C the state after the current epoch (weights, Adam, shuffling RNG, best so far) goes to
    `save_resume`; passing it back as `resume` gives exactly the uninterrupted result.
    """
    torch.manual_seed(seed)
    head = Head(train.inputs.shape[1], vocab_size).to(device)
    if bias is not None:  # start exactly at the unigram model: W = 0, b = log p(w)
        with torch.no_grad():
            head.proj.weight.zero_()
            head.proj.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))
    opt = torch.optim.Adam(head.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(seed)
    start_val = evaluate(head, val)
    result = Phase2Result(head=head, best_epoch=0, best={"val": start_val})
    best_state, best_loss, waited = copy.deepcopy(head.state_dict()), start_val["loss"], 0
    n = len(train.targets)
    rows = max(1, LOGIT_BUDGET // vocab_size)
    first = 1
    if resume is not None:
        head.load_state_dict(resume["head"])
        opt.load_state_dict(resume["optimizer"])
        gen.set_state(resume["rng"])
        best_state, best_loss, waited = resume["best_state"], resume["best_loss"], resume["waited"]
        result.epochs, result.best_epoch, result.best = list(resume["epochs"]), resume["best_epoch"], resume["best"]
        first = resume["next"]
    for epoch in range(first, cfg.epochs + 1):
        t0 = time.perf_counter()
        order = torch.randperm(n, generator=gen).to(device)
        total, correct = 0.0, 0
        for s in range(0, n, cfg.batch_size):
            idx = order[s:s + cfg.batch_size]
            opt.zero_grad(set_to_none=True)
            batch_loss = 0.0
            for c in range(0, len(idx), rows):  # same gradient as the whole batch, logits stay in cache
                part = idx[c:c + rows]
                logits = head(train.inputs[part])
                loss = F.cross_entropy(logits, train.targets[part], reduction="sum") / len(idx)
                loss.backward()
                batch_loss += float(loss.detach())
                correct += int((logits.detach().argmax(1) == train.targets[part]).sum())
            total += batch_loss * len(idx)
            if not math.isfinite(batch_loss):
                raise NumericalError(f"non-finite Phase 2 loss in epoch {epoch} (--phase2-lr {cfg.lr} may be too high)")
            if cfg.gradient_clip > 0:
                nn.utils.clip_grad_norm_(head.parameters(), cfg.gradient_clip)
            opt.step()
        running = total / max(n, 1)  # the epoch's running mean: no second pass over train
        record = {"epoch": epoch, "val": evaluate(head, val),
                  "train": {"loss": running, "perplexity": math.exp(min(running, 700.0)), "accuracy": correct / max(n, 1)},
                  "seconds": time.perf_counter() - t0}
        result.epochs.append(record)
        if on_epoch:
            on_epoch(record)
        if record["val"]["loss"] < best_loss:
            best_loss, waited = record["val"]["loss"], 0
            best_state = copy.deepcopy(head.state_dict())
            result.best_epoch, result.best = epoch, {"train": record["train"], "val": record["val"]}
        else:
            waited += 1
            if waited >= cfg.patience:
                break
        if interrupt.requested() and save_resume is not None and epoch < cfg.epochs:
            save_resume({"next": epoch + 1, "head": head.state_dict(), "optimizer": opt.state_dict(),
                         "rng": gen.get_state(), "best_state": best_state, "best_loss": best_loss,
                         "waited": waited, "epochs": result.epochs, "best_epoch": result.best_epoch,
                         "best": result.best})
            raise Interrupted(f"interrupted after Phase 2 epoch {epoch}; rerun the same command to resume")
    head.load_state_dict(best_state)
    return result
