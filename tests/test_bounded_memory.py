"""Phase 1 in bounded memory: chunked statistics, closed-form gradient, windowed sweeps, file stores."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from newllm_cli.model.network import NewLLM
from newllm_cli.model.recurrence import embedding_table, recur, recur_numba, recur_torch
from newllm_cli.settings import Phase1Settings
from newllm_cli.store.rowstore import RowStore
from newllm_cli.training.objectives import Comparison, loss_gradient, reference_losses
from newllm_cli.training.phase1 import plan_memory, run_cvfp

CPU = torch.device("cpu")


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunked_statistics_equal_whole_array_ones(chunk):
    rng = np.random.default_rng(0)
    q = (rng.normal(0.3, 1.7, (500, 6))).astype(np.float32)
    p = (q + rng.normal(0, 0.15, q.shape)).astype(np.float32)
    cfg = Phase1Settings(dist_reg_weight=0.3, convergence_threshold=0.02)
    stats = Comparison()
    for s in range(0, len(q), chunk):
        stats.add(q[s : s + chunk], p[s : s + chunk], cfg.convergence_threshold)
    q64, p64 = torch.from_numpy(q).double(), torch.from_numpy(p).double()
    whole = {k: float(v) for k, v in reference_losses(q64, p64, cfg).items()}
    got = stats.losses(cfg)
    for key in whole:  # element-wise work is float32, sums float64: float32 precision, at any chunk size
        assert got[key] == pytest.approx(whole[key], rel=1e-6), key
    assert np.allclose(stats.mean, q64.mean(0).numpy(), rtol=0, atol=1e-9)
    assert np.allclose(stats.var, q64.var(0, unbiased=False).numpy(), rtol=1e-6)
    per_token = ((q64 - p64) ** 2).mean(1)
    assert stats.converged == int((per_token < cfg.convergence_threshold).sum())


@pytest.mark.parametrize("use_reg", [True, False])
def test_closed_form_gradient_equals_autograd(use_reg):
    rng = np.random.default_rng(1)
    q = torch.from_numpy(rng.normal(0.2, 1.3, (300, 5)))
    p = q + torch.from_numpy(rng.normal(0, 0.1, (300, 5)))
    cfg = Phase1Settings(dist_reg_weight=0.4, use_distribution_reg=use_reg)
    leaf = q.clone().requires_grad_(True)
    reference_losses(leaf, p, cfg)["loss"].backward()
    stats = Comparison()
    for s in range(0, 300, 37):
        stats.add(q[s : s + 37].numpy(), p[s : s + 37].numpy(), 0.02)
    assert torch.allclose(loss_gradient(q, p, stats, cfg), leaf.grad, rtol=1e-6, atol=1e-12)


def test_row_store_in_a_file_reads_what_was_written_and_saves_by_rename(tmp_path):
    rng = np.random.default_rng(2)
    data = rng.normal(size=(1000, 3)).astype(np.float32)
    store = RowStore(1000, 3, tmp_path)
    for s in range(0, 1000, 333):
        store.write(s, data[s : s + 333])
    assert np.array_equal(store.read(0, 1000), data)
    assert np.array_equal(store.read(500, 502), data[500:502])
    assert np.array_equal(store.gather(np.array([999, 0, 17])), data[[999, 0, 17]])
    out = store.save(tmp_path / "ctx.npy")
    assert np.array_equal(np.load(out), data)
    assert [f.name for f in tmp_path.iterdir()] == ["ctx.npy"]  # no temporary left behind
    again = RowStore.open(out)
    assert np.array_equal(again.read(10, 20), data[10:20])
    again.close()
    assert out.exists()  # closing a store opened on a saved file never deletes it


def _corpus(lengths, vocab, seed=0):
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return np.random.default_rng(seed).integers(0, vocab, offsets[-1]), offsets


@pytest.mark.parametrize("kernel", ["numba", "torch"])
@pytest.mark.parametrize("window", [3, 40, 10_000])
def test_windowed_sweep_equals_one_call(kernel, window, tmp_path):
    """Windows smaller than a document, than the number of documents, and larger than the corpus."""
    torch.manual_seed(0)
    model = NewLLM(30, 6, 4, 2)
    tokens, offsets = _corpus([50, 1, 17, 120, 9, 33], 30)
    c0 = np.random.default_rng(1).normal(size=(6, 6)).astype(np.float32)
    table = embedding_table(model, CPU)
    fn = {"numba": recur_numba, "torch": recur_torch}[kernel]
    whole = fn(model, table, torch.as_tensor(tokens), offsets, torch.from_numpy(c0)).numpy()
    out = RowStore(len(tokens), 6, tmp_path)
    last = recur(model, kernel, table, tokens, offsets, c0, out, window)
    got = out.read(0, len(tokens))
    if kernel == "numba":  # float64 state carried between windows: the same bits
        assert np.array_equal(got, whole) and np.array_equal(last, whole[offsets[1:] - 1])
        return
    # torch: a window changes the lockstep batch, and float32 BLAS may round a row differently for
    # another batch shape. Both runs are float32 evaluations of one recurrence, so each is within
    # float32's own error of the float64 result: the windowed run may round differently, not worse.
    exact = fn(
        copy.deepcopy(model).double(), table.double(), torch.as_tensor(tokens), offsets, torch.from_numpy(c0).double()
    ).numpy()
    ulp = np.finfo(np.float32).eps * np.abs(exact).max()
    bound = 2 * np.abs(whole - exact).max() + 4 * ulp
    assert 0 < np.abs(whole - exact).max() < 1e3 * ulp  # the reference is float64, the runs float32
    assert np.abs(got - exact).max() <= bound
    assert np.abs(last - exact[offsets[1:] - 1]).max() <= bound


def test_plan_keeps_small_corpora_in_memory_and_spills_large_ones():
    model = NewLLM(256, 16, 16, 2)
    assert plan_memory(100_000, model, 1 << 30).in_memory
    big = plan_memory(10_000_000, model, 1 << 30)
    assert not big.in_memory and big.chunk >= 256 and big.window >= 1024
    assert plan_memory(10_000_000, model, 1 << 34).in_memory


@pytest.mark.parametrize("scheme", ["sequential", "parallel"])
def test_small_budget_gives_the_same_contexts(scheme, tmp_path):
    """Budget of one byte: contexts in files, sweeps in windows of 1024 rows across 9 documents; the
    same training as with everything in memory, bit for bit: a budget moves stores between memory
    and files and cuts sweeps into windows (numba carries its float64 state across them), but never
    regroups a float32 sum (the statistics and gradient chunks do not depend on it). Any difference
    would be amplified by every later Adam step and recurrence, so no tolerance could be argued."""
    tokens, offsets = _corpus([700, 300, 5, 900, 400, 250, 600, 150, 95], 40, seed=3)
    cfg = Phase1Settings(scheme=scheme, max_iterations=5, min_converged_ratio=1.0)
    runs = []
    for budget in (1 << 30, 1):
        torch.manual_seed(4)
        model = NewLLM(40, 8, 6, 2)
        res = run_cvfp(model, tokens, offsets, cfg, train=True, device=CPU, memory_budget=budget, scratch=tmp_path)
        runs.append((res.contexts.read(0, len(tokens)).copy(), res.history, res.contexts.path))
    (a, hist_a, path_a), (b, hist_b, path_b) = runs
    assert path_a is None and path_b is not None and path_b.parent == tmp_path
    assert np.array_equal(a, b)
    assert [{k: v for k, v in h.items() if k != "seconds"} for h in hist_a] == [
        {k: v for k, v in h.items() if k != "seconds"} for h in hist_b
    ]
    assert len(list(tmp_path.iterdir())) == 1  # only the live result's file; spares were deleted


def test_kernel_rule_follows_rows_per_lockstep_step():
    from newllm_cli.model.recurrence import choose_kernel

    equal = lambda docs, length: np.arange(docs + 1) * length  # noqa: E731
    assert choose_kernel("auto", CPU, 16, equal(8192, 20)) == "numba"  # small C: never lockstep
    assert choose_kernel("auto", CPU, 768, equal(1, 500)) == "torch"  # one wide stream: BLAS
    assert choose_kernel("auto", CPU, 256, equal(64, 100)) == "torch"
    skewed = np.concatenate([equal(63, 100), [6300 + 100_000]])  # one long document
    assert choose_kernel("auto", CPU, 256, skewed) == "numba"
    assert choose_kernel("numba", CPU, 768, equal(1, 500)) == "numba"  # an explicit choice stands
    assert choose_kernel("auto", torch.device("cuda"), 16, equal(1, 5)) == "torch"


def test_interrupted_run_with_contexts_in_files_resumes_exactly(tmp_path, monkeypatch):
    """Ctrl-C with file stores: the previous contexts move beside the resume checkpoint (renamed,
    not copied), and the resumed run ends where an uninterrupted one does."""
    from newllm_cli.runtime import interrupt
    from newllm_cli.runtime.errors import Interrupted
    from newllm_cli.store.resume import Resumable

    tokens, offsets = _corpus([400, 300, 500], 30, seed=5)
    cfg = Phase1Settings(max_iterations=5, min_converged_ratio=1.0)

    def run(**kw):
        torch.manual_seed(2)
        return run_cvfp(
            NewLLM(30, 6, 4, 2), tokens, offsets, cfg, train=True, device=CPU, memory_budget=1, scratch=tmp_path, **kw
        )

    whole = run().contexts.read(0, len(tokens)).copy()
    resumable = Resumable(tmp_path / "phase1_train.resume.pt", {"k": 1})
    seen = []
    monkeypatch.setattr(interrupt, "requested", lambda: len(seen) >= 2)
    with pytest.raises(Interrupted):
        run(on_iteration=seen.append, save_resume=resumable.save)
    assert (tmp_path / "phase1_train.resume.pt.prev.2.npy").exists()
    assert not list(tmp_path.glob(".contexts.*"))  # no temporary left behind
    monkeypatch.setattr(interrupt, "requested", lambda: False)
    resumed = run(resume=resumable.load())
    assert np.array_equal(resumed.contexts.read(0, len(tokens)), whole)
    resumable.clear()
    assert not list(tmp_path.glob("phase1_train.resume*"))
