"""The research's later context network: ContextLayers that update only the context.

A ContextLayer maps c (width `c_in`) to c' = LN(R c + phi(W [c, X] + b)) of width `c_out`, where X is
the token input (possibly empty) and R the identity, or a Linear where the width changes. With the
token input on every layer all widths are C; with it on the first layer only, that layer reads
[c, X] as its state and the widths shrink linearly from C + kE to C. X itself is k consecutive
layer-normed embeddings [X_{t-k+1}, ..., X_t], zero before a document's start, assembled by
model/recurrence.py's `token_input` (the network's `input_tokens` says k).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from newllm_cli.model.network import ContextNetwork, init_weights

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU}


class ContextLayer(nn.Module):
    """c' = LN(R c + phi(W [c, x] + b)): the token input x is read, never carried on."""

    def __init__(self, c_in: int, c_out: int, x_width: int, activation: str):
        super().__init__()
        self.linear = nn.Linear(c_in + x_width, c_out)
        self.act = ACTIVATIONS[activation]()
        self.project = nn.Linear(c_in, c_out) if c_in != c_out else None
        self.norm = nn.LayerNorm(c_out)

    def forward(self, c: torch.Tensor, x: torch.Tensor | None) -> torch.Tensor:
        y = self.act(self.linear(c if x is None else torch.cat([c, x], dim=-1)))
        return self.norm((c if self.project is None else self.project(c)) + y)


def widths(context_dim: int, x_width: int, layers: int, token_input: str) -> list[int]:
    """State widths before and after each layer: C throughout when every layer reads the token;
    from C + kE down to C in equal steps when only the first does."""
    if token_input == "every":
        return [context_dim] * (layers + 1)
    return [int(round(w)) for w in np.linspace(context_dim + x_width, context_dim, layers + 1)]


class ContextLayerNetwork(ContextNetwork):
    """Embedding + L ContextLayers; `blocks` holds the layers (what Phase 1 trains)."""

    def __init__(self, vocab_size: int, context_dim: int, embed_dim: int, layers: int, *, token_input: str = "every",
                 input_tokens: int = 1, activation: str = "relu", init_std: float = 0.02,
                 init_bias_std: float = 0.0):  # fmt: skip
        super().__init__()
        self.context_dim, self.embed_dim, self.input_tokens = context_dim, embed_dim, input_tokens
        self.token_input = token_input
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.embed_norm = nn.LayerNorm(embed_dim)
        x = embed_dim * input_tokens
        w = widths(context_dim, x, layers, token_input)
        every = token_input == "every"
        self.blocks = nn.ModuleList(ContextLayer(w[i], w[i + 1], x if every else 0, activation) for i in range(layers))
        self.apply(lambda m: init_weights(m, init_std, init_bias_std))

    def step(self, tok: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        if self.token_input == "first":  # the first layer's state is [c, X]; no later layer reads X
            ctx = torch.cat([ctx, tok], dim=-1)
        for layer in self.blocks:
            ctx = layer(ctx, tok if self.token_input == "every" else None)
        return ctx
