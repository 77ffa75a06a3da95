"""Files inside a workspace, opened without following links.

A workspace may be shared by several people and machines, so anything one of them can plant there
(a symbolic link to someone's file, a FIFO, /dev/zero behind a name, a directory where a file
belongs, a file of gigabytes) must not make newllm read, write or delete outside it, hang or fill
memory. Every path below a registered workspace root is therefore checked component by component
with lstat (each directory a real directory, the file a regular file), opened with O_NOFOLLOW and
O_NONBLOCK (a FIFO opens at once and is then refused by fstat), and read up to a bound. The root
itself, and what the user names on the command line (--path, --config, --contexts), may be links:
those are the user's choice.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path
from typing import IO, Any

from newllm_cli.runtime.errors import RefusedError, UsageError

TEXT_LIMIT = 64 << 20  # bytes: settings, reports, metrics, logs and tokenizers are far smaller
_ROOTS: set[str] = set()


class Unsafe(RefusedError):
    """Something other than a regular file or directory at a workspace path (exit 3)."""

    def __init__(self, path: str | Path, what: str):
        super().__init__(
            f"{path} is {what}; newllm never follows links or opens special files inside its workspace: "
            "remove it (newllm writes it again)"
        )


def register(root: str | Path) -> None:
    """Paths below `root` are the workspace's: checked by everything in this module."""
    _ROOTS.add(os.path.abspath(root))


def _parts(path: str | Path) -> tuple[str, list[str]] | None:
    """(root, components below it) for a workspace path; None for a path outside every workspace."""
    p = os.path.abspath(path)
    for root in sorted(_ROOTS, key=len, reverse=True):
        base = root.rstrip(os.sep) or os.sep
        if p == base:
            return base, []
        if p.startswith(base.rstrip(os.sep) + os.sep):
            return base, p[len(base.rstrip(os.sep)) + 1 :].split(os.sep)
    return None


def kind(mode: int) -> str:
    """What a file is, for a message."""
    for test, name in (
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISDIR, "a directory"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def check(path: str | Path, expect: str | None = "file") -> os.stat_result | None:
    """The lstat of `path` (None when it is not there or lies outside every workspace), after
    checking that every directory from the workspace root down to it is a real directory, and that
    `path` itself is what `expect` says ("file", "dir", or None for either, never a link)."""
    where = _parts(path)
    if where is None:
        return None
    current, parts = where
    st = None
    for i, part in enumerate(parts):
        current = os.path.join(current, part)
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            return None
        except NotADirectoryError:
            raise Unsafe(os.path.dirname(current), "not a directory") from None
        last = i == len(parts) - 1
        wanted = (expect if last else "dir") or ("file", "dir")
        ok = (stat.S_ISREG(st.st_mode) and "file" in wanted) or (stat.S_ISDIR(st.st_mode) and "dir" in wanted)
        if not ok:
            raise Unsafe(current, kind(st.st_mode))
    return st


def open_fd(path: str | Path, flags: int = os.O_RDONLY, limit: int | None = None, mode: int = 0o666) -> int:
    """A descriptor of the regular file `path`, never through a link, never blocking on a FIFO,
    refused when larger than `limit` bytes. Outside every workspace it is a plain open."""
    inside = _parts(path) is not None
    if inside:
        check(path)
    extra = os.O_CLOEXEC | (os.O_NOFOLLOW | os.O_NONBLOCK if inside else 0)
    try:
        fd = os.open(path, flags | extra, mode)
    except OSError as e:
        what = {errno.ELOOP: "a symbolic link", errno.ENXIO: "a FIFO", errno.EISDIR: "a directory"}.get(e.errno or 0)
        if inside and what:  # a link or FIFO planted after the check (a FIFO without reader: ENXIO)
            raise Unsafe(path, what) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) and (inside or stat.S_ISDIR(st.st_mode)):
            raise Unsafe(path, kind(st.st_mode)) if inside else UsageError(f"{path} is {kind(st.st_mode)}")
        if limit is not None and st.st_size > limit:
            size = f"{st.st_size:,} bytes, more than such a file ever holds ({limit:,})"
            raise Unsafe(path, size) if inside else UsageError(f"{path} is {size}")
        if inside:
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_file(path: str | Path, mode: str = "rb", limit: int | None = None) -> IO[Any]:
    """open(path, mode) for "r", "rb", "a" and "ab", through `open_fd` (text: UTF-8, newline="")."""
    flags = os.O_RDONLY if mode.startswith("r") else os.O_WRONLY | os.O_APPEND | os.O_CREAT
    fd = open_fd(path, flags, limit)
    return os.fdopen(fd, mode) if "b" in mode else os.fdopen(fd, mode, encoding="utf-8", newline="")


def read_bytes(path: str | Path, limit: int = TEXT_LIMIT) -> bytes:
    """The whole file, read once (a pipe or device the user names, too), refused above `limit` bytes."""
    with open_file(path, "rb", limit) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        if _parts(path) is not None:
            raise Unsafe(path, f"more than {limit:,} bytes, more than such a file ever holds")
        raise UsageError(f"{path} holds more than {limit:,} bytes, more than such a file ever holds")
    return data


def read_text(path: str | Path, limit: int = TEXT_LIMIT) -> str:
    """UTF-8 text (a UnicodeDecodeError, a ValueError, for anything else)."""
    return read_bytes(path, limit).decode("utf-8")


def is_dir(path: str | Path) -> bool:
    """A real directory (not a link to one)."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def makedirs(path: str | Path) -> None:
    """mkdir -p, refusing a link or a file on the way (inside a workspace)."""
    check(path, "dir")
    Path(path).mkdir(parents=True, exist_ok=True)
    check(path, "dir")


def remove_tree(path: str | Path) -> None:
    """Delete a directory and what it holds, never through a link: a link in its place is refused,
    links inside it are removed as links (shutil.rmtree's descriptor-based walk)."""
    import shutil

    if check(path, "dir") is not None:
        shutil.rmtree(path)
