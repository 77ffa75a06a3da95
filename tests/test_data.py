"""Sources, tokenizers and token arrays on small fixtures; bad input fails with exit 2 and no leftovers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from newllm_cli.data import sources
from newllm_cli.settings import DataSettings


def dialogue(i: int) -> dict:
    return {
        "messages": [
            {"role": "user", "content": f"question {i} about rivers"},
            {"role": "assistant", "content": f"answer {i} about stones"},
        ]
    }


def load_split(dataset_dir: Path, split: str) -> list[list[int]]:
    tokens = np.load(dataset_dir / f"{split}.tokens.npy")
    offsets = np.load(dataset_dir / f"{split}.offsets.npy")
    return [tokens[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])]


def test_text_file_blocks_and_lines(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("one\ntwo\n\n\nthree\n")
    assert list(sources.text_file_documents(str(p))) == ["one\ntwo", "three"]
    p.write_text("first line\nsecond line\n")
    assert list(sources.text_file_documents(str(p))) == ["first line", "second line"]


def test_text_dir_recursive_symlink_once_binary_skipped(tmp_path):
    root = tmp_path / "docs"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("alpha text")
    (root / "sub" / "b.txt").write_text("beta text")
    (root / "sub" / "blob.txt").write_bytes(b"\x00\x01binary")
    os.symlink(root / "a.txt", root / "sub" / "link.txt")
    docs = list(sources.text_dir_documents(str(root), "*.txt"))
    assert sorted(docs) == ["alpha text", "beta text"]


def test_ultrachat_jsonl_and_parquet_through_datasets(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [dialogue(i) for i in range(5)]
    jl = tmp_path / "chat.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "chat.parquet")
    d = DataSettings()
    for path in (jl, tmp_path / "chat.parquet"):
        docs = list(sources.documents("ultrachat", str(path), d, 3))
        assert docs == [f"question {i} about rivers\nanswer {i} about stones" for i in range(3)]


def test_prepare_is_cached_and_keyed(cli, tmp_path, corpus):
    args = ["--workspace", tmp_path / "ws", "--source", "text_file", "--path", corpus, "--tokenizer", "byte", "--json"]
    first = cli("prepare-data", *args)
    assert first.code == 0 and first.json()["cache_hit"] is False
    again = cli("prepare-data", *args)
    assert again.code == 0 and again.json()["cache_hit"] is True and "cache hit" in again.err
    other = cli("prepare-data", *args, "--val-ratio", "0.3")
    assert other.json()["key"] != first.json()["key"]
    d = Path(first.json()["dataset_dir"])
    assert np.load(d / "train.tokens.npy").dtype == np.uint16
    text = corpus.read_text()
    docs = load_split(d, "train") + load_split(d, "val")
    assert sorted(bytes(x).decode() for x in docs) == sorted(p for p in text.strip().split("\n\n"))


@pytest.mark.parametrize("fmt", ["npy", "pt", "json", "txt"])
def test_manual_validation_formats(cli, tmp_path, corpus, fmt):
    ids = [[72, 101, 108], [108, 111, 32, 33]]
    path = tmp_path / f"val.{fmt}"
    if fmt == "npy":
        np.save(path, np.array(ids[1]))
        ids = ids[1:]
    elif fmt == "pt":
        torch.save(torch.tensor(ids[0]), path)
        ids = ids[:1]
    elif fmt == "json":
        path.write_text(json.dumps(ids))
    else:
        path.write_text("\n".join(" ".join(map(str, r)) for r in ids))
    r = cli(
        "prepare-data",
        "--workspace",
        tmp_path / "ws",
        "--source",
        "text_file",
        "--path",
        corpus,
        "--tokenizer",
        "byte",
        "--val-source",
        "manual",
        "--val-path",
        path,
        "--json",
    )
    assert r.code == 0, r.err
    assert load_split(Path(r.json()["dataset_dir"]), "val") == ids


def bad_cases(tmp_path: Path, corpus: Path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    (tmp_path / "emptydir").mkdir()
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"good text\n\ncaf\xe9 here\n")
    oov = tmp_path / "oov.json"
    oov.write_text("[1, 2, 999]")
    none = tmp_path / "none.json"
    none.write_text("[]")
    base = ["--source", "text_file", "--path", str(corpus), "--tokenizer", "byte"]
    return [
        (["--source", "text_file", "--path", str(tmp_path / "missing.txt")], "no such file"),
        (["--source", "text_file", "--path", str(empty)], "no documents"),
        (["--source", "text_dir", "--path", str(tmp_path / "emptydir")], "no files match"),
        (["--source", "text_file", "--path", str(latin)], "offset 14"),
        (base + ["--val-source", "manual", "--val-path", str(oov)], "outside the vocabulary"),
        (base + ["--val-source", "manual", "--val-path", str(none)], "empty"),
        (["--source", "ultrachat", "--path", str(tmp_path / "x.csv")], "no such file"),
    ]


def test_bad_inputs_exit_2_and_leave_nothing(cli, tmp_path, corpus):
    for args, needle in bad_cases(tmp_path, corpus):
        ws = tmp_path / "ws"
        r = cli("prepare-data", "--workspace", ws, *args)
        assert r.code == 2, (args, r.err)
        assert needle in r.err and len(r.err.strip().splitlines()) == 1, (args, r.err)
        leftovers = list((ws / "datasets").glob("*")) if (ws / "datasets").exists() else []
        assert leftovers == [], leftovers


def test_more_samples_than_exist_warns_and_uses_all(cli, tmp_path):
    chat = tmp_path / "chat.jsonl"
    chat.write_text("\n".join(json.dumps(dialogue(i)) for i in range(4)))
    r = cli(
        "prepare-data",
        "--workspace",
        tmp_path / "ws",
        "--source",
        "ultrachat",
        "--path",
        chat,
        "--num-samples",
        "10",
        "--tokenizer",
        "byte",
        "--json",
    )
    assert r.code == 0 and "using all" in r.err
    assert r.json()["train"]["documents"] + r.json()["val"]["documents"] == 4


def test_bundled_sample_has_forty_dialogues_in_ultrachat_schema():
    lines = sources.sample_path().read_text().splitlines()
    assert len(lines) >= 40
    for line in lines:
        msgs = json.loads(line)["messages"]
        assert {m["role"] for m in msgs} == {"user", "assistant"} and all(m["content"] for m in msgs)


def test_hub_unreachable_says_how_to_use_a_local_export(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = cli("prepare-data", "--workspace", tmp_path / "ws", "--source", "ultrachat", "--num-samples", "3")
    assert r.code == 2 and "--path" in r.err and len(r.err.strip().splitlines()) == 1
    r = cli(
        "prepare-data",
        "--workspace",
        tmp_path / "ws",
        "--source",
        "text_file",
        "--path",
        make_text(tmp_path),
        "--tokenizer",
        "gpt2",
    )
    assert r.code == 2 and "tokenizer.json" in r.err


def make_text(tmp_path: Path) -> Path:
    p = tmp_path / "t.txt"
    p.write_text("first document here\n\nsecond document there\n\nthird one\n")
    return p


def test_a_local_tokenizer_json_is_used_and_stored(cli, tmp_path):
    from newllm_cli.data.tokenizer import train_bpe

    tok_path = tmp_path / "mine.json"
    train_bpe(["some words for a tokenizer", "more words"], 300).save(str(tok_path))
    r = cli(
        "prepare-data",
        "--workspace",
        tmp_path / "ws",
        "--source",
        "text_file",
        "--path",
        make_text(tmp_path),
        "--tokenizer",
        tok_path,
        "--json",
    )
    assert r.code == 0, r.err
    stored = Path(r.json()["dataset_dir"]) / "tokenizer.json"
    assert json.loads(stored.read_text())["model"]["vocab"] == json.loads(tok_path.read_text())["model"]["vocab"]


def test_a_new_source_does_not_inherit_the_old_path(cli, tmp_path):
    ws = ["--workspace", tmp_path / "ws"]
    assert (
        cli("prepare-data", *ws, "--source", "text_file", "--path", make_text(tmp_path), "--tokenizer", "byte").code
        == 0
    )
    r = cli("prepare-data", *ws, "--source", "sample", "--num-samples", "4", "--json")
    assert r.code == 0, r.err
    # another source starts from its defaults: neither the path nor the tokenizer of the old one
    assert r.json()["data"]["path"] is None and r.json()["data"]["tokenizer"] == "bpe"


def test_encoding_reads_latin1_and_the_error_names_the_option(cli, tmp_path):
    p = tmp_path / "latin.txt"
    p.write_bytes("un caf\u00e9 cr\u00e8me\n\nune cr\u00eape br\u00fbl\u00e9e\n".encode("latin-1"))
    ws = str(tmp_path / "ws")
    r = cli("prepare-data", "--workspace", ws, "--source", "text_file", "--path", p, "--tokenizer", "byte")
    assert r.code == 2 and "--encoding" in r.err and "0xe9" in r.err and len(r.err.strip().splitlines()) == 1
    assert list(sources.text_file_documents(str(p), "latin-1")) == [
        "un caf\u00e9 cr\u00e8me",
        "une cr\u00eape br\u00fbl\u00e9e",
    ]
    assert (
        cli(
            "prepare-data",
            "--workspace",
            ws,
            "--source",
            "text_file",
            "--path",
            p,
            "--tokenizer",
            "byte",
            "--encoding",
            "latin-1",
            "--val-ratio",
            "0.5",
        ).code
        == 0
    )
    for bad in ("klingon", "utf-16"):  # unknown, or line breaks wider than a byte
        r = cli("prepare-data", "--workspace", ws, "--source", "text_file", "--path", p, "--encoding", bad)
        assert r.code == 2 and "data.encoding" in r.err
    assert DataSettings().encoding == "utf-8"


def test_long_documents_are_encoded_in_pieces_with_the_same_ids(monkeypatch):
    """A document is tokenized in bounded pieces (memory for any line length), cut where the
    byte-level pre-tokenizer cuts anyway, so the ids are those of the whole document."""
    from newllm_cli.data import dataset
    from newllm_cli.data import tokenizer as tokenizers

    rng = np.random.default_rng(0)
    words = ["the", "river", "stone,", "light.", "  double", "\nnew", "x" * 40, "tab\t", "", "code()"]
    text = " ".join(rng.choice(words) for _ in range(3000))
    tok = tokenizers.train_bpe([text[:5000]], 400)
    monkeypatch.setattr(dataset, "PIECE", 120)  # longer than any run without a cut point
    parts = list(dataset.pieces(text))
    assert "".join(parts) == text and max(map(len, parts)) <= 120 and len(parts) > 100
    joined = [i for p in parts for i in tok.encode(p, add_special_tokens=False).ids]
    assert joined == tok.encode(text, add_special_tokens=False).ids
