"""Fused input projection of the Gemma 4 MTP drafter.

    out = concat([embed_weight[token_ids] * scale, hidden], -1) @ weight.T

The Triton kernel gathers the embedding rows by id and runs the two halves of the
K loop (embedding columns 0..Ht-1 of ``weight``, hidden columns Ht..2Ht-1) into one
fp32 accumulator, so the [T, 2*Ht] concatenation (and the scaled embedding) never
reaches global memory. At decode sizes (T <= 64) the cost is reading ``weight``
once; the grid therefore also splits K so that enough programs stream it in
parallel, and a tiny second kernel sums the fp32 partials.
"""

from __future__ import annotations

import functools

import torch

from . import jit_lazily, sm_count, use_triton

tl = None  # triton.language, bound by _load()
triton = None

__all__ = ["drafter_input_proj", "drafter_input_proj_ref"]


def _scale_in_dtype(scale: float, dtype: torch.dtype) -> torch.Tensor:
    # Gemma's scaled embedding multiplies by the scale *already rounded* to the
    # embedding dtype (sqrt(2560) in bf16 is 50.5, not 50.596...).
    return torch.tensor(scale, dtype=dtype)


def drafter_input_proj_ref(
    token_ids: torch.Tensor,  # [T] int
    embed_weight: torch.Tensor,  # [V, Ht]
    scale: float,
    hidden: torch.Tensor,  # [T, Ht]
    weight: torch.Tensor,  # [Hd, 2*Ht]
) -> torch.Tensor:  # [T, Hd] in hidden.dtype
    x = embed_weight[token_ids.long()] * _scale_in_dtype(scale, embed_weight.dtype).to(embed_weight.device)
    xh = torch.cat([x.to(hidden.dtype), hidden], dim=-1)  # [T, 2*Ht]
    return xh @ weight.to(hidden.dtype).t()


# --------------------------------------------------------------------------- Triton


def _cast_rne(x, ty: tl.constexpr):
    # Explicit round-to-nearest-even for fp32 -> bf16: the GPU does this natively, but
    # the CPU interpreter truncates, and the tests compare bit-for-bit with torch.
    if ty == tl.bfloat16:
        if x.dtype == tl.float32:
            b = x.to(tl.uint32, bitcast=True)
            b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
            x = b.to(tl.float32, bitcast=True)
    return x.to(ty)


def _dot_acc(a, b, acc, DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr):
    if DOT_IN_FP32:
        # Operands hold bf16/fp16 values exactly, so an fp32 product is the same maths.
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


