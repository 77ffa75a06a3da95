"""Text generation: from the prompt's fixed context, sampling token by token through the recurrence.

The prompt is read as a document with carry-over until its trajectory is a fixed point (as in
Phase 1 validation: training.phase1.prompt_context); generation starts from its last context c_N.
Each sampled token is fed back through f, so generation continues the same recurrence the head was
trained on.
"""

from __future__ import annotations

import torch

from newllm_cli.model.head import Head
from newllm_cli.model.network import ContextNetwork


def sample(
    model: ContextNetwork,
    head: Head,
    head_input: str,
    start: torch.Tensor,
    last: int,
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    seed: int,
    device: torch.device,
    context_ids: list[int] | None = None,
) -> list[int]:
    """Sampled token ids, from the prompt's fixed context `start` (training.phase1.prompt_context)
    after its last token `last` (`context_ids`: the prompt's ids, which a network reading k tokens
    needs). temperature 0 means greedy."""
    gen = torch.Generator().manual_seed(seed)
    ctx, out, recent = start, [], list(context_ids or [last])[-model.input_tokens :]
    with torch.no_grad():
        for _ in range(max_new_tokens):
            feats = ctx
            if head_input == "context+token":
                feats = torch.cat([ctx, model.embed_tokens(torch.tensor([last], device=device))[0]])
            logits = head(feats).float().cpu()
            if temperature == 0:
                nxt = int(logits.argmax())
            else:
                scaled = logits / temperature
                if not bool(torch.isfinite(scaled).all()):  # a tiny temperature: in float64, from the top
                    scaled = (logits.double() - logits.max()) / temperature
                logits = scaled
                if 0 < top_k < len(logits):
                    cutoff = torch.topk(logits, top_k).values[-1]
                    logits = logits.masked_fill(logits < cutoff, float("-inf"))
                nxt = int(torch.multinomial(torch.softmax(logits, dim=0), 1, generator=gen))
            out.append(nxt)
            recent = (recent + [nxt])[-model.input_tokens :]
            ctx = model.step(_token_input(model, recent, device), ctx)
            last = nxt
    return out


def _token_input(model: ContextNetwork, recent: list[int], device: torch.device) -> torch.Tensor:
    """[X_{t-k+1}, ..., X_t] of the newest tokens, zeros where the text is shorter than k."""
    x = model.embed_tokens(torch.tensor(recent, device=device))
    pad = torch.zeros(model.input_tokens - len(recent), x.shape[1], dtype=x.dtype, device=device)
    return torch.cat([pad, x]).reshape(-1)
