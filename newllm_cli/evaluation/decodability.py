"""What the contexts encode, measured by linear probes through the same protocol as Phase 2.

For a seeded sample of positions t (neither first nor last in their document), three probes:
- the current token x_t from c_t,
- the current token x_t from the step c_t - c_{t-1} (what one update wrote into the context),
- the next token x_{t+1} from c_t (what Phase 2 relies on).
Each is fitted on train rows and scored on val rows, for the run's contexts beside the untrained
network's and a Gaussian floor (features with no information), so a figure always has its
reference. Only the sampled rows are read, so memory is bounded at any corpus size.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from newllm_cli.evaluation.analysis import sample_rows
from newllm_cli.evaluation.baselines import unigram_log_probs
from newllm_cli.training import head_fit

PROBES = {
    "token_from_context": "x_t from c_t",
    "token_from_step": "x_t from c_t - c_{t-1}",
    "next_from_context": "x_{t+1} from c_t",
}


def positions(offsets: np.ndarray, rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted sample of inner positions (with a previous and a next token in the same document) and
    their document indices."""
    offsets = np.asarray(offsets, np.int64)
    n = int(offsets[-1])
    inner = np.ones(n, dtype=bool)
    inner[offsets[:-1][offsets[:-1] < n]] = False  # document starts: no c_{t-1} of the same document
    ends = offsets[1:] - 1
    inner[ends[ends >= 0]] = False  # document ends: no x_{t+1}
    pos = np.nonzero(inner)[0]
    if len(pos) > rows:
        pos = np.sort(np.random.default_rng(seed).choice(pos, size=rows, replace=False))
    return pos, np.searchsorted(offsets, pos, side="right") - 1


def _features(contexts: np.ndarray, pos: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_t, c_t - c_{t-1}) at the sampled positions, read row by row from disk."""
    cur = sample_rows(contexts, pos).astype(np.float32)
    prev = sample_rows(contexts, pos - 1).astype(np.float32)
    return torch.from_numpy(cur), torch.from_numpy(cur - prev)


def probe_all(
    sources: dict[str, tuple[np.ndarray, ...]],
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    vocab: int,
    *,
    rows: int,
    seed: int,
    device: torch.device,
    on_fit: Callable[[str], None] | None = None,
) -> dict:
    """{probe: {source: {val_perplexity, val_accuracy, train_perplexity, train_accuracy, l2}}}.

    `sources` maps a name to its (train contexts, val contexts); `train`/`val` are (tokens, offsets).
    A source named "gaussian" is added: standard normal features of the same width.
    """
    prior = unigram_log_probs(train[0], vocab)
    sampled = {}
    for split, (tokens, offsets) in (("train", train), ("val", val)):
        pos, docs = positions(offsets, rows, seed + (split == "val"))
        tokens = np.asarray(tokens, np.int64)
        sampled[split] = (pos, torch.from_numpy(docs), torch.from_numpy(tokens[pos]), torch.from_numpy(tokens[pos + 1]))
    width = next(iter(sources.values()))[0].shape[1]
    gen = torch.Generator().manual_seed(seed)
    feats: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    for name, ctx in sources.items():
        feats[name] = {split: _features(ctx[i], sampled[split][0]) for i, split in enumerate(("train", "val"))}
    feats["gaussian"] = {
        split: (torch.randn(len(sampled[split][0]), width, generator=gen),) * 2 for split in ("train", "val")
    }
    out: dict = {key: {} for key in PROBES}
    for key in PROBES:
        for name, by_split in feats.items():
            splits = []
            for split in ("train", "val"):
                _, doc_ids, current, nxt = sampled[split]
                inputs = by_split[split][1 if key == "token_from_step" else 0]
                y = nxt if key == "next_from_context" else current
                splits.append(head_fit.Split(inputs.to(device), y.to(device), doc_ids.to(device)))
            if on_fit:
                on_fit(f"{PROBES[key]} ({name})")
            res = head_fit.fit(splits[0], splits[1], vocab, prior, device=device, label=f"probe {key} ({name})")
            out[key][name] = {
                "val_perplexity": res.val["perplexity"],
                "val_accuracy": res.val["accuracy"],
                "train_perplexity": res.train["perplexity"],
                "train_accuracy": res.train["accuracy"],
                "l2": res.l2,
            }
    return {"rows": {split: int(len(sampled[split][0])) for split in sampled}, "probes": out}
