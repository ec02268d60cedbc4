"""Fused drafter input projection: Triton kernel (CPU interpreter) against the torch reference.

Tolerance: |triton - ref| <= rtol * |ref| + atol * max|ref| elementwise, with
(rtol, atol) = (1e-5, 1e-6) for fp32, (2e-3, 1e-3) for fp16, (1.6e-2, 8e-3) for bf16,
i.e. about one unit in the last place of the output dtype: both sides accumulate in fp32
and round once, and only the summation order differs.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton decorates anything

import sys

import pytest
import torch
import triton  # noqa: F401  -- a test dependency: missing triton must fail, not skip

sys.path.insert(0, os.path.dirname(__file__))
import kernel_utils as ku  # noqa: E402

import vllm_gemma_mtp.kernels.input_proj as ip  # noqa: E402
from vllm_gemma_mtp.kernels.input_proj import drafter_input_proj, drafter_input_proj_ref  # noqa: E402

TOL = {torch.float32: (1e-5, 1e-6), torch.float16: (2e-3, 1e-3), torch.bfloat16: (1.6e-2, 8e-3)}


def _inputs(gen, T, Ht, Hd, dtype, V=97, id_dtype=torch.long):
    ids = torch.randint(0, V, (T,), generator=gen).to(id_dtype)
    emb = torch.randn(V, Ht, generator=gen).to(dtype)
    hidden = torch.randn(T, Ht, generator=gen).to(dtype)
    weight = (torch.randn(Hd, 2 * Ht, generator=gen) / (2 * Ht) ** 0.5).to(dtype)
    return ids, emb, float(Ht) ** 0.5, hidden, weight


def _assert_close(out, ref):
    assert out.dtype == ref.dtype and out.shape == ref.shape
    rtol, atol = TOL[ref.dtype]
    o, r = out.double(), ref.double()
    bound = rtol * r.abs() + atol * r.abs().max()
    err = (o - r).abs()
    assert (err <= bound).all(), f"max err {err.max():.3g}, worst ratio {(err / bound).max():.3g}"


def test_interpreter_is_active():
    ip._load()
    from triton.runtime.interpreter import InterpretedFunction

    assert isinstance(ip._input_proj_kernel, InterpretedFunction)


def test_reference_matches_definition():
    gen = torch.Generator().manual_seed(0)
    ids, emb, scale, hidden, weight = _inputs(gen, 4, 16, 8, torch.bfloat16)
    # The scale is applied in the embedding dtype, like Gemma's scaled embedding.
    x = emb[ids] * torch.tensor(scale, dtype=torch.bfloat16)
    expect = torch.cat([x, hidden], -1) @ weight.t()
    assert torch.equal(drafter_input_proj_ref(ids, emb, scale, hidden, weight), expect)
    assert torch.equal(drafter_input_proj(ids, emb, scale, hidden, weight, impl="auto"), expect)


# Grid: tokens x (Ht, Hd) x dtype x K split. Ht = 40 / 150 are not multiples of the
# 16 / 64-wide K tiles; Hd = 24 / 70 are not multiples of the 16-wide N tiles.
@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("dims", [(16, 16), (40, 24), (150, 70)], ids=lambda d: f"Ht{d[0]}-Hd{d[1]}")
@pytest.mark.parametrize("T", [1, 5, 33])
def test_grid_against_reference(T, dims, dtype, split_k):
    Ht, Hd = dims
    gen = torch.Generator().manual_seed(T * 1000 + Ht)
    args = _inputs(gen, T, Ht, Hd, dtype)
    bk = 64 if Ht > 64 else 16
    out = drafter_input_proj(*args, impl="triton", split_k=split_k, block_sizes=(16, 16, bk))
    _assert_close(out, drafter_input_proj_ref(*args))


def test_default_config_and_strided_hidden():
    gen = torch.Generator().manual_seed(1)
    ids, emb, scale, hidden, weight = _inputs(gen, 20, 130, 40, torch.bfloat16, id_dtype=torch.int32)
    # A row-strided view (e.g. a slice of a wider hidden-state buffer) must not be copied wrongly.
    wide = torch.randn(20, 200, generator=gen).to(torch.bfloat16)
    wide[:, :130] = hidden
    view = wide[:, :130]
    out = drafter_input_proj(ids, emb, scale, view, weight, impl="triton")
    _assert_close(out, drafter_input_proj_ref(ids, emb, scale, hidden, weight))


def test_scale_rounded_in_embedding_dtype():
    # sqrt(2560) = 50.596 is 50.5 in bf16: a kernel scaling by the fp32 value is 0.2% off,
    # which the fp32 tolerance (hidden and weight in fp32, embedding in bf16) resolves.
    gen = torch.Generator().manual_seed(2)
    ids, emb, _, hidden, weight = _inputs(gen, 3, 16, 16, torch.float32)
    emb = emb.to(torch.bfloat16)
    scale = 2560**0.5
    out = drafter_input_proj(ids, emb, scale, hidden, weight, impl="triton", split_k=1, block_sizes=(16, 16, 16))
    _assert_close(out, drafter_input_proj_ref(ids, emb, scale, hidden, weight))
    wrong = torch.cat([emb[ids].float() * scale, hidden], -1) @ weight.t()
    assert not torch.allclose(out, wrong, rtol=1e-4, atol=1e-4)


def test_zero_tokens():
    gen = torch.Generator().manual_seed(3)
    ids, emb, scale, hidden, weight = _inputs(gen, 0, 16, 8, torch.float32)
    out = drafter_input_proj(ids, emb, scale, hidden, weight, impl="triton")
    assert out.shape == (0, 8)


def test_kernels_compile_for_sm90():
    mod = "vllm_gemma_mtp.kernels.input_proj"
    ints = "T HT HD k_per_split stride_e stride_h stride_wn stride_wk stride_os stride_ot".split()
    sig = {"ids_ptr": "*i64", "emb_ptr": "*bf16", "hid_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*fp32", "scale": "fp32", **{n: "i32" for n in ints}}
    jobs = [
        dict(module=mod, kernel="_input_proj_kernel", signature=sig, num_warps=4,
             constexprs={"BLOCK_T": bt, "BLOCK_N": 64, "BLOCK_K": 128, "DOT_PRECISION": "tf32", "DOT_IN_FP32": False})
        for bt in (16, 64)
    ] + [
        dict(module=mod, kernel="_sum_splits_kernel", signature={"ws_ptr": "*fp32", "out_ptr": "*bf16", "M": "i32", "SPLIT_K": "i32"}, constexprs={"BLOCK": 1024}),
    ]
    usage = ku.compile_for_gpu(jobs)
    assert all(u["local"] == 0 for u in usage), usage
