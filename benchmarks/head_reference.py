"""Check that Phase 2 reached its optimum: an independent solve of the same problem with scipy.

For a finished run (`newllm phase2`), this script rebuilds the head's problem from the saved contexts
and tokens with numpy alone (pairs inside documents, whitening, add-one log-unigram prior, the l2
that phase2.json reports), solves it over the full vocabulary with scipy's L-BFGS-B in float64, and
prints both val perplexities, for the Phase 1 contexts and for the control's.

    python benchmarks/head_reference.py --workspace W [--run default]   (needs: pip install scipy)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from scipy.optimize import minimize


def pairs(contexts: np.ndarray, tokens: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    last = np.zeros(len(tokens), dtype=bool)
    last[offsets[1:] - 1] = True
    pos = np.nonzero(~last)[0]
    return np.asarray(contexts[pos], np.float64), np.asarray(tokens[pos + 1], np.int64)


def solve(x: np.ndarray, y: np.ndarray, prior: np.ndarray, l2: float) -> tuple[np.ndarray, float]:
    """argmin mean CE(x W + b, y) + l2/2 (|W|^2 + |b - prior|^2) over the full vocabulary."""
    n, d = x.shape
    vocab = len(prior)
    xa = np.hstack([x, np.ones((n, 1))])
    onehot_sum = np.zeros((d + 1, vocab))
    np.add.at(onehot_sum.T, y, xa)

    def f(theta: np.ndarray):
        p = theta.reshape(d + 1, vocab)
        loss, grad = 0.0, -onehot_sum
        for a in range(0, n, 8192):  # rows in chunks: a full n x V float64 matrix would not fit
            xs, ys = xa[a : a + 8192], y[a : a + 8192]
            s = xs @ p
            top = s.max(1, keepdims=True)
            e = np.exp(s - top)
            z = e.sum(1, keepdims=True)
            loss += float((top[:, 0] + np.log(z[:, 0]) - s[np.arange(len(ys)), ys]).sum())
            grad = grad + xs.T @ (e / z)
        dev = p.copy()
        dev[-1] -= prior
        return loss / n + 0.5 * l2 * float((dev**2).sum()), (grad / n + l2 * dev).ravel()

    start = np.zeros((d + 1, vocab))
    start[-1] = prior
    res = minimize(
        f,
        start.ravel(),
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": 3000, "maxfun": 6000, "ftol": 1e-12, "gtol": 1e-7},
    )
    return res.x.reshape(d + 1, vocab), res.nit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workspace", default="cache")
    ap.add_argument("--run", default="default")
    args = ap.parse_args()
    run = Path(args.workspace) / "runs" / args.run
    report = json.loads((run / "phase2.json").read_text())
    data = Path(args.workspace) / "datasets" / report["provenance"]["dataset"]
    vocab = report["provenance"]["vocab_size"]
    if report["provenance"]["head_input"] != "context":
        raise SystemExit("this check covers --head-input context")
    split = {s: (np.load(data / f"{s}.tokens.npy"), np.load(data / f"{s}.offsets.npy")) for s in ("train", "val")}
    counts = np.bincount(split["train"][0].astype(np.int64), minlength=vocab).astype(np.float64)
    prior = np.log((counts + 1) / (counts.sum() + vocab))
    rows = [("phase1 contexts", "contexts_{}.npy", report["l2"], report["val"]["perplexity"])]
    if "untrained_network" in report["baselines"]:
        b = report["baselines"]["untrained_network"]
        rows.append(("untrained contexts", "control_contexts_{}.npy", b["l2"], b["val_perplexity"]))
    print("| contexts | l2 | newllm val ppl | scipy L-BFGS-B val ppl | difference | scipy iterations | seconds |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |", flush=True)
    for name, pattern, l2, ours in rows:
        (x, y), (vx, vy) = (pairs(np.load(run / pattern.format(s)), *split[s]) for s in ("train", "val"))
        mean = x.mean(0)
        values, vectors = np.linalg.eigh(np.cov(x, rowvar=False))
        keep = values > values.max() * 1e-7
        t = vectors[:, keep] / np.sqrt(values[keep])
        t0 = time.perf_counter()
        p, iterations = solve((x - mean) @ t, y, prior, l2)
        s = np.hstack([(vx - mean) @ t, np.ones((len(vx), 1))]) @ p
        top = s.max(1)
        ref = float(np.exp((top + np.log(np.exp(s - top[:, None]).sum(1)) - s[np.arange(len(vy)), vy]).mean()))
        print(
            f"| {name} | {l2:g} | {ours:.2f} | {ref:.2f} | {ours / ref - 1:+.3%} | {iterations} | "
            f"{time.perf_counter() - t0:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
