"""Weights as safetensors: the tensors, and everything else of the checkpoint as JSON metadata.

phase1.safetensors and phase2.safetensors load without torch's pickle (and outside torch: any
safetensors reader sees the tensors, `newllm` metadata holds provenance, ids and sizes as JSON). A
run made before them has phase1.pt / phase2.pt, read with weights_only=True and said once to be old.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from newllm_cli.runtime import nofollow
from newllm_cli.runtime.errors import RefusedError
from newllm_cli.runtime.progress import warn
from newllm_cli.store.publish import atomic_path
from newllm_cli.store.validate import Damaged

KEY = "newllm"  # the metadata entry holding the checkpoint's other fields, as one JSON object
FORMAT = "newllm-weights-1"
_SAID: set[str] = set()  # old checkpoints already said to be old, in this process


def encode(payload: dict[str, Any]) -> bytes:
    """A checkpoint {"state": tensors, ...} as safetensors bytes (tensors copied apart: tied or
    shared storage cannot be saved)."""
    import torch
    from safetensors.torch import save

    raw = payload.get("state")
    tensors = isinstance(raw, dict) and all(isinstance(v, torch.Tensor) for v in raw.values())
    state = (
        {k: v.detach().cpu().contiguous().clone() for k, v in raw.items()} if isinstance(raw, dict) and tensors else {}
    )
    rest = {k: v for k, v in payload.items() if k != "state" or not tensors}  # (a state of no tensors: a test's)
    meta = {KEY: json.dumps(rest, sort_keys=True), "format": FORMAT}
    meta.update({k: json.dumps(v) for k, v in rest.items()})  # each field on its own too, for other readers
    return canonical(save(state, metadata=meta))


def canonical(data: bytes) -> bytes:
    """The same file with its JSON header's keys sorted: safetensors writes them in hash-map order,
    which changes from process to process, so equal weights would give unequal files."""
    n = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8 : 8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the tensors stay 8-byte aligned, as the library keeps them
    return len(header).to_bytes(8, "little") + header + data[8 + n :]


def decode(data: bytes, path: Path, fix: str) -> dict[str, Any]:
    """The checkpoint dict encode() was given, from its bytes; damage is one line naming `path`."""
    from safetensors.torch import load

    try:
        state = load(data)
        meta = metadata(data)
    except Exception as e:  # SafetensorError, a truncated header...
        raise Damaged(path, f"cannot be loaded as safetensors ({type(e).__name__})", fix) from None
    try:
        rest = json.loads(meta[KEY])
    except (KeyError, ValueError):
        raise Damaged(path, "not a newllm checkpoint (no provenance)", fix) from None
    if not isinstance(rest, dict) or not isinstance(rest.get("provenance"), dict):
        raise Damaged(path, "not a newllm checkpoint (no provenance)", fix)
    return {**rest, **({"state": state} if state else {})}


def metadata(data: bytes) -> dict[str, str]:
    """The file's metadata: its header is 8 bytes of little-endian length, then that much JSON."""
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]).get("__metadata__") or {}


def write_weights(path: Path, payload: dict[str, Any]) -> Path:
    """Write a checkpoint atomically (the leader's, under torchrun)."""
    from newllm_cli.store.artifacts import publishes

    if not publishes():
        return path
    data = encode(payload)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


def legacy(path: Path) -> Path:
    """Where a run made before safetensors keeps these weights."""
    return path.with_suffix(".pt")


def read_weights(path: Path, what: str, fix: str = "the stage that writes it") -> dict[str, Any]:
    """A checkpoint: `path` (.safetensors), else the old torch file beside it, said once."""
    if not os.path.lexists(path) and os.path.lexists(legacy(path)):
        from newllm_cli.store.artifacts import read_checkpoint

        if str(path) not in _SAID:
            _SAID.add(str(path))
            warn(f"{legacy(path).name} is in the old torch format; `{fix}` writes {path.name} instead")
        return read_checkpoint(legacy(path), what, fix)
    if not os.path.lexists(path):
        raise RefusedError(f"missing {what}: {path}")
    size = os.lstat(path).st_size
    return decode(nofollow.read_bytes(path, limit=max(size, 1)), path, fix)
