"""Phase 2 predictors: what learns x_{t+1} from the frozen contexts of each pair, one entry each.

One signature: `fit(train, val, vocab, prior, job)` returns a result with the validation loss of
every pair (`val_losses`, nats) and `train`/`val` metrics; `record` gives its own fields for
phase2.json (a penalty and its selection, or epochs and steps); `head` turns it into the module
saved in phase2.pt; `advice` says in words what its ending means. `previous` is how many earlier
contexts each pair reads, `reads_token` whether the predictor takes x_t itself. A new predictor is
one `register(Predictor(...))` here; the controls (evaluation/controls.py) run whichever is chosen.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from newllm_cli.model.head import Head
from newllm_cli.model.token_block import TokenBlock
from newllm_cli.runtime.distributed import SOLO, Group
from newllm_cli.training import head_fit, token_fit
from newllm_cli.training.head_fit import Split


@dataclass
class Job:
    """What every fit is given besides its data."""

    cfg: Any  # the Phase2Settings
    model: Any  # the ModelSettings (activation, init) of the run
    embedding: torch.Tensor  # [V, E]: the context network's
    seed: int
    device: torch.device
    on_block: Callable[[dict[str, Any]], None] | None = None
    resume: dict[str, Any] | None = None
    save_resume: Callable[[dict[str, Any]], None] | None = None
    label: str = "probe"
    group: Group = SOLO
    save_every: float = 0.0


@dataclass(frozen=True)
class Predictor:
    name: str
    fit: Callable[[Split, Split, int, np.ndarray, Job], Any]
    head: Callable[[Any], nn.Module]
    record: Callable[[Any], dict[str, Any]]
    advice: Callable[[Any, str, Any], list[str]]
    previous: Callable[[Any], int] = lambda cfg: 0
    reads_token: bool = False


PREDICTORS: dict[str, Predictor] = {}
DEFAULT = "linear"  # the head every run fits by default: a softmax over a linear map of the context


def register(predictor: Predictor) -> Predictor:
    PREDICTORS[predictor.name] = predictor
    return predictor


def _linear(train: Split, val: Split, vocab: int, prior: np.ndarray, job: Job) -> head_fit.ProbeResult:
    return head_fit.fit(train, val, vocab, prior, l2=job.cfg.l2, max_iterations=job.cfg.max_iterations,
                        device=job.device, on_block=job.on_block, resume=job.resume, save_resume=job.save_resume,
                        label=job.label, group=job.group, save_every=job.save_every)  # fmt: skip


def _linear_record(res: head_fit.ProbeResult) -> dict[str, Any]:
    return {"l2": res.l2, "selection": res.selection, "iterations": res.iterations, "capped": res.capped,
            "head_rows": res.head_rows}  # fmt: skip


def token_block(job: Job, context_width: int) -> TokenBlock:
    """The TokenBlock of a run's settings (also what phase2.pt's state loads into)."""
    c, m = job.cfg, job.model
    return TokenBlock(job.embedding, context_width * (c.previous_contexts + 1), c.token_layers, m.activation,
                      c.untied, c.embedding == "trained", m.init_std, m.init_bias_std)  # fmt: skip


def _tokenblock(train: Split, val: Split, vocab: int, prior: np.ndarray, job: Job) -> token_fit.TokenFit:
    width = (train.inputs.shape[1]) // (job.cfg.previous_contexts + 1)
    return token_fit.fit(train, val, lambda: token_block(job, width), job.cfg, seed=job.seed, device=job.device,
                         on_block=job.on_block, resume=job.resume, save_resume=job.save_resume, label=job.label,
                         group=job.group, save_every=job.save_every)  # fmt: skip


def _tokenblock_record(res: token_fit.TokenFit) -> dict[str, Any]:
    return {"epochs": res.history, "best_epoch": res.best_epoch, "steps": res.steps, "capped": res.capped,
            "held_out_rows": res.held_out_rows}  # fmt: skip


register(
    Predictor(
        DEFAULT,
        _linear,
        Head.from_probe,
        _linear_record,
        lambda res, label, cfg: head_fit.advice(res, label, cfg.max_iterations),
    )
)
register(
    Predictor(
        "tokenblock",
        _tokenblock,
        lambda res: res.module,
        _tokenblock_record,
        lambda res, label, cfg: token_fit.advice(res, label, cfg.epochs),
        previous=lambda cfg: int(cfg.previous_contexts),
        reads_token=True,
    )
)
