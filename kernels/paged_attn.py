"""Drafter attention straight from the target's paged KV cache.

    out[b, h] = softmax(q[b, h] @ K[b, h].T) @ V[b, h]       (Gemma 4: scale 1.0, softmax in fp32)

where K[b, h] / V[b, h] are the keys / values of request b, KV head h, at the context positions
[0, kv_len[b]) (full attention) or [kv_len[b] - window, kv_len[b]) (sliding window), stored in the
target's paged cache at ``table[b, pos // block_size]``, offset ``pos % block_size``.

Why: today's path (``kv_reader.gather`` + ``drafter.attend``) first COPIES every request's context
K/V into a fresh [B, kvh, S, d] tensor, every draft round, for every layer type -- and, for an fp8
cache, dequantizes that copy into another one. At 8k context that copy (read + write + read again by
the attention) is most of the drafter's time. The Triton kernel reads K/V in place through the block
table, once per KV head (all G = (query heads per KV head) x (queries) rows of that head share the
load), dequantizes fp8 in registers, and keeps an online softmax over the window: no copy at all.
For long contexts the window is split over programs (flash-decoding), and a second tiny kernel merges
the per-split (max, sum, accumulator) partials.

Shapes:
    q         [B, kvh, G, d]                       any strides, the drafter's dtype
    k_cache   [num_blocks, block_size, kvh, d]     any strides (kv_reader.split_paged views: the
    v_cache   [num_blocks, block_size, kvh, d]     CPU_ATTN key is stored transposed), storage dtype
    table     [B, max_blocks] int                  block-table rows; entries past the context unread
    kv_len    [B] int                              context length P + 1 (>= 1)
    k_scale, v_scale                               python float or 0-d / 1-element tensor (fp8)
    out       [B, kvh, G, d]                       q.dtype
"""

from __future__ import annotations

import functools

import torch

from . import jit_lazily, next_pow2, sm_count, use_triton

tl = None  # triton.language, bound by _load()
triton = None

__all__ = ["paged_attend", "paged_attend_ref", "paged_attend_triton"]


