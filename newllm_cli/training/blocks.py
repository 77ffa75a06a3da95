"""Phase 1 of side-by-side networks (model/side_by_side.py): part b trains on the b-th contiguous
share of the training stream, alone, with the ordinary loop (phase1.run_cvfp); then the whole
network's contexts over the full split are solved without updates, like validation. Each part's
training is kept as its own report."""

from __future__ import annotations

from typing import Any

import numpy as np

from newllm_cli.model.side_by_side import SideBySide
from newllm_cli.settings import Phase1Settings
from newllm_cli.training.phase1 import CVFPResult, run_cvfp


def shares(offsets: np.ndarray, parts: int, concat: bool) -> list[tuple[int, int, np.ndarray]]:
    """(first row, stop row, document offsets from the first row) of each part's share: cut at the
    document bounds nearest to b/parts of the tokens (anywhere, for one stream: --concat)."""
    offsets = np.asarray(offsets, np.int64)
    total = int(offsets[-1])
    if concat:
        cuts = [round(total * b / parts) for b in range(parts + 1)]
        return [(a, z, np.array([0, z - a], np.int64)) for a, z in zip(cuts[:-1], cuts[1:])]
    at = [0] + [int(np.abs(offsets - total * b / parts).argmin()) for b in range(1, parts)] + [len(offsets) - 1]
    return [(int(offsets[i]), int(offsets[j]), offsets[i : j + 1] - offsets[i]) for i, j in zip(at[:-1], at[1:])]


def run_side_by_side(
    model: SideBySide, tokens: np.ndarray, offsets: np.ndarray, cfg: Phase1Settings, *, seed: int = 0,
    label: str = "phase1", **kw,
) -> tuple[CVFPResult, list[dict]]:  # fmt: skip
    """Train every part on its share, then solve the whole network's contexts; returns that solve
    and each part's training summary (history, steps, stop reason, warnings). No resume points
    yet: an interrupted run trains every part again from its start."""
    kw.pop("resume", None)
    kw.pop("save_resume", None)
    parts: list[dict[str, Any]] = []
    for b, ((a, z, offs), part) in enumerate(zip(shares(offsets, len(model.members), cfg.concat), model.members)):
        res = run_cvfp(part, tokens[a:z], offs, cfg, train=True, seed=seed + b, label=f"{label} block {b + 1}", **kw)
        parts.append(
            {
                "block": b + 1,
                "tokens": z - a,
                "documents": len(offs) - 1,
                "iterations": len(res.history) + len(res.solve),
                "optimizer_steps": res.optimizer_steps,
                "converged_ratio": res.converged_ratio,
                "stopped_by": res.stopped_by,
                "warnings": res.warnings,
                "history": res.history,
            }
        )
        res.contexts.close()
    whole = run_cvfp(model, tokens, offsets, cfg, train=False, label=f"{label} solve", **kw)
    whole.optimizer_steps = sum(p["optimizer_steps"] for p in parts)
    capped = [p for p in parts if p["stopped_by"] == "max_iterations"]
    whole.stopped_by = "max_iterations" if capped else parts[-1]["stopped_by"]
    whole.warnings = [f"block {p['block']}: {w}" for p in parts for w in p["warnings"]] + whole.warnings
    return whole, parts
