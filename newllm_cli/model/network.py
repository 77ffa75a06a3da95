"""The New-LLM network: token embedding, L residual context blocks, and the step f(x, c)."""

from __future__ import annotations

import torch
from torch import nn


class ContextNetwork(nn.Module):
    """What every context network gives (model/architectures.py): Phase 1 trains `blocks` only;
    `embed_tokens` is context-independent, so Phase 1 computes it once per run; `step` is
    f(x_t, c_{t-1}) -> c_t on already-embedded tokens, on any batch shape."""

    context_dim: int
    embed_dim: int
    embed: nn.Embedding
    blocks: nn.ModuleList
    input_tokens: int = 1  # k: step reads [X_{t-k+1}, ..., X_t] (model/recurrence.py's token_input)

    embed_norm: nn.Module

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """LayerNorm(Embedding(x)): context-independent, so Phase 1 computes it once per run."""
        return self.embed_norm(self.embed(ids))

    def step(self, tok: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class ContextBlock(nn.Module):
    """One block: an MLP over [ctx, tok], then residual LayerNorms on each half."""

    def __init__(self, context_dim: int, embed_dim: int, layers_per_block: int = 1):
        super().__init__()
        width = context_dim + embed_dim
        layers: list[nn.Module] = []
        for _ in range(layers_per_block):
            layers += [nn.Linear(width, width), nn.ReLU()]
        self.mlp = nn.Sequential(*layers)
        self.norm_ctx = nn.LayerNorm(context_dim)
        self.norm_tok = nn.LayerNorm(embed_dim)
        self.context_dim = context_dim

    def forward(
        self, ctx: torch.Tensor, tok: torch.Tensor, last: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """New (ctx, tok); the last block's tok is never read, so it is not computed (None)."""
        y_ctx, y_tok = self.mlp(torch.cat([ctx, tok], dim=-1)).split([self.context_dim, tok.shape[-1]], dim=-1)
        return self.norm_ctx(ctx + y_ctx), None if last else self.norm_tok(tok + y_tok)


class NewLLM(ContextNetwork):
    """Embedding + context blocks. The next-token head is model/head.py, fitted in Phase 2."""

    def __init__(self, vocab_size: int, context_dim: int, embed_dim: int, num_layers: int, layers_per_block: int = 1,
                 init_std: float = 0.02, init_bias_std: float = 0.0):  # fmt: skip
        super().__init__()
        self.context_dim, self.embed_dim = context_dim, embed_dim
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.embed_norm = nn.LayerNorm(embed_dim)
        self.blocks = nn.ModuleList(ContextBlock(context_dim, embed_dim, layers_per_block) for _ in range(num_layers))
        self.apply(lambda m: init_weights(m, init_std, init_bias_std))

    def step(self, tok: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        """f(x_t, c_{t-1}) -> c_t on already-embedded tokens; works on any batch shape."""
        for i, block in enumerate(self.blocks):
            ctx, tok = block(ctx, tok, last=i == len(self.blocks) - 1)
        return ctx


def init_weights(module: nn.Module, std: float = 0.02, bias_std: float = 0.0) -> None:
    """Init as in docs/ARCHITECTURE.md: every Linear and Embedding weight N(0, std^2), Linear biases
    N(0, bias_std^2) (0 by default: zeros, drawing nothing)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=std)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias) if bias_std == 0 else nn.init.normal_(module.bias, mean=0.0, std=bias_std)