def _check_args(q, k_cache, v_cache, table, kv_len, window) -> None:
    def bad(msg):
        raise ValueError(f"paged_attend: {msg}")

    if q.dim() != 4:
        bad(f"q must be [B, kv_heads, G, head_dim], got shape {tuple(q.shape)}")
    if k_cache.dim() != 4 or v_cache.dim() != 4:
        bad(f"k_cache/v_cache must be [num_blocks, block_size, kv_heads, head_dim], got "
            f"{tuple(k_cache.shape)} / {tuple(v_cache.shape)}")
    if k_cache.shape != v_cache.shape:
        bad(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ")
    B, kvh, _, d = q.shape
    if k_cache.shape[2] != kvh or k_cache.shape[3] != d:
        bad(f"q has {kvh} KV heads of dim {d}, the cache {k_cache.shape[2]} of dim {k_cache.shape[3]}")
    if table.dim() != 2 or table.shape[0] != B:
        bad(f"table must be [B={B}, max_blocks], got {tuple(table.shape)}")
    if kv_len.dim() != 1 or kv_len.shape[0] != B:
        bad(f"kv_len must be [B={B}], got {tuple(kv_len.shape)}")
    if table.dtype.is_floating_point or table.dtype == torch.bool or kv_len.dtype.is_floating_point:
        bad(f"table and kv_len must be integer tensors, got {table.dtype} / {kv_len.dtype}")
    if int(window) < 0:
        bad(f"window must be >= 0 (0: full attention), got {window}")
    if k_cache.dtype != v_cache.dtype:
        bad(f"k_cache is {k_cache.dtype}, v_cache {v_cache.dtype}")


def _scales_tensor(k_scale, v_scale, device) -> torch.Tensor | None:
    """[2] fp32 = (k_scale, v_scale), or None when neither is given (the stored values are the values)."""
    if k_scale is None and v_scale is None:
        return None

    def one(s):
        if s is None:
            return torch.ones((), dtype=torch.float32, device=device)
        return torch.as_tensor(s, dtype=torch.float32, device=device).reshape(())

    return torch.stack([one(k_scale), one(v_scale)])


def paged_attend_ref(
    q: torch.Tensor,  # [B, kvh, G, d]
    k_cache: torch.Tensor,  # [nb, bs, kvh, d], storage dtype, any strides
    v_cache: torch.Tensor,  # [nb, bs, kvh, d]
    table: torch.Tensor,  # [B, max_blocks] int
    kv_len: torch.Tensor,  # [B] int, P + 1
    window: int = 0,
    k_scale=None,
    v_scale=None,
) -> torch.Tensor:  # [B, kvh, G, d] in q.dtype
    """Today's production path, verbatim: kv_reader.gather (a copy of the context), kv_reader.dequantize
    (scales applied in the drafter's dtype), drafter.attend (scale 1.0, fp32 softmax)."""
    from vllm_gemma_mtp.drafter import attend
    from vllm_gemma_mtp.kv_reader import dequantize, gather

    _check_args(q, k_cache, v_cache, table, kv_len, window)
    B = q.shape[0]
    if B == 0:
        return torch.empty_like(q)
    window = int(window)
    max_len = int(kv_len.max())  # the proposer passes the batch's max_seq_len; same keys
    (K, V), mask = gather(k_cache, v_cache, table, kv_len, max_len, window)  # [B, kvh, S, d], [B, 1, 1, S]
    if window == 1:  # gather keeps >= 2 keys (a size-1 S would specialise the compiled round)
        mask = mask & (torch.arange(mask.shape[-1], device=mask.device) == mask.shape[-1] - 1)
    scales = _scales_tensor(k_scale, v_scale, q.device)
    (K, V), = dequantize({"x": (K, V)}, None if scales is None else {"x": scales}, q.dtype).values()
    return attend(q, K.to(q.dtype), V.to(q.dtype), mask)


# --------------------------------------------------------------------------- Triton


def _cast_rne(x, ty: tl.constexpr):
    # Round-to-nearest-even fp32 -> bf16: the GPU does it natively, the CPU interpreter truncates.
    if ty == tl.bfloat16:
        if x.dtype == tl.float32:
            b = x.to(tl.uint32, bitcast=True)
            b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
            x = b.to(tl.float32, bitcast=True)
    return x.to(ty)


def _paged_attn_kernel(
    q_ptr,  # [B, KVH, G, D]
    k_ptr,  # [NB, BS, KVH, D] storage dtype
    v_ptr,  # [NB, BS, KVH, D]
    tab_ptr,  # [B, max_blocks] int
    len_ptr,  # [B] int
    sc_ptr,  # [2] fp32 (k_scale, v_scale), already rounded to q's dtype; unused unless HAS_SCALES
    o_ptr,  # [B, KVH, G, D] final (NUM_SPLITS == 1), else unused
    ws_acc_ptr,  # [B, KVH, NUM_SPLITS, G, D] fp32 partial accumulators (NUM_SPLITS > 1)
    ws_ml_ptr,  # [B, KVH, NUM_SPLITS, 2, G] fp32 partial (max in log2 units, sum)
    KVH,
    G,
    D,
    BS,  # cache block size
    window,  # 0: full attention
    stride_qb, stride_qh, stride_qg, stride_qd,
    stride_kn, stride_kt, stride_kh, stride_kd,
    stride_vn, stride_vt, stride_vh, stride_vd,
    stride_tb, stride_tc,
    stride_ob, stride_oh, stride_og,
    NUM_SPLITS: tl.constexpr,
    HAS_SCALES: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,  # interpreter only: its bf16 tl.dot multiplies raw bits
):
    pid_hg = tl.program_id(0)  # kv head x G tile
    b = tl.program_id(1)
    split = tl.program_id(2)
    n_gt = tl.cdiv(G, BLOCK_G)
    h = pid_hg // n_gt
    gt = pid_hg % n_gt
    q_ty = q_ptr.dtype.element_ty

    offs_g = gt * BLOCK_G + tl.arange(0, BLOCK_G)  # [BG]
    offs_d = tl.arange(0, BLOCK_D)  # [BD]
    mask_g = offs_g < G
    mask_d = offs_d < D
    q_base = q_ptr + b.to(tl.int64) * stride_qb + h * stride_qh
    q = tl.load(q_base + offs_g[:, None] * stride_qg + offs_d[None, :] * stride_qd,
                mask=mask_g[:, None] & mask_d[None, :], other=0.0)  # [BG, BD]
    if DOT_IN_FP32:
        q = q.to(tl.float32)

    # this request's window of keys, and this split's share of its tiles
    hi = tl.load(len_ptr + b).to(tl.int32)
    lo = tl.where(window > 0, tl.maximum(hi - window, 0), 0)
    n_tiles = tl.cdiv(hi - lo, BLOCK_N)
    per_split = tl.cdiv(n_tiles, NUM_SPLITS)
    t_lo = lo + split * per_split * BLOCK_N
    t_hi = tl.minimum(hi, t_lo + per_split * BLOCK_N)

    if HAS_SCALES:
        k_sc = tl.load(sc_ptr)
        v_sc = tl.load(sc_ptr + 1)
    tab_row = tab_ptr + b.to(tl.int64) * stride_tb
    k_head = k_ptr + h.to(tl.int64) * stride_kh
    v_head = v_ptr + h.to(tl.int64) * stride_vh

    m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    for start in range(t_lo, t_hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)  # [BN]
        valid = pos < t_hi
        # block ids only for real positions: table entries past the context may be garbage
        blk = tl.load(tab_row + (pos // BS) * stride_tc, mask=valid, other=0).to(tl.int64)
        off = (pos % BS).to(tl.int64)
        kv_mask = valid[None, :] & mask_d[:, None]  # [BD, BN]
        kt = tl.load(k_head + blk[None, :] * stride_kn + off[None, :] * stride_kt + offs_d[:, None] * stride_kd,
                     mask=kv_mask, other=0.0)  # [BD, BN] keys, transposed
        if HAS_SCALES:
            kt = kt.to(tl.float32) * k_sc
        elif DOT_IN_FP32:
            kt = kt.to(tl.float32)
        if DOT_IN_FP32:
            s = tl.dot(q, kt.to(tl.float32), input_precision="ieee")
        else:
            s = tl.dot(q, kt.to(q_ty), input_precision=DOT_PRECISION)  # [BG, BN] fp32
        s = s * 1.4426950408889634  # softmax in base 2
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every tile holds a real key
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])  # [BG, BN]
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_head + blk[:, None] * stride_vn + off[:, None] * stride_vt + offs_d[None, :] * stride_vd,
                    mask=valid[:, None] & mask_d[None, :], other=0.0)  # [BN, BD]
        if HAS_SCALES:
            v = v.to(tl.float32) * v_sc
        if DOT_IN_FP32:
            pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(q_ty), v.to(q_ty), input_precision=DOT_PRECISION)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    if NUM_SPLITS == 1:
        out = acc / l_i[:, None]
        o = o_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + offs_g[:, None] * stride_og + offs_d[None, :]
        tl.store(o, _cast_rne(out, o_ptr.dtype.element_ty), mask=mask_g[:, None] & mask_d[None, :])
    else:
        row = (b.to(tl.int64) * KVH + h) * NUM_SPLITS + split  # (b, h, split)
        ws = ws_acc_ptr + (row * G + offs_g[:, None]) * D + offs_d[None, :]
        tl.store(ws, acc, mask=mask_g[:, None] & mask_d[None, :])
        tl.store(ws_ml_ptr + row * 2 * G + offs_g, m_i, mask=mask_g)
        tl.store(ws_ml_ptr + row * 2 * G + G + offs_g, l_i, mask=mask_g)


