"""prepare-data: documents -> tokenizer -> flat token arrays with document offsets, cached by key.

A dataset lives in WORKSPACE/datasets/<key>, where the key hashes the data settings and the state of
the input files: preparing the same data again is a cache hit, and different data never shares a
directory. It is built in a temporary directory and renamed into place, so a failure leaves nothing.
Token ids are uint16 when the vocabulary fits (half the disk and memory), else uint32.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from newllm_cli.data import dedup, sources
from newllm_cli.data import tokenizer as tokenizers
from newllm_cli.runtime import locks, nofollow
from newllm_cli.runtime.errors import RefusedError, UsageError, first_line
from newllm_cli.runtime.progress import info, progress, warn
from newllm_cli.settings import Settings
from newllm_cli.store import validate
from newllm_cli.store.artifacts import Workspace, fingerprint, read_array, read_json, write_json
from newllm_cli.store.publish import naming, save_npy, share

ENCODE_BATCH = 512


def _path_state(path: str | None, pattern: str, scratch: Path) -> object:
    """What of the input files the cache key must notice: the real path and the content (an edit
    that restores the modification time is still an edit; a pipe is keyed by what it held)."""
    if not path:
        return None
    p = Path(path).expanduser()
    if p.is_dir():
        files = [(str(f.relative_to(p)), sources.content_hash(f)) for f in sources.text_dir_files(str(p), pattern)]
        return [os.path.realpath(p), fingerprint(files)]
    if not os.path.exists(p):
        return str(p)  # the source reader names what is missing
    real, digest = sources.settle(path, scratch)
    return [os.path.realpath(p) if real == p else "pipe", digest]


def dataset_key(s: Settings) -> str:
    d, scratch = s.data, Path(s.runtime.workspace) / "datasets"  # where a piped --path is copied
    data = d.model_dump()
    if data["encoding"] == "utf-8":  # the default leaves the keys of datasets made before it existed
        data.pop("encoding")
    if data["val_offset"] == 0:  # likewise for the validation offset
        data.pop("val_offset")
    if data["val_duplicates"] == "keep":  # datasets made before duplicates were dropped kept them: same key
        data.pop("val_duplicates")
    parts = {
        "data": data,
        "path": _path_state(d.path, d.pattern, scratch),
        "val_path": _path_state(d.val_path, d.pattern, scratch),
        "sample": sources.sample_path().stat().st_size if "sample" in (d.source, d.val_source) else None,
    }
    return fingerprint(parts)


def workspace_for(s: Settings) -> Workspace:
    return Workspace(s.runtime.workspace, s.runtime.run, dataset_key(s))


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


class Spool:
    """Documents written once to a temporary JSONL file, so the source is read a single time."""

    def __init__(self, path: Path):
        self.path, self.count = path, 0
        self.keys = dedup.KeyFile(path.with_suffix(".keys"))  # each document's hash, for duplicates

    def fill(self, docs: Iterator[str]) -> None:
        with naming(self.path), open(self.path, "w") as f:

            def kept() -> Iterator[int]:
                for doc in docs:
                    if doc.strip():
                        f.write(json.dumps(doc) + "\n")
                        self.count += 1
                        yield dedup.text_key(doc)

            self.keys.write(kept())

    def read(self, keep=None) -> Iterator[str]:
        with open(self.path) as f:
            for i, line in enumerate(f):
                if keep is None or keep[i]:
                    yield json.loads(line)


PIECE = 1 << 16  # characters: a longer document is tokenized in pieces of about this size
BATCH_CHARS = 1 << 22  # characters encoded in one call, so memory stays bounded for any document


def pieces(text: str) -> Iterator[str]:
    """A document in pieces of at most PIECE characters, each cut just before a space that follows
    a non-space: the byte-level pre-tokenizer splits there anyway, so the pieces' ids, concatenated,
    are the document's (a run of PIECE characters without such a space is cut where it ends)."""
    start = 0
    while len(text) - start > PIECE:
        cut = text.rfind(" ", start + 1, start + PIECE)
        while cut > start and text[cut - 1].isspace():
            cut = text.rfind(" ", start + 1, cut)
        if cut <= start:
            cut = start + PIECE
        yield text[start:cut]
        start = cut
    yield text[start:]


