"""`newllm runs` and `newllm compare`: runs side by side from their saved reports, with the
scaling law PPL = A * tokens^alpha and the correlation of val effective rank with perplexity.

Everything here reads artifacts only; no stage is run. A run that has not reached a stage shows
blanks for that stage's figures.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from newllm_cli.evaluation.controls import CONTROLS, unconverged_mark
from newllm_cli.experiments import scaling
from newllm_cli.runtime import nofollow
from newllm_cli.runtime.errors import UsageError
from newllm_cli.settings import SECTIONS, cli_name

KEY_SETTINGS = (
    "model.architecture",
    "model.context_dim",
    "model.num_layers",
    "model.context_blocks",
    "phase1.diversity",
    "data.source",
    "data.num_samples",
    "phase1.dist_reg_weight",
    "data.tokenizer",
)
DATA_SIZE = ("data.num_samples",)  # settings that make a sweep a data-size sweep


def _read(path: Path) -> dict | None:
    try:
        data = json.loads(nofollow.read_text(path))
        return data if isinstance(data, dict) else None
    except (OSError, ValueError, RecursionError, nofollow.Unsafe):  # a planted link is no report
        return None


def _flat(settings: dict) -> dict:
    return {
        f"{section}.{k}": v
        for section, values in settings.items()
        if isinstance(values, dict)
        for k, v in values.items()
    }


def _get(d: dict | None, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _figure(value) -> float | int | None:
    """A figure read from a report: a finite number, or None (a damaged field is a blank cell)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return value if ok else None


def run_row(run_dir: Path) -> dict:
    """One run's figures, from its reports (None where a stage has not run or a field is damaged)."""
    settings = _flat(_read(run_dir / "settings.json") or {})
    p1 = {split: _read(run_dir / f"phase1_{split}.json") for split in ("train", "val")}
    ana, p2 = _read(run_dir / "analysis.json"), _read(run_dir / "phase2.json")
    base = _get(p2, "baselines") or {}
    times = (_get(p1["train"], "seconds"), _get(p1["val"], "seconds"), _get(p2, "seconds"))
    seconds = [x for x in map(_figure, times) if x]
    size, converged = _get(base, "untrained_network", "size"), _get(base, "untrained_network", "solve", "converged")
    return {
        "run": run_dir.name,
        "settings": settings,
        **{
            k: _figure(v)
            for k, v in {
                "tokens": _get(p1["train"], "tokens"),
                "converged_train": _get(p1["train"], "converged_ratio"),
                "converged_val": _get(p1["val"], "converged_ratio"),
                "rank_train": _get(ana, "train", "centred", "effective_rank"),
                "rank_val": _get(ana, "val", "centred", "effective_rank"),
                "attainable_rank": _get(ana, "val", "attainable_rank"),
                "perplexity": _get(p2, "val", "perplexity"),
                **{c.column: _get(base, c.key, "val_perplexity") for c in CONTROLS},
            }.items()
        },
        "against_control": size if isinstance(size, str) else None,
        "control_converged": converged if isinstance(converged, bool) else None,
        "seconds": sum(seconds) if seconds else None,
        "evaluations": evaluations(run_dir),
    }


def evaluations(run_dir: Path) -> list[dict]:
    """The run's `newllm eval` results (runs/NAME/eval/KEY/eval.json): each text with its figures."""
    where = run_dir / "eval"
    found = []
    for path in sorted(where.glob("*/eval.json")) if nofollow.is_dir(where) else []:
        r = _read(path) or {}
        text, base = _get(r, "text") or {}, _get(r, "baselines") or {}
        found.append(
            {
                "key": path.parent.name,
                "text": str(_get(text, "path") or _get(text, "source")),
                "tokens": _figure(_get(text, "tokens")),
                "perplexity": _figure(_get(r, "val", "perplexity")),
                **{c.column: _figure(_get(base, c.key, "val_perplexity")) for c in CONTROLS},
                "against_control": _get(base, "untrained_network", "size"),
            }
        )
    return found


def workspace_runs(workspace: str) -> list[Path]:
    root = Path(workspace) / "runs"
    return sorted(p for p in root.glob("*") if nofollow.is_dir(p)) if nofollow.is_dir(root) else []


