"""What a sound artifact looks like, checked on every read, so that a damaged file ends a command
with one line (exit 3) naming the file, what is wrong, and the command that rebuilds it, instead of
an exception deep inside a stage.

JSON reports are checked against small pydantic models of the fields readers use (other fields are
free); arrays by dtype, dimensions, shape, id range and finiteness; checkpoints by keys, shapes
(loading into the model they are for) and finiteness; tokenizers by loading them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from newllm_cli.runtime.errors import RefusedError

BLOCK_BYTES = 1 << 24  # read at a time for range, finiteness and content checks
SQUARABLE = 1e18  # beyond this a float32 square (a second moment) overflows to inf


class Damaged(RefusedError):
    """An artifact that is there but unusable (exit 3)."""

    def __init__(self, path: Path, problem: str, fix: str):
        self.path, self.problem = path, problem
        super().__init__(f"{path} is damaged: {problem}; rebuild it with `{fix}`")


class _Free(BaseModel):
    model_config = ConfigDict(extra="allow")


class SplitMeta(_Free):
    tokens: int = Field(ge=0)
    documents: int = Field(ge=0)


class DatasetMeta(_Free):
    key: str
    vocab_size: int = Field(gt=0)
    dtype: Literal["uint8", "uint16", "uint32", "int32", "int64"]
    tokenizer: str
    train: SplitMeta
    val: SplitMeta


class Provenance(_Free):
    dataset: str


class Phase1Provenance(Provenance):
    model_id: str | None
    model: dict


class Phase1Report(_Free):
    split: Literal["train", "val"]
    tokens: int = Field(ge=0)
    history: list[dict]
    converged_ratio: float | None
    provenance: Phase1Provenance


class Rank(_Free):
    effective_rank: float


class Flag(_Free):
    degenerate: bool


class ZeroFlag(Flag):
    mean_norm: float


class SplitAnalysis(_Free):
    n: int = Field(gt=0)
    dim: int = Field(gt=0)
    centred: Rank
    information: Rank
    global_attractor: Flag
    zero_solution: ZeroFlag


class AnalysisProvenance(_Free):
    model_id: str | None


class AnalysisReport(_Free):
    provenance: AnalysisProvenance
    train: SplitAnalysis | None = None
    val: SplitAnalysis | None = None


class ControlReport(_Free):
    provenance: dict


def json_fields(data, schema: type[BaseModel], path: Path, fix: str) -> dict:
    """`data` when it has the fields (and types) `schema` asks for."""
    try:
        schema.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "the top level"
        raise Damaged(path, f"{where}: {err['msg'].lower()}", fix) from None
    return data


def array(
    a: np.ndarray,
    path: Path,
    fix: str,
    *,
    kind: str,
    rows: int | None = None,
    cols: int | None = None,
    below: int | None = None,
    finite: bool = False,
    sha256: str | None = None,
) -> np.ndarray:
    """`a` when it is a `kind` ("int" or "float") array of `rows` x `cols` (1-D without cols) whose
    ids lie in [0, below), whose values are finite and whose content has the `sha256` its writer
    recorded, as asked (one streamed pass for all three)."""
    ok_kind = a.dtype.kind in ("iu" if kind == "int" else "f")
    if not ok_kind:
        raise Damaged(path, f"dtype {a.dtype}, expected {kind}", fix)
    if a.ndim != (1 if cols is None else 2):
        raise Damaged(path, f"{a.ndim} dimensions, expected {1 if cols is None else 2}", fix)
    if rows is not None and a.shape[0] != rows:
        raise Damaged(path, f"{a.shape[0]} rows, expected {rows}", fix)
    if cols is not None and a.shape[1] != cols:
        raise Damaged(path, f"{a.shape[1]} columns, expected {cols}", fix)
    if below is None and not finite and sha256 is None:
        return a
    h = hashlib.sha256()
    for block in blocks(a):
        if below is not None and len(block) and (block.min() < 0 or block.max() >= below):
            raise Damaged(path, f"ids outside 0..{below - 1}", fix)
        if finite and not np.isfinite(block).all():
            raise Damaged(path, "NaN or Inf values", fix)
        if finite and len(block) and np.abs(block).max() > SQUARABLE:
            raise Damaged(
                path, f"values as large as {float(np.abs(block).max()):.3g}, too large to square in float32", fix
            )
        h.update(block.data)
    if sha256 is not None and h.hexdigest()[:16] != sha256:
        raise Damaged(path, "its content is not the one its writer recorded (swapped or edited)", fix)
    return a


def blocks(a: np.ndarray):
    """`a` in C-contiguous blocks of rows of about BLOCK_BYTES (a memory map is read block by block)."""
    step = max(1, BLOCK_BYTES // max(1, a[:1].nbytes))
    for s in range(0, len(a), step):
        yield np.ascontiguousarray(a[s : s + step])


def digest(a: np.ndarray) -> str:
    """The content hash `array` checks: sha256 of the C-ordered bytes, streamed."""
    h = hashlib.sha256()
    for block in blocks(a):
        h.update(block.data)
    return h.hexdigest()[:16]


def offsets(o: np.ndarray, path: Path, fix: str, documents: int, tokens: int) -> np.ndarray:
    """Document boundaries: documents + 1 non-decreasing integers from 0 to the token count."""
    array(o, path, fix, kind="int", rows=documents + 1)
    if o[0] != 0 or o[-1] != tokens or (np.diff(o) < 0).any():
        raise Damaged(path, f"offsets must rise from 0 to {tokens}", fix)
    return o


def state(module, payload: dict, path: Path, fix: str, keys: tuple[str, ...] = ("state", "provenance")) -> None:
    """Load a checkpoint's weights into `module`: every key there, every shape right, all finite."""
    import torch

    missing = [k for k in keys if k not in payload]
    if missing:
        raise Damaged(path, f"no {', '.join(missing)}", fix)
    weights = payload["state"]
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise Damaged(path, "its state is not a set of tensors", fix)
    try:
        module.load_state_dict(weights)
    except RuntimeError as e:  # "Error(s) in loading state_dict ...:" then one line per problem
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise Damaged(path, (lines[1] if len(lines) > 1 else lines[0]).rstrip(".").lower(), fix) from None
    if not all(bool(torch.isfinite(v).all()) for v in weights.values() if v.is_floating_point()):
        raise Damaged(path, "NaN or Inf weights", fix)