def write_tokens(
    tok, docs: Iterator[str], dtype: np.dtype, tokens_path: Path, offsets_path: Path, total: int, label: str
) -> dict:
    """Encode documents, piece by piece in bounded batches, into a raw file, then copy it into .npy
    chunk by chunk."""
    raw_path = tokens_path.with_suffix(".raw")
    offsets = [0]
    with naming(tokens_path), open(raw_path, "wb") as raw, progress(f"tokenizing {label}", total) as advance:
        pending: list[tuple[str, bool]] = []  # (piece, is its document's last)
        doc_tokens = chars = 0

        def flush() -> None:
            nonlocal doc_tokens, chars
            for (_, last), enc in zip(pending, tok.encode_batch([p for p, _ in pending], add_special_tokens=False)):
                ids = np.asarray(enc.ids, dtype=dtype)
                raw.write(ids.tobytes())
                doc_tokens += len(ids)
                if last:
                    if doc_tokens:
                        offsets.append(offsets[-1] + doc_tokens)
                    doc_tokens = 0
                    advance(1)
            pending.clear()
            chars = 0

        for doc in docs:
            parts = list(pieces(doc))
            for i, piece in enumerate(parts):
                pending.append((piece, i == len(parts) - 1))
                chars += len(piece)
                if len(pending) >= ENCODE_BATCH or chars >= BATCH_CHARS:
                    flush()
        if pending:
            flush()
    return _finish_arrays(raw_path, np.asarray(offsets, dtype=np.int64), dtype, tokens_path, offsets_path)


def _finish_arrays(raw_path: Path, offsets: np.ndarray, dtype, tokens_path: Path, offsets_path: Path) -> dict:
    """The raw ids as a .npy file, copied with plain writes (a full disk is ENOSPC naming the file,
    never a SIGBUS from a memory map), and the ids' sha256, which readers check."""
    n = int(offsets[-1])
    digest = hashlib.sha256()
    with naming(tokens_path), open(raw_path, "rb") as raw, open(tokens_path, "wb") as out:
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": (n,)}
        np.lib.format.write_array_header_1_0(out, header)
        while block := raw.read(1 << 24):
            out.write(block)
            digest.update(block)
    raw_path.unlink(missing_ok=True)
    with naming(offsets_path), open(offsets_path, "wb") as f:
        save_npy(f, offsets)
    return {
        "tokens": n,
        "documents": len(offsets) - 1,
        "sha256": digest.hexdigest()[:16],
        "offsets_sha256": validate.digest(offsets),
    }


def read_manual(path: str | None, vocab_size: int) -> list[np.ndarray]:
    """Validation token ids from .npy, .pt (weights_only), .json or whitespace-separated .txt."""
    if not path:
        raise UsageError("--val-source manual needs --val-path (a file of token ids)")
    p = sources.reading(path)
    if not p.is_file():
        raise UsageError(f"manual validation file not found: {p}")
    suffix = p.suffix.lower()
    try:
        if suffix == ".npy":
            data = np.load(p, allow_pickle=False)
        elif suffix == ".pt":
            data = torch.load(p, map_location="cpu", weights_only=True)
            data = data.numpy() if isinstance(data, torch.Tensor) else data
        elif suffix == ".json":
            data = json.loads(p.read_text())
        elif suffix == ".txt":
            data = [[int(v) for v in line.split()] for line in p.read_text().splitlines() if line.strip()]
        else:
            raise UsageError(f"{p}: manual token ids must be .npy, .pt, .json or .txt")
    except UsageError:
        raise
    except Exception as e:
        raise UsageError(f"{p}: cannot read token ids ({type(e).__name__}: {first_line(e)})") from None
    docs = _as_documents(data, p)
    for i, doc in enumerate(docs):
        bad = np.nonzero((doc < 0) | (doc >= vocab_size))[0]
        if len(bad):
            raise UsageError(
                f"{p}: token id {int(doc[bad[0]])} (document {i}, position {int(bad[0])}) "
                f"is outside the vocabulary of {vocab_size}"
            )
    return docs


def _as_documents(data, p: Path) -> list[np.ndarray]:
    """A flat list is one document; a list of lists (or a 2-D array) is one document per row."""
    try:
        if isinstance(data, np.ndarray) and data.ndim == 1:
            rows = [data]
        elif isinstance(data, np.ndarray) and data.ndim == 2:
            rows = list(data)
        elif isinstance(data, list) and data and all(isinstance(r, list) for r in data):
            rows = [np.asarray(r) for r in data]
        elif isinstance(data, list):
            rows = [np.asarray(data)]
        else:
            raise TypeError
        docs = []
        for r in rows:
            r = np.asarray(r)
            if r.dtype.kind not in "iu" and not (r.dtype.kind == "f" and len(r) == 0):
                raise TypeError
            if len(r):
                docs.append(r.astype(np.int64))
    except (TypeError, ValueError):
        raise UsageError(f"{p}: expected integer token ids (a list, or a list of lists)") from None
    if not docs:
        raise UsageError(f"{p}: the validation set is empty")
    return docs


