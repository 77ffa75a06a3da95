"""Exact duplicates between the training and validation documents, in bounded memory.

A validation document equal to a training document (or to an earlier validation document) measures
memory of the training set, not prediction: it makes the bigram and every head look better than
they are. Documents are compared by a 64-bit hash of their text with whitespace runs collapsed
(token documents: of their ids). Hashes are kept in files, 8 bytes a document, and compared one
hash partition at a time, so memory stays within PART hashes whatever the corpus size.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np

PART = 1 << 22  # hashes of one partition held at once (32 MiB)
READ = 1 << 20  # hashes read from a file at a time


def text_key(text: str) -> int:
    """The document's identity up to whitespace: runs of spaces, tabs and line breaks are one space."""
    return int.from_bytes(hashlib.blake2b(" ".join(text.split()).encode(), digest_size=8).digest(), "little")


def ids_key(ids: np.ndarray) -> int:
    return int.from_bytes(hashlib.blake2b(np.asarray(ids, np.int64).tobytes(), digest_size=8).digest(), "little")


class KeyFile:
    """Document hashes appended to a raw uint64 file, read back memory-mapped."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.write_bytes(b"")

    def write(self, keys: Iterable[int]) -> np.ndarray:
        """Append the keys, READ at a time (any number in bounded memory); all of them, mapped."""
        with open(self.path, "ab") as f:
            batch: list[int] = []
            for key in keys:
                batch.append(key)
                if len(batch) >= READ:
                    f.write(np.asarray(batch, np.uint64).tobytes())
                    batch.clear()
            f.write(np.asarray(batch, np.uint64).tobytes())
        return self.read()

    def read(self) -> np.ndarray:
        size = self.path.stat().st_size // 8
        return np.memmap(self.path, np.uint64, "r", shape=(size,)) if size else np.zeros(0, np.uint64)


def _members(keys: np.ndarray, mask: np.ndarray | None, parts: int, p: int) -> tuple[np.ndarray, np.ndarray]:
    """(positions, hashes) of the rows of `keys` (those with mask True) that fall in partition p."""
    pos, got = [], []
    for s in range(0, len(keys), READ):
        block = np.asarray(keys[s : s + READ])
        hit = (block % np.uint64(parts)) == p
        if mask is not None:
            hit &= mask[s : s + READ]
        pos.append(np.nonzero(hit)[0] + s)
        got.append(block[hit])
    return (np.concatenate(pos), np.concatenate(got)) if pos else (np.zeros(0, np.int64), np.zeros(0, np.uint64))


def find(
    train: np.ndarray, val: np.ndarray, train_mask: np.ndarray | None = None, val_mask: np.ndarray | None = None
) -> dict:
    """Which validation documents repeat a training document or an earlier validation document.

    `train` and `val` are hash arrays (memory-mapped is fine); the masks select the rows that belong
    to each split (auto_split draws both from one array). Returns `duplicate`, a bool per row of
    `val` (False outside val_mask), and the counts `of_train` and `within_val`."""
    n_train = len(train) if train_mask is None else int(train_mask.sum())
    n_val = len(val) if val_mask is None else int(val_mask.sum())
    parts = max(1, -(-max(n_train, n_val) // PART))
    duplicate = np.zeros(len(val), bool)
    of_train = within = 0
    for p in range(parts):
        _, seen = _members(train, train_mask, parts, p)
        seen = np.unique(seen)
        pos, keys = _members(val, val_mask, parts, p)
        in_train = np.isin(keys, seen, assume_unique=False)
        _, first = np.unique(keys, return_index=True)
        repeat = np.ones(len(keys), bool)
        repeat[first] = False
        repeat &= ~in_train  # counted once: a repeat of a train document is a train duplicate
        duplicate[pos[in_train | repeat]] = True
        of_train += int(in_train.sum())
        within += int(repeat.sum())
    return {"duplicate": duplicate, "of_train": of_train, "within_val": within}
