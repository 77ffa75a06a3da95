"""Tokenizers, all as one `tokenizers.Tokenizer` saved as tokenizer.json beside the token arrays.

bpe: byte-level BPE trained offline on the training documents (the default).
byte: the 256 byte values, no merges (no training, any text).
gpt2: GPT-2's tokenizer from the hub (the original program's); a local tokenizer.json path also works.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from newllm_cli.runtime import nofollow
from newllm_cli.runtime.errors import RefusedError, UsageError, first_line
from newllm_cli.store.validate import Damaged


def _byte_level(model: models.Model) -> Tokenizer:
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def byte_symbols() -> list[str]:
    """The character ByteLevel uses for each byte value: printable bytes stand for themselves,
    the others are shifted past 255 (the GPT-2 convention)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    symbols, extra = {}, 0
    for b in range(256):
        if b in keep:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def byte_tokenizer() -> Tokenizer:
    """Token id = byte value, no merges."""
    return _byte_level(models.BPE(vocab={ch: b for b, ch in enumerate(byte_symbols())}, merges=[]))


def train_bpe(documents: Iterable[str], vocab_size: int) -> Tokenizer:
    tok = _byte_level(models.BPE())
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(documents, trainer=trainer)
    return tok


def pretrained(name: str) -> Tokenizer:
    """`gpt2` from the hub, or any tokenizer.json on disk."""
    path = Path(name).expanduser()
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            raise UsageError(f"tokenizer file not found: {path}")
        try:
            return Tokenizer.from_file(str(path))
        except Exception as e:
            raise UsageError(f"{path} is not a tokenizer.json ({first_line(e)})") from None
    if name != "gpt2":
        raise UsageError(f"unknown tokenizer {name!r}: use bpe, byte, gpt2 or a tokenizer.json path")
    from newllm_cli.data.hub import hub_reachable, quiet_hub_logs

    quiet_hub_logs()
    if not hub_reachable():
        raise UsageError(
            "cannot reach the hub for the gpt2 tokenizer (offline?); pass a local "
            "tokenizer.json path with --tokenizer PATH"
        )
    try:
        return Tokenizer.from_pretrained("gpt2")
    except Exception:
        raise UsageError(
            "cannot fetch the gpt2 tokenizer from the hub (offline?); pass a local "
            "tokenizer.json path with --tokenizer PATH"
        ) from None


def needs_training(name: str) -> bool:
    return name == "bpe"


def build(name: str, vocab_size: int, documents: Iterable[str] | None = None) -> Tokenizer:
    if name == "bpe":
        return train_bpe(documents or [], vocab_size)
    if name == "byte":
        return byte_tokenizer()
    return pretrained(name)


def load(path: Path, sha256: str | None = None) -> Tokenizer:
    """A tokenizer.json, read once without following a link inside the workspace; with `sha256`,
    only when its bytes have that hash (else a ValueError)."""
    blob = nofollow.read_bytes(path)
    if sha256 is not None and hashlib.sha256(blob).hexdigest()[:16] != sha256:
        raise ValueError("its content is not the one its dataset recorded (swapped or edited)")
    return Tokenizer.from_str(blob.decode("utf-8"))


def load_checked(path: Path, vocab_size: int, fix: str, sha256: str | None = None):
    """The tokenizer, loaded, with the vocabulary size (and content hash) its dataset records."""
    if not os.path.lexists(path):
        raise RefusedError(f"missing tokenizer: {path}; rebuild it with `{fix}`")
    try:
        tok = load(path, sha256)
    except nofollow.Unsafe:
        raise
    except ValueError as e:
        raise Damaged(path, str(e), fix) from None
    except Exception as e:  # the tokenizers library raises its own exception types
        raise Damaged(
            path, f"not a tokenizer ({str(e).splitlines()[0][:80] if str(e) else type(e).__name__})", fix
        ) from None
    if tok.get_vocab_size() != vocab_size:
        raise Damaged(path, f"vocabulary {tok.get_vocab_size()}, the dataset says {vocab_size}", fix)
    return tok
