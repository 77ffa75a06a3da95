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

from newllm_cli.model.context_layers import ContextLayerNetwork
from newllm_cli.model.network import ContextNetwork, NewLLM
from newllm_cli.model.side_by_side import SideBySide
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
    """The network; with --context-blocks B > 1, B of them side by side, built one after another."""
    if cfg.context_blocks == 1:
        return ARCHITECTURES[name].build(vocab_size, cfg)
    return SideBySide([ARCHITECTURES[name].build(vocab_size, cfg) for _ in range(cfg.context_blocks)])


def compiled(model: ContextNetwork) -> bool:
    """Whether the numba kernel can run this network."""
    return isinstance(model, NewLLM)


register(
    Architecture(
        DEFAULT,
        lambda vocab, m: NewLLM(
            vocab, m.context_dim, m.embed_dim, m.num_layers, m.layers_per_block, m.init_std, m.init_bias_std
        ),
    )
)
# the research's later network (docs/ARCHITECTURE.md): ContextLayers, the token read by every layer or the first
register(
    Architecture(
        "context",
        lambda vocab, m: ContextLayerNetwork(
            vocab,
            m.context_dim,
            m.embed_dim,
            m.num_layers,
            token_input=m.token_input,
            input_tokens=m.input_tokens,
            activation=m.activation,
            init_std=m.init_std,
            init_bias_std=m.init_bias_std,
        ),  # fmt: skip
    )
)
