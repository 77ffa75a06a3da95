"""Writing files: atomically (a temporary beside the target, renamed over it once complete) and,
inside `together`, all of a stage's outputs at once; a failed write names its file and cause.

A full disk must lose nothing: arrays are written with plain writes (never a memory map, whose
short write is a SIGBUS), and a stage's outputs are renamed into place only when every one of them
is complete, checkpoints last, so the run never holds a new network beside old contexts.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from newllm_cli.runtime import locks, nofollow


def umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def share(path: Path, directory: bool = False) -> None:
    """Give a file made by mkstemp/mkdtemp (always 0600/0700) the mode the user's umask asks for,
    as open() would have: a teammate can read a shared workspace under umask 022."""
    os.chmod(path, (0o777 if directory else 0o666) & ~umask())


_BATCH = threading.local()  # a stack: per open `together` block, [(temporary, path)] written so far


def _stack() -> list[list[tuple[str, Path]] | None]:
    if not hasattr(_BATCH, "stack"):
        _BATCH.stack = []
    return _BATCH.stack


@contextmanager
def together() -> Iterator[None]:
    """Publish every artifact written inside the block only once all of them are written: each
    goes to a temporary name, and they are renamed into place together when the block succeeds,
    checkpoints last (a reader then never pairs a new network with old contexts, nor the reverse);
    when it fails, the temporaries go and the previous artifacts stay as they were. A block inside
    another publishes its own outputs when it ends. Under torchrun every rank reads what the leader
    wrote at once, so there each artifact is published as soon as it is written."""
    from newllm_cli.runtime import distributed

    if distributed.current().size > 1:
        yield
        return
    pending: list[tuple[str, Path]] = []
    _stack().append(pending)
    try:
        yield
    except BaseException:
        for tmp, _ in pending:
            Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        _stack().pop()  # this block's list (blocks nest)
    for tmp, path in sorted(pending, key=lambda p: p[1].suffix == ".pt"):
        os.replace(tmp, path)


def publish(tmp: str | Path, path: str | Path, now: bool = False) -> None:
    """Rename a finished temporary over `path`, now or (inside `together`) with the others."""
    pending = _stack()[-1] if _stack() else None
    if now or pending is None:
        os.replace(tmp, path)
        return
    for i, (old, target) in enumerate(pending):
        if target == Path(path):  # written again (metrics.csv): the newer copy wins
            Path(old).unlink(missing_ok=True)
            pending[i] = (str(tmp), Path(path))
            return
    pending.append((str(tmp), Path(path)))


@contextmanager
def at_once() -> Iterator[None]:
    """Inside a `together` block, publish what is written here at once: a resume point must
    survive the failure (Ctrl-C) of the stage it belongs to."""
    _stack().append(None)
    try:
        yield
    finally:
        _stack().pop()


def latest(path: Path) -> Path:
    """Where the current content of `path` is: its unpublished copy inside `together`, else itself."""
    for pending in reversed(_stack()):
        for tmp, target in pending or []:
            if target == Path(path):
                return Path(tmp)
    return path


@contextmanager
def atomic_path(path: Path, now: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds.
    Inside a workspace, no directory on the way and not `path` itself may be a link. A failed
    write (a full disk) names `path` and the cause, never the temporary."""
    nofollow.makedirs(path.parent)
    nofollow.check(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{locks.tag()}", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with naming(path):
            yield Path(tmp)
        share(Path(tmp))
        publish(tmp, path, now)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def naming(path: Path) -> Iterator[None]:
    """An OSError inside the block (a short write on a full disk) re-raised naming `path`, the
    file being written, and its cause."""
    try:
        yield
    except OSError as e:
        raise OSError(e.errno, f"{e.strerror or e} while writing", str(path)) from None


def save_npy(f, array: np.ndarray, rows: int = 1 << 16) -> None:
    """np.save through f.write, a block of rows at a time: a full disk is an OSError with its errno
    (ndarray.tofile, which np.save uses, reports only "N requested and M written")."""
    array = np.asarray(array)
    header = {"descr": np.lib.format.dtype_to_descr(array.dtype), "fortran_order": False, "shape": array.shape}
    np.lib.format.write_array_header_1_0(f, header)
    flat = array.reshape(1) if array.ndim == 0 else array
    for s in range(0, len(flat), rows):
        f.write(np.ascontiguousarray(flat[s : s + rows]).tobytes())