def prepare(s: Settings) -> dict:
    """Build (or find in the cache) the dataset the settings describe; return its description.
    One process builds a dataset at a time; others wait, then find it in the cache."""
    ws = workspace_for(s)
    with locks.dataset(ws.data_dir):
        return _prepare(s, ws)


def _prepare(s: Settings, ws: Workspace) -> dict:
    if os.path.lexists(ws.data_dir):
        try:
            meta = check_dataset(ws)
            info(f"cache hit: dataset {ws.data_dir.name} already prepared")
            return {**meta, "cache_hit": True, "dataset_dir": str(ws.data_dir)}
        except RefusedError as e:  # damaged or half-removed: this command writes it, so it replaces it
            warn(f"rebuilding dataset {ws.data_dir.name}: {e}")
            nofollow.remove_tree(ws.data_dir)
    nofollow.makedirs(ws.data_dir.parent)

    tmp = Path(tempfile.mkdtemp(prefix=f".{ws.data_dir.name}.{locks.tag()}", dir=ws.data_dir.parent))
    try:
        staged = ws.staged(tmp)
        meta = _build(s, ws.data_dir.name, staged)
        write_json(staged.dataset_meta(), meta, private=True)  # any rank of a job may be the builder
        if ws.data_dir.exists():  # another process finished first: keep theirs
            shutil.rmtree(tmp)
        else:
            share(tmp, directory=True)
            os.replace(tmp, ws.data_dir)
    except OSError as e:  # a full disk: name the dataset's file, not the temporary directory
        shutil.rmtree(tmp, ignore_errors=True)
        inside = e.filename and os.path.dirname(str(e.filename)) == str(tmp)
        raise OSError(
            e.errno, e.strerror, str(ws.data_dir / os.path.basename(str(e.filename))) if inside else e.filename
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    info(
        f"prepared dataset {ws.data_dir.name}: {meta['train']['tokens']:,} train and "
        f"{meta['val']['tokens']:,} val tokens, vocabulary {meta['vocab_size']:,}"
    )
    return {**meta, "cache_hit": False, "dataset_dir": str(ws.data_dir)}


def _build(s: Settings, key: str, ws: Workspace) -> dict:
    """Write tokenizer and token arrays into ws's (temporary) dataset directory."""
    d = s.data
    tmp = ws.data_dir
    spool = Spool(tmp / "train.docs.jsonl")
    spool.fill(sources.documents(d.source, d.path, d, d.num_samples))
    if spool.count == 0:
        raise UsageError(f"the training source ({d.source}{' ' + d.path if d.path else ''}) has no documents")
    if d.num_samples and spool.count < d.num_samples:
        warn(f"{d.num_samples} samples asked, the source has {spool.count}: using all")
    keep = np.ones(spool.count, dtype=bool)
    if d.val_source == "auto_split":
        if spool.count < 2:
            raise UsageError("auto_split needs at least 2 training documents; give --val-source")
        n_val = min(spool.count - 1, max(1, round(d.val_ratio * spool.count)))
        keep[np.random.default_rng(d.split_seed).permutation(spool.count)[:n_val]] = False
    dedupe = d.val_duplicates == "drop"
    tok = tokenizers.build(d.tokenizer, d.tokenizer_vocab_size, (p for doc in spool.read(keep) for p in pieces(doc)))
    vocab = tok.get_vocab_size()
    dtype = token_dtype(vocab)
    with naming(ws.tokenizer()):
        try:
            tok.save(str(ws.tokenizer()))
        except Exception as e:  # the tokenizers library raises its own type, "... (os error 28)"
            code = re.search(r"os error (\d+)", str(e))
            raise OSError(int(code[1]) if code else None, first_line(e)) from None
    names = {split: (ws.tokens(split), ws.offsets(split)) for split in ("train", "val")}
    train = write_tokens(tok, spool.read(keep), dtype, *names["train"], int(keep.sum()), "train")
    if d.val_source == "auto_split":
        found = dedup.find(spool.keys.read(), spool.keys.read(), keep, ~keep)
        val_keep = ~keep & ~found["duplicate"] if dedupe else ~keep
        val = write_tokens(tok, spool.read(val_keep), dtype, *names["val"], int(val_keep.sum()), "val")
    elif d.val_source == "manual":
        docs = read_manual(d.val_path, vocab)
        found = dedup.find(
            _token_keys(names["train"], tmp), dedup.KeyFile(tmp / "val.keys").write(map(dedup.ids_key, docs))
        )
        if dedupe:
            docs = [x for x, dup in zip(docs, found["duplicate"]) if not dup]
        raw = names["val"][0].with_suffix(".raw")
        raw.write_bytes(b"".join(x.astype(dtype).tobytes() for x in docs))
        offsets = np.concatenate([[0], np.cumsum([len(x) for x in docs])]).astype(np.int64)
        val = _finish_arrays(raw, offsets, dtype, *names["val"])
    else:
        vspool = Spool(tmp / "val.docs.jsonl")
        vspool.fill(sources.documents(d.val_source, d.val_path, d, d.val_num_samples, skip=d.val_offset))
        found = dedup.find(spool.keys.read(), vspool.keys.read(), keep)
        val_keep = ~found["duplicate"] if dedupe else None
        val = write_tokens(
            tok,
            vspool.read(val_keep),
            dtype,
            *names["val"],
            vspool.count - (int(found["duplicate"].sum()) if dedupe else 0),
            "val",
        )
    duplicates = {
        "of_train": found["of_train"],
        "within_val": found["within_val"],
        "dropped": int(found["duplicate"].sum()) if dedupe else 0,
    }
    if duplicates["of_train"] + duplicates["within_val"]:
        (info if dedupe else warn)(
            f"validation duplicates: {duplicates['of_train']:,} documents equal a training document and "
            f"{duplicates['within_val']:,} an earlier validation one; "
            + (
                f"dropped {duplicates['dropped']:,} (--val-duplicates keep keeps them)"
                if dedupe
                else "kept (--val-duplicates keep): the val figures partly measure memory of the training set"
            )
        )
    if dedupe and val["documents"] == 0:
        raise UsageError(
            "every validation document repeats a training document; give another validation "
            "source, or --val-duplicates keep to measure on them anyway"
        )
    for name, split in (("train", train), ("val", val)):
        if split["tokens"] == 0:
            raise UsageError(f"the {name} set is empty after tokenization")
    for f in [*tmp.glob("*.docs.jsonl"), *tmp.glob("*.keys")]:
        f.unlink()
    return {
        "key": key,
        "data": d.model_dump(),
        "tokenizer": d.tokenizer,
        "tokenizer_sha256": hashlib.sha256(nofollow.read_bytes(ws.tokenizer())).hexdigest()[:16],
        "vocab_size": vocab,
        "dtype": dtype.name,
        "train": train,
        "val": val,
        "val_duplicates": duplicates,
    }


def _token_keys(train_files: tuple[Path, Path], tmp: Path) -> np.ndarray:
    """The training documents' hashes by token ids (to compare manual validation ids with)."""
    tokens, offsets = np.load(train_files[0], mmap_mode="r"), np.load(train_files[1])
    return dedup.KeyFile(tmp / "train.ids.keys").write(
        dedup.ids_key(tokens[a:b]) for a, b in zip(offsets[:-1], offsets[1:])
    )


FIX = "newllm prepare-data"


def read_meta(ws: Workspace) -> dict:
    """dataset.json, checked, and naming its own directory."""
    meta = read_json(ws.dataset_meta(), "dataset description", FIX, validate.DatasetMeta)
    if meta["key"] != ws.data_dir.name:
        raise validate.Damaged(ws.dataset_meta(), f"key {meta['key']!r} is not its directory's", FIX)
    return meta


def check_dataset(ws: Workspace) -> dict:
    """Every file of a prepared dataset, checked (a pass over the token ids); its description."""
    meta = read_meta(ws)
    for split in ("train", "val"):
        load_split(ws, split, meta)
    tokenizers.load_checked(ws.tokenizer(), meta["vocab_size"], FIX, meta.get("tokenizer_sha256"))
    return meta


def load_meta(s: Settings) -> tuple[Workspace, dict]:
    ws = workspace_for(s)
    if not os.path.lexists(ws.dataset_meta()):
        if not ws.started() and ws.runs():  # most likely a mistyped --run
            raise ws.no_such_run()
        raise RefusedError(
            f"no prepared data for these data settings in {ws.root} (key {ws.data_dir.name}); "
            "run `newllm prepare-data` with the same data options first"
        )
    return ws, read_meta(ws)


def load_split(ws: Workspace, split: str, meta: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Token ids (memory-mapped) and document offsets of one split, checked against the dataset's
    description: counts, boundaries, ids within the vocabulary."""
    meta = meta or read_meta(ws)
    m = meta[split]
    tokens = validate.array(
        read_array(ws.tokens(split), f"{split} tokens", FIX),
        ws.tokens(split),
        FIX,
        kind="int",
        rows=m["tokens"],
        below=meta["vocab_size"],
        sha256=m.get("sha256"),  # datasets made before these checks lack the offsets' hash
    )
    offsets = validate.offsets(
        np.array(read_array(ws.offsets(split), f"{split} offsets", FIX)),
        ws.offsets(split),
        FIX,
        m["documents"],
        m["tokens"],
    )
    validate.array(offsets, ws.offsets(split), FIX, kind="int", sha256=m.get("offsets_sha256"))
    return tokens, offsets
