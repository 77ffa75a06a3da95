"""The Python API: a trained run (or an exported folder) loaded for use, with no side effects.

    import newllm_cli as nl
    run = nl.load_run("cache/runs/default")
    run.contexts("some text")        # N x C fixed-point contexts, numpy
    run.perplexity("some text")      # of the run's Phase 2 predictor on the text
    run.generate("The", max_new_tokens=20, seed=0)

Loading reads the run's files and nothing else: no log, no lock, no write (it works on a read-only
copy), and every call runs in a quiet session that publishes nothing. The same checks as the
commands apply: weights against their ids, the tokenizer against its hash.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from newllm_cli import stages
from newllm_cli.data import dataset
from newllm_cli.data import tokenizer as tokenizers
from newllm_cli.model import generate as gen
from newllm_cli.model.head import Head
from newllm_cli.model.network import ContextNetwork
from newllm_cli.runtime.errors import RefusedError, UsageError
from newllm_cli.runtime.session import Session, use
from newllm_cli.settings import Settings
from newllm_cli.store.artifacts import Workspace, read_json
from newllm_cli.training import pairs, predictors
from newllm_cli.training.phase1 import prompt_context, run_cvfp

CONFIG = "config.json"  # what marks an exported folder (use/export.py)


@contextmanager
def _silent() -> Iterator[None]:
    """A session that prints nothing and publishes nothing (the API's calls are pure)."""
    with use(Session(quiet=True, publishing=False)):
        yield


class Folder:
    """An exported folder seen through the paths the loaders ask a Workspace for."""

    def __init__(self, root: Path):
        self.root = root

    def phase1_checkpoint(self) -> Path:
        return self.root / "phase1.safetensors"

    def phase2_checkpoint(self) -> Path:
        return self.root / "phase2.safetensors"

    def tokenizer(self) -> Path:
        return self.root / "tokenizer.json"


@dataclass
class Run:
    """A trained run: its settings, frozen Phase 1 network, Phase 2 predictor and tokenizer."""

    settings: Settings
    network: ContextNetwork
    predictor: torch.nn.Module
    provenance: dict[str, Any]  # the predictor's: model_id, head_id, head_input, predictor, vocab_size
    tokenizer: Any  # a tokenizers.Tokenizer
    device: torch.device

    def ids(self, text: str) -> np.ndarray:
        """The text's token ids under the run's tokenizer.

        Args: text: any string. Returns: int64 ids, one document."""
        ids = np.asarray(self.tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int64)
        if len(ids) == 0:
            raise UsageError("the text has no tokens")
        return ids

    def contexts(self, text: str) -> np.ndarray:
        """The fixed-point contexts of `text` as one document, solved as `phase1 --split val` does.

        Args: text: any string. Returns: float32 array, one row c_t per token (N x C)."""
        ids = self.ids(text)
        return self._contexts(ids)

    def _contexts(self, ids: np.ndarray) -> np.ndarray:
        with _silent(), tempfile.TemporaryDirectory(prefix="newllm-api-") as scratch:
            res = run_cvfp(
                self.network, ids, np.array([0, len(ids)]), self.settings.phase1, train=False, device=self.device,
                seed=self.settings.runtime.seed, memory_budget=int(self.settings.runtime.memory_budget * 2**30),
                scratch=Path(scratch),
            )  # fmt: skip
            return np.array(res.contexts.read(0, len(ids)))

    def perplexity(self, text: str) -> float:
        """Perplexity of the run's Phase 2 predictor on `text` (one document: N - 1 predictions).

        Args: text: a string of at least 2 tokens. Returns: exp(mean negative log-likelihood)."""
        ids = self.ids(text)
        if len(ids) < 2:
            raise UsageError("perplexity needs a text of at least 2 tokens")
        ctx = self._contexts(ids)
        chosen = predictors.PREDICTORS[self.provenance.get("predictor", predictors.DEFAULT)]
        lags = chosen.previous(self.settings.phase2)

        def embed(x: np.ndarray) -> torch.Tensor:
            with torch.no_grad():
                return self.network.embed_tokens(torch.as_tensor(x, device=self.device))

        features = embed if self.provenance.get("head_input") == "context+token" and not chosen.reads_token else None
        offsets = np.array([0, len(ids)])
        with _silent(), pairs.make_split(ctx, ids, offsets, self.device, features, previous=lags) as split:
            assert isinstance(split.inputs, torch.Tensor)
            with torch.no_grad():
                args = (split.inputs, split.sources) if chosen.reads_token else (split.inputs,)
                logits = self.predictor(*args).double()
                nll = torch.nn.functional.cross_entropy(logits, split.targets.to(logits.device))
        return float(torch.exp(nll))

    def generate(
        self, prompt: str, max_new_tokens: int = 50, seed: int = 0, temperature: float = 1.0, top_k: int = 0
    ) -> str:
        """The prompt continued by sampling from the linear head, as `newllm generate` does.

        Args: prompt: text to continue; max_new_tokens: tokens to sample; seed: of the sampling;
        temperature: 0 is greedy; top_k: sample among the k likeliest (0: all).
        Returns: the prompt and its continuation, decoded."""
        if self.provenance.get("predictor", predictors.DEFAULT) != predictors.DEFAULT:
            raise UsageError("generate samples from the linear head; this run's Phase 2 is a tokenblock predictor")
        ids = self.ids(prompt)
        assert isinstance(self.predictor, Head)  # the linear predictor's module
        with _silent():
            start = prompt_context(self.network, ids, self.settings.phase1, self.device)
            new = gen.sample(
                self.network, self.predictor, self.provenance["head_input"], start, int(ids[-1]),
                max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed, device=self.device,
                context_ids=ids.tolist(),
            )  # fmt: skip
        return self.tokenizer.decode(ids.tolist() + new)


def load_run(path: str | Path, device: str = "cpu") -> Run:
    """A run directory (WORKSPACE/runs/NAME) or a folder `newllm export` wrote, loaded read-only.

    Args: path: the run's or the folder's directory; device: cpu, cuda or auto.
    Returns: a Run with its network, predictor, tokenizer and settings."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise UsageError(f"no run or exported folder at {root}")
    dev = stages.resolve_device(device)
    with _silent():
        if (root / CONFIG).is_file():
            config = json.loads((root / CONFIG).read_text())
            settings = Settings.model_validate(config["settings"])
            where: Any = Folder(root)
            meta = {"key": config["dataset"], "vocab_size": config["vocab_size"]}
            tokenizer_sha = config.get("tokenizer_sha256")
        else:
            if not (root / "settings.json").is_file():
                raise RefusedError(f"{root} holds no settings.json: not a run (nor a folder `newllm export` wrote)")
            settings = Settings.model_validate(read_json(root / "settings.json", "run settings"))
            key = stages.read_weights(root / "phase1.safetensors", "Phase 1 checkpoint", "newllm phase1")
            where = Workspace(root.parent.parent, root.name, key["provenance"]["dataset"])
            meta = dataset.read_meta(where)
            tokenizer_sha = meta.get("tokenizer_sha256")
        network, ckpt = stages.load_phase1_model(where, settings, meta, dev)
        network.eval()
        predictor, provenance = stages.load_predictor(where, settings, meta, network, ckpt["model_id"], dev)
        tok = tokenizers.load_checked(where.tokenizer(), meta["vocab_size"], dataset.FIX, tokenizer_sha)
    return Run(settings, network, predictor, provenance, tok, dev)
