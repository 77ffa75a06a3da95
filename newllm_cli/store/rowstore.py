"""N x C float32 rows (one context per token) held in memory, or in a .npy file read chunk by chunk.

Phase 1 keeps two of these (this iteration's contexts and the previous one's), Phase 2 one per split
of pairs. When they fit the memory budget they are plain arrays; otherwise they are files in the run
directory, read and written with pread/pwrite, never memory-mapped: mapped pages count towards the
process's resident memory, and the point of a file is that only the chunk in hand does.
"""

from __future__ import annotations

import os
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from newllm_cli.runtime import locks, nofollow
from newllm_cli.runtime.distributed import Group, Shard
from newllm_cli.store.artifacts import write_array
from newllm_cli.store.publish import publish, share


class RowStore:
    """N x C float32 rows, in memory or in a temporary .npy file read and written with pread/pwrite.
    `with RowStore(...) as store:` closes it (deleting an unsaved file) when the block ends."""

    def __init__(self, rows: int, width: int, directory: Path | None = None, name: str = "rows"):
        self.shape = (rows, width)
        self.row_bytes = width * 4
        self.array: np.ndarray | None = None
        self.path: Path | None = None
        self.fd: int | None = None
        self.owned = True  # its file is deleted on close unless saved
        if directory is None:
            self.array = np.zeros(self.shape, dtype=np.float32)
            return
        Path(directory).mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.{locks.tag()}", suffix=".npy", dir=directory)
        os.close(fd)
        self.path = Path(tmp)
        header = np.lib.format.open_memmap(self.path, mode="w+", dtype=np.float32, shape=self.shape)
        self.data_offset = header.offset
        del header  # the file is created at full size (sparse); we never map it again
        self.fd = os.open(self.path, os.O_RDWR)
        self._cleanup = weakref.finalize(self, _remove, self.fd, self.path)  # if never saved nor closed

    @classmethod
    def open(cls, path: Path, writable: bool = False) -> RowStore:
        """An existing float32 .npy file of rows, read (and written) through pread like any file
        store; closing it never deletes it."""
        nofollow.check(path)
        probe = np.load(path, mmap_mode="r")
        if probe.dtype != np.float32 or probe.ndim != 2 or not probe.flags.c_contiguous:
            raise ValueError(f"{path} does not hold float32 rows")
        store = cls.__new__(cls)
        store.shape, store.row_bytes, store.array = probe.shape, probe.shape[1] * 4, None
        store.path, store.data_offset = Path(path), probe.offset
        del probe
        store.fd = nofollow.open_fd(path, os.O_RDWR if writable else os.O_RDONLY)

        store.owned = False
        return store

    @classmethod
    def from_array(cls, source: np.ndarray | RowStore, directory: Path | None, chunk: int) -> RowStore:
        """A store holding a copy of `source` (possibly memory-mapped), copied chunk by chunk."""
        store = cls(source.shape[0], source.shape[1], directory)
        for s in range(0, len(source), chunk):
            store.write(s, np.asarray(source[s : s + chunk], dtype=np.float32))
        return store

    def __len__(self) -> int:
        return self.shape[0]

    def __enter__(self) -> RowStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _file(self) -> int:
        if self.fd is None:
            raise ValueError("the row store is closed")
        return self.fd

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, _ = rows.indices(len(self))
        return self.read(start, stop)

    def read(self, start: int, stop: int) -> np.ndarray:
        if self.array is not None:
            return self.array[start:stop]
        out = np.empty((stop - start, self.shape[1]), dtype=np.float32)
        view, pos = out.data.cast("B"), self.data_offset + start * self.row_bytes
        while len(view):
            got = os.preadv(self._file(), [view], pos)
            if got <= 0:
                raise OSError(f"short read from {self.path}")
            view, pos = view[got:], pos + got
        return out

    def write(self, start: int, rows: np.ndarray) -> None:
        if self.array is not None:
            self.array[start : start + len(rows)] = rows
            return
        view = np.ascontiguousarray(rows, dtype=np.float32).data.cast("B")
        pos = self.data_offset + start * self.row_bytes
        while len(view):
            try:
                done = os.pwrite(self._file(), view, pos)
            except OSError as e:  # a full disk: name the directory (the file is a temporary)
                raise OSError(
                    e.errno, f"{e.strerror} while writing context rows in", str(Path(str(self.path)).parent)
                ) from None
            view, pos = view[done:], pos + done

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """Scattered rows (one per document, say), without reading what lies between them."""
        if self.array is not None:
            return self.array[rows]
        return (
            np.stack([self.read(int(r), int(r) + 1)[0] for r in rows])
            if len(rows)
            else np.zeros((0, self.shape[1]), np.float32)
        )

    def chunks(self, chunk: int):
        for s in range(0, len(self), chunk):
            yield s, min(s + chunk, len(self))

    def save(self, path: Path, chunk: int = 1 << 16) -> Path:
        """Write the rows to `path` as .npy, atomically; a file store is renamed, not copied."""
        if self.path is not None and self.path.parent.resolve() == Path(path).parent.resolve():
            os.fsync(self._file())
            share(self.path)
            publish(self.path, path)
            self.owned = False  # the file now belongs to `path` (renamed now or with its stage's outputs)
            self.close()
            return path
        if self.array is not None:
            return write_array(Path(path), self.array)
        copy = RowStore.from_array(self, Path(path).parent, chunk)  # another directory: copy, then rename
        return copy.save(path)

    def close(self) -> None:
        """Free the rows: an unsaved file is deleted."""
        self.array = None
        if getattr(self, "_cleanup", None) is not None:
            self._cleanup.detach()
        if self.fd is not None:
            if self.owned and self.path is not None:
                _remove(self.fd, self.path)
            else:
                os.close(self.fd)
            self.fd = None


def _remove(fd: int, path: Path) -> None:
    """Close a store's file, deleting it if it is still a temporary (a dot-name never renamed)."""
    os.close(fd)
    if path.name.startswith(".") and path.exists():
        path.unlink()


def save_rows(store, path: Path, shard: Shard, group: Group, keep: bool = False, chunk: int = 1 << 16) -> Path:
    """Write each rank's rows (a RowStore holding rows shard.start..stop-1) into one .npy of
    shard.total rows, atomically: the leader makes a temporary file, every rank writes its block,
    the leader renames it once all are done. One process without `keep` renames its own store's
    file instead. `keep` leaves the store open (a periodic resume point)."""
    path = Path(path)
    if group.size == 1 and not keep:
        return store.save(path)
    name = None
    if group.leader:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.{locks.tag()}", suffix=".npy", dir=path.parent)
        os.close(fd)
        # created at full size (sparse) and closed at once: the ranks fill it with pwrite
        np.lib.format.open_memmap(name, mode="w+", dtype=np.float32, shape=(shard.total, store.shape[1]))
    name = group.broadcast(name)
    with RowStore.open(Path(name), writable=True) as target:
        for s, e in store.chunks(chunk):
            target.write(shard.start + s, store.read(s, e))
        os.fsync(target._file())
    group.barrier()  # every block is on disk
    if group.leader:
        share(Path(name))
        publish(name, path)
    group.barrier()  # renamed: any rank may read it now
    if not keep:
        store.close()
    return path


@dataclass
class Part:
    """A rank's rows of a corpus-sized table, saved collectively (a resume point's contexts)."""

    store: RowStore
    shard: Shard
    group: Group
    keep: bool = False

    def save(self, path: Path) -> Path:
        return save_rows(self.store, path, self.shard, self.group, keep=self.keep)
