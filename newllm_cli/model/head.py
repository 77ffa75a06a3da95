"""The next-token head: a plain Linear on the context (and optionally the current token's embedding)."""

from __future__ import annotations

import torch
from torch import nn


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
    def from_probe(result) -> Head:
        """From a fit's weight [V, d] and bias [V] (training.head_fit.ProbeResult)."""
        head = Head(result.weight.shape[1], result.weight.shape[0])
        with torch.no_grad():
            head.proj.weight.copy_(result.weight)
            head.proj.bias.copy_(result.bias)
        return head
