"""Data parallelism on torch.distributed, for jobs started by torchrun (docs/ARCHITECTURE.md,
"Many processes").

A Group is the processes (ranks) of one job. Each rank takes a contiguous range of documents
balanced by token count (`shard_of`), so its rows form one block of every corpus-sized file, which
it writes in place (`save_rows`). Ranks are cut between fixed blocks of whole documents, inside
which float32 sums are taken, so every world size adds the same float32 partial sums in float64.
Whatever a decision depends on is combined so that every rank holds the same bits: sums by
all_reduce, statistics gathered and merged in rank order. Rank 0, the leader, holds the run's lock
and writes the run's other files (the session's `publishing`); the other ranks compute the same and
print only their errors. One process is SOLO, where combining is the identity, so the stages have
one code path.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from newllm_cli.runtime.errors import NewLLMError, RankFailed, first_line
from newllm_cli.runtime.session import current as current_session


@dataclass(frozen=True)
class Shard:
    """Documents first..last-1, rows start..stop-1, of a corpus of `total` rows; `blocks` are the
    row bounds (from `start`) of the corpus's blocks in it."""

    first: int
    last: int
    start: int
    stop: int
    total: int
    blocks: np.ndarray

    def local(self, tokens: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """This shard's tokens and its document offsets counted from its first row."""
        return tokens[self.start : self.stop], np.asarray(offsets[self.first : self.last + 1], np.int64) - self.start


def block_size(n: int) -> int:
    """Rows per block (tokens; Phase 2: pairs) of n: 4,096 at least, growing with n to 65,536 (a
    whole chunk of work: smaller blocks cost up to a third more time), then n / 4,096, so there are
    at most 16 blocks below a million rows and 4,096 above 268 million."""
    return max(4096, min(65536, -(-n // 16)), -(-n // 4096))


def block_starts(offsets: np.ndarray) -> np.ndarray:
    """Where the corpus's blocks start (document indices, then the end): a block starts at the first
    document boundary at or after each multiple of block_size(tokens). A function of the corpus
    alone, never of the world size."""
    total = int(offsets[-1])
    starts = np.searchsorted(offsets, np.arange(0, total, block_size(total)), side="left")
    return np.unique(np.append(starts, len(offsets) - 1)).astype(np.int64)


def shard_of(offsets: np.ndarray, rank: int, size: int) -> Shard:
    """Rank `rank`'s contiguous documents: cut at the block starts nearest to k/size of the tokens,
    so ranks differ by about a block (a rank may get none). Depends only on the offsets and the
    world size."""
    offsets = np.asarray(offsets, np.int64)
    total = int(offsets[-1])
    starts = block_starts(offsets)
    at = offsets[starts]
    cuts = [0] + [int(starts[np.abs(at - total * k / size).argmin()]) for k in range(1, size)] + [len(offsets) - 1]
    first, last = cuts[rank], max(cuts[rank], cuts[rank + 1])
    inside = starts[(starts >= first) & (starts <= last)]
    return Shard(first, last, int(offsets[first]), int(offsets[last]), total, offsets[inside] - offsets[first])


class Group:
    """One process: every combination is the identity. `Ranks` is the torch.distributed job."""

    rank, size, local_size = 0, 1, 1

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def shard(self, offsets: np.ndarray) -> Shard:
        return shard_of(offsets, self.rank, self.size)

    def rows(self, n: int, block: int) -> tuple[int, int]:
        """This rank's rows of n independent rows (Phase 2 pairs): cut at the multiples of `block`
        nearest to k/size of them."""
        cut = [min(n, round(n * k / self.size / block) * block) for k in range(self.size)] + [n]
        return cut[self.rank], cut[self.rank + 1]

    def sum(self, x):
        """Sum over ranks of a number, or elementwise of a tensor (float64 on the wire, the input's
        type back)."""
        return x

    def gather(self, obj: Any) -> list:
        """Every rank's `obj`, in rank order."""
        return [obj]

    def broadcast(self, obj: Any) -> Any:
        """The leader's `obj`."""
        return obj

    def any(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag, true when it is true on some rank."""
        return tuple(bool(f) for f in flags)

    def barrier(self) -> None:
        pass

    def cat(self, array: np.ndarray) -> np.ndarray:
        """Every rank's rows, concatenated in rank order (so in corpus order)."""
        return np.concatenate(self.gather(np.asarray(array)))

    def threads(self) -> int:
        """CPU threads per rank when --threads is 0: the cores shared by this machine's ranks."""
        return 0 if self.local_size == 1 else max(1, len(os.sched_getaffinity(0)) // self.local_size)

    @contextlib.contextmanager
    def leading(self, guard: contextlib.AbstractContextManager) -> Iterator[None]:
        """Enter `guard` (the run's lock) on the leader only; if it refuses, every rank raises that."""
        with contextlib.ExitStack() as stack:
            error = None
            if self.leader:
                try:
                    stack.enter_context(guard)
                except NewLLMError as e:
                    error = e
            shared = self.broadcast(None if error is None else (type(error), str(error)))
            if shared is not None:
                raise error if error is not None else shared[0](shared[1])
            yield

    def close(self) -> None:
        pass


SOLO = Group()


def current() -> Group:
    """The command's group: SOLO unless `start` joined one."""
    return current_session().group or SOLO


def launched() -> bool:
    """Started by torchrun (or anything that sets its environment) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _collective(method):
    """A lost peer shows up as an error inside a collective: one line, naming the cause."""

    @functools.wraps(method)
    def wrapped(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except RuntimeError as e:  # gloo and NCCL raise RuntimeError or its subclass DistError
            raise RankFailed(f"another rank of this job stopped ({_cause(e)}); see its own error") from None

    return wrapped


def _cause(e: BaseException) -> str:
    """A backend's message without its source location, to its first sentence: 'Connection reset
    by peer' rather than a path into gloo's sources."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", first_line(e))
    return text.split(". ")[0][:200]


class Ranks(Group):
    """The processes of a torchrun job, over gloo (CPU) or NCCL (CUDA)."""

    def __init__(self, device):
        import torch
        import torch.distributed as dist

        self.dist, self.torch = dist, torch
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")
        try:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        except (RuntimeError, ValueError) as e:
            raise RankFailed(f"cannot join the torchrun job: {first_line(e)[:200]}") from None
        self.rank, self.size = dist.get_rank(), dist.get_world_size()
        self.local_size = int(os.environ.get("LOCAL_WORLD_SIZE", self.size))

    @_collective
    def sum(self, x):
        if not isinstance(x, self.torch.Tensor):  # a count or a float
            return type(x)(self.sum(self.torch.tensor(float(x), dtype=self.torch.float64)).item())
        wire = x.to(self.device, self.torch.float64, copy=True)
        self.dist.all_reduce(wire)
        return wire.to(x.device, x.dtype)

    @_collective
    def gather(self, obj: Any) -> list:
        out = [None] * self.size
        self.dist.all_gather_object(out, obj)
        return out

    @_collective
    def broadcast(self, obj: Any) -> Any:
        box = [obj]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    @_collective
    def any(self, *flags: bool) -> tuple[bool, ...]:
        t = self.torch.tensor([int(bool(f)) for f in flags], device=self.device)
        self.dist.all_reduce(t, op=self.dist.ReduceOp.MAX)
        return tuple(bool(v) for v in t.tolist())

    @_collective
    def barrier(self) -> None:
        self.dist.barrier()

    def close(self) -> None:
        session = current_session()
        if session.group is self:
            session.group = None
        with contextlib.suppress(Exception):  # a peer may be gone already
            self.dist.destroy_process_group()


def start(device) -> Group:
    """Join the job torchrun started (gloo on CPU, NCCL on CUDA, one GPU per local rank). Ranks
    other than the leader stay silent and write none of the run's files."""
    group = Ranks(device)
    session = current_session()
    session.group = group
    if not group.leader:
        session.publishing = False
        session.muted = f"rank {group.rank}"
    return group