def varied(rows: list[dict]) -> list[str]:
    """The settings (section.field) whose values differ between the rows, runtime ones aside."""
    keys = sorted({k for r in rows for k in r["settings"]} - {"runtime.run", "runtime.workspace"})
    return [
        k for k in keys if not k.startswith("runtime.") and len({json.dumps(r["settings"].get(k)) for r in rows}) > 1
    ]


def flag(key: str) -> str:
    section, field = key.split(".")
    return cli_name(section, field) if section in SECTIONS and field in SECTIONS[section].model_fields else key


def scaling_law(tokens, perplexity) -> dict:
    """Least squares of log PPL = log A + alpha log tokens: alpha, A and R^2 of the log-log fit."""
    x, y = np.log(np.asarray(tokens, np.float64)), np.log(np.asarray(perplexity, np.float64))
    design = np.stack([np.ones_like(x), x], axis=1)
    (intercept, alpha), *_ = np.linalg.lstsq(design, y, rcond=None)
    residual = y - (intercept + alpha * x)
    total = ((y - y.mean()) ** 2).sum()
    return {
        "alpha": float(alpha),
        "A": float(math.exp(intercept)),
        "points": len(x),
        "r2": float(1 - (residual**2).sum() / total) if total > 0 else None,
    }


def correlation(x, y) -> float | None:
    """Pearson's r (None when either side does not vary)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    dx, dy = x - x.mean(), y - y.mean()
    norm = math.sqrt((dx**2).sum() * (dy**2).sum())
    return float((dx * dy).sum() / norm) if norm > 0 else None


def fits(rows: list[dict]) -> dict:
    """Scaling laws per group of the other varied settings (when the data size varies), and the
    correlation of val effective rank with Phase 2 perplexity over all runs that have both."""
    out: dict = {"scaling": [], "rank_perplexity": None}
    keys = varied(rows)
    if any(k in DATA_SIZE for k in keys):
        others = [k for k in keys if k not in DATA_SIZE]
        groups: dict = {}
        for r in rows:
            if r["tokens"] and r["perplexity"]:
                groups.setdefault(tuple(json.dumps(r["settings"].get(k)) for k in others), []).append(r)
        for group_key, members in groups.items():
            if len({m["tokens"] for m in members}) >= 2:
                n, ppl = [m["tokens"] for m in members], [m["perplexity"] for m in members]
                fit = scaling_law(n, ppl)
                fit["laws"] = [scaling.power(n, ppl), scaling.saturation(n, ppl)]
                fit["preferred"] = min(fit["laws"], key=lambda f: f["aic"])["law"]  # by AIC
                fit["group"] = {flag(k): json.loads(v) for k, v in zip(others, group_key)}
                fit["runs"] = [m["run"] for m in members]
                out["scaling"].append(fit)
    both = [r for r in rows if r["rank_val"] is not None and r["perplexity"] is not None]
    if len(both) >= 3:
        corr = correlation([b["rank_val"] for b in both], [b["perplexity"] for b in both])
        out["rank_perplexity"] = {"r": corr, "runs": len(both)}
    return out


def figures() -> tuple[str, ...]:
    """The CSV's figure columns: every control's after the head's perplexity."""
    return (
        "tokens",
        "converged_train",
        "converged_val",
        "rank_train",
        "rank_val",
        "perplexity",
        *(c.column for c in CONTROLS),
        "seconds",
    )


def to_csv(rows: list[dict], settings: list[str]) -> str:
    """The rows as CSV: run, the given settings (by option name), the figures."""
    import csv
    import io

    buf = io.StringIO()
    out = csv.writer(buf, lineterminator="\n")
    out.writerow(["run", *map(flag, settings), *figures()])
    for r in rows:
        out.writerow([r["run"], *(r["settings"].get(k) for k in settings), *(r.get(f) for f in figures())])
    return buf.getvalue()


