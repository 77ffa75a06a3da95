"""Phase 2: a next-token head on saved fixed contexts, trained to its optimum (see probe.py).

Pairs are (c_t, x_{t+1}) inside each document, grouped by document so that the penalty is chosen
on held-out training documents and the verdicts' uncertainty resamples whole documents. The head is
stored as a plain Linear(in, V) on the raw features, so `generate` needs nothing else.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from . import probe
from .baselines import pair_positions
from .errors import NumericalError
from .probe import ProbeResult, Split


class Head(nn.Module):
    """token_output: Linear(C, V), or Linear(C + E, V) reading the current token's embedding too."""

    def __init__(self, in_dim: int, vocab_size: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, vocab_size)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)

    @staticmethod
    def from_probe(result: ProbeResult) -> "Head":
        head = Head(result.weight.shape[1], result.weight.shape[0])
        with torch.no_grad():
            head.proj.weight.copy_(result.weight)
            head.proj.bias.copy_(result.bias)
        return head


def pair_documents(offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions t with a next token in the same document, and each one's document index."""
    pos = pair_positions(offsets)
    return pos, np.searchsorted(np.asarray(offsets, np.int64), pos, side="right") - 1


def make_split(contexts: np.ndarray, tokens: np.ndarray, offsets: np.ndarray, device: torch.device,
               token_features: Callable[[np.ndarray], torch.Tensor] | None = None) -> Split:
    """(c_t [, emb(x_t)]) -> x_{t+1} for every pair inside a document."""
    pos, docs = pair_documents(offsets)
    x = torch.from_numpy(np.asarray(contexts[pos], dtype=np.float32)).to(device)
    if not torch.isfinite(x).all():
        raise NumericalError("the saved contexts contain NaN or Inf; rerun phase1 (a lower learning rate "
                             "may be needed)")
    if token_features is not None:
        x = torch.cat([x, token_features(np.asarray(tokens[pos], dtype=np.int64)).to(device)], dim=1)
    y = torch.from_numpy(np.asarray(tokens[pos + 1], dtype=np.int64)).to(device)
    return Split(x, y, torch.from_numpy(docs).to(device))


def evaluate(head: Head, split: Split) -> dict:
    """Mean cross-entropy, perplexity exp(loss) and top-1 accuracy of a full head over every pair."""
    with torch.no_grad():
        logits = head(split.inputs)
        losses = torch.nn.functional.cross_entropy(logits, split.targets, reduction="none")
        correct = int((logits.argmax(1) == split.targets).sum())
    return probe.metrics(losses.double().cpu().numpy(), correct)