def _merge_splits_kernel(
    ws_acc_ptr,  # [B, KVH, NUM_SPLITS, G, D] fp32
    ws_ml_ptr,  # [B, KVH, NUM_SPLITS, 2, G] fp32
    o_ptr,  # [B, KVH, G, D]
    KVH,
    G,
    D,
    NUM_SPLITS,
    stride_ob, stride_oh, stride_og,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_hg = tl.program_id(0)
    b = tl.program_id(1)
    n_gt = tl.cdiv(G, BLOCK_G)
    h = pid_hg // n_gt
    gt = pid_hg % n_gt
    offs_g = gt * BLOCK_G + tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    mask_g = offs_g < G
    mask = mask_g[:, None] & (offs_d < D)[None, :]
    m = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    row0 = (b.to(tl.int64) * KVH + h) * NUM_SPLITS
    for s in range(0, NUM_SPLITS):
        row = row0 + s
        m_s = tl.load(ws_ml_ptr + row * 2 * G + offs_g, mask=mask_g, other=float("-inf"))
        l_s = tl.load(ws_ml_ptr + row * 2 * G + G + offs_g, mask=mask_g, other=0.0)
        a_s = tl.load(ws_acc_ptr + (row * G + offs_g[:, None]) * D + offs_d[None, :], mask=mask, other=0.0)
        m_new = tl.maximum(m, m_s)
        ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # splits with no keys: m = -inf, l = 0
        alpha = tl.exp2(m - ref)
        beta = tl.exp2(m_s - ref)
        l = l * alpha + l_s * beta
        acc = acc * alpha[:, None] + a_s * beta[:, None]
        m = m_new
    out = acc / tl.where(mask_g, l, 1.0)[:, None]  # padding rows: no 0 / 0
    o = o_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + offs_g[:, None] * stride_og + offs_d[None, :]
    tl.store(o, _cast_rne(out, o_ptr.dtype.element_ty), mask=mask)


# Plain functions until _load() swaps in their triton.jit versions.
_JIT_NAMES = ("_cast_rne", "_paged_attn_kernel", "_merge_splits_kernel")


@functools.lru_cache(maxsize=None)
def _load():
    return jit_lazily(globals(), _JIT_NAMES)


def _pick_config(G: int, d: int):
    """(BLOCK_G, BLOCK_N, BLOCK_D, num_warps). tl.dot needs every dim >= 16; the [BG, BD] fp32
    accumulator and the [BN, BD] K/V tiles live in registers, so BN shrinks as d grows."""
    block_d = max(16, next_pow2(d))
    block_g = max(16, min(next_pow2(G), 64))
    block_n = 64 if block_d <= 128 else (32 if block_d <= 256 else 16)
    num_warps = 4 if block_d <= 256 else 8
    return block_g, block_n, block_d, num_warps


def paged_attend_triton(
    q: torch.Tensor,  # [B, kvh, G, d]
    k_cache: torch.Tensor,  # [nb, bs, kvh, d]
    v_cache: torch.Tensor,
    table: torch.Tensor,  # [B, max_blocks] int
    kv_len: torch.Tensor,  # [B] int
    window: int = 0,
    k_scale=None,
    v_scale=None,
    *,
    max_len: int | None = None,  # host-side bound on kv_len (sizing only); default: table width * bs
    num_splits: int | None = None,  # context splits per (request, kv head); default: fill the GPU
    block_sizes: tuple[int, int, int] | None = None,  # (BLOCK_G, BLOCK_N, BLOCK_D), each >= 16
    num_warps: int | None = None,
    num_stages: int = 2,
    dot_in_fp32: bool | None = None,  # default: only under the interpreter (its bf16 tl.dot is wrong)
) -> torch.Tensor:  # [B, kvh, G, d] in q.dtype
    _load()
    _check_args(q, k_cache, v_cache, table, kv_len, window)
    B, kvh, G, d = q.shape
    bs = k_cache.shape[1]
    window = int(window)
    out = torch.empty((B, kvh, G, d), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    bg, bn, bd, nw = _pick_config(G, d)
    if block_sizes is not None:
        bg, bn, bd = block_sizes
    if bd < d:
        raise ValueError(f"paged_attend: BLOCK_D={bd} < head_dim {d}")
    num_warps = num_warps or nw
    n_gt = triton.cdiv(G, bg)
    if num_splits is None:
        num_splits = 1
        if q.is_cuda:
            # B * kvh programs leave most SMs idle at small batch (full layers: 4 KV heads): split the
            # window until there are about two programs per SM, keeping >= 4 key tiles per split.
            keys = max_len if max_len is not None else table.shape[1] * bs
            if window:
                keys = min(keys, window)
            want = 2 * sm_count(q.device.index or 0) // max(1, B * kvh * n_gt)
            num_splits = max(1, min(want, triton.cdiv(keys, 4 * bn), 64))
    num_splits = max(1, int(num_splits))
    scales = _scales_tensor(k_scale, v_scale, q.device)
    if scales is not None:
        scales = scales.to(q.dtype).float()  # dequantize() multiplies in the drafter's dtype
    dot_precision = "ieee" if q.dtype == torch.float32 else "tf32"
    if num_splits > 1:
        ws_acc = torch.empty((B, kvh, num_splits, G, d), dtype=torch.float32, device=q.device)
        ws_ml = torch.empty((B, kvh, num_splits, 2, G), dtype=torch.float32, device=q.device)
    else:
        ws_acc = ws_ml = out  # unused
    grid = (kvh * n_gt, B, num_splits)
    _paged_attn_kernel[grid](
        q, k_cache, v_cache, table, kv_len, scales if scales is not None else out, out, ws_acc, ws_ml,
        kvh, G, d, bs, window,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *table.stride(),
        out.stride(0), out.stride(1), out.stride(2),
        NUM_SPLITS=num_splits, HAS_SCALES=scales is not None,
        BLOCK_G=bg, BLOCK_N=bn, BLOCK_D=bd, DOT_PRECISION=dot_precision,
        DOT_IN_FP32=(not q.is_cuda) if dot_in_fp32 is None else bool(dot_in_fp32),
        num_warps=num_warps, num_stages=num_stages,
    )
    if num_splits > 1:
        _merge_splits_kernel[(kvh * n_gt, B)](
            ws_acc, ws_ml, out, kvh, G, d, num_splits,
            out.stride(0), out.stride(1), out.stride(2),
            BLOCK_G=bg, BLOCK_D=bd, num_warps=4 if bd <= 256 else 8,
        )
    return out


def paged_attend(
    q: torch.Tensor,  # [B, kvh, G, d]
    k_cache: torch.Tensor,  # [nb, bs, kvh, d]
    v_cache: torch.Tensor,
    table: torch.Tensor,  # [B, max_blocks] int
    kv_len: torch.Tensor,  # [B] int
    window: int = 0,
    k_scale=None,
    v_scale=None,
    impl: str = "auto",
    **triton_kwargs,
) -> torch.Tensor:  # [B, kvh, G, d] in q.dtype
    """Attention of q over the paged cache (see the module docstring); impl as in kernels/__init__."""
    if use_triton(q, impl):
        return paged_attend_triton(q, k_cache, v_cache, table, kv_len, window, k_scale, v_scale, **triton_kwargs)
    return paged_attend_ref(q, k_cache, v_cache, table, kv_len, window, k_scale, v_scale)
