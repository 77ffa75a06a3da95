"""Using a trained run: `newllm eval` on any text, the Python API, safetensors weights and export."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CHECKOUT, load_checkpoint, make_corpus, one_line

from newllm_cli.cli.app import main

ARGS = ["--tokenizer", "byte", "--phase1-max-iterations", "6", "--phase2-max-iterations", "20", "--threads", "1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, list[str], Path]:
    """A tiny run trained on one text (controls on), its arguments, and a second text."""
    root = tmp_path_factory.mktemp("use")
    corpus, other = make_corpus(root / "a.txt", docs=50), make_corpus(root / "b.txt", docs=20, seed=7)
    base = ["--workspace", str(root / "ws"), *ARGS]
    assert main(["full", *base, "--source", "text_file", "--path", str(corpus), "--force", "--probe-rows", "0"]) == 0
    return root, base, other


def run_dir(root: Path) -> Path:
    return root / "ws" / "runs" / "default"


def evaluated(cli, base, *text) -> dict:
    r = cli("eval", *base, *text, "--json", "--quiet")
    assert r.code == 0, r.err
    return r.json()


def test_eval_on_the_runs_own_val_split_gives_phase2s_figures_exactly(cli, trained):
    root, base, _ = trained
    got = evaluated(cli, base, "--split", "val")
    want = json.loads((run_dir(root) / "phase2.json").read_text())
    assert got["val"] == want["val"] and got["baselines"] == want["baselines"]  # every interval, to the bit
    assert got["finding"] == want["finding"]
    assert got["provenance"]["head_id"] == want["provenance"]["head_id"]  # the fit is phase2's own head


def reference_recurrence(state: dict, tokens: np.ndarray, c0: np.ndarray) -> np.ndarray:
    """c_t = f(x_t, c_{t-1}) written out from the weights in float64: LN(E[x]), then per block
    y = ReLU(W [ctx, tok] + b), ctx = LN(ctx + y[:C]), tok = LN(tok + y[C:])."""
    w = {k: v.double().numpy() for k, v in state.items()}

    def ln(x, name):
        return (x - x.mean()) / np.sqrt(x.var() + 1e-5) * w[f"{name}.weight"] + w[f"{name}.bias"]

    blocks = sorted({int(k.split(".")[1]) for k in w if k.startswith("blocks.")})
    c, out = c0.astype(np.float64), []
    for x in tokens:
        tok = ln(w["embed.weight"][int(x)], "embed_norm")
        for i in blocks:
            y = np.maximum(w[f"blocks.{i}.mlp.0.weight"] @ np.concatenate([c, tok]) + w[f"blocks.{i}.mlp.0.bias"], 0)
            c, tok = ln(c + y[: len(c)], f"blocks.{i}.norm_ctx"), ln(tok + y[len(c) :], f"blocks.{i}.norm_tok")
        out.append(c)
    return np.array(out)


def test_eval_on_another_text_solves_the_recurrence_of_the_saved_weights(cli, trained):
    root, base, other = trained
    got = evaluated(cli, base, "--path", str(other))
    where = Path(got["path"]).parent
    ctx, tokens = np.load(where / "contexts.npy"), np.load(where / "tokens.npy")
    offsets = np.load(where / "offsets.npy")
    assert got["text"]["tokens"] == len(tokens) == len(ctx) and got["text"]["documents"] == len(offsets) - 1 == 20
    assert got["text"]["unknown_tokens"] == 0  # the byte tokenizer encodes everything
    state = load_checkpoint(run_dir(root) / "phase1.safetensors")["state"]
    for d in range(len(offsets) - 1):  # each document from its carry-over c_0 = c_N, token by token
        a, b = offsets[d], offsets[d + 1]
        ref = reference_recurrence(state, tokens[a:b], ctx[b - 1])
        assert np.abs(ref - ctx[a:b]).max() <= 1e-3 * np.abs(ctx[a:b]).max()
    assert set(got["baselines"]) >= {"unigram_add_one", "bigram_add_k", "untrained_network", "zero_context"}
    again = evaluated(cli, base, "--path", str(other))
    assert again["skipped"] and again["val"] == got["val"]  # a rerun is a cache hit
    with open(other) as stdin:
        piped = subprocess.run(
            [sys.executable, "-m", "newllm_cli", "eval", *base, "--path", "-", "--json", "-q"],
            stdin=stdin, capture_output=True, text=True,
        )  # fmt: skip
    assert piped.returncode == 0, piped.stderr
    assert json.loads(piped.stdout)["val"] == got["val"]  # stdin: the same text, the same key
    keys = {p.name for p in (run_dir(root) / "eval").iterdir() if not p.name.startswith(".")}
    assert Path(got["path"]).parent.name in keys and len(keys) >= 1
    shown = cli("runs", "--workspace", str(root / "ws"), "--json").json()["runs"][0]["evaluations"]
    assert any(e["perplexity"] == got["val"]["perplexity"] for e in shown)


def test_eval_refuses_no_text_or_two_in_one_line(cli, trained):
    _, base, other = trained
    one_line(cli("eval", *base), 2, "eval needs one text")
    one_line(cli("eval", *base, "--split", "val", "--path", str(other)), 2, "eval needs one text")
    one_line(cli("eval", *base, "--path", str(other), "--val-path", str(other)), 2, "give the text once")


def tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def test_the_readmes_api_example_runs_and_changes_nothing(trained, tmp_path):
    root, _, _ = trained
    copy = tmp_path / "ws"
    shutil.copytree(root / "ws", copy)
    before = tree_hashes(copy)
    example = re.search(r"```python\n(.*?)```", (CHECKOUT / "README.md").read_text(), re.S)[1]
    scope: dict = {}
    exec(example.replace("cache/runs/default", str(copy / "runs" / "default")), scope)
    run = scope["run"]
    ctx = scope["ctx"]
    assert isinstance(ctx, np.ndarray) and ctx.shape == (len(run.ids("some text")), 16)
    assert np.array_equal(ctx, run.contexts("some text"))  # the same solve each time
    assert 1 < run.perplexity("some text with more words in it") < 256
    r = main(["generate", "--workspace", str(copy), "--prompt", "The", "--max-new-tokens", "20", "--seed", "0"])
    assert r == 0
    assert tree_hashes(copy) == {**before, **{k: v for k, v in tree_hashes(copy).items() if k.endswith("log.txt")}}


def test_loading_writes_nothing_and_takes_no_lock(trained, tmp_path):
    import newllm_cli as nl

    root, _, _ = trained
    copy = tmp_path / "ws"
    shutil.copytree(root / "ws", copy)
    before = tree_hashes(copy)
    run = nl.load_run(copy / "runs" / "default")
    run.contexts("The river")
    run.generate("The", max_new_tokens=5, seed=0)
    assert tree_hashes(copy) == before  # log.txt included, and no lock file made
    assert {p.relative_to(copy) for p in copy.rglob("*")} == {
        p.relative_to(root / "ws") for p in (root / "ws").rglob("*")
    }


FORBIDDING = """
import sys, numpy as np, torch
def refused(*a, **k):
    raise AssertionError("torch.load was called")
