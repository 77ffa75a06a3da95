"""Results a researcher can trust on the first try: no silent inheritance, no train/val leakage,
figures that say when they mean little, hints that act on the same run, fast reruns of `full`."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import make_corpus
from rich.console import Console

from newllm_cli.data import dedup
from newllm_cli.evaluation import verdict
from newllm_cli.evaluation.analysis import analyze_contexts
from newllm_cli.runtime import locks
from newllm_cli.runtime.progress import make_bar


def _fast(tmp_path: Path, corpus: Path, *more: str) -> list[str]:
    return [
        "--workspace",
        str(tmp_path / "ws"),
        "--source",
        "text_file",
        "--path",
        str(corpus),
        "--tokenizer",
        "byte",
        "--phase2-max-iterations",
        "30",
        *more,
        "--probe-rows",
        "0",
    ]  # last: see [:-2]


# 2. inheritance


def test_a_new_source_does_not_inherit_the_old_sources_data_settings(cli, tmp_path, corpus):
    ws = ["--workspace", str(tmp_path / "ws")]
    assert cli("prepare-data", *ws, "--num-samples", "3", "--tokenizer", "byte").code == 0
    again = cli("prepare-data", *ws, "--json")  # same source: inherits, and says so
    assert again.code == 0 and again.json()["train"]["documents"] + again.json()["val"]["documents"] == 3
    assert "settings from run 'default': num_samples = 3, tokenizer = \"byte\"" in again.err
    other = cli("prepare-data", *ws, "--source", "text_file", "--path", corpus, "--json")
    assert other.code == 0, other.err
    assert "made of other data (--source differs)" in other.err and "num_samples" not in other.err
    got = other.json()
    assert got["data"]["num_samples"] is None and got["data"]["tokenizer"] == "bpe"  # that source's defaults
    assert got["train"]["documents"] + got["val"]["documents"] == 24  # the whole file, not 3 documents


def test_config_of_a_run_that_does_not_exist_is_refused(cli, tmp_path):
    r = cli("config", "--workspace", tmp_path / "ws", "--run", "nosuch")
    assert r.code == 3 and "no run named 'nosuch'" in r.err and r.out == ""
    assert cli("config", "--workspace", tmp_path / "ws").code == 0  # a new workspace's default run: defaults


# 3. duplicates between the splits


def _naive_duplicates(train: list[str], val: list[str]) -> list[bool]:
    norm = lambda t: " ".join(t.split())  # noqa: E731
    seen, out = {norm(t) for t in train}, []
    earlier = set()
    for t in val:
        out.append(norm(t) in seen or norm(t) in earlier)
        earlier.add(norm(t))
    return out


@pytest.mark.parametrize("part", [1 << 22, 3])  # one partition, and many
def test_duplicate_finder_equals_a_naive_set_comparison(part, monkeypatch, tmp_path):
    monkeypatch.setattr(dedup, "PART", part)
    monkeypatch.setattr(dedup, "READ", 4)
    rng = np.random.default_rng(0)
    pool = [f"doc {i}\n  with  words {i % 3}" for i in range(12)]
    train = [pool[i] for i in rng.integers(0, 12, 15)]
    val = [pool[i].replace("  ", " ") for i in rng.integers(0, 18, 20) if i < 12] + ["only in val", "only in val"]
    t = dedup.KeyFile(tmp_path / "t").write(map(dedup.text_key, train))
    v = dedup.KeyFile(tmp_path / "v").write(map(dedup.text_key, val))
    found = dedup.find(t, v)
    want = _naive_duplicates(train, val)
    assert found["duplicate"].tolist() == want
    assert found["of_train"] + found["within_val"] == sum(want) and found["within_val"] >= 1


def _duplicated_corpus(path: Path) -> Path:
    base = make_corpus(path.with_name("base.txt"), docs=30, seed=1).read_text().split("\n\n")
    docs = base + base[::2] + [base[i].replace(" ", "  ") for i in range(1, 30, 3)]  # copies, some re-spaced
    path.write_text("\n\n".join(d.strip() for d in docs) + "\n")
    return path


def _documents(ws: Path, split: str) -> list[tuple]:
    data = next((ws / "datasets").iterdir())
    tokens, offsets = np.load(data / f"{split}.tokens.npy"), np.load(data / f"{split}.offsets.npy")
    return [tuple(tokens[a:b]) for a, b in zip(offsets[:-1], offsets[1:])]


def test_prepare_data_drops_validation_documents_seen_in_training(cli, tmp_path):
    corpus = _duplicated_corpus(tmp_path / "dups.txt")
    args = ["--source", "text_file", "--path", corpus, "--tokenizer", "byte", "--val-ratio", "0.4", "--json"]
    r = cli("prepare-data", "--workspace", tmp_path / "a", *args)
    assert r.code == 0, r.err
    dups = r.json()["val_duplicates"]
    train, val = _documents(tmp_path / "a", "train"), _documents(tmp_path / "a", "val")
    assert not set(val) & set(train) and len(set(val)) == len(val)
    assert dups["dropped"] == dups["of_train"] + dups["within_val"] > 0 and "validation duplicates" in r.err
    meta = json.loads(next((tmp_path / "a" / "datasets").glob("*/dataset.json")).read_text())
    assert meta["val_duplicates"] == dups
    kept = cli("prepare-data", "--workspace", tmp_path / "b", *args, "--val-duplicates", "keep")
    assert kept.code == 0 and kept.json()["key"] != r.json()["key"]
    assert (
        kept.json()["val_duplicates"]["dropped"] == 0 and kept.json()["val_duplicates"]["of_train"] == dups["of_train"]
    )
    assert len(_documents(tmp_path / "b", "val")) == len(val) + dups["dropped"]  # the original behaviour
    assert set(_documents(tmp_path / "b", "val")) & set(_documents(tmp_path / "b", "train"))


# 4. sanity of what is printed


def test_small_sets_and_worse_than_uniform_perplexities_are_warned(cli, tmp_path, corpus):
    from newllm_cli.stages import sanity_warnings

    r = cli("full", *_fast(tmp_path, corpus, "--val-ratio", "0.05"), "--force", "--json")
    assert r.code == 0, r.err
    warnings = r.json()["phase2"]["warnings"]
    assert r.json()["prepare_data"]["val"]["tokens"] < 1000
    assert any("validation set has" in w and "under 1,000" in w for w in warnings)
    words = sanity_warnings(
        300.0, {"bigram_add_k": {"val_perplexity": 10.0}}, vocab=256, train_tokens=100, val_tokens=5000
    )
    assert any("above the vocabulary size 256 (the head)" in w for w in words)
    assert any("smaller than the vocabulary" in w for w in words)
    assert sanity_warnings(10.0, {}, vocab=256, train_tokens=10_000, val_tokens=5000) == []


def test_the_attainable_rank_is_c_minus_one_only_for_layer_normed_contexts():
    rng = np.random.default_rng(0)
    noise = rng.normal(size=(2000, 8)).astype(np.float32)
    assert analyze_contexts(noise)["attainable_rank"] == 8
    normed = (noise - noise.mean(1, keepdims=True)) / noise.std(1, keepdims=True)
    assert analyze_contexts(normed * 1.5 + 0.3)["attainable_rank"] == 7  # LayerNorm with an affine map


def test_a_text_file_named_npy_is_not_a_npy_array(cli, tmp_path):
    (tmp_path / "ctx.npy").write_text("not numbers\n")
    r = cli("analyze", "--contexts", tmp_path / "ctx.npy", "--workspace", tmp_path / "ws")
    assert r.code == 2 and "not a .npy array" in r.err and "allow_pickle" not in r.err


def test_analyzing_an_outside_file_takes_no_lock_of_the_run(cli, tmp_path):
    np.save(tmp_path / "ctx.npy", np.random.default_rng(0).normal(size=(300, 4)).astype(np.float32))
    with locks.run(tmp_path / "ws", "default"):  # another command writes run 'default'
        r = cli("analyze", "--contexts", tmp_path / "ctx.npy", "--workspace", tmp_path / "ws")
    assert r.code == 0, r.err


def test_rebuild_hints_name_the_workspace_and_run_that_failed(cli, tmp_path, corpus):
    args = _fast(tmp_path, corpus, "--run", "exp_1")
    assert cli("full", *args, "--force").code == 0
    (tmp_path / "ws" / "runs" / "exp_1" / "contexts_val.npy").write_bytes(b"damaged")
    r = cli("phase2", *args[:-2], "--rebuild", "--force")  # phase2 takes no --probe-rows
    assert r.code == 0  # --rebuild replaces it
    (tmp_path / "ws" / "runs" / "exp_1" / "contexts_val.npy").write_bytes(b"damaged")
    bad = cli("phase2", "--workspace", tmp_path / "ws", "--run", "exp_1", "--force")
    assert bad.code == 3
    hint = bad.err.split("`")[1]
    assert hint == f"newllm phase1 --split val --workspace {tmp_path / 'ws'} --run exp_1", bad.err


def test_one_verdict_wording_and_a_plain_finding(cli, tmp_path, corpus):
    big = verdict.size({"verdict": "loses to", "ratio_low": 4.1, "ratio": 4.49, "ratio_high": 4.9})
    small = verdict.size({"verdict": "loses to", "ratio_low": 1.5, "ratio": 1.602, "ratio_high": 1.7})
    assert big.startswith("loses by 349.0%") and small.startswith("loses by 60.2%") and "x" not in big
    r = cli("full", *_fast(tmp_path, corpus), "--force", "--json")
    assert r.code == 0, r.err
    finding = r.json()["phase2"]["finding"]
    assert finding.startswith("Finding: the Phase 1 contexts ") and "untrained network" in finding
    assert "gram" in finding and "95% interval" in finding and "other seeds" in finding  # the strongest count model
    assert finding in r.err.replace("\n", " ") or finding[:60] in r.err


def test_runs_table_and_progress_bar_fit_80_columns(cli, tmp_path, corpus, monkeypatch):
    assert cli("full", *_fast(tmp_path, corpus), "--force").code == 0
    monkeypatch.setenv("COLUMNS", "80")
    r = cli("runs", "--workspace", tmp_path / "ws")
    assert r.code == 0 and max(len(line) for line in r.err.splitlines()) <= 80, r.err
    bar = make_bar(Console(file=io.StringIO(), width=80, force_terminal=True))
    task = bar.add_task(
        "head on phase1 contexts l2=0.001 (select), a long description",
        total=10**8,
        status="objective 5.123456",
        unit="it",
    )
    bar.update(task, advance=10**6)
    time.sleep(0.02)
    bar.update(task, advance=10**6)
    out = io.StringIO()
    Console(file=out, width=80, no_color=True).print(bar.make_tasks_table(bar.tasks))
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and len(lines[0]) <= 80 and "eta" in lines[0] and "%" in lines[0], lines


# 5. fast reruns of full


def test_a_rerun_of_full_skips_every_unchanged_stage_and_reports_the_same(cli, tmp_path, corpus):
    args = _fast(tmp_path, corpus, "--force")
    first = cli("full", *args, "--json")
    assert first.code == 0, first.err
    run = tmp_path / "ws" / "runs" / "default"
    reports = {
        p.name: p.read_bytes()
        for p in run.iterdir()
        if p.suffix in (".json", ".npy", ".pt") and p.name != "stages.json"
    }
    second = cli("full", *args, "--json")
    assert second.code == 0, second.err
    got = second.json()
    assert set(got["seconds"]) == {"prepare_data", "phase1_train", "phase1_val", "analysis", "phase2"}
    assert all(got[k]["skipped"] for k in ("phase1_train", "phase1_val", "analysis", "phase2"))
    assert second.err.count("up to date, skipped") == 4
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.name in reports} == reports
    for key in ("phase1_train", "phase2"):
        a, b = first.json()[key], got[key]
        assert {k: v for k, v in a.items() if k not in ("skipped", "wall_seconds")} == json.loads(
            json.dumps({k: v for k, v in b.items() if k not in ("skipped", "wall_seconds")})
        )
    # another Phase 2 setting: only Phase 2 runs again
    third = cli("full", *args, "--phase2-l2", "0.01", "--json").json()
    assert [k for k in ("phase1_train", "phase1_val", "analysis", "phase2") if not third[k]["skipped"]] == ["phase2"]
    # an upstream output rewritten: everything after it runs again; --rebuild runs everything
    (run / "contexts_val.npy").unlink()
    fourth = cli("full", *args, "--phase2-l2", "0.01", "--json").json()
    assert [k for k in ("phase1_train", "phase1_val", "analysis", "phase2") if not fourth[k]["skipped"]] == [
        "phase1_val",
        "analysis",
        "phase2",
    ]
    fifth = cli("full", *args, "--phase2-l2", "0.01", "--rebuild", "--json").json()
    assert not any(fifth[k]["skipped"] for k in ("phase1_train", "phase1_val", "analysis", "phase2"))
