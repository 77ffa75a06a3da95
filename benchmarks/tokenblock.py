"""Phase 2 throughput of the TokenBlock predictor at GPT-2's vocabulary (V = 50,257, a generated
embedding matrix), in training tokens per second and as a share of this machine's float32 matmul.

    python benchmarks/tokenblock.py [--vocab 50257] [--embed 768] [--context 64] [--rows 4096] [--repeats 3]

One epoch of token_fit over --rows synthetic pairs (random contexts and tokens), tied frozen output,
batches of 512, logits in slices of token_fit.LOGIT_BUDGET scores. FLOPs per training token: the
layer (C + E) E and the tied output E V multiply-adds, forward and backward (3x), times 2; the
held-out pass adds a forward over a tenth. Each share is against the mean of the matmul rates
measured just before and after it. Speeds are never asserted: read the figures.
"""

from __future__ import annotations

import argparse
import statistics

from phase1 import matmul_gflops


def epoch(vocab: int, embed: int, context: int, rows: int) -> tuple[float, float]:
    import numpy as np
    import torch

    from newllm_cli.settings import ModelSettings, Phase2Settings
    from newllm_cli.training import pairs, predictors

    rng = np.random.default_rng(0)
    length = 256
    tokens = rng.integers(vocab, size=rows + rows // length + 1)
    offsets = np.arange(0, len(tokens) + 1, length + 1)
    offsets[-1] = len(tokens)
    ctx = rng.normal(size=(len(tokens), context)).astype(np.float32)
    cpu = torch.device("cpu")
    train = pairs.make_split(ctx, tokens, offsets, cpu)
    val = pairs.make_split(ctx[:length], tokens[:length], np.array([0, length]), cpu)
    cfg = Phase2Settings(predictor="tokenblock", epochs=1)
    job = predictors.Job(cfg, ModelSettings(), torch.randn(vocab, embed) * 0.02, 0, cpu)
    res = predictors.PREDICTORS["tokenblock"].fit(train, val, vocab, np.zeros(vocab), job)
    seconds = res.history[0]["seconds"]  # the epoch and its held-out pass, not the final scoring
    n = len(train.targets)
    flops = 2 * ((context + embed) * embed + embed * vocab) * (3 * 0.9 * n + 0.1 * n)
    return n * 0.9 / seconds, flops / seconds / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--embed", type=int, default=768)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    rates, shares = [], []
    for _ in range(a.repeats):
        before = matmul_gflops()
        tps, gflops = epoch(a.vocab, a.embed, a.context, a.rows)
        after = matmul_gflops()
        rates.append(tps)
        shares.append(gflops / ((before + after) / 2))
        print(f"  {tps:,.0f} training tokens/s, {gflops:.1f} GFLOP/s, {shares[-1]:.0%} of matmul")
    print(
        f"tokenblock V={a.vocab} E={a.embed} C={a.context}: {statistics.median(rates):,.0f} tokens/s "
        f"({min(rates):,.0f}-{max(rates):,.0f}); {statistics.median(shares):.0%} of matmul "
        f"({min(shares):.0%}-{max(shares):.0%}), {a.repeats} repeats"
    )


if __name__ == "__main__":
    main()
