"""Phase 2 pairs: (c_t, x_{t+1}) from saved fixed contexts, for the head fit of head_fit.py.

Pairs are (c_t, x_{t+1}) inside each document, grouped by document so that the penalty is chosen
on held-out training documents and the verdicts' uncertainty resamples whole documents. The head is
stored as a plain Linear(in, V) on the raw features, so `generate` needs nothing else.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from newllm_cli.model.head import Head
from newllm_cli.runtime.distributed import SOLO, Group, block_size
from newllm_cli.runtime.errors import NumericalError
from newllm_cli.store.rowstore import RowStore
from newllm_cli.training import head_fit
from newllm_cli.training.head_fit import Split


def pair_positions(offsets: np.ndarray) -> np.ndarray:
    """Positions t whose next token x_{t+1} is in the same document."""
    n = int(offsets[-1])
    last = np.zeros(n, dtype=bool)
    ends = np.asarray(offsets[1:], dtype=np.int64) - 1
    last[ends[ends >= 0]] = True
    return np.nonzero(~last)[0]


def pair_documents(offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions t with a next token in the same document, and each one's document index."""
    pos = pair_positions(offsets)
    return pos, np.searchsorted(np.asarray(offsets, np.int64), pos, side="right") - 1


def pair_block(offsets: np.ndarray, group: Group) -> tuple[np.ndarray, np.ndarray]:
    """Positions and documents of this rank's pairs, found from the documents they lie in (no array
    the size of the corpus)."""
    offsets = np.asarray(offsets, np.int64)
    before = np.concatenate([[0], np.cumsum(np.maximum(np.diff(offsets) - 1, 0))])  # pairs before each document
    a, b = group.rows(int(before[-1]), block_size(int(before[-1])))
    if b <= a:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    first = int(np.searchsorted(before, a, side="right")) - 1
    last = int(np.searchsorted(before, b, side="left"))
    start = int(offsets[first])
    pos, docs = pair_documents(offsets[first : last + 1] - start)
    skip = a - int(before[first])
    return pos[skip : skip + b - a] + start, docs[skip : skip + b - a] + first


def make_split(
    contexts: np.ndarray,
    tokens: np.ndarray,
    offsets: np.ndarray,
    device: torch.device,
    token_features: Callable[[np.ndarray], torch.Tensor] | None = None,
    memory_budget: int | None = None,
    scratch: Path | None = None,
    group: Group = SOLO,
    previous: int = 0,
    zero: bool = False,
) -> Split:
    """(c_t [, c_{t-1}..c_{t-previous}] [, emb(x_t)]) -> x_{t+1} for every pair inside a document
    (earlier contexts are zero before the document's start; `zero`: every context is zero, and the
    contexts are never read); with a `group`, this rank's consecutive block of the pairs, cut between
    gradient blocks (distributed.block_size). Groups are the corpus's document indices; `sources`
    holds each pair's x_t.

    Features are one tensor when they (and their whitened copy) take at most half of `memory_budget`
    bytes; otherwise they go to a file under `scratch`, filled chunk by chunk from the contexts file
    read with pread, and the probe streams them."""
    pos, docs = pair_block(offsets, group)
    y = torch.from_numpy(np.asarray(tokens[pos + 1], dtype=np.int64)).to(device)
    groups = torch.from_numpy(docs).to(device)
    sources = torch.from_numpy(np.asarray(tokens[pos], dtype=np.int64)).to(device)
    starts = np.asarray(offsets, np.int64)[docs]
    extra = len(token_features(np.zeros(1, np.int64))[0]) if token_features else 0
    width = contexts.shape[1] * (previous + 1) + extra

    def features(reader: RowStore | None, s: int, e: int) -> torch.Tensor:
        p = pos[s:e]
        x = _lagged(contexts, reader, p, starts[s:e], previous, zero)
        _check_finite(x)
        if token_features is not None:
            x = torch.cat([x, token_features(np.asarray(tokens[p], dtype=np.int64)).cpu()], dim=1)
        return x

    if memory_budget is None or 2 * len(pos) * width * 4 <= memory_budget // 2 or not len(pos):
        with _reader(contexts) as reader:
            return Split(features(reader, 0, len(pos)).to(device), y, groups, sources)
    store = RowStore(len(pos), width, scratch, "pairs")
    try:
        with _reader(contexts) as reader:
            for s in range(0, len(pos), head_fit.CHUNK):
                store.write(s, features(reader, s, s + head_fit.CHUNK).numpy())
    except BaseException:
        store.close()
        raise
    return Split(store, y, groups, sources)  # the Split owns the store now: `with split:` closes it


def _lagged(
    contexts: np.ndarray, reader: RowStore | None, p: np.ndarray, starts: np.ndarray, previous: int, zero: bool
) -> torch.Tensor:
    """[c_t, c_{t-1}, ..., c_{t-previous}] of positions p (zero before each one's document start)."""
    width = contexts.shape[1]
    if zero or not len(p):
        return torch.zeros(len(p), width * (previous + 1))
    a, b = max(int(p[0]) - previous, 0), int(p[-1]) + 1
    block = reader.read(a, b) if reader else np.asarray(contexts[a:b])
    parts = []
    for lag in range(previous + 1):
        rows = np.ascontiguousarray(block[np.maximum(p - lag - a, 0)], dtype=np.float32)
        rows[p - lag < starts] = 0.0
        parts.append(rows)
    return torch.from_numpy(parts[0] if previous == 0 else np.concatenate(parts, axis=1))


@contextlib.contextmanager
def _reader(contexts: np.ndarray) -> Iterator[RowStore | None]:
    """A memory-mapped contexts' file read with pread (None: in memory, or not plain float32 rows
    of one whole file, such as a slice of one: read through the map)."""
    reader = None
    if isinstance(contexts, np.memmap) and contexts.filename:
        with contextlib.suppress(ValueError):
            reader = RowStore.open(Path(contexts.filename))
    if reader is not None and reader.shape != contexts.shape:
        reader.close()
        reader = None
    try:
        yield reader
    finally:
        if reader is not None:
            reader.close()


def _check_finite(x: torch.Tensor) -> None:
    if not torch.isfinite(x).all():
        raise NumericalError(
            "the saved contexts contain NaN or Inf; rerun phase1 (a lower learning rate may be needed)"
        )


def evaluate(head: Head, split: Split) -> dict:
    """Mean cross-entropy, perplexity exp(loss) and top-1 accuracy of a full head over every pair."""
    with torch.no_grad():
        logits = head(split.inputs)
        losses = torch.nn.functional.cross_entropy(logits, split.targets, reduction="none")
        correct = int((logits.argmax(1) == split.targets).sum())
    return head_fit.metrics(losses.double().cpu().numpy(), correct)