def to_markdown(result: dict) -> str:
    """The rows and the fits as a Markdown table and lines, ready for a notebook or the docs."""
    cols = [
        "run",
        *map(flag, result["settings"]),
        "train tokens",
        "converged train / val",
        "val rank (centred)",
        "val ppl",
        *(c.column for c in CONTROLS),
        "seconds",
    ]
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for r in result["runs"]:
        conv = " / ".join("-" if r[k] is None else f"{r[k]:.1%}" for k in ("converged_train", "converged_val"))
        cells = [
            r["run"],
            *(str(r["settings"].get(k)) for k in result["settings"]),
            _num(r["tokens"], ","),
            conv,
            _num(r["rank_val"]),
            *(_num(r.get(k)) + unconverged_mark(r, k) for k in ("perplexity", *(c.column for c in CONTROLS))),
            _num(r["seconds"], ".0f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if result.get("scaling") or result.get("rank_perplexity"):
        lines.append("")
    for fit in result.get("scaling", []):
        group = ", ".join(f"{k}={v}" for k, v in fit["group"].items())
        lines.append(
            f"Scaling{' (' + group + ')' if group else ''}: PPL = {fit['A']:.4g} x tokens^{fit['alpha']:.4f}, "
            f"R^2 = {_num(fit['r2'], '.4f')} ({fit['points']} runs)."
        )
        for law in fit.get("laws", []):
            chosen = " (lower AIC)" if law["law"] == fit.get("preferred") else ""
            lines.append(f"- {law['law']}{chosen}: {scaling.describe(law)}.")
    if result.get("rank_perplexity"):
        c = result["rank_perplexity"]
        lines.append(
            f"Correlation of val effective rank with val perplexity: r = {_num(c['r'], '.3f')} ({c['runs']} runs)."
        )
    return "\n".join(lines) + "\n"


def _num(v, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def _formats(out: dict, csv_output: bool, markdown: bool) -> dict:
    if csv_output and markdown:
        raise UsageError("choose --csv or --markdown")
    if csv_output:
        out["stdout"] = to_csv(out["runs"], out["settings"])
    if markdown:
        out["stdout"] = to_markdown(out)
    return out


def runs(s, csv_output: bool = False, markdown: bool = False) -> dict:
    """Every run of the workspace, one row each: key settings, Phase 1 converged share, centred
    effective rank, Phase 2 perplexity beside unigram, bigram and the control, and time."""
    rows = [run_row(p) for p in workspace_runs(s.runtime.workspace)]
    return _formats({"runs": rows, "settings": list(KEY_SETTINGS)}, csv_output, markdown)


def compare(
    s,
    names: list[str] | None = None,
    sweep: str | None = None,
    storage: str | None = None,
    plot: Path | None = None,
    csv_output: bool = False,
    markdown: bool = False,
) -> dict:
    """The chosen runs (or a sweep's) side by side with their varied settings, the scaling law
    when the data size varies, and the rank-perplexity correlation."""
    if bool(names) == bool(sweep):
        raise UsageError("give run names or --sweep NAME (not both)")
    root = Path(s.runtime.workspace) / "runs"
    names = sweep_runs(s.runtime.workspace, sweep, storage) if sweep else list(names or [])
    missing = [n for n in names if not (root / n).is_dir()]
    if missing:
        raise UsageError(f"no run {', '.join(missing)} in {s.runtime.workspace}")
    rows = [run_row(root / n) for n in names]
    out = {"runs": rows, "settings": varied(rows), "sweep": sweep, **fits(rows)}
    if plot is not None:
        from newllm_cli.evaluation import plots

        out["plots"] = [str(p) for p in plots.comparison(out, plot)]
    return _formats(out, csv_output, markdown)


def sweep_runs(workspace: str, name: str, storage: str | None) -> list[str]:
    """The runs of a sweep's finished trials, in trial order."""
    import optuna
    from optuna.trial import TrialState

    from newllm_cli.experiments.sweep import open_storage, storage_url

    url = storage_url(workspace, storage)
    try:
        study = optuna.load_study(study_name=name, storage=open_storage(url, 10.0))
    except KeyError:
        raise UsageError(f"no sweep {name!r} in {url}") from None
    return [  # a point run under several seeds (--seeds) lists one run per seed
        run
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if "run" in t.user_attrs
        for run in t.user_attrs.get("runs", [t.user_attrs["run"]])
    ]
