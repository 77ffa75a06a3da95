"""PNG figures for people who would rather look: singular-value spectrum, Phase 1 convergence, Phase 2 fits.

matplotlib is an optional extra (`pip install 'newllm[plot]'`); without it, a clear one-line error.
"""

from __future__ import annotations

from pathlib import Path

from newllm_cli.evaluation.controls import CONTROLS
from newllm_cli.runtime.errors import UsageError
from newllm_cli.store.artifacts import publishes
from newllm_cli.store.publish import atomic_path


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install 'newllm[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    if publishes():  # the leader's figure is every rank's
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
        ax.semilogy(
            range(1, len(s) + 1),
            [max(v / total, 1e-12) for v in s],
            marker="o",
            label=f"{split} (effective rank {rep['information']['effective_rank']:.2f} / {rep['dim']})",
        )
    ax.set_xlabel("index")
    ax.set_ylabel("singular value / sum")
    ax.set_title("context singular-value spectrum")
    ax.legend()
    ax.grid(alpha=0.3)
    path = _save(fig, out_dir / "spectrum.png")
    plt.close(fig)
    return path


def convergence(histories: dict[str, list[dict]], target: float, out_dir: Path) -> Path:
    """Phase 1 per iteration: the losses of training (log scale), and the converged share of each
    split beside the stopping target."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    train = [h for h in histories.get("train", []) if h.get("cvfp_loss") is not None]
    for key in ("loss", "cvfp_loss", "dist_loss"):
        left.semilogy([h["iteration"] for h in train], [max(h[key], 1e-12) for h in train], marker=".", label=key)
    left.set(xlabel="iteration", ylabel="loss", title="Phase 1 training losses")
    for split, history in histories.items():
        rows = [h for h in history if h.get("converged_ratio") is not None]
        right.plot([h["iteration"] for h in rows], [h["converged_ratio"] for h in rows], marker=".", label=split)
    right.axhline(target, color="k", linestyle="--", linewidth=1, label=f"target {target:.0%}")
    right.set(
        xlabel="iteration",
        ylabel="share of tokens converged",
        ylim=(0, 1.02),
        title="converged share (val: weights frozen)",
    )
    for ax in (left, right):
        ax.legend()
        ax.grid(alpha=0.3)
    path = _save(fig, out_dir / "convergence.png")
    plt.close(fig)
    return path


def phase2(report: dict, out_dir: Path) -> Path:
    """Phase 2: each fit's training objective over L-BFGS iterations, and val perplexity against
    the penalty chosen on held-out training documents, with the baselines as horizontal lines."""
    import math

    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, blocks in report.get("curves", {}).items():
        for (l2, stage), style in zip(dict.fromkeys((b["l2"], b["stage"]) for b in blocks), ("-", "--", ":", "-.") * 9):
            rows = [b for b in blocks if (b["l2"], b["stage"]) == (l2, stage)]
            left.plot(
                [b["iterations"] for b in rows],
                [b["objective"] for b in rows],
                style,
                marker="o",
                label=f"{name} {stage} l2={l2:g}",
                linewidth=2 if stage == "refit" else 1,
            )
    left.set(
        xlabel="L-BFGS iterations",
        ylabel="training objective (nats / pair)",
        title="Phase 2 fits (a point per block of iterations)",
    )
    left.legend(fontsize=7)
    heads = [("head", report.get("selection", []), report["val"]["perplexity"], report["l2"])]
    for c in CONTROLS:  # the controls that fit a head have a penalty curve of their own
        fitted = report["baselines"].get(c.key)
        if c.curve and fitted and "l2" in fitted:
            heads.append((c.curve, fitted.get("selection", []), fitted["val_perplexity"], fitted["l2"]))
    for name, selection, val, l2 in heads:
        if selection:
            right.semilogx(
                [r["l2"] for r in selection],
                [math.exp(r["heldout_loss"]) for r in selection],
                marker="o",
                label=f"{name}: held-out perplexity",
            )
        right.plot([l2], [val], marker="*", markersize=12, linestyle="none", label=f"{name}: val perplexity {val:.1f}")
    for c in CONTROLS:
        if c.key in report["baselines"]:
            v = report["baselines"][c.key]["val_perplexity"]
            right.axhline(v, linestyle="--", linewidth=1, color="k" if c.curve else "grey")
            right.annotate(f"{c.short} {v:.1f}", (0.01, v), xycoords=("axes fraction", "data"), fontsize=7, va="bottom")
    right.set_xscale("log")
    right.set(xlabel="l2 penalty", ylabel="perplexity", title="penalty choice and baselines (val)")
    right.legend(fontsize=7)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    path = _save(fig, out_dir / "phase2.png")
    plt.close(fig)
    return path


def comparison(result: dict, out_dir: Path) -> list[Path]:
    """`compare --plot`: the log-log scaling of perplexity with training tokens (with each fitted law)
    and val effective rank against perplexity."""
    plt = _pyplot()
    rows = {r["run"]: r for r in result["runs"]}
    paths = []
    if result["scaling"]:
        fig, ax = plt.subplots(figsize=(6, 4))
        for fit in result["scaling"]:
            members = sorted((rows[n] for n in fit["runs"]), key=lambda r: r["tokens"])
            xs, ys = [m["tokens"] for m in members], [m["perplexity"] for m in members]
            label = ", ".join(f"{k}={v}" for k, v in fit["group"].items()) or "runs"
            points = ax.loglog(xs, ys, "o", label=label)[0]
            ax.loglog(
                xs,
                [fit["A"] * x ** fit["alpha"] for x in xs],
                "-",
                color=points.get_color(),
                label=f"PPL = {fit['A']:.3g} N^{fit['alpha']:.3f} (R^2 {fit['r2'] or 0:.3f})",
            )
        ax.set(xlabel="training tokens N", ylabel="val perplexity (head)", title="scaling with data")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, which="both")
        paths.append(_save(fig, out_dir / "scaling.png"))
        plt.close(fig)
    both = [r for r in result["runs"] if r["rank_val"] is not None and r["perplexity"] is not None]
    if both:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([r["rank_val"] for r in both], [r["perplexity"] for r in both], "o")
        for r in both:
            ax.annotate(r["run"].split(".", 1)[-1], (r["rank_val"], r["perplexity"]), fontsize=6)
        corr = result.get("rank_perplexity") or {}
        ax.set(
            xlabel="val effective rank (centred)",
            ylabel="val perplexity (head)",
            title=f"rank against perplexity (r = {corr.get('r') or float('nan'):.3f})",
        )
        ax.grid(alpha=0.3)
        paths.append(_save(fig, out_dir / "rank_perplexity.png"))
        plt.close(fig)
    return paths
