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

from .errors import NumericalError
from .settings import Phase2Settings

EVAL_BATCH = 8192


def pair_positions(offsets: np.ndarray) -> np.ndarray:
    """Positions t whose next token x_{t+1} is in the same document."""
    n = int(offsets[-1])
    last = np.zeros(n, dtype=bool)
    ends = np.asarray(offsets[1:], dtype=np.int64) - 1
    last[ends[ends >= 0]] = True
    return np.nonzero(~last)[0]


def unigram_log_probs(tokens: np.ndarray, vocab_size: int) -> np.ndarray:
    """log p(w) = log((count_w + 1) / (N + V)): add-one smoothing of the training counts."""
    counts = np.bincount(np.asarray(tokens, dtype=np.int64), minlength=vocab_size).astype(np.float64)
    return np.log((counts + 1.0) / (counts.sum() + vocab_size))


def unigram_perplexity(train_tokens: np.ndarray, targets: np.ndarray, vocab_size: int) -> float:
    logp = unigram_log_probs(train_tokens, vocab_size)
    return float(math.exp(-logp[np.asarray(targets, dtype=np.int64)].mean()))


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
    if token_features is not None:
        x = torch.cat([x, token_features(np.asarray(tokens[pos], dtype=np.int64)).to(device)], dim=1)
    y = torch.from_numpy(np.asarray(tokens[pos + 1], dtype=np.int64)).to(device)
    return Split(x, y)


def evaluate(head: Head, split: Split) -> dict:
    """Mean cross-entropy, perplexity exp(loss) and top-1 accuracy over every pair."""
    total, correct = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(split.targets), EVAL_BATCH):
            logits = head(split.inputs[s:s + EVAL_BATCH])
            y = split.targets[s:s + EVAL_BATCH]
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
               on_epoch: Callable[[dict], None] | None = None) -> Phase2Result:
    """Adam with clipping and shuffled batches; early stopping on val loss; best epoch restored."""
    torch.manual_seed(seed)
    head = Head(train.inputs.shape[1], vocab_size).to(device)
    if bias is not None:
        with torch.no_grad():
            head.proj.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))
    opt = torch.optim.Adam(head.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(seed)
    start_val = evaluate(head, val)
    result = Phase2Result(head=head, best_epoch=0, best={"val": start_val})
    best_state, best_loss, waited = copy.deepcopy(head.state_dict()), start_val["loss"], 0
    n = len(train.targets)
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        order = torch.randperm(n, generator=gen).to(device)
        for s in range(0, n, cfg.batch_size):
            idx = order[s:s + cfg.batch_size]
            loss = F.cross_entropy(head(train.inputs[idx]), train.targets[idx])
            if not torch.isfinite(loss):
                raise NumericalError(f"non-finite Phase 2 loss in epoch {epoch} (--phase2-lr {cfg.lr} may be too high)")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.gradient_clip > 0:
                nn.utils.clip_grad_norm_(head.parameters(), cfg.gradient_clip)
            opt.step()
        record = {"epoch": epoch, "train": evaluate(head, train), "val": evaluate(head, val),
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
    head.load_state_dict(best_state)
    return result
