"""One writer per run, one builder per dataset, and no temporary file outliving its process.

Locks are `flock`s on files under WORKSPACE/locks/ (not in the run directory, so a refused command
leaves no run behind). The kernel releases a lock when its process dies, however it dies, so a lock
left by a killed process is simply free. The holder writes its PID and command line into the file,
so a refused command can say who holds it. Temporary files and directories carry their creator's
PID (`.NAME.PID.xxxx`); `remove_stale` removes those whose process is gone.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from newllm_cli.runtime.errors import RefusedError

STALE = re.compile(r"^\..+?\.(\d+)\.[^.]+(\.tmp|\.npy)?$")  # .NAME.PID.random[.tmp|.npy]


def tag() -> str:
    """The part of a temporary name that says whose it is."""
    return f"{os.getpid()}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_stale(directory: Path) -> list[Path]:
    """Remove the temporary files and directories in `directory` whose creating process is gone."""
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    for p in directory.iterdir():
        m = STALE.match(p.name)
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed


@contextmanager
def hold(lock: Path, what: str, exclusive: bool = True, wait: float = 0.0) -> Iterator[None]:
    """Hold `lock` (exclusive for writers, shared for readers) for the block. When another process
    holds it, wait up to `wait` seconds, then refuse (exit 3) naming the holder."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    deadline = time.monotonic() + wait
    try:
        while True:
            try:
                fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
                    raise RefusedError(
                        f"{what} is in use by PID {holder}; wait for it to finish (or use another --run)"
                    ) from None
                time.sleep(0.1)
        if exclusive:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} (newllm {' '.join(sys.argv[1:])})".encode()[:4000], 0)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextmanager
def run(workspace: str | Path, name: str, exclusive: bool = True) -> Iterator[None]:
    """The run's lock; a writer also clears temporary files its killed predecessors left."""
    root = Path(workspace)
    with hold(root / "locks" / f"run-{name}.lock", f"run {name!r}", exclusive):
        if exclusive:
            remove_stale(root / "runs" / name)
        yield


@contextmanager
def dataset(data_dir: Path) -> Iterator[None]:
    """A dataset being built: others wait for it (then find it in the cache)."""
    root = data_dir.parent.parent
    with hold(root / "locks" / f"dataset-{data_dir.name}.lock", f"dataset {data_dir.name}", wait=24 * 3600):
        remove_stale(data_dir.parent)
        yield
