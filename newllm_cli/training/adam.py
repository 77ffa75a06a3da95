"""Adam for Phase 1: the same arithmetic as torch.optim.Adam's single-tensor path (defaults, no
weight decay), bit for bit on CPU (tests/test_phase1.py checks it).

Why not torch.optim.Adam itself: since torch 2.x its first use imports torch._dynamo, 1.2 s of
every `newllm phase1` command (about 10% of a 1M-token run) for a compiler we never use.
"""

from __future__ import annotations

import torch


class Adam:
    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.params = list(params)
        self.lr, self.betas, self.eps = lr, betas, eps
        self.steps = [0] * len(self.params)
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        """One update of every parameter that has a gradient (others keep their step count)."""
        beta1, beta2 = self.betas
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            self.steps[i] += 1
            t = float(self.steps[i])
            self.exp_avg[i].lerp_(p.grad, 1 - beta1)
            self.exp_avg_sq[i].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            step_size = self.lr / (1 - beta1**t)
            denom = (self.exp_avg_sq[i].sqrt() / (1 - beta2**t) ** 0.5).add_(self.eps)
            p.addcdiv_(self.exp_avg[i], denom, value=-step_size)

    def state_dict(self) -> dict:
        return {
            "steps": list(self.steps),
            "exp_avg": [t.clone() for t in self.exp_avg],
            "exp_avg_sq": [t.clone() for t in self.exp_avg_sq],
        }

    def load_state_dict(self, state: dict) -> None:
        self.steps = list(state["steps"])
        for mine, saved in zip(self.exp_avg + self.exp_avg_sq, state["exp_avg"] + state["exp_avg_sq"]):
            mine.copy_(saved)
