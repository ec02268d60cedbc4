"""Centroid-masked drafter LM head: Triton kernels (CPU interpreter) against the torch reference.

Exact: argmax token ids, candidate ids (and their order), cluster choice under ties.
Probabilities: |triton - ref| <= 1e-5 * |ref| + 1e-7, and each row sums to 1 within 1e-5.
Two data kinds: "normal" (random; fp32 accumulation orders differ by ulps, near-ties are
improbable at these sizes and the seeds are fixed) and "integer" (small integers, so every
sum is exact in any order and ties are frequent -- the tie rules are tested for real).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton decorates anything

import sys

import pytest
import torch
import triton  # noqa: F401  -- a test dependency: missing triton must fail, not skip

sys.path.insert(0, os.path.dirname(__file__))
import kernel_utils as ku  # noqa: E402

import vllm_gemma_mtp.kernels.centroid_head as ch  # noqa: E402
from vllm_gemma_mtp.kernels.centroid_head import (  # noqa: E402
    centroid_argmax,
    centroid_argmax_ref,
    centroid_sparse_probs,
    centroid_sparse_probs_ref,
    centroid_topk_ref,
    sparse_to_dense_probs,
)

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _inputs(gen, T, C, per, Hd, dtype, kind):
    V = C * per
    if kind == "integer":
        def mk(*shape):
            return torch.randint(-2, 3, shape, generator=gen).float().to(dtype)
    else:
        def mk(*shape):
            return torch.randn(*shape, generator=gen).to(dtype)
    return mk(T, Hd), mk(C, Hd), torch.randperm(V, generator=gen), mk(V, Hd)


def test_interpreter_is_active():
    ch._load()
    from triton.runtime.interpreter import InterpretedFunction

    assert isinstance(ch._candidate_kernel, InterpretedFunction)


def test_reference_equals_masked_dense_argmax():
    # The definition: argmax over a full-vocabulary row that is -inf outside the candidates.
    gen = torch.Generator().manual_seed(0)
    for kind in ("normal", "integer"):
        h, cw, order, lm = _inputs(gen, 7, 16, 8, 24, torch.float32, kind)
        top = centroid_topk_ref(h, cw, 3)
        cand = order.view(16, 8)[top].reshape(7, -1)
        dense = torch.full((7, 128), float("-inf"))
        dense.scatter_(1, cand, (lm[cand] * h[:, None, :]).sum(-1))
        assert torch.equal(centroid_argmax_ref(h, cw, order, lm, 3), dense.argmax(-1))


# (T, C, V // C, Hd, top_k): odd sizes on purpose -- C = 12 and V // C = 6 are not powers
# of two, Hd = 40 is not a multiple of the 16/32-wide tiles, top_k = C takes every cluster.
SHAPES = [(1, 8, 4, 16, 1), (5, 12, 6, 40, 3), (9, 16, 8, 24, 4), (3, 4, 5, 16, 4)]


@pytest.mark.parametrize("kind", ["normal", "integer"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T%d-C%d-per%d-H%d-k%d" % s)
def test_grid_against_reference(shape, dtype, kind):
    T, C, per, Hd, k = shape
    gen = torch.Generator().manual_seed(sum(shape))
    h, cw, order, lm = _inputs(gen, T, C, per, Hd, dtype, kind)
    kw = dict(num_splits=2, block_sizes=(16, 16, 16))
    tok = centroid_argmax(h, cw, order, lm, k, impl="triton", **kw)
    assert tok.dtype == torch.int64
    assert torch.equal(tok, centroid_argmax_ref(h, cw, order, lm, k))

    temp = torch.linspace(0.5, 1.5, T)
    ids, probs = centroid_sparse_probs(h, cw, order, lm, k, temp, impl="triton", **kw)
    ids_r, probs_r = centroid_sparse_probs_ref(h, cw, order, lm, k, temp)
    assert torch.equal(ids, ids_r)
    torch.testing.assert_close(probs, probs_r, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(probs.sum(-1), torch.ones(T), rtol=0, atol=1e-5)


def test_cluster_ties_prefer_smaller_index():
    # Clusters 1, 3 and 6 have identical centroids (the largest logit); top_k = 2 must
    # take 1 and 3, in that order, in both implementations.
    gen = torch.Generator().manual_seed(1)
    T, C, per, Hd = 2, 8, 4, 16
    h = torch.ones(T, Hd)
    cw = torch.randn(C, Hd, generator=gen) * 0.01
    cw[[1, 3, 6]] = 1.0
    order = torch.arange(C * per)
    lm = torch.randn(C * per, Hd, generator=gen)
    assert centroid_topk_ref(h, cw, 2).tolist() == [[1, 3]] * T
    ids, _ = centroid_sparse_probs(h, cw, order, lm, 2, 1.0, impl="triton", num_splits=1)
    assert ids[0].tolist() == list(range(4, 8)) + list(range(12, 16))
    assert torch.equal(ids, centroid_sparse_probs_ref(h, cw, order, lm, 2, 1.0)[0])


def test_candidate_ties_prefer_smaller_vocab_id():
    # Equal best logits for vocab ids 29 (cluster 0) and 2 (cluster 1): the answer is 2
    # although 29 comes first in candidate order.
    T, C, per, Hd = 1, 4, 8, 16
    h = torch.ones(T, Hd)
    cw = torch.zeros(C, Hd)
    cw[0], cw[1] = 2.0, 1.0  # cluster order 0, 1
    order = torch.cat([torch.tensor([29, 30, 31, 28, 27, 26, 25, 24]), torch.tensor([2, 3, 4, 5, 6, 7, 0, 1]), torch.arange(8, 24)])
    lm = torch.zeros(C * per, Hd)
    lm[29] = lm[2] = 1.0
    assert centroid_argmax_ref(h, cw, order, lm, 2).tolist() == [2]
    assert centroid_argmax(h, cw, order, lm, 2, impl="triton", num_splits=2).tolist() == [2]
    assert centroid_argmax(h, cw, order, lm, 2, impl="triton", num_splits=1).tolist() == [2]


def test_zero_temperature_is_one_hot_and_dense_scatter():
    gen = torch.Generator().manual_seed(2)
    T, C, per, Hd, k = 4, 8, 4, 16, 2
    h, cw, order, lm = _inputs(gen, T, C, per, Hd, torch.float32, "normal")
    temp = torch.tensor([0.0, 1.0, 1e-6, 0.7])
    ids, probs = centroid_sparse_probs(h, cw, order, lm, k, temp, impl="triton")
    ids_r, probs_r = centroid_sparse_probs_ref(h, cw, order, lm, k, temp)
    assert torch.equal(ids, ids_r)
    torch.testing.assert_close(probs, probs_r, rtol=1e-5, atol=1e-7)
    best = centroid_argmax_ref(h, cw, order, lm, k)
    for t in (0, 2):
        assert probs[t].max() == 1.0 and probs[t].sum() == 1.0
        assert ids[t][probs[t].argmax()] == best[t]
    dense = sparse_to_dense_probs(ids, probs, C * per)
    assert dense.shape == (T, C * per)
    torch.testing.assert_close(dense.sum(-1), torch.ones(T))
    assert torch.equal(dense.gather(1, ids), probs)
    outside = torch.ones_like(dense, dtype=torch.bool).scatter_(1, ids, False)
    assert (dense[outside] == 0).all()
    # A scalar temperature means the same for every row.
    a = centroid_sparse_probs(h, cw, order, lm, k, 0.7, impl="triton")[1]
    b = centroid_sparse_probs(h, cw, order, lm, k, torch.full((T,), 0.7), impl="triton")[1]
    assert torch.equal(a, b)


def test_kernels_compile_for_sm90():
    mod = "vllm_gemma_mtp.kernels.centroid_head"
    cand_sig = {
        "h_ptr": "*bf16", "lm_ptr": "*bf16", "ord_ptr": "*i64", "top_ptr": "*i32", "temp_ptr": "*fp32",
        "ids_ptr": "*i64", "z_ptr": "*fp32", "pbest_ptr": "*fp32", "pid_ptr": "*i32", "pm_ptr": "*fp32", "ps_ptr": "*fp32",
        **{n: "i32" for n in "HD TOPK PER NSPLIT clusters_per_split stride_h stride_lm".split()}, "eps": "fp32",
    }
    jobs = [
        dict(module=mod, kernel="_centroid_logits_kernel",
             signature={"h_ptr": "*bf16", "cw_ptr": "*bf16", "c_ptr": "*fp32", **{n: "i32" for n in "T C HD stride_h stride_c".split()}},
             constexprs={"BLOCK_T": 16, "BLOCK_C": 64, "BLOCK_H": 64, "DOT_IN_FP32": False}),
        dict(module=mod, kernel="_topk_kernel", signature={"c_ptr": "*fp32", "top_ptr": "*i32", "C": "i32", "TOPK": "i32"},
             constexprs={"C_PAD": 2048}, num_warps=8),
        dict(module=mod, kernel="_candidate_kernel", signature=cand_sig,
             constexprs={"PER_PAD": 128, "BLOCK_H": 64, "WRITE_CANDIDATES": True}),
        dict(module=mod, kernel="_combine_kernel",
             signature={"pbest_ptr": "*fp32", "pid_ptr": "*i32", "pm_ptr": "*fp32", "ps_ptr": "*fp32", "temp_ptr": "*fp32",
                        "ids_ptr": "*i64", "z_ptr": "*fp32", "argmax_ptr": "*i64", "NSPLIT": "i32", "S": "i32", "eps": "fp32"},
             constexprs={"NS_PAD": 32, "BLOCK_S": 4096, "WRITE_PROBS": True}, num_warps=8),
    ]
    usage = ku.compile_for_gpu(jobs)
    assert all(u["local"] == 0 for u in usage), usage
