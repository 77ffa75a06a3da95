"""The recurrence c_t = f(x_t, c_{t-1}) over many documents, run without autograd.

Two kernels with one contract, `kernel(model, table, ids, offsets, c0, last=None) -> Q` (float32,
one row per token), where `table` holds LayerNorm(Emb(v)) for every vocabulary entry v; `last`, when
given, receives each document's final state at the kernel's own precision, so that a document
continued in a later window goes on exactly as if it had not been cut:
- `torch`: documents advanced in lockstep, so each step is one matrix-matrix product per layer
  (BLAS on CPU, any device). Fast when many documents run side by side at large C.
- `numba`: a compiled CPU kernel, one document per thread, float64 arithmetic with independent
  accumulators. Fast at small C, where a BLAS call costs more than the arithmetic it does.
`--kernel auto` picks between them by the rule measured in docs/EXPERIMENTS.md (`choose_kernel`).
`recur` runs either over a corpus in windows of bounded size and writes into a RowStore, so the
corpus never has to be in memory at once. Also the shift that builds each token's incoming context.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from newllm_cli.model.network import ContextNetwork, NewLLM
from newllm_cli.runtime.errors import UsageError
from newllm_cli.runtime.progress import info
from newllm_cli.store.rowstore import RowStore

try:  # numba is a dependency, but a broken LLVM install should not make newllm unusable on CUDA
    import numba
except ImportError:  # pragma: no cover
    numba = None  # type: ignore[assignment]


def embedding_table(model: ContextNetwork, device: torch.device) -> torch.Tensor:
    """LN(Emb(v)) for every v: context-independent, so Phase 1 computes it once per run."""
    with torch.no_grad():
        return model.embed_tokens(torch.arange(model.embed.num_embeddings, device=device))


def token_input(
    table: torch.Tensor, tokens: np.ndarray, offsets: np.ndarray, rows: np.ndarray, k: int = 1
) -> torch.Tensor:
    """The token input X of the given rows (indices into `tokens`, whose documents `offsets` bound):
    table[x_t] for k = 1; for k > 1 the k rows [X_{t-k+1}, ..., X_t] side by side, zeros for the
    positions before the row's document start (model/context_layers.py)."""
    rows = np.asarray(rows, np.int64)
    if k == 1:
        return table[torch.as_tensor(np.asarray(tokens[rows], dtype=np.int64), device=table.device)]
    starts = np.asarray(offsets, np.int64)[np.searchsorted(offsets, rows, side="right") - 1]
    parts = []
    zero = torch.zeros((), dtype=table.dtype, device=table.device)
    for back in range(k - 1, -1, -1):
        inside = rows - back >= starts
        ids = np.asarray(tokens[np.where(inside, rows - back, rows)], np.int64)
        x = table[torch.as_tensor(ids, device=table.device)]
        parts.append(torch.where(torch.as_tensor(inside, device=table.device)[:, None], x, zero))
    return torch.cat(parts, dim=-1)


def shifted(traj: np.ndarray, before: np.ndarray | None, starts: np.ndarray, c0: np.ndarray) -> np.ndarray:
    """Incoming contexts of rows s..e: the row before each (`before` = row s-1, when it exists)
    and c0 of the document at every document start (`starts` are local row indices)."""
    inc = np.empty_like(traj)
    inc[1:] = traj[:-1]
    if before is not None:
        inc[0] = before
    inc[starts] = c0
    return inc


def recur_torch(
    model: ContextNetwork,
    table: torch.Tensor,
    ids: torch.Tensor,
    offsets: np.ndarray,
    c0: torch.Tensor,
    last: np.ndarray | None = None,
) -> torch.Tensor:
    """Lockstep: position t of every document in one call of f.

    Documents are visited longest first so that the ones still running at position t are always a
    prefix of the batch. Inputs are gathered time-major once, so each step reads and writes plain
    slices; the outputs go back to corpus order in one scatter at the end.
    """
    lengths = np.diff(offsets)
    if not len(lengths) or lengths.max() == 0:
        return torch.empty(0, c0.shape[1], device=ids.device, dtype=table.dtype)
    order = np.argsort(-lengths, kind="stable")
    sorted_len = lengths[order]
    steps = np.arange(int(sorted_len[0]))[:, None]
    valid = steps < sorted_len[None, :]  # [T, B]
    rows = torch.as_tensor(np.where(valid, offsets[:-1][order][None, :] + steps, 0), device=ids.device)
    emb = table[ids[rows]]  # [T, B, E]
    out_tm = torch.empty(*valid.shape, c0.shape[1], device=ids.device, dtype=table.dtype)
    active = np.searchsorted(-sorted_len, -steps[:, 0], side="left")  # documents longer than t
    ctx = c0[torch.as_tensor(order, device=c0.device)].to(table.dtype)
    with torch.no_grad():
        for t, a in enumerate(active):
            ctx = model.step(emb[t, :a], ctx[:a])
            out_tm[t, :a] = ctx
    mask = torch.as_tensor(valid, device=ids.device)
    out = torch.empty(len(ids), c0.shape[1], device=ids.device, dtype=table.dtype)
    out[rows[mask]] = out_tm[mask]
    if last is not None:  # float32 states: the outputs themselves (c0 for an empty document)
        ran = lengths > 0
        last[:] = c0.cpu().numpy()
        last[ran] = out[torch.as_tensor(offsets[1:][ran] - 1, device=ids.device)].cpu().numpy()
    return out


