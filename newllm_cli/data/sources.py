"""Document sources: each yields documents as strings, streaming, failing loudly.

A document is one conversation (ultrachat/sample), one blank-line-separated block (text_file) or
one file (text_dir). Nothing here invents data: a missing or unreadable input is a UsageError.
"""

from __future__ import annotations

import atexit
import hashlib
import itertools
import os
import stat
import tempfile
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

from newllm_cli.data.hub import hub_reachable, quiet_hub_logs
from newllm_cli.runtime import nofollow
from newllm_cli.runtime.errors import UsageError, first_line
from newllm_cli.runtime.progress import warn

SAMPLE_FILE = "dialogues.jsonl"


def sample_path() -> Path:
    return Path(str(resources.files("newllm_cli") / "sample_data" / SAMPLE_FILE))


def _existing(path: str | None, what: str) -> Path:
    if not path:
        raise UsageError(f"{what} needs a path")
    p = reading(path)
    if not p.exists():
        raise UsageError(f"{what}: no such file or directory: {p}")
    return p


_SETTLED: dict[str, tuple[Path, str]] = {}  # --path of a pipe -> (its copy, content hash), per process


def reading(path: str) -> Path:
    """The file to read for `path`: the copy of a pipe already read (settle), else the path."""
    return _SETTLED[path][0] if path in _SETTLED else Path(path).expanduser()


_HASHED: dict[tuple, str] = {}  # (real path, size, mtime, ctime, inode) -> content hash
HASH_BLOCK = 1 << 22


def content_hash(path: Path) -> str:
    """sha256 of a regular file's bytes, streamed; computed once per process and version of the file
    (ctime changes with any write, even one that restores the modification time)."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    if key not in _HASHED:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(HASH_BLOCK):
                digest.update(block)
        _HASHED[key] = digest.hexdigest()[:16]
    return _HASHED[key]


def settle(path: str, scratch: Path) -> tuple[Path, str]:
    """The regular file to read for --path, and its content hash. A pipe (`--path <(cmd)`) can be
    read only once: it is copied into `scratch` on first use (the copy lives as long as the process)
    and every later read in this process reads the copy. A device or socket is refused."""
    if path in _SETTLED:
        return _SETTLED[path]
    p = Path(path).expanduser()
    try:
        mode = os.stat(p).st_mode
    except OSError as e:
        raise UsageError(f"--path: cannot read {p}: {e.strerror or e}") from None
    if stat.S_ISREG(mode):
        return p, content_hash(p)
    if not stat.S_ISFIFO(mode):
        raise UsageError(f"--path {p} is not a text file, a directory or a pipe")
    nofollow.makedirs(scratch)
    fd, name = tempfile.mkstemp(prefix=f".pipe.{os.getpid()}.", suffix=".tmp", dir=scratch)
    atexit.register(lambda: Path(name).unlink(missing_ok=True))
    digest = hashlib.sha256()
    with open(p, "rb") as src, os.fdopen(fd, "wb") as out:
        while block := src.read(HASH_BLOCK):
            out.write(block)
            digest.update(block)
    _SETTLED[path] = (Path(name), digest.hexdigest()[:16])
    return _SETTLED[path]


def conversation_text(record: dict, where: str) -> str:
    """UltraChat's schema: the `content` of each message, joined with newlines."""
    messages = record.get("messages")
    if not isinstance(messages, list):
        raise UsageError(f"{where}: record has no 'messages' list (UltraChat schema expected)")
    return "\n".join(str(m.get("content", "")) for m in messages if isinstance(m, dict))


