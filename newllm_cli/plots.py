"""PNG figures for people who would rather look: singular-value spectrum and Phase 1 convergence.

matplotlib is an optional extra (`pip install 'newllm[plot]'`); without it, a clear one-line error.
"""
from __future__ import annotations

from pathlib import Path

from .artifacts import atomic_path
from .errors import UsageError


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install 'newllm[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    return path


def spectrum(reports: dict[str, dict], out_dir: Path) -> Path:
    """Normalised singular values (s / sum s) per split, log scale, with effective ranks."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for split, rep in reports.items():
        s = rep["information"]["singular_values"]
        total = sum(s) or 1.0
        ax.semilogy(range(1, len(s) + 1), [max(v / total, 1e-12) for v in s], marker="o",
                    label=f"{split} (effective rank {rep['information']['effective_rank']:.2f} / {rep['dim']})")
    ax.set_xlabel("index")
    ax.set_ylabel("singular value / sum")
    ax.set_title("context singular-value spectrum")
    ax.legend()
    ax.grid(alpha=0.3)
    path = _save(fig, out_dir / "spectrum.png")
    plt.close(fig)
    return path


def convergence(history: list[dict], out_dir: Path) -> Path:
    """Phase 1 losses (log scale) and converged share per iteration."""
    plt = _pyplot()
    rows = [h for h in history if h.get("cvfp_loss") is not None]
    it = [h["iteration"] for h in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in ("loss", "cvfp_loss", "dist_loss"):
        ax.semilogy(it, [max(h[key], 1e-12) for h in rows], marker="o", label=key)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    ax2.plot(it, [h["converged_ratio"] for h in rows], "k--", marker="s", label="converged share")
    ax2.set_ylim(0, 1.02)
    ax2.set_ylabel("converged share")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="center right")
    ax.set_title("Phase 1 convergence (train)")
    ax.grid(alpha=0.3)
    path = _save(fig, out_dir / "convergence.png")
    plt.close(fig)
    return path