def _input_proj_kernel(
    ids_ptr,  # [T] int
    emb_ptr,  # [V, Ht]
    hid_ptr,  # [T, Ht]
    w_ptr,  # [Hd, 2*Ht]
    out_ptr,  # [SPLIT_K, T, Hd] fp32 partials, or [T, Hd] final when SPLIT_K == 1
    scale,  # fp32 holding a value exactly representable in the embedding dtype
    T,
    HT,
    HD,
    k_per_split,  # multiple of BLOCK_K
    stride_e,
    stride_h,
    stride_wn,
    stride_wk,
    stride_os,
    stride_ot,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,  # interpreter only: its bf16 tl.dot multiplies raw bits
):
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    dot_ty = hid_ptr.dtype.element_ty
    emb_ty = emb_ptr.dtype.element_ty

    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    mask_t = offs_t < T
    mask_n = offs_n < HD
    ids = tl.load(ids_ptr + offs_t, mask=mask_t, other=0).to(tl.int64)  # [BT]
    # int64 row offsets: V * Ht overflows int32 for a 262k vocabulary.
    emb_rows = emb_ptr + ids[:, None] * stride_e  # [BT, 1]
    hid_rows = hid_ptr + offs_t[:, None].to(tl.int64) * stride_h  # [BT, 1]
    w_cols = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn  # [1, BN]

    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    k_lo = pid_s * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, 2 * HT)

    # Embedding half of K: columns [k_lo, min(k_hi, Ht)).
    e_hi = tl.minimum(k_hi, HT)
    for k0 in range(k_lo, e_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)  # [BK]
        mask_k = offs_k < e_hi
        e = tl.load(emb_rows + offs_k[None, :], mask=mask_t[:, None] & mask_k[None, :], other=0.0)  # [BT, BK]
        # Round the scaled embedding to its own dtype first, as the torch path does.
        x = _cast_rne(_cast_rne(e.to(tl.float32) * scale, emb_ty), dot_ty)
        w = tl.load(w_cols + offs_k[:, None] * stride_wk, mask=mask_k[:, None] & mask_n[None, :], other=0.0)  # [BK, BN]
        acc = _dot_acc(x, w.to(dot_ty), acc, DOT_PRECISION, DOT_IN_FP32)

    # Hidden half of K: columns [max(k_lo, Ht), k_hi) of weight, [.. - Ht] of hidden.
    for k0 in range(tl.maximum(k_lo, HT), k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_hi
        hv = tl.load(hid_rows + (offs_k - HT)[None, :], mask=mask_t[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_cols + offs_k[:, None] * stride_wk, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = _dot_acc(_cast_rne(hv, dot_ty), w.to(dot_ty), acc, DOT_PRECISION, DOT_IN_FP32)

    out = out_ptr + pid_s * stride_os + offs_t[:, None].to(tl.int64) * stride_ot + offs_n[None, :]
    tl.store(out, _cast_rne(acc, out_ptr.dtype.element_ty), mask=mask_t[:, None] & mask_n[None, :])


def _sum_splits_kernel(
    ws_ptr,  # [SPLIT_K, M] fp32
    out_ptr,  # [M]
    M,
    SPLIT_K,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, SPLIT_K):
        acc += tl.load(ws_ptr + s * M + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, _cast_rne(acc, out_ptr.dtype.element_ty), mask=mask)


# Plain functions until _load() swaps in their triton.jit versions.
_JIT_NAMES = ("_cast_rne", "_dot_acc", "_input_proj_kernel", "_sum_splits_kernel")


@functools.lru_cache(maxsize=None)
def _load():
    return jit_lazily(globals(), _JIT_NAMES)


def _pick_config(T: int, Ht: int):
    block_t = 16 if T <= 16 else (32 if T <= 32 else 64)
    block_n = 64
    block_k = 128 if Ht >= 128 else 16
    return block_t, block_n, block_k


def drafter_input_proj_triton(
    token_ids: torch.Tensor,  # [T] int
    embed_weight: torch.Tensor,  # [V, Ht]
    scale: float,
    hidden: torch.Tensor,  # [T, Ht]
    weight: torch.Tensor,  # [Hd, 2*Ht]
    *,
    split_k: int | None = None,
    block_sizes: tuple[int, int, int] | None = None,  # (BLOCK_T, BLOCK_N, BLOCK_K), each >= 16
    num_warps: int = 4,
    num_stages: int = 3,
) -> torch.Tensor:  # [T, Hd]
    _load()
    T, Ht = hidden.shape
    Hd = weight.shape[0]
    assert weight.shape[1] == 2 * Ht and embed_weight.shape[1] == Ht and token_ids.shape == (T,)
    assert embed_weight.stride(1) == 1 and weight.stride(1) == 1
    hidden = hidden if hidden.stride(1) == 1 else hidden.contiguous()
    out = torch.empty((T, Hd), dtype=hidden.dtype, device=hidden.device)
    if T == 0 or Hd == 0:
        return out
    bt, bn, bk = block_sizes or _pick_config(T, Ht)
    grid_t, grid_n = triton.cdiv(T, bt), triton.cdiv(Hd, bn)
    k_tiles = triton.cdiv(2 * Ht, bk)
    if split_k is None:
        # Small T leaves most SMs idle while a handful of programs stream the weight;
        # split K until there are about two programs per SM.
        split_k = 1
        if hidden.is_cuda:
            want = 2 * sm_count(hidden.device.index or 0)
            split_k = max(1, min(k_tiles, want // max(1, grid_t * grid_n), 64))
    split_k = max(1, min(split_k, k_tiles))
    k_per_split = triton.cdiv(k_tiles, split_k) * bk
    split_k = triton.cdiv(2 * Ht, k_per_split)  # drop empty splits
    dot_precision = "ieee" if hidden.dtype == torch.float32 else "tf32"
    scale_q = float(_scale_in_dtype(scale, embed_weight.dtype))
    target = out if split_k == 1 else torch.empty((split_k, T, Hd), dtype=torch.float32, device=hidden.device)
    _input_proj_kernel[(grid_t, grid_n, split_k)](
        token_ids, embed_weight, hidden, weight, target, scale_q,
        T, Ht, Hd, k_per_split,
        embed_weight.stride(0), hidden.stride(0), weight.stride(0), weight.stride(1),
        target.stride(0) if split_k > 1 else 0, Hd,
        BLOCK_T=bt, BLOCK_N=bn, BLOCK_K=bk, DOT_PRECISION=dot_precision,
        DOT_IN_FP32=not hidden.is_cuda,
        num_warps=num_warps, num_stages=num_stages,
    )
    if split_k > 1:
        block = 1024
        _sum_splits_kernel[(triton.cdiv(T * Hd, block),)](target, out, T * Hd, split_k, BLOCK=block)
    return out


def drafter_input_proj(
    token_ids: torch.Tensor,  # [T] int
    embed_weight: torch.Tensor,  # [V, Ht]
    scale: float,
    hidden: torch.Tensor,  # [T, Ht]
    weight: torch.Tensor,  # [Hd, 2*Ht]
    impl: str = "auto",
    **triton_kwargs,
) -> torch.Tensor:  # [T, Hd] in hidden.dtype
    """``concat([embed_weight[ids] * scale, hidden]) @ weight.T``; fp32 accumulation."""
    if use_triton(hidden, impl):
        return drafter_input_proj_triton(token_ids, embed_weight, scale, hidden, weight, **triton_kwargs)
    return drafter_input_proj_ref(token_ids, embed_weight, scale, hidden, weight)
