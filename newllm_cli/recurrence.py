"""The recurrence c_t = f(x_t, c_{t-1}) over many documents, run without autograd.

Two implementations with one contract, `sweep(model, tok_emb, offsets, c0) -> Q`:
- `torch`: plain PyTorch, documents advanced in lockstep (any device; the reference in tests).
- `numba`: a compiled CPU kernel, one document per thread, ~100x less per-token overhead.
Plus the helpers both Phase 1 schemes share: batched f over given incoming contexts, and the shift
that builds each token's incoming context from a trajectory.
"""
from __future__ import annotations

import numpy as np
import torch

from .model import NewLLM

CHUNK = 65536  # tokens per batched call: bounds memory on corpora of any size

try:  # numba is a dependency, but a broken LLVM install should not make newllm unusable on CUDA
    import numba
except ImportError:  # pragma: no cover
    numba = None


def incoming_contexts(traj: torch.Tensor, offsets: np.ndarray, c0: torch.Tensor) -> torch.Tensor:
    """The context each token reads: traj shifted by one inside each document, c0 at each start."""
    inc = torch.empty_like(traj)
    inc[1:] = traj[:-1]
    starts = torch.as_tensor(offsets[:-1], device=traj.device, dtype=torch.long)
    inc[starts] = c0
    return inc


def last_contexts(traj: torch.Tensor, offsets: np.ndarray) -> torch.Tensor:
    """P_N of each document: the carry-over into the next iteration."""
    ends = torch.as_tensor(offsets[1:] - 1, device=traj.device, dtype=torch.long)
    return traj[ends]


def batched_step(model: NewLLM, tok_emb: torch.Tensor, incoming: torch.Tensor) -> torch.Tensor:
    """f(x_t, incoming_t) for all t at once, in chunks, without autograd (Jacobi; checks)."""
    out = torch.empty_like(incoming)
    with torch.no_grad():
        for s in range(0, len(out), CHUNK):
            out[s:s + CHUNK] = model.step(tok_emb[s:s + CHUNK], incoming[s:s + CHUNK])
    return out


def sweep_torch(model: NewLLM, tok_emb: torch.Tensor, offsets: np.ndarray,
                c0: torch.Tensor) -> torch.Tensor:
    """Sequential sweep in plain torch: position t of every document in one call.

    Documents are visited longest first so that the ones still running at position t are always a
    prefix of the batch; each step is then one slice, with no masking.
    """
    lengths = np.diff(offsets)
    order = np.argsort(-lengths, kind="stable")
    sorted_len = lengths[order]
    starts = torch.as_tensor(offsets[:-1][order], device=tok_emb.device, dtype=torch.long)
    out = torch.empty(len(tok_emb), c0.shape[1], device=tok_emb.device, dtype=tok_emb.dtype)
    ctx = c0[torch.as_tensor(order, device=c0.device)].clone()
    with torch.no_grad():
        for t in range(int(sorted_len[0]) if len(sorted_len) else 0):
            active = int(np.searchsorted(-sorted_len, -t, side="left"))  # docs with length > t
            rows = starts[:active] + t
            ctx = model.step(tok_emb[rows], ctx[:active])
            out[rows] = ctx
    return out


def numba_available() -> bool:
    return numba is not None


def _pack(model: NewLLM) -> tuple:
    """The model's context blocks as contiguous float64 arrays for the kernel."""
    def arr(t):
        return np.ascontiguousarray(t.detach().to("cpu", torch.float64).numpy())
    blocks = model.blocks
    lin = [[m for m in b.mlp if isinstance(m, torch.nn.Linear)] for b in blocks]
    W = arr(torch.stack([torch.stack([m.weight for m in ls]) for ls in lin]))
    B = arr(torch.stack([torch.stack([m.bias for m in ls]) for ls in lin]))
    gc = arr(torch.stack([b.norm_ctx.weight for b in blocks]))
    bc = arr(torch.stack([b.norm_ctx.bias for b in blocks]))
    gt = arr(torch.stack([b.norm_tok.weight for b in blocks]))
    bt = arr(torch.stack([b.norm_tok.bias for b in blocks]))
    return W, B, gc, bc, gt, bt, float(blocks[0].norm_ctx.eps)


def sweep_numba(model: NewLLM, tok_emb: torch.Tensor, offsets: np.ndarray,
                c0: torch.Tensor) -> torch.Tensor:
    """Sequential sweep with the compiled kernel (CPU); same results as sweep_torch to ~1e-6."""
    emb = np.ascontiguousarray(tok_emb.detach().cpu().numpy(), dtype=np.float32)
    start = np.ascontiguousarray(c0.detach().cpu().numpy(), dtype=np.float64)
    out = np.empty((len(emb), start.shape[1]), dtype=np.float32)
    _kernel()(emb, np.ascontiguousarray(offsets, dtype=np.int64), start, *_pack(model), out)
    return torch.from_numpy(out).to(tok_emb.device)


def sweep(model: NewLLM, tok_emb: torch.Tensor, offsets: np.ndarray, c0: torch.Tensor,
          kernel: str) -> torch.Tensor:
    """Dispatch: kernel is 'numba' or 'torch' (resolved from 'auto' by the caller)."""
    if kernel == "numba":
        return sweep_numba(model, tok_emb, offsets, c0)
    return sweep_torch(model, tok_emb, offsets, c0)


def resolve_kernel(kernel: str, device: torch.device) -> str:
    """'auto' means the compiled kernel on CPU and plain torch on an accelerator."""
    if kernel == "auto":
        return "numba" if device.type == "cpu" and numba_available() else "torch"
    return kernel


def _kernel():
    if numba is None:
        raise RuntimeError("numba is not installed; use --kernel torch")
    return _sweep_kernel


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
    def _sweep_kernel(emb, offsets, c0, W, B, gc, bc, gt, bt, eps, out):
        """One thread per document; float64 arithmetic, float32 output."""
        n_docs = offsets.shape[0] - 1
        n_blocks, depth, width = W.shape[0], W.shape[1], W.shape[2]
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
                for i in range(E):
                    tok[i] = emb[t, i]
                for blk in range(n_blocks):
                    for i in range(C):
                        h[i] = ctx[i]
                    for i in range(E):
                        h[C + i] = tok[i]
                    for k in range(depth):
                        for r in range(width):
                            acc = B[blk, k, r]
                            for j in range(width):
                                acc += W[blk, k, r, j] * h[j]
                            y[r] = acc if acc > 0.0 else 0.0
                        for r in range(width):
                            h[r] = y[r]
                    for i in range(C):
                        tmp_c[i] = ctx[i] + h[i]
                    for i in range(E):
                        tmp_t[i] = tok[i] + h[C + i]
                    _layer_norm(tmp_c, gc[blk], bc[blk], eps, ctx)
                    _layer_norm(tmp_t, gt[blk], bt[blk], eps, tok)
                for i in range(C):
                    out[t, i] = ctx[i]
