"""Phase 1, CVFP (docs/ARCHITECTURE.md): one function for training and validation.

Each iteration k produces, for every token, its incoming context and its new context Q:
- sequential (Gauss-Seidel): Q is the recurrence run from c_0 = P_N (carry-over), no autograd;
- parallel (Jacobi): Q = f(x, shift(P)) with wrap-around, one batched call.
Training then takes one Adam step on (1-w) MSE(Q, P) + w dist_loss(Q). Incoming contexts are
detached, so that gradient is exactly the gradient of one batched f over (x_t, incoming_t); we get
dL/dQ in closed form by autograd on Q alone, then back-propagate it through f chunk by chunk
(memory bounded at any corpus size).
The saved contexts are always those of the saved weights: no step follows the final sweep.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from . import interrupt
from .errors import Interrupted, NumericalError
from .model import NewLLM
from .recurrence import CHUNK, batched_step, incoming_contexts, last_contexts, resolve_kernel, sweep
from .settings import Phase1Settings


def dist_loss(q: torch.Tensor) -> torch.Tensor:
    """mean_d(mean_t q)^2 + mean_d(var_t q - 1)^2, population variance."""
    mean = q.mean(dim=0)
    var = q.var(dim=0, unbiased=False)
    return (mean ** 2).mean() + ((var - 1.0) ** 2).mean()


def phase1_losses(q: torch.Tensor, p: torch.Tensor, cfg: Phase1Settings) -> dict[str, torch.Tensor]:
    cvfp = torch.mean((q - p) ** 2)
    dist = dist_loss(q)
    w = cfg.dist_reg_weight if cfg.use_distribution_reg else 0.0
    return {"cvfp_loss": cvfp, "dist_loss": dist, "loss": (1.0 - w) * cvfp + w * dist}


def learning_rate(k: int, cfg: Phase1Settings) -> float:
    """By 0-based iteration index: k <= 3 warm-up, k <= 8 medium, then fine-tune."""
    return cfg.lr_warmup if k <= 3 else cfg.lr_medium if k <= 8 else cfg.lr_finetune


def embed_all(model: NewLLM, tokens: np.ndarray, device: torch.device) -> torch.Tensor:
    """LN(Emb(x)) for every token, in chunks; fixed during Phase 1 (the embedding does not learn)."""
    out = torch.empty(len(tokens), model.embed_dim, device=device)
    with torch.no_grad():
        for s in range(0, len(tokens), CHUNK):
            ids = torch.as_tensor(np.asarray(tokens[s:s + CHUNK], dtype=np.int64), device=device)
            out[s:s + CHUNK] = model.embed_tokens(ids)
    return out


def accumulate_gradient(model: NewLLM, tok_emb: torch.Tensor, incoming: torch.Tensor,
                        q: torch.Tensor, p: torch.Tensor, cfg: Phase1Settings) -> None:
    """Add d loss(Q, P) / d weights to .grad, with Q = f(x, incoming.detach()) recomputed in chunks."""
    q_leaf = q.detach().clone().requires_grad_(True)
    phase1_losses(q_leaf, p, cfg)["loss"].backward()
    grad_q = q_leaf.grad
    for s in range(0, len(q), CHUNK):
        out = model.step(tok_emb[s:s + CHUNK], incoming[s:s + CHUNK].detach())
        out.backward(grad_q[s:s + CHUNK])


@dataclass
class CVFPResult:
    contexts: torch.Tensor
    history: list[dict] = field(default_factory=list)
    optimizer_steps: int = 0
    stopped_by: str = ""
    warnings: list[str] = field(default_factory=list)
    solve: list[dict] = field(default_factory=list)  # no-update iterations after unconverged training

    @property
    def converged_ratio(self) -> float | None:
        """Of the saved contexts: after the no-update solve when training ended unconverged."""
        last = (self.solve or self.history or [{"converged_ratio": None}])[-1]
        return last["converged_ratio"]

    @property
    def residual(self) -> float | None:
        """Mean squared change of the saved contexts in their last iteration: distance from a fixed point."""
        last = (self.solve or self.history or [{"residual": None}])[-1]
        return last["residual"]


def run_cvfp(model: NewLLM, tokens: np.ndarray, offsets: np.ndarray, cfg: Phase1Settings, *,
             train: bool, device: torch.device, optimizer: torch.optim.Optimizer | None = None,
             on_iteration: Callable[[dict], None] | None = None, resume: dict | None = None,
             save_resume: Callable[[dict], None] | None = None) -> CVFPResult:
    """Iterate to the fixed point; train=True also updates the context blocks (only them).

    On Ctrl-C (see interrupt.py) the state after the current iteration goes to `save_resume`;
    passing that state back as `resume` continues exactly where it stopped.
    """
    offsets = np.array([0, len(tokens)], dtype=np.int64) if cfg.concat else np.asarray(offsets, np.int64)
    kernel = resolve_kernel(cfg.kernel, device)
    tok_emb = embed_all(model, tokens, device)
    n_docs, n = len(offsets) - 1, len(tokens)
    if train and optimizer is None:
        optimizer = torch.optim.Adam([p for b in model.blocks for p in b.parameters()], lr=cfg.lr_warmup)
    result = CVFPResult(contexts=torch.zeros(0))
    prev: torch.Tensor | None = None
    first = 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        if train:
            optimizer.load_state_dict(resume["optimizer"])
        prev = resume["prev"].to(device)
        result.history, result.optimizer_steps, first = list(resume["history"]), resume["optimizer_steps"], resume["next"]
    for k in range(first, cfg.max_iterations):
        start = time.perf_counter()
        if prev is None:
            c0 = torch.zeros(n_docs, model.context_dim, device=device)
        else:
            c0 = last_contexts(prev, offsets)
        if cfg.scheme == "sequential":
            q = sweep(model, tok_emb, offsets, c0, kernel)
            incoming = incoming_contexts(q, offsets, c0)
        else:
            incoming = (torch.zeros(n, model.context_dim, device=device) if prev is None
                        else incoming_contexts(prev, offsets, c0))
            q = batched_step(model, tok_emb, incoming)
        record = {"iteration": k + 1, "lr": None, "cvfp_loss": None, "dist_loss": None, "loss": None,
                  "converged_ratio": None, "residual": None}
        reason = None
        if prev is not None:
            with torch.no_grad():
                losses = {name: float(v) for name, v in phase1_losses(q, prev, cfg).items()}
                per_token = torch.mean((q - prev) ** 2, dim=1)
                ratio = float((per_token < cfg.convergence_threshold).float().mean())
            record.update(losses, converged_ratio=ratio, residual=float(per_token.mean()))
            if not all(np.isfinite(v) for v in losses.values()):
                raise NumericalError(f"non-finite Phase 1 loss at iteration {k + 1} "
                                     f"(learning rate {learning_rate(k, cfg)} may be too high)")
            reason = _stop_reason(result.history, ratio, cfg, train, result.optimizer_steps)
        if k == cfg.max_iterations - 1 and reason != "converged":
            reason = "max_iterations"
        if prev is not None:
            if train and reason is None:
                lr = learning_rate(k, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.zero_grad(set_to_none=True)
                accumulate_gradient(model, tok_emb, incoming, q, prev, cfg)
                optimizer.step()
                result.optimizer_steps += 1
                record["lr"] = lr
        if not torch.isfinite(q).all():
            raise NumericalError(f"non-finite contexts at iteration {k + 1}")
        record["seconds"] = time.perf_counter() - start
        result.history.append(record)
        if on_iteration:
            on_iteration(record)
        prev = q
        if reason is not None:
            result.stopped_by = reason
            break
        if interrupt.requested() and save_resume is not None:
            save_resume({"next": k + 1, "prev": prev.cpu(), "history": result.history,
                         "optimizer_steps": result.optimizer_steps, "model": model.state_dict(),
                         "optimizer": optimizer.state_dict() if train else {}})
            raise Interrupted(f"interrupted after Phase 1 iteration {k + 1}; rerun the same command to resume")
    result.contexts = prev
    if train and result.stopped_by != "converged":
        # The last step moved the fixed point: iterate the final weights, without updates, until the
        # saved contexts are their fixed point to the same tolerance as validation.
        settled = run_cvfp(model, tokens, offsets, cfg, train=False, device=device, resume={
            "next": 0, "prev": prev, "history": [], "optimizer_steps": 0, "model": model.state_dict()})
        result.contexts, result.solve = settled.contexts, settled.history
        if settled.stopped_by != "converged":
            result.warnings.append(f"the final weights' fixed point was not reached in {cfg.max_iterations} "
                                   f"no-update iterations (converged {settled.converged_ratio:.1%})")
    if train and result.optimizer_steps == 0:
        result.warnings.append("Phase 1 stopped before any optimizer step: the contexts are those of "
                               "the untrained network (raise --phase1-min-iterations)")
    return result


def _stop_reason(history: list[dict], ratio: float, cfg: Phase1Settings, train: bool, steps: int) -> str | None:
    """'converged', 'diverging' (training, when enabled: the converged share fell by more than one
    point `stop_on_drops` times in a row), or None to go on."""
    if ratio >= cfg.min_converged_ratio and (not train or steps >= cfg.min_iterations):
        return "converged"
    drops = cfg.stop_on_drops
    if train and drops:
        ratios = [h["converged_ratio"] for h in history if h["converged_ratio"] is not None] + [ratio]
        if len(ratios) > drops and all(ratios[-i] < ratios[-i - 1] - 0.01 for i in range(1, drops + 1)):
            return "diverging"
    return None
