"""Compact rich reports of each stage's result, on stderr (stdout is for scripts)."""

from __future__ import annotations

from rich.table import Table

from newllm_cli.evaluation.controls import CONTROLS, label, unconverged_mark  # numpy only: help stays fast
from newllm_cli.runtime.progress import console


def run_names(result: dict) -> str:
    """`runs` and `compare` without --csv or --markdown: one run name a line."""
    return "\n".join(r["run"] for r in result["runs"])


def prepare(r: dict) -> None:
    t = Table(title=f"dataset {r['key']}{' (cache hit)' if r['cache_hit'] else ''}")
    for col in ("split", "documents", "tokens"):
        t.add_column(col, justify="right")
    for split in ("train", "val"):
        t.add_row(split, f"{r[split]['documents']:,}", f"{r[split]['tokens']:,}")
    t.caption = f"tokenizer {r['tokenizer']}, vocabulary {r['vocab_size']:,}"
    console(quiet=True).print(t)


def phase1(r: dict) -> None:
    ratio = r["converged_ratio"]
    settled = f", then {len(r['solve'])} no-update iterations" if r.get("solve") else ""
    console(quiet=True).print(
        f"phase1 {r['split']}: {r['iterations']} iterations, {r['optimizer_steps']} optimizer steps "
        f"({r['stopped_by']}){settled}; saved contexts {ratio:.1%} converged, fixed-point residual "
        f"{r['residual']:.2g}; {r['token_iterations_per_second']:,.0f} token-iterations/s"
    )
    fp = r.get("fixed_point")
    if fp:
        console(quiet=True).print(
            f"  carry-over c_0 = c_N: {fp['within_tolerance']:.1%} of {fp['documents']:,} documents within "
            f"{fp['tolerance']:g} (relative; worst {fp['carry_over_relative_max']:.2g}, largest change "
            f"{fp['carry_over_max_abs']:.2g}); inside documents {fp['interior_max_abs']:.1g}"
        )
    solve = r.get("fixed_point_solve") or {}
    if solve.get("failing"):
        console(quiet=True).print(
            f"  [yellow]{solve['failing']:,} documents not solved[/] in {solve['passes']} passes "
            f"({solve['stalled']:,} stalled: a cycle, chaos or too weak a pull); worst {solve['worst_residual']:.2g}"
        )
    if solve.get("unique"):
        u = solve["unique"]
        console(quiet=True).print(
            f"  a second start: {u['apart']:,} of {u['documents']:,} documents reach another fixed point "
            f"(largest distance {u['max_distance']:.2g})"
        )


def _flag(value: bool) -> str:
    return "[bold red]YES[/]" if value else "no"


SECTIONS = {
    "collapse": [
        ("global attractor", lambda a: _flag(a["global_attractor"]["degenerate"])),
        ("pairwise L2 mean", lambda a: f"{a['global_attractor']['mean_l2']:.4f}"),
        ("pairwise cosine mean", lambda a: f"{a['global_attractor']['mean_cosine']:.4f}"),
        ("zero solution", lambda a: _flag(a["zero_solution"]["degenerate"])),
    ],
    "distribution": [
        (
            "norm mean / median / std",
            lambda a: "{norm_mean:.3f} / {norm_median:.3f} / {norm_std:.3f}".format(**a["distribution"]),
        ),
        ("pairwise L2 median", lambda a: f"{a['distribution']['pairwise_l2_median']:.4f}"),
        ("sparsity (|v| < 0.01)", lambda a: f"{a['distribution']['sparsity']:.3%}"),
    ],
    "steps along the text": [
        ("norm spread (std / mean)", lambda a: _num(a["steps"]["norm_spread"])),
        ("cosine of consecutive contexts", lambda a: _num(a["steps"]["consecutive_cosine"])),
        (
            "variance not explained by x_t (memory)",
            lambda a: _fmt((a.get("memory") or {}).get("not_explained_by_token"), ".1%"),
        ),
        *[
            (f"autocorrelation, lag {k}", lambda a, k=k: _num(a["steps"]["autocorrelation"][f"lag_{k}"]))
            for k in (1, 10, 100)
        ],
    ],
    "fixed point (c_0 = c_N, relative)": [
        ("documents within the tolerance", lambda a: _share(a.get("fixed_point"), "within_tolerance")),
        ("worst carry-over residual", lambda a: _share(a.get("fixed_point"), "carry_over_relative_max", ".2g")),
        ("spectral radius of dc_N/dc_0, median / max", lambda a: _pair(a.get("contraction"), "pass_spectral_radius")),
        ("norm of df/dc at tokens, median / max", lambda a: _pair(a.get("contraction"), "step_norm")),
    ],
    "information": [
        ("actual rank", lambda a: f"{a['information']['actual_rank']} / {a['dim']}"),
        ("effective rank, centred (gated)", lambda a: _rank(a["centred"]["effective_rank"], a["attainable_rank"])),
        ("effective rank, uncentred", lambda a: f"{a['information']['effective_rank']:.2f} / {a['dim']}"),
        ("top singular values", lambda a: ", ".join(f"{v:.1f}" for v in a["information"]["top_singular_values"][:3])),
    ],
}


