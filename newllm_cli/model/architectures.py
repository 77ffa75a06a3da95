"""Context networks, one entry each: what f(x_t, c_{t-1}) -> c_t is.

A network built here has `context_dim`, `embed_dim`, `embed` (an nn.Embedding), `blocks` (the
parameters Phase 1 trains, an nn.ModuleList), `embed_tokens(ids)` (the context-independent token
input, computed once per run) and `step(tok, ctx)` on any batch shape. The compiled recurrence
kernel knows the residual network's weight layout only (NewLLM); any other runs on the torch
kernel. A new network is one `register(Architecture(...))` here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from newllm_cli.model.network import ContextNetwork, NewLLM
from newllm_cli.settings import ModelSettings


@dataclass(frozen=True)
class Architecture:
    name: str
    build: Callable[[int, ModelSettings], ContextNetwork]  # (vocabulary size, model settings) -> network


ARCHITECTURES: dict[str, Architecture] = {}
DEFAULT = "residual"  # docs/ARCHITECTURE.md's residual context blocks


def register(architecture: Architecture) -> Architecture:
    ARCHITECTURES[architecture.name] = architecture
    return architecture


def build(name: str, vocab_size: int, cfg: ModelSettings) -> ContextNetwork:
    return ARCHITECTURES[name].build(vocab_size, cfg)


def compiled(model: ContextNetwork) -> bool:
    """Whether the numba kernel can run this network."""
    return isinstance(model, NewLLM)


register(
    Architecture(
        DEFAULT,
        lambda vocab, m: NewLLM(vocab, m.context_dim, m.embed_dim, m.num_layers, m.layers_per_block),
    )
)
