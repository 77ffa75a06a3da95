"""Token embeddings from outside (--embeddings): a V x E matrix from .npy, .safetensors or the hub.

The research tied its predictor's output to GPT-2's pretrained `wte` (50,257 x 768). The matrix is
read without pickle (numpy's `allow_pickle=False`, safetensors), checked against the tokenizer's
vocabulary and the model's width with one-line errors, and identified by the sha256 of its float32
bytes, which provenance records. The hub is reached only when the user names it ('gpt2').
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from newllm_cli.runtime.errors import UsageError, first_line

HUB = {"gpt2": ("openai-community/gpt2", "model.safetensors", "wte.weight")}  # name: (repo, file, tensor)


@dataclass(frozen=True)
class Embeddings:
    matrix: np.ndarray  # [V, E] float32
    sha256: str
    source: str


def _safetensors(path: Path, tensor: str | None) -> np.ndarray:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            names = list(f.keys())
            if tensor is None:
                if len(names) != 1:
                    raise UsageError(
                        f"{path} holds {len(names)} tensors ({', '.join(names[:6])}...): name one with "
                        "--embeddings-tensor"
                    )
                tensor = names[0]
            if tensor not in names:
                raise UsageError(f"{path} has no tensor {tensor!r} (it has {', '.join(names[:6])})")
            return f.get_tensor(tensor)
    except UsageError:
        raise
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise UsageError(f"{path}: cannot read as safetensors: {first_line(e)}") from None


def _hub(name: str) -> Path:
    from huggingface_hub import hf_hub_download

    repo, file, _ = HUB[name]
    try:
        return Path(hf_hub_download(repo, file))
    except Exception as e:
        raise UsageError(
            f"cannot fetch {name}'s embeddings from the hub ({type(e).__name__}): offline? "
            f"download {repo}/{file} and pass --embeddings FILE --embeddings-tensor wte.weight"
        ) from None


def load(spec: str, tensor: str | None, vocab: int, width: int) -> Embeddings:
    """The matrix named by `spec` (a path, or a HUB name), checked to be vocab x width and finite."""
    if spec in HUB:
        path, tensor = _hub(spec), tensor or HUB[spec][2]
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise UsageError(f"--embeddings: no such file: {path}")
    if path.suffix == ".npy":
        try:
            raw = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise UsageError(f"{path}: cannot read as .npy: {first_line(e)}") from None
    elif path.suffix == ".safetensors":
        raw = _safetensors(path, tensor)
    else:
        raise UsageError(f"{path}: --embeddings must be a .npy or .safetensors file, or one of {', '.join(HUB)}")
    if raw.ndim != 2 or raw.dtype.kind != "f":
        raise UsageError(f"{path}: embeddings must be a 2-d float array, not {raw.dtype} of shape {raw.shape}")
    if raw.shape[0] != vocab:
        raise UsageError(f"{path}: {raw.shape[0]:,} embedding rows for a tokenizer of {vocab:,} tokens")
    if raw.shape[1] != width:
        raise UsageError(f"{path}: embeddings are {raw.shape[1]} wide: give --embed-dim {raw.shape[1]}")
    matrix = np.ascontiguousarray(raw, dtype=np.float32)
    if not np.isfinite(matrix).all():
        raise UsageError(f"{path}: the embeddings contain NaN or Inf")
    return Embeddings(matrix, content_hash(matrix), spec)


def content_hash(matrix: np.ndarray) -> str:
    """sha256 (16 hex digits) of a matrix's float32 bytes: what provenance records of an embedding."""
    return hashlib.sha256(np.ascontiguousarray(matrix, dtype=np.float32).tobytes()).hexdigest()[:16]