def ultrachat_documents(path: str | None, dataset: str, split: str, limit: int | None, skip: int = 0) -> Iterator[str]:
    """Streamed through `datasets`, so 10 samples read 10 conversations, from the hub or a local export;
    `skip` passes over the first records (samples by index: --val-offset 50000)."""
    quiet_hub_logs()
    if not path and not hub_reachable():
        raise UsageError(
            f"cannot reach {dataset} on the hub (offline?); download an export and pass "
            "--source ultrachat --path FILE.jsonl|.parquet"
        )
    import datasets

    datasets.disable_progress_bars()
    if path:
        p = _existing(path, "ultrachat --path")
        kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(p.suffix.lower())
        if kind is None:
            raise UsageError(f"{p}: a local UltraChat export must be .jsonl, .json or .parquet")
        where = str(p)
        try:
            stream = datasets.load_dataset(kind, data_files=str(p), split="train", streaming=True)
        except Exception as e:  # datasets raises many types for a bad file
            raise UsageError(f"{p}: cannot read as {kind}: {first_line(e)}") from None
    else:
        where = f"{dataset} ({split})"
        try:
            stream = datasets.load_dataset(dataset, split=split, streaming=True)
        except Exception as e:
            raise UsageError(
                f"cannot reach {dataset} on the hub ({type(e).__name__}); offline, download an "
                "export and pass --source ultrachat --path FILE.jsonl|.parquet"
            ) from None
    count = 0
    if skip:
        stream = stream.skip(skip)
    try:
        for record in stream:
            if limit is not None and count >= limit:
                return
            yield conversation_text(record, where)
            count += 1
    except UsageError:
        raise
    except Exception as e:
        raise UsageError(f"{where}: reading failed after {count} records: {first_line(e)}") from None


def _decode(raw: bytes, path: Path, offset: int, encoding: str) -> str:
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as e:
        raise UsageError(
            f"{path}: byte 0x{raw[e.start]:02x} at offset {offset + e.start} is not valid {encoding}; "
            "if the file uses another encoding, pass it with --encoding (e.g. latin-1)"
        ) from None


def text_file_documents(path: str | None, encoding: str = "utf-8") -> Iterator[str]:
    """Blank-line-separated blocks; a file without blank lines gives one document per line."""
    p = _existing(path, "text_file")
    if p.is_dir():
        raise UsageError(f"{p} is a directory; use --source text_dir")
    blank_lines = False
    with open(p, "rb") as f:
        for raw in f:
            if not raw.strip():
                blank_lines = True
                break
    block: list[str] = []
    offset = 0
    with open(p, "rb") as f:
        for raw in f:
            line = _decode(raw, p, offset, encoding).rstrip("\r\n")
            offset += len(raw)
            if not blank_lines:
                if line.strip():
                    yield line
            elif line.strip():
                block.append(line)
            elif block:
                yield "\n".join(block)
                block = []
    if block:
        yield "\n".join(block)


def text_dir_files(path: str | None, pattern: str) -> list[Path]:
    """Files matching the glob below `path`, recursively, each real file once (symlinks folded)."""
    root = _existing(path, "text_dir")
    if not root.is_dir():
        raise UsageError(f"{root} is not a directory; use --source text_file")
    seen: set[str] = set()
    files = []
    for p in sorted(root.rglob(pattern)):
        if not p.is_file():
            continue
        real = os.path.realpath(p)
        if real in seen:
            continue
        seen.add(real)
        files.append(p)
    return files


def text_dir_documents(path: str | None, pattern: str, encoding: str = "utf-8") -> Iterator[str]:
    """One file, one document. Files holding NUL bytes are binary: skipped with a warning."""
    files = text_dir_files(path, pattern)
    if not files:
        raise UsageError(f"{path}: no files match {pattern!r}")
    for p in files:
        raw = p.read_bytes()
        if b"\x00" in raw:
            warn(f"skipping binary file {p}")
            continue
        text = _decode(raw, p, 0, encoding).strip()
        if text:
            yield text


def documents(source: str, path: str | None, data, limit: int | None, skip: int = 0) -> Iterator[str]:
    """The documents of a text source after its first `skip`; `data` is the DataSettings (for pattern
    and hub names)."""
    if source == "sample":
        yield from ultrachat_documents(str(sample_path()), "", "", limit, skip)
        return
    if source == "ultrachat":
        yield from ultrachat_documents(path, data.ultrachat_dataset, data.ultrachat_split, limit, skip)
        return
    it = (
        text_file_documents(path, data.encoding)
        if source == "text_file"
        else text_dir_documents(path, data.pattern, data.encoding)
    )
    for i, doc in enumerate(itertools.islice(it, skip, None)):
        if limit is not None and i >= limit:
            return
        yield doc