def numba_available() -> bool:
    return numba is not None


def _pack(model: NewLLM) -> tuple:
    """The model's context blocks as contiguous float64 arrays; weights transposed (input-major) so
    the kernel's inner loop runs over outputs, whose accumulators are independent."""

    def arr(t):
        return np.ascontiguousarray(t.detach().to("cpu", torch.float64).numpy())

    blocks: Any = model.blocks
    lin = [[m for m in b.mlp if isinstance(m, torch.nn.Linear)] for b in blocks]
    WT = arr(torch.stack([torch.stack([m.weight.t() for m in ls]) for ls in lin]))
    B = arr(torch.stack([torch.stack([m.bias for m in ls]) for ls in lin]))
    gc = arr(torch.stack([b.norm_ctx.weight for b in blocks]))
    bc = arr(torch.stack([b.norm_ctx.bias for b in blocks]))
    gt = arr(torch.stack([b.norm_tok.weight for b in blocks]))
    bt = arr(torch.stack([b.norm_tok.bias for b in blocks]))
    return WT, B, gc, bc, gt, bt, float(blocks[0].norm_ctx.eps)


def recur_numba(
    model: NewLLM,
    table: torch.Tensor,
    ids: torch.Tensor,
    offsets: np.ndarray,
    c0: torch.Tensor,
    last: np.ndarray | None = None,
) -> torch.Tensor:
    """Per-document threads with the compiled kernel (CPU); same results as recur_torch to ~1e-6.
    It computes in float64: `last` gets the float64 states, not the float32 outputs."""
    if numba is None:
        raise RuntimeError("numba is not installed; use --kernel torch")
    if not _kernel_ready():
        info("compiling the Phase 1 kernel (first run with this numba; 10-20 s, cached afterwards)")
    tab = np.ascontiguousarray(table.detach().cpu().numpy(), dtype=np.float32)
    start = np.ascontiguousarray(c0.detach().cpu().numpy(), dtype=np.float64)
    out = np.empty((len(ids), start.shape[1]), dtype=np.float32)
    state = np.empty_like(start)
    kernel: Any = _recur_kernel  # a numba dispatcher
    kernel(
        tab,
        np.ascontiguousarray(ids.cpu().numpy(), dtype=np.int64),
        np.ascontiguousarray(offsets, dtype=np.int64),
        start,
        *_pack(model),
        out,
        state,
    )
    if last is not None:
        last[:] = state
    return torch.from_numpy(out).to(table.device)


def _kernel_ready() -> bool:
    """Compiled in this process or cached on disk; otherwise its first call compiles. Reads numba's
    cache index path, a private attribute: if that moves, say nothing rather than fail."""
    if _recur_kernel.overloads:
        return True
    try:
        dispatcher: Any = _recur_kernel
        return os.path.exists(dispatcher._cache._cache_file._index_path)
    except AttributeError:  # pragma: no cover
        return True


KERNELS: dict[str, Callable[..., torch.Tensor]] = {"numba": recur_numba, "torch": recur_torch}


def choose_kernel(
    kernel: str, device: torch.device, context_dim: int, offsets: np.ndarray, compiled: bool = True
) -> str:
    """'auto': lockstep BLAS off CPU; on CPU once C >= 64 and b x C^2 >= 2^19, where b = tokens /
    longest document is the mean number of rows per lockstep step (a few long documents leave most
    steps nearly empty). So C=768 from one stream, C=256 from b=8, C=128 from b=32, C=64 from b=128;
    at C=16 the compiled kernel wins even at b=8192. Crossover measured, docs/EXPERIMENTS.md.
    `compiled` False: the network is one the compiled kernel does not know (model/architectures.py)."""
    if kernel == "numba" and not compiled:
        raise UsageError("--kernel numba runs the residual network only; use --kernel torch or auto")
    if kernel != "auto":
        return kernel
    if device.type != "cpu" or not numba_available() or not compiled:
        return "torch"
    lengths = np.diff(offsets)
    rows_per_step = lengths.sum() / max(int(lengths.max(initial=0)), 1)
    return "torch" if context_dim >= 64 and rows_per_step * context_dim**2 >= 2**19 else "numba"