torch.load = refused  # (numba's own kernel cache still unpickles; no weights do)
import newllm_cli as nl
run = nl.load_run(sys.argv[1])
np.save(sys.argv[2], run.contexts("The garden"))
print(run.perplexity("The garden cat writes code"))
"""


def test_an_exported_folder_loads_without_pickle_and_gives_the_runs_contexts(cli, trained, tmp_path):
    import newllm_cli as nl

    root, base, _ = trained
    folder = tmp_path / "export"
    r = cli("export", *base, str(folder))
    assert r.code == 0, r.err
    assert r.out.strip() == str(folder)
    assert {p.name for p in folder.iterdir()} == {
        "config.json", "phase1.safetensors", "phase2.safetensors", "tokenizer.json", "README.md"
    }  # fmt: skip
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"]["context_dim"] == 16 and config["vocab_size"] == 256
    assert "| own val | the predictor |" in (folder / "README.md").read_text()
    out = subprocess.run(
        [sys.executable, "-c", FORBIDDING, str(folder), str(tmp_path / "c.npy")], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    run = nl.load_run(run_dir(root))
    assert np.array_equal(np.load(tmp_path / "c.npy"), run.contexts("The garden"))
    assert float(out.stdout) == run.perplexity("The garden cat writes code")
    one_line(cli("export", *base, str(folder)), 2, "not an empty directory")


def test_a_run_with_the_old_torch_checkpoints_still_loads_and_says_so_once(cli, trained, tmp_path):
    root, base, _ = trained
    shutil.copytree(root / "ws", tmp_path / "ws")
    run = tmp_path / "ws" / "runs" / "default"
    for name in ("phase1", "phase2"):
        torch.save(load_checkpoint(run / f"{name}.safetensors"), run / f"{name}.pt")
        (run / f"{name}.safetensors").unlink()
    args = ["--workspace", str(tmp_path / "ws"), *ARGS]
    new = cli("generate", *args, "--prompt", "The", "--max-new-tokens", "5", "--seed", "0")
    assert new.code == 0, new.err
    assert new.err.count("phase1.pt is in the old torch format") == 1 and "phase2.pt is in the old" in new.err
    import newllm_cli as nl

    assert nl.load_run(run_dir(root)).generate("The", max_new_tokens=5, seed=0) == new.out.rstrip("\n")


def test_safetensors_weights_hold_their_provenance_as_json(trained):
    root, _, _ = trained
    from safetensors import safe_open

    with safe_open(str(run_dir(root) / "phase1.safetensors"), framework="np") as f:
        meta = f.metadata()
        assert "blocks.0.mlp.0.weight" in f.keys()  # noqa: SIM118 (a safe_open has no __contains__)
    assert json.loads(meta["provenance"])["model"]["context_dim"] == 16 and len(json.loads(meta["model_id"])) == 16
    head = load_checkpoint(run_dir(root) / "phase2.safetensors")
    assert set(head) == {"state", "provenance", "l2"} and head["provenance"]["predictor"] == "linear"


def test_equal_weights_give_equal_files_in_every_process():
    """safetensors writes its header in hash-map order; ours is sorted, so a rerun's file is byte-identical."""
    code = (
        "import hashlib, torch; from newllm_cli.store.weights import encode; "
        "print(hashlib.sha256(encode({'state': {'a': torch.ones(2), 'b': torch.zeros(3)}, "
        "'provenance': {'x': 1}, 'model_id': 'm', 'vocab_size': 3})).hexdigest())"
    )
    digests = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout for _ in range(4)}
    assert len(digests) == 1 and len(next(iter(digests))) == 65
