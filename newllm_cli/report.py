"""Compact rich reports of each stage's result, on stderr (stdout is for scripts)."""
from __future__ import annotations

from rich.table import Table

from .progress import console


def primary_path(command: str, result: dict) -> str:
    """What a script gets on stdout without --json: the main artifact's path."""
    if command == "prepare-data":
        return result["dataset_dir"]
    if command == "phase1":
        return result["contexts"]
    if command == "phase2":
        return result["checkpoint"]
    if command == "full":
        return result["run_dir"]
    if command == "generate":
        return result["text"]
    return str(result.get("path", ""))


def prepare(r: dict) -> None:
    t = Table(title=f"dataset {r['key']}{' (cache hit)' if r['cache_hit'] else ''}")
    for col in ("split", "documents", "tokens"):
        t.add_column(col, justify="right")
    for split in ("train", "val"):
        t.add_row(split, f"{r[split]['documents']:,}", f"{r[split]['tokens']:,}")
    t.caption = f"tokenizer {r['tokenizer']}, vocabulary {r['vocab_size']:,}"
    console().print(t)


def phase1(r: dict) -> None:
    ratio = r["converged_ratio"]
    console().print(f"phase1 {r['split']}: {r['iterations']} iterations, {r['optimizer_steps']} optimizer steps, "
                    f"converged {ratio:.1%} ({r['stopped_by']}), "
                    f"{r['token_iterations_per_second']:,.0f} token-iterations/s")


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
        ("norm mean / median / std", lambda a: "{norm_mean:.3f} / {norm_median:.3f} / {norm_std:.3f}".format(**a["distribution"])),
        ("pairwise L2 median", lambda a: f"{a['distribution']['pairwise_l2_median']:.4f}"),
        ("sparsity (|v| < 0.01)", lambda a: f"{a['distribution']['sparsity']:.3%}"),
    ],
    "information": [
        ("actual rank", lambda a: f"{a['information']['actual_rank']} / {a['dim']}"),
        ("effective rank", lambda a: _rank(a["information"]["effective_rank"], a["dim"])),
        ("effective rank, centred", lambda a: f"{a['centred']['effective_rank']:.2f} / {a['dim']}"),
        ("top singular values", lambda a: ", ".join(f"{v:.1f}" for v in a["information"]["top_singular_values"][:3])),
    ],
}


def _rank(eff: float, dim: int) -> str:
    text = f"{eff:.2f} / {dim}"
    return f"[bold red]{text}[/]" if eff < 0.2 * dim else text


def analysis(r: dict) -> None:
    """One table per section, one column per split; degenerate figures in red."""
    splits = [s for s in ("train", "val", "contexts") if s in r]
    con = console()
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
    gate = r["gate"]
    con.print("Phase-1 gate: " + ("[green]passed[/]" if gate["passed"] else
                                  "[bold red]failed[/]: " + "; ".join(gate["problems"])))
    for p in r.get("plots", []):
        con.print(f"wrote {p}")


NAMES = {"unigram_add_one": "add-one unigram", "bigram_add_k": "add-k bigram",
         "untrained_network": "untrained network (control)"}


def phase2(r: dict) -> None:
    """The head beside each baseline, and a plain sentence on whether it beats them."""
    best = r["best"]["val"]
    t = Table(title=f"phase2: head reads {r['provenance']['head_input']} (best epoch {r['best_epoch']})")
    for col in ("model", "val perplexity", "val accuracy"):
        t.add_column(col, justify="right")
    t.add_row("head on Phase 1 contexts", f"{best['perplexity']:.2f}", f"{best['accuracy']:.3f}")
    for key, b in r["baselines"].items():
        extra = f" (k={b['k']:g})" if "k" in b else ""
        t.add_row(NAMES.get(key, key) + extra, f"{b['val_perplexity']:.2f}", "")
    con = console()
    con.print(t)
    for key, b in r["baselines"].items():
        verdict = ("[green]beats[/]" if b["beaten"] else "[yellow]only matches[/]" if b["ratio"] < 1.001
                   else "[bold red]does not beat[/]")
        con.print(f"the head {verdict} the {NAMES.get(key, key)}")


def generate(r: dict) -> None:
    console().print(f"generated {len(r['token_ids'])} tokens after a {len(r['prompt_ids'])}-token prompt")


def full(r: dict) -> None:
    prepare(r["prepare_data"])
    phase1(r["phase1_train"])
    phase1(r["phase1_val"])
    analysis(r["analysis"])
    phase2(r["phase2"])
