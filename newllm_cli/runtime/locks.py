"""One writer per run, one builder per dataset, and no temporary file outliving its process.

A run's lock is a `flock` on its directory, which a second writer cannot get around by deleting a
file (a command that made the directory only to be refused removes it again). A dataset's lock is
a `flock` on WORKSPACE/locks/dataset-KEY.lock, checked after locking to still be the file at that
path (one deleted and made again is taken afresh); two builders that slip past it anyway cost only
time, since each builds in its own temporary directory and the first rename wins. The kernel
releases a lock when its process dies, however it dies, so a lock left by a killed process is
simply free. The holder writes its PID and command line into WORKSPACE/locks/, so a refused command
can say who holds it. Temporary files and directories carry their creator's PID (`.NAME.PID.xxxx`);
`remove_stale` removes those whose process is gone. Nothing here follows a link (nofollow.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from newllm_cli.runtime import nofollow
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
    if not nofollow.is_dir(directory):
        return removed
    for p in directory.iterdir():
        m = STALE.match(p.name)
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True) if nofollow.is_dir(p) else p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _flock(fd: int, exclusive: bool, wait: float, refusal) -> None:
    """flock `fd`, retrying for `wait` seconds, then raise refusal()."""
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise refusal() from None
            time.sleep(0.1)


def _holder(note: Path) -> str:
    try:
        return nofollow.read_text(note, 4096).strip() or "another process"
    except (OSError, ValueError, RefusedError):
        return "another process"


def _sign(note: Path) -> None:
    """Say who holds the lock, in `note` (never through a link)."""
    fd = nofollow.open_fd(note, os.O_RDWR | os.O_CREAT)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} (newllm {' '.join(sys.argv[1:])})".encode()[:4000], 0)
    finally:
        os.close(fd)


def _in_use(what: str, note: Path):
    return lambda: RefusedError(
        f"{what} is in use by PID {_holder(note)}; wait for it to finish (or use another --run)"
    )


@contextmanager
def hold(lock: Path, what: str, exclusive: bool = True, wait: float = 0.0) -> Iterator[None]:
    """Hold the lock file `lock` (exclusive for writers, shared for readers) for the block. When
    another process holds it, wait up to `wait` seconds, then refuse (exit 3) naming the holder."""
    nofollow.makedirs(lock.parent)
    while True:
        fd = nofollow.open_fd(lock, os.O_RDWR | os.O_CREAT)
        try:
            _flock(fd, exclusive, wait, _in_use(what, lock))
            try:  # the file may have been deleted (and made again) while we waited: lock that one
                same = os.path.samestat(os.lstat(lock), os.fstat(fd))
            except FileNotFoundError:
                same = False
        except BaseException:
            os.close(fd)
            raise
        if same:
            break
        os.close(fd)
    try:
        if exclusive:
            _sign(lock)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextmanager
def run(workspace: str | Path, name: str, exclusive: bool = True) -> Iterator[None]:
    """The run's lock, on its directory; a writer also clears temporary files its killed
    predecessors left. A reader of a run that does not exist takes none (it has nothing to read)."""
    root = Path(workspace)
    run_dir, note = root / "runs" / name, root / "locks" / f"run-{name}.lock"
    made = exclusive and not os.path.lexists(run_dir)
    if not exclusive and not os.path.lexists(run_dir):
        yield
        return
    nofollow.makedirs(run_dir)
    fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    stack = contextlib.ExitStack()
    try:
        try:
            _flock(fd, exclusive, 0.0, _in_use(f"run {name!r}", note))
        except OSError:  # a file system that cannot flock a directory (some NFS): the lock file instead
            stack.enter_context(hold(note, f"run {name!r}", exclusive))
        if exclusive:
            nofollow.makedirs(note.parent)
            _sign(note)
            remove_stale(run_dir)
        yield
    finally:
        stack.close()
        os.close(fd)
        if made:
            with contextlib.suppress(OSError):
                run_dir.rmdir()  # only when empty: the command was refused before it wrote anything


@contextmanager
def dataset(data_dir: Path) -> Iterator[None]:
    """A dataset being built: others wait for it (then find it in the cache)."""
    root = data_dir.parent.parent
    with hold(root / "locks" / f"dataset-{data_dir.name}.lock", f"dataset {data_dir.name}", wait=24 * 3600):
        remove_stale(data_dir.parent)
        yield
