"""Several context networks side by side (--context-blocks B, the research's "Dual"): each keeps
its own weights and recurrence over the same tokens (one shared token embedding), and the context
of the whole is the concatenation [c^1_t, ..., c^B_t], B x C wide. Phase 1 trains each part on its
own share of the training stream (training/blocks.py); every other stage sees one network."""

from __future__ import annotations

import torch
from torch import nn

from newllm_cli.model.network import ContextNetwork


class SideBySide(ContextNetwork):
    def __init__(self, parts: list[ContextNetwork]):
        super().__init__()
        for part in parts[1:]:  # one token input for all: the first part's embedding
            part.embed = parts[0].embed
            part.embed_norm = parts[0].embed_norm
        self.parts = nn.ModuleList(parts)
        self.members: list[ContextNetwork] = list(parts)  # the same modules, typed
        self.widths = [p.context_dim for p in parts]
        self.context_dim, self.embed_dim = sum(self.widths), parts[0].embed_dim
        self.input_tokens = parts[0].input_tokens

    @property
    def embed(self) -> nn.Embedding:  # type: ignore[override]
        return self.members[0].embed

    @property
    def blocks(self) -> nn.ModuleList:  # type: ignore[override]
        """Every part's layers (not registered twice: the parts hold them)."""
        return nn.ModuleList(b for p in self.members for b in p.blocks)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.members[0].embed_tokens(ids)

    def step(self, tok: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        return torch.cat([p.step(tok, c) for p, c in zip(self.members, ctx.split(self.widths, dim=-1))], dim=-1)
