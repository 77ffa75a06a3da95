"""runs/NAME/metrics.csv: one row per step of each stage and split, for plots and scripts.

A rerun of a stage replaces its own rows (the file holds the run's current figures, like the JSON
reports); log.txt keeps the history of what was printed.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from newllm_cli.runtime import nofollow
from newllm_cli.runtime.errors import UsageError, first_line
from newllm_cli.runtime.progress import warn
from newllm_cli.store.artifacts import publishes
from newllm_cli.store.publish import atomic_path, latest

FIELDS = [
    "stage",
    "split",
    "step",
    "lr",
    "loss",
    "cvfp_loss",
    "dist_loss",
    "mcdl_loss",
    "centroid_loss",
    "odcm_loss",
    "sdl_loss",
    "nuc_loss",
    "converged_ratio",
    "residual",
    "l2",
    "objective",
    "heldout_loss",
    "seconds",
]


def record(path: Path, stage: str, split: str, rows: list[dict], board: Path | None = None) -> None:
    """Write `rows` (Phase 1 history records or Phase 2 blocks) as the rows of (stage, split), and as
    TensorBoard events under `board` when given."""
    if not publishes():
        return
    if board is not None:
        _events(board / f"{stage}_{split}", rows)
    kept = []
    if os.path.lexists(latest(path)):
        try:
            with nofollow.open_file(latest(path), "r", nofollow.TEXT_LIMIT) as f:
                kept = [r for r in csv.DictReader(f) if (r.get("stage"), r.get("split")) != (stage, split)]
        except (ValueError, csv.Error, nofollow.Unsafe) as e:  # not UTF-8, not CSV, too large, a link
            warn(f"ignoring damaged {path} ({first_line(e)[:100]}): it is written afresh")
            kept = []
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        out = csv.DictWriter(f, FIELDS, extrasaction="ignore")
        out.writeheader()
        out.writerows(kept)
        for r in rows:
            step = r.get("iteration", r.get("iterations", r.get("steps")))
            out.writerow({k: _cell(v) for k, v in {**r, "stage": stage, "split": split, "step": step}.items()})


def _cell(value) -> str:
    return "" if value is None else repr(value) if isinstance(value, float) else str(value)


def _events(directory: Path, rows: list[dict]) -> None:
    """One event file per (stage, split), replaced on a rerun like its CSV rows; a scalar per figure,
    under the row's l2 for Phase 2 (each penalty's fit restarts its iteration count)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UsageError("--tensorboard needs the tensorboard package: pip install 'newllm[tensorboard]'") from None
    nofollow.remove_tree(directory)
    nofollow.makedirs(directory)
    with SummaryWriter(str(directory)) as writer:
        for r in rows:
            step = r.get("iteration", r.get("iterations"))
            prefix = f"l2={r['l2']:g} {r['stage']}/" if "l2" in r else ""
            for key in FIELDS[3:]:
                if key != "l2" and isinstance(r.get(key), (int, float)):
                    writer.add_scalar(prefix + key, r[key], step)
