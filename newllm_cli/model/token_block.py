"""The research's Phase 2 predictor: a TokenBlock that reads the token and the contexts.

    h_0 = X_t = LN(W_E[x_t]),   h' = LN_E(h + phi(W [ctx, h] + b)),   logits = h_L W_E^T

`ctx` is [c_t, c_{t-1}, ..., c_{t-p}] of every side-by-side network (zeros before a document's
start). The output is tied to the embedding W_E (frozen unless asked otherwise), or an untied
Linear(E -> V). With ctx = 0 it is a bigram model through the same layers: the zero-context control.
"""

from __future__ import annotations

import torch
from torch import nn

from newllm_cli.model.context_layers import ACTIVATIONS
from newllm_cli.model.network import init_weights


class TokenLayer(nn.Module):
    """h' = LN(h + phi(W [ctx, h] + b))."""

    def __init__(self, context_width: int, embed_dim: int, activation: str):
        super().__init__()
        self.linear = nn.Linear(context_width + embed_dim, embed_dim)
        self.phi = ACTIVATIONS[activation]()
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, ctx: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return self.norm(h + self.phi(self.linear(torch.cat([ctx, h], dim=-1))))


class TokenBlock(nn.Module):
    def __init__(
        self,
        embedding: torch.Tensor,  # [V, E]: the context network's (pretrained or drawn)
        context_width: int,  # of ctx: (p + 1) x the saved contexts' width
        layers: int = 1,
        activation: str = "relu",
        untied: bool = False,
        trainable: bool = False,
        init_std: float = 0.02,
        init_bias_std: float = 0.0,
    ):
        super().__init__()
        vocab, width = embedding.shape
        self.layers = nn.ModuleList(TokenLayer(context_width, width, activation) for _ in range(layers))
        self.out = nn.Linear(width, vocab, bias=False) if untied else None
        self.apply(lambda m: init_weights(m, init_std, init_bias_std))  # before the embedding: it is given
        self.embed = nn.Embedding.from_pretrained(embedding.detach().clone().float(), freeze=not trainable)
        self.embed_norm = nn.LayerNorm(width)
        self.context_width = context_width

    def hidden(self, ctx: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed_norm(self.embed(ids))
        for layer in self.layers:
            h = layer(ctx, h)
        return h

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.out(h) if self.out is not None else h @ self.embed.weight.t()

    def forward(self, ctx: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.logits(self.hidden(ctx, ids))
