"""Named presets: whole recipes set at once (`--preset NAME`), below options and --config files.

`seed` is today's defaults; `oacd`, `oacd-dual` and `mcdl` are the research's later recipes
(docs/ARCHITECTURE.md). On a small machine a preset is scaled down with ordinary options
(`--preset oacd --context-dim 64 --embed-dim 64`). A new recipe is one entry in RECIPES.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from newllm_cli.runtime.errors import UsageError

_ONE_STREAM = {  # the research's Phase 1 iteration: Jacobi over one stream from zero, a constant learning rate
    "scheme": "parallel",
    "concat": True,
    "start": "zero",
    "lr_warmup": 0.002,
    "lr_medium": 0.002,
    "lr_finetune": 0.002,
    "max_iterations": 60,
    "diversity_batch": 5000,
}
_OACD = {
    "model": {
        "architecture": "context",
        "num_layers": 1,
        "activation": "gelu",
        "context_dim": 500,
        "embed_dim": 768,
        "init_std": 0.1,
        "init_bias_std": 0.01,
    },
    "phase1": {
        **_ONE_STREAM,
        "first_iteration": "random",
        "first_sigma": 0.01,
        "noise": 0.1,
        "diversity": "oacd",
        "diversity_weight": 1.0,
        "centroid_weight": 0.1,
        "grad_clip": 2.0,
        "min_converged_ratio": 0.9,
        "convergence_threshold": 0.03,
    },
}
RECIPES: dict[str, dict] = {
    "oacd": _OACD,  # their final recipe (12-01 on): OACD only, noise, random iteration 0
    "oacd-dual": {"model": {**_OACD["model"], "context_blocks": 2}, "phase1": _OACD["phase1"]},
    "mcdl": {  # their best with the CVFP term on (before 12-01): w = 0.9, two input tokens, ReLU, no noise
        "model": {
            "architecture": "context",
            "num_layers": 1,
            "activation": "relu",
            "input_tokens": 2,
            "context_dim": 768,
            "embed_dim": 768,
            "init_std": 0.1,
            "init_bias_std": 0.01,
        },
        "phase1": {**_ONE_STREAM, "diversity": "mcdl", "diversity_weight": 0.9, "use_distribution_reg": False},
    },
}


def _seed(default: Callable[[str, str], Any]) -> dict:
    """Every setting another preset sets, at its default: switching back to the seed's recipe."""
    keys = {(sec, k) for recipe in RECIPES.values() for sec, fields in recipe.items() for k in fields}
    out: dict = {}
    for sec, k in sorted(keys):
        out.setdefault(sec, {})[k] = default(sec, k)
    return out


NAMES = ("seed", *RECIPES)


def layer(name: str | None, default: Callable[[str, str], Any]) -> dict:
    """The settings a preset sets, by section ({} for none); `default(section, field)` gives a
    setting's default (for `seed`)."""
    if name is None:
        return {}
    if name == "seed":
        return _seed(default)
    if name not in RECIPES:
        raise UsageError(f"--preset {name!r}: no such preset (one of {', '.join(NAMES)})")
    return {sec: dict(fields) for sec, fields in RECIPES[name].items()}