def recur(
    model: ContextNetwork,
    kernel: str,
    table: torch.Tensor,
    tokens: np.ndarray,
    offsets: np.ndarray,
    c0: np.ndarray,
    out: RowStore,
    window: int,
    advance: Callable[[int], None] = lambda n: None,
) -> np.ndarray:
    """Run the recurrence over every document from c0, writing Q into `out`; return each document's
    last context (the carry-over into the next iteration).

    Work goes in time windows of at most `window` rows: every unfinished document advances by the
    same number of tokens, then its rows are written out and its last context carried over. A corpus
    that fits one window is one call (one document per thread, or all documents in lockstep).
    """
    fn, device = KERNELS[kernel], table.device
    starts, lengths = offsets[:-1].astype(np.int64), np.diff(offsets).astype(np.int64)
    carry = np.array(c0, dtype=np.float64, copy=True)  # at the kernel's precision between windows
    t0 = 0
    while True:
        active = np.flatnonzero(lengths > t0)
        if not len(active):
            return carry.astype(np.float32)  # = each document's last row of Q
        remaining = lengths[active] - t0
        # all that is left fits: one call, so threads share whole documents (best balance)
        span = int(remaining.max()) if remaining.sum() <= window else max(1, window // len(active))
        for group in np.array_split(active, -(-len(active) // window)):
            seg = np.minimum(lengths[group] - t0, span)
            local = np.concatenate([[0], np.cumsum(seg)])
            rows = np.repeat(starts[group] + t0 - local[:-1], seg) + np.arange(local[-1])
            state = np.empty((len(group), carry.shape[1]), np.float64)
            if model.input_tokens == 1:
                inputs, ids = table, torch.as_tensor(np.asarray(tokens[rows], dtype=np.int64), device=device)
            else:  # each row's k-token input, gathered by row number (the windows may cut a document)
                inputs = token_input(table, tokens, offsets, rows, model.input_tokens)
                ids = torch.arange(len(rows), device=device)
            q = fn(model, inputs, ids, local, torch.as_tensor(carry[group], device=device), state).cpu().numpy()
            carry[group] = state
            _write_segments(out, starts[group] + t0, local, q)
            advance(len(q))
        t0 += span


def _write_segments(out: RowStore, dest: np.ndarray, local: np.ndarray, q: np.ndarray) -> None:
    """Segment i of q (rows local[i]:local[i+1]) goes to rows dest[i]...; adjacent ones in one write."""
    i, n = 0, len(dest)
    while i < n:
        j = i + 1
        while j < n and dest[j] == dest[j - 1] + (local[j] - local[j - 1]):
            j += 1
        out.write(int(dest[i]), q[local[i] : local[j]])
        i = j


if numba is not None:
    # Module-level definitions so numba's on-disk cache works (compiled once per machine, not per run).
    @numba.njit(inline="always", cache=True)
    def _layer_norm(v, gamma, beta, eps, out):
        n = v.shape[0]
        mean = 0.0
        for i in range(n):
            mean += v[i]
        mean /= n
        var = 0.0
        for i in range(n):
            var += (v[i] - mean) ** 2
        inv = 1.0 / np.sqrt(var / n + eps)
        for i in range(n):
            out[i] = (v[i] - mean) * inv * gamma[i] + beta[i]

    @numba.njit(parallel=True, cache=True, nogil=True)
    def _recur_kernel(table, ids, offsets, c0, WT, B, gc, bc, gt, bt, eps, out, last):
        """One thread per document; float64 arithmetic, float32 output, each final state in `last`.

        y = b + sum_j W[:, j] h[j], summed over j in order (the reference's order, so results are
        the same bit for bit) but with the loop over outputs innermost: each output's sum is its
        own accumulator, and the compiler runs them side by side in vector registers.
        """
        n_docs = offsets.shape[0] - 1
        n_blocks, depth, width = WT.shape[0], WT.shape[1], WT.shape[2]
        C = c0.shape[1]
        E = width - C
        for d in numba.prange(n_docs):
            ctx = c0[d].copy()
            tok = np.empty(E)
            h = np.empty(width)
            y = np.empty(width)
            tmp_c = np.empty(C)
            tmp_t = np.empty(E)
            for t in range(offsets[d], offsets[d + 1]):
                v = ids[t]
                for i in range(E):
                    tok[i] = table[v, i]
                for blk in range(n_blocks):
                    for i in range(C):
                        h[i] = ctx[i]
                    for i in range(E):
                        h[C + i] = tok[i]
                    for k in range(depth):
                        for r in range(width):
                            y[r] = B[blk, k, r]
                        for j in range(width):
                            hj = h[j]
                            for r in range(width):
                                y[r] += WT[blk, k, j, r] * hj
                        for r in range(width):
                            h[r] = y[r] if y[r] > 0.0 else 0.0
                    for i in range(C):
                        tmp_c[i] = ctx[i] + h[i]
                    for i in range(E):
                        tmp_t[i] = tok[i] + h[C + i]
                    _layer_norm(tmp_c, gc[blk], bc[blk], eps, ctx)
                    _layer_norm(tmp_t, gt[blk], bt[blk], eps, tok)
                for i in range(C):
                    out[t, i] = ctx[i]
            for i in range(C):
                last[d, i] = ctx[i]
