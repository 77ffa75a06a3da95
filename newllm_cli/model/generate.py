"""Text generation: the prompt's fixed context, then sampling token by token through the recurrence.

The prompt is read as a document with carry-over until its trajectory is a fixed point (as in
Phase 1 validation); generation starts from its last context c_N. Each sampled token is fed back
through f, so generation continues the same recurrence the head was trained on.
"""

from __future__ import annotations

import numpy as np
import torch

from newllm_cli.model.network import NewLLM
from newllm_cli.settings import Phase1Settings
from newllm_cli.training.pairs import Head
from newllm_cli.training.phase1 import run_cvfp


def prompt_context(model: NewLLM, ids: np.ndarray, cfg: Phase1Settings, device: torch.device) -> torch.Tensor:
    """c_N of the prompt's fixed-point trajectory."""
    res = run_cvfp(
        model, ids, np.array([0, len(ids)]), cfg.model_copy(update={"concat": False}), train=False, device=device
    )
    return torch.from_numpy(res.contexts.read(len(ids) - 1, len(ids))[0]).to(device)


def sample(
    model: NewLLM,
    head: Head,
    head_input: str,
    ids: np.ndarray,
    cfg: Phase1Settings,
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    seed: int,
    device: torch.device,
) -> tuple[list[int], torch.Tensor]:
    """Sampled token ids and the starting context. temperature 0 means greedy."""
    start = prompt_context(model, ids, cfg, device)
    gen = torch.Generator().manual_seed(seed)
    ctx, last, out = start, int(ids[-1]), []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            feats = ctx
            if head_input == "context+token":
                feats = torch.cat([ctx, model.embed_tokens(torch.tensor([last], device=device))[0]])
            logits = head(feats).float().cpu()
            if temperature == 0:
                nxt = int(logits.argmax())
            else:
                logits = logits / temperature
                if 0 < top_k < len(logits):
                    cutoff = torch.topk(logits, top_k).values[-1]
                    logits = logits.masked_fill(logits < cutoff, float("-inf"))
                nxt = int(torch.multinomial(torch.softmax(logits, dim=0), 1, generator=gen))
            out.append(nxt)
            ctx = model.step(model.embed_tokens(torch.tensor([nxt], device=device))[0], ctx)
            last = nxt
    return out, start