def _share(fp: dict | None, key: str, spec: str = ".1%") -> str:
    if not fp or not isinstance(fp.get(key), (int, float)):  # a report from before the field, or damaged
        return "-"
    of = f" of {fp['documents']:,}" if key == "within_tolerance" and "documents" in fp else ""
    return format(fp[key], spec) + of


def _pair(c: dict | None, key: str) -> str:
    if not c or c.get(f"{key}_median") is None:
        return "-"
    return f"{c[key + '_median']:.3f} / {c[key + '_max']:.3f}"


def _num(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def _rank(eff: float, top: int) -> str:
    text = f"{eff:.2f} / {top} ({eff / top:.0%})"
    return f"[bold red]{text}[/]" if eff < 0.2 * top else text


def analysis(r: dict) -> None:
    """One table per section, one column per split; degenerate figures in red."""
    splits = [s for s in ("train", "val", "contexts") if s in r]
    con = console(quiet=True)
    for title, rows in SECTIONS.items():
        t = Table(title=title, title_justify="left")
        t.add_column("figure")
        for s in splits:
            t.add_column(f"{s} ({r[s]['n']:,})", justify="right")
        for name, get in rows:
            t.add_row(name, *(get(r[s]) for s in splits))
        con.print(t)
    for s in splits:
        for d in r[s]["directions"]:
            if "tokens" in d:
                con.print(f"  {s} direction {d['direction']}: " + " ".join(repr(x) for x in d["tokens"]))
    if "decodability" in r:
        decodability(r["decodability"], r.get("control_steps", {}))
    gate = r["gate"]
    con.print(
        "Phase-1 gate: "
        + ("[green]passed[/]" if gate["passed"] else "[bold red]failed[/]: " + "; ".join(gate["problems"]))
    )
    for p in r.get("plots", []):
        con.print(f"wrote {p}")


PROBE_NAMES = {
    "token_from_context": "current token from c_t",
    "token_from_step": "current token from c_t - c_(t-1)",
    "next_from_context": "next token from c_t",
}


def decodability(d: dict, control_steps: dict) -> None:
    """Val perplexity / accuracy of each linear probe, for each source side by side."""
    t = Table(
        title=f"linear decodability (fit on {d['rows']['train']:,} train rows, scored on "
        f"{d['rows']['val']:,} val rows): val perplexity / accuracy",
        title_justify="left",
    )
    t.add_column("probe")
    sources = list(next(iter(d["probes"].values())))
    for name in sources:
        t.add_column(name, justify="right")
    for key, by_source in d["probes"].items():
        t.add_row(
            PROBE_NAMES.get(key, key),
            *(f"{v['val_perplexity']:.1f} / {v['val_accuracy']:.3f}" for v in by_source.values()),
        )
    console(quiet=True).print(t)
    for split, st in control_steps.items():
        auto = st["autocorrelation"]
        console(quiet=True).print(
            f"  untrained network, {split}: consecutive cosine {_num(st['consecutive_cosine'])}, "
            f"autocorrelation lag 1/10/100 {_num(auto['lag_1'])} / {_num(auto['lag_10'])} / "
            f"{_num(auto['lag_100'])}"
        )


def phase2(r: dict) -> None:
    """The head beside each baseline: perplexity ratio with its 95% interval, and how much it wins or
    loses by."""
    val = r["val"]
    fitted = f"l2 {r['l2']:g}" if "l2" in r else f"best of {len(r.get('epochs', []))} epochs: {r.get('best_epoch')}"
    predictor = r["provenance"].get("predictor", "linear")
    t = Table(title=f"phase2: {predictor} head reads {r['provenance']['head_input']} ({fitted})")
    t.add_column("model")
    for col in ("val ppl", "val acc", "the head against it"):
        t.add_column(col, justify="right")
    t.add_row("head on Phase 1 contexts", f"{val['perplexity']:.2f}", f"{val['accuracy']:.3f}", "")
    for key, b in r["baselines"].items():
        extra = f" (k={b['k']:g})" if "k" in b else ""
        extra += " [bold red](not converged)[/]" if not b.get("solve", {}).get("converged", True) else ""
        colour = {"beats": "green", "ties": "yellow"}.get(b["verdict"], "bold red")
        t.add_row(
            label(key) + extra,
            f"{b['val_perplexity']:.2f}",
            _fmt(b.get("accuracy"), ".3f"),
            f"[{colour}]{b['size']}[/]",
        )
    t.caption = (
        "the head's val perplexity lower (beats) or higher (loses) by this much; 95% interval in "
        f"parentheses, bootstrap over {next(iter(r['baselines'].values()))['resampled']}"
    )
    console(quiet=True).print(t)
    for p in r.get("plots", []):
        console(quiet=True).print(f"wrote {p}")
    if r.get("finding"):
        console(quiet=True).print(r["finding"], highlight=False)


def evaluation(r: dict) -> None:
    """phase2's table, on the evaluated text."""
    t = r["text"]
    where = f"{t['source']}{' ' + t['path'] if t.get('path') else ''}"
    console(quiet=True).print(
        f"eval on {where}: {t['tokens']:,} tokens, {t['documents']:,} documents, "
        f"{t['unknown_tokens']:,} unknown to the tokenizer{' (cached)' if r.get('skipped') else ''}",
        highlight=False,
    )
    phase2(r)


def generate(r: dict) -> None:
    console(quiet=True).print(f"generated {len(r['token_ids'])} tokens after a {len(r['prompt_ids'])}-token prompt")


def full(r: dict) -> None:
    prepare(r["prepare_data"])
    phase1(r["phase1_train"])
    phase1(r["phase1_val"])
    analysis(r["analysis"])
    phase2(r["phase2"])


def _fmt(value, spec: str = ".2f") -> str:
    if value is None:
        return "-"
    return format(value, spec) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def _count(n) -> str:
    return "-" if n is None else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k" if n >= 1e4 else f"{n / 1e3:.1f}k"


def _setup(settings: dict) -> str:
    """A run's key settings in a few characters: C16 L2 sample/12 w0.2 byte."""
    g = settings.get
    size = f"/{g('data.num_samples')}" if g("data.num_samples") else ""
    model = f"C{g('model.context_dim')} L{g('model.num_layers')}"
    if (g("model.context_blocks") or 1) > 1:
        model = f"{g('model.context_blocks')}x{model}"
    if g("model.architecture") not in (None, "residual"):
        model += f" {g('model.architecture')}"
    if g("phase1.diversity") not in (None, "none"):
        model += f" {g('phase1.diversity')}{g('phase1.diversity_weight')}"
    return f"{model} {g('data.source')}{size} w{g('phase1.dist_reg_weight')} {g('data.tokenizer')}"


def runs(r: dict, title: str = "runs") -> None:
    """One row per run: its settings (the varied ones, or a short summary), Phase 1 converged share
    (train/val), val effective rank, Phase 2 perplexities, time."""
    from rich import box

    from newllm_cli.experiments.compare import flag

    t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    t.add_column("run", overflow="fold", min_width=8)
    varied = r.get("varied")
    names = [flag(k) for k in r["settings"]] if varied else ["setup"]
    for name in names:
        t.add_column(name, justify="right", overflow="fold", min_width=5)
    for col in ("tokens", "conv%", "rank", "ppl", *(c.abbrev for c in CONTROLS), "time"):
        t.add_column(col, justify="right", no_wrap=True)
    for row in r["runs"]:
        conv = "/".join("-" if row[k] is None else f"{100 * row[k]:.0f}" for k in ("converged_train", "converged_val"))
        cells = [_fmt(row["settings"].get(k), "g") for k in r["settings"]] if varied else [_setup(row["settings"])]
        name = row["run"].split(".", 1)[1] if r.get("sweep") and "." in row["run"] else row["run"]
        t.add_row(
            name,
            *cells,
            _count(row["tokens"]),
            conv,
            _fmt(row["rank_val"], ".1f"),
            *(_ppl(row.get(k)) + unconverged_mark(row, k) for k in ("perplexity", *(c.column for c in CONTROLS))),
            "-" if row["seconds"] is None else f"{row['seconds']:.0f}s",
        )
    t.caption = (
        "conv%: Phase 1 converged share, train/val; rank: val effective rank (centred); ppl: the head's "
        f"val perplexity beside {', '.join(c.short for c in CONTROLS)}; *: the control's solve did not converge"
    )
    console(quiet=True).print(t, soft_wrap=False)
    evaluated = [(row["run"], e) for row in r["runs"] for e in row.get("evaluations", [])]
    if evaluated:
        e = Table(title="evaluated on other text (newllm eval)", title_justify="left", box=box.SIMPLE_HEAD)
        for col in ("run", "text", "tokens", "ppl", *(c.abbrev for c in CONTROLS)):
            e.add_column(col, justify="left" if col in ("run", "text") else "right", overflow="fold")
        for run, x in evaluated:
            figures = [_ppl(x.get(k)) for k in ("perplexity", *(c.column for c in CONTROLS))]
            e.add_row(run, x["text"], _count(x["tokens"]), *figures)
        console(quiet=True).print(e, soft_wrap=False)


def _ppl(value) -> str:
    """A perplexity in a narrow column: one decimal below 100 (the CSV and JSON keep every digit)."""
    return _fmt(value, ".1f" if value is not None and value < 100 else ".0f")


def compare(r: dict) -> None:
    runs({**r, "varied": True}, title=f"sweep {r['sweep']}" if r.get("sweep") else "runs compared")
    con = console(quiet=True)
    for fit in r["scaling"]:
        group = ", ".join(f"{k}={v}" for k, v in fit["group"].items())
        con.print(
            f"scaling{' (' + group + ')' if group else ''}: PPL = {fit['A']:.4g} * tokens^{fit['alpha']:.4f}, "
            f"R^2 {_fmt(fit['r2'], '.4f')} over {fit['points']} runs"
        )
    if r["rank_perplexity"]:
        c = r["rank_perplexity"]
        con.print(f"correlation of val effective rank with perplexity: r = {_fmt(c['r'], '.4f')} over {c['runs']} runs")
    for p in r.get("plots", []):
        con.print(f"wrote {p}")


def replicate(r: dict) -> None:
    """Each seed's head against each comparison, then the pooled verdicts."""
    keys = list(r["pooled"])
    t = Table(title=f"replicate {r['run']}: {len(r['seeds'])} seeds", title_justify="left")
    short = {c.key: c.short for c in CONTROLS}
    for col in ("seed", "head ppl", *(short.get(k, k) for k in keys)):
        t.add_column(col, justify="right")
    for row in r["runs"]:
        cells = [f"{row[k]['ratio']:.3f} {row[k]['verdict']}" for k in keys]
        if row.get("control_converged") is False and "untrained_network" in keys:
            cells[keys.index("untrained_network")] += " [bold red](not converged)[/]"
        t.add_row(str(row["seed"]), f"{row['perplexity']:.2f}", *cells)
    pooled = [r["pooled"][k] for k in keys]
    t.add_row(
        "pooled", "", *(f"{p['ratio']:.3f} {p['verdict']} ({p['ratio_low']:.3f}-{p['ratio_high']:.3f})" for p in pooled)
    )
    t.caption = "perplexity ratio head / comparison; pooled: t-interval over seeds plus the document bootstrap"
    console(quiet=True).print(t)
    console(quiet=True).print(r["finding"], highlight=False)


def sweep(r: dict) -> None:
    t = Table(title=f"sweep {r['sweep']}", title_justify="left")
    for col in ("trial", "run", "state", "val ppl", "error"):
        t.add_column(col, overflow="fold")
    for trial in r["trials"]:
        t.add_row(
            str(trial["number"]), trial["run"], trial["state"].lower(), _fmt(trial["value"]), trial["error"] or ""
        )
    console(quiet=True).print(t)
