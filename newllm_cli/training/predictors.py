"""Phase 2 predictors: what learns x_{t+1} from the frozen features of each pair, one entry each.

One signature: `fit(train, val, vocab, prior, **options)` returns a result with the validation
loss of every pair (`val_losses`, nats), `train`/`val` metrics and the fit's own record (`l2`,
`selection`, `iterations`, `capped`, `head_rows`), as training.head_fit.ProbeResult does; `head`
turns that result into the module saved in phase2.pt (features -> logits). The options are those of
head_fit.fit (l2, max_iterations, device, on_block, resume, save_resume, label, group, save_every).
A new predictor is one `register(Predictor(...))` here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from newllm_cli.model.head import Head
from newllm_cli.training import head_fit


@dataclass(frozen=True)
class Predictor:
    name: str
    fit: Callable[..., Any]
    head: Callable[[Any], nn.Module]


PREDICTORS: dict[str, Predictor] = {}
DEFAULT = "linear"  # the head every run fits today: a softmax over a linear map of the context


def register(predictor: Predictor) -> Predictor:
    PREDICTORS[predictor.name] = predictor
    return predictor


register(Predictor(DEFAULT, head_fit.fit, Head.from_probe))
