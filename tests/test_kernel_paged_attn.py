"""Paged drafter attention: Triton kernel (CPU interpreter) against the torch reference.

The reference (paged_attend_ref) is today's production path -- kv_reader.gather (a copy of the context),
kv_reader.dequantize, drafter.attend -- and the caches are written by kv_reader.write_reference and read
through kv_reader.split_paged's views, so the kernel is checked against what the drafter does now, on
both block layouts (CPU_ATTN: key stored transposed; TRITON_ATTN).

Every cache cell no request may read (past kv_len, before the window, unused blocks) holds NaN, and
table entries past a request's context (and before its window) are garbage: out-of-range block ids or
NaN-filled blocks. A kernel that reads one of them returns NaN or crashes.

Tolerance: |triton - ref| <= rtol * |ref| + atol * max|ref| elementwise, with (rtol, atol) =
(1e-5, 1e-6) when q is fp32 (the same fp32 maths in another summation order; fp8 caches included, their
dequantised values are exact in fp32), (2e-3, 1e-3) for fp16 and (1.6e-2, 8e-3) for bf16, as in the
other kernel tests: about one step of the output dtype. The reference rounds the scores and the
probabilities to bf16 (the kernel keeps fp32 scores); the worst case over this file uses about 0.55 of
the bf16 bound, 0.4 of the fp32 one. Scores are drawn ~ N(0, 1.5^2), as a normed drafter's are O(1).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton decorates anything

import sys

import pytest
import torch
import triton  # noqa: F401  -- a test dependency: missing triton must fail, not skip

sys.path.insert(0, os.path.dirname(__file__))
import kernel_utils as ku  # noqa: E402

import vllm_gemma_mtp.kernels.paged_attn as pa  # noqa: E402
from vllm_gemma_mtp import kv_reader as R  # noqa: E402
from vllm_gemma_mtp.drafter import attend  # noqa: E402
from vllm_gemma_mtp.kernels.paged_attn import paged_attend, paged_attend_ref  # noqa: E402

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
# name -> (cache storage dtype, q dtype, (k_scale, v_scale) or None)
DTYPES = {
    "fp32": (torch.float32, torch.float32, None),
    "bf16": (torch.bfloat16, torch.bfloat16, None),
    "e4m3": (E4M3, torch.bfloat16, (0.37, 2.5)),  # fp8 cache under a bf16 drafter (production)
    "e5m2": (E5M2, torch.float32, (3.0, 0.2)),  # fp8 cache under an fp32 drafter: pins the scale maths
}
TOL = {torch.float32: (1e-5, 1e-6), torch.float16: (2e-3, 1e-3), torch.bfloat16: (1.6e-2, 8e-3)}
BAD_ID = 1 << 30  # a block id far outside the cache
LAYOUTS = ["CPU_ATTN", "TRITON_ATTN"]
# Gemma 4's two KV-cache groups, scaled down: sliding-window layers and full-attention layers, with
# different KV heads and head dims (window below and above the longest context)
LAYERS = {
    "sliding-w24": dict(kvh=2, d=32, window=24),
    "sliding-w200": dict(kvh=2, d=32, window=200),
    "full": dict(kvh=1, d=64, window=0),
}


def _nan_cache(nb, kvh, bs, d, storage):
    if storage.itemsize == 1:  # vLLM keeps fp8 caches as bytes; 0x7F is NaN in e4m3fn and in e5m2
        return torch.full((nb, kvh, bs, 2 * d), 0x7F, dtype=torch.uint8)
    return torch.full((nb, kvh, bs, 2 * d), float("nan"), dtype=storage)


def _paged_case(gen, backend, storage, kvh, d, bs, lens, window, scales=None, extra_cols=2, share=True):
    """A paged cache holding each request's readable keys at scattered blocks, NaN everywhere else.
    Returns (k view, v view, table [B, max_blocks] int32, kv_len [B])."""
    B = len(lens)
    need = [(n + bs - 1) // bs for n in lens]
    max_blocks = max(need) + extra_cols
    nb = sum(need) + 4  # 4 blocks no request uses (NaN)
    perm = torch.randperm(nb, generator=gen).int()
    table = torch.empty(B, max_blocks, dtype=torch.int32)
    used = 0
    for b in range(B):
        table[b, :need[b]] = perm[used:used + need[b]]
        used += need[b]
        # garbage past the context: out-of-range ids and blocks that hold only NaN
        table[b, need[b]:] = torch.where(torch.arange(max_blocks - need[b]) % 2 == 0, BAD_ID, perm[-1])
    if share and B >= 2 and need[0] >= 1 and need[1] >= 1:
        table[1, 0] = table[0, 0]  # a prefix block shared by two requests (prefix caching)
    cache = _nan_cache(nb, kvh, bs, d, storage)
    ks, vs = scales or (1.0, 1.0)
    for b, n in enumerate(lens):
        # (the reference's gather reads >= 2 keys even for a window of 1)
        lo = max(0, n - max(window, 2)) if window else 0
        pos = torch.arange(lo, n)
        slots = table[b, pos // bs].long() * bs + pos % bs
        k = torch.randn(len(pos), kvh, d, generator=gen)
        v = torch.randn(len(pos), kvh, d, generator=gen)
        R.write_reference(cache, backend, k, v, slots, storage, ks, vs)
        if window and lo >= bs:  # blocks wholly before the window: vLLM frees them (null block)
            table[b, :lo // bs] = BAD_ID
    kc, vc = R.split_paged(cache, backend, "vec", storage)
    return kc, vc, table, torch.tensor(lens)


def _q(gen, B, kvh, G, d, dtype):
    return (torch.randn(B, kvh, G, d, generator=gen) * 1.5 / d**0.5).to(dtype)  # scores ~ N(0, 1.5^2)


def _assert_close(out, ref):
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert torch.isfinite(ref).all()
    rtol, atol = TOL[ref.dtype]
    o, r = out.double(), ref.double()
    bound = rtol * r.abs() + atol * r.abs().max()
    err = (o - r).abs()
    assert (err <= bound).all(), f"max err {err.max():.3g}, worst ratio {(err / bound).max():.3g}"


def _check(q, kc, vc, table, kv_len, window, scales, **kw):
    sc = scales or (None, None)
    out = paged_attend(q, kc, vc, table, kv_len, window, *sc, impl="triton", **kw)
    _assert_close(out, paged_attend_ref(q, kc, vc, table, kv_len, window, *sc))


def test_interpreter_is_active():
    pa._load()
    from triton.runtime.interpreter import InterpretedFunction

    assert isinstance(pa._paged_attn_kernel, InterpretedFunction)


# kv_len: one key, exactly one block, a block + 1, several blocks with a partial last one
LENS = [1, 16, 17, 53]


# dtype x layer type x G in full; the layout alternates so that every (layout, dtype), (layout, layer)
# and (layout, G) pair is covered (the layouts differ only in strides)
GRID = [
    (LAYOUTS[(di + li + gi) % 2], dtype, layer, G)
    for di, dtype in enumerate(DTYPES) for li, layer in enumerate(LAYERS) for gi, G in enumerate([1, 2, 4])
]


@pytest.mark.parametrize("backend,dtype,layer,G", GRID, ids=["-".join(map(str, c)) for c in GRID])
def test_grid_against_reference(backend, dtype, layer, G):
    storage, qdt, scales = DTYPES[dtype]
    geo = LAYERS[layer]
    seed = LAYOUTS.index(backend) * 1000 + list(DTYPES).index(dtype) * 100 + list(LAYERS).index(layer) * 10 + G
    gen = torch.Generator().manual_seed(seed)
    kc, vc, table, kv_len = _paged_case(gen, backend, storage, geo["kvh"], geo["d"], 16, LENS, geo["window"], scales)
    q = _q(gen, len(LENS), geo["kvh"], G, geo["d"], qdt)
    # alternate one program per (request, head) with the flash-decoding split (3 splits: some empty)
    splits = 1 + 2 * ((G + list(LAYERS).index(layer)) % 2)
    _check(q, kc, vc, table, kv_len, geo["window"], scales, num_splits=splits)


@pytest.mark.parametrize("window", [0, 1, 5, 40])
@pytest.mark.parametrize("num_splits", [1, 6])
def test_windows_and_splits(window, num_splits):
    """Window of one key, one inside a block, one spanning blocks; more splits than key tiles (empty
    splits) and tiles (BLOCK_N = 16) that straddle block boundaries of a block size 8 cache."""
    gen = torch.Generator().manual_seed(window * 10 + num_splits)
    lens = [1, 8, 9, 70]
    kc, vc, table, kv_len = _paged_case(gen, "TRITON_ATTN", torch.float32, 1, 32, 8, lens, window)
    q = _q(gen, len(lens), 1, 3, 32, torch.float32)
    _check(q, kc, vc, table, kv_len, window, None, num_splits=num_splits, block_sizes=(16, 16, 32))


@pytest.mark.parametrize("backend", LAYOUTS)
def test_two_kv_cache_groups(backend):
    """One batch through both of Gemma 4's KV-cache groups, as the drafter body does: each group has its
    own cache, block table (and here block size), KV heads and head dim."""
    gen = torch.Generator().manual_seed(7)
    lens = [33, 5, 64]
    groups = [
        dict(kvh=2, d=32, bs=16, window=24, G=2, dtype="e4m3"),  # sliding
        dict(kvh=1, d=64, bs=32, window=0, G=4, dtype="e4m3"),  # full: 4 query heads per KV head
    ]
    for g in groups:
        storage, qdt, scales = DTYPES[g["dtype"]]
        kc, vc, table, kv_len = _paged_case(gen, backend, storage, g["kvh"], g["d"], g["bs"], lens, g["window"], scales)
        q = _q(gen, len(lens), g["kvh"], g["G"], g["d"], qdt)
        _check(q, kc, vc, table, kv_len, g["window"], scales)


@pytest.mark.parametrize("d,kvh,G,window,dtype", [
    (256, 2, 2, 24, "bf16"),  # Gemma 4 sliding layers: head dim 256
    (512, 1, 8, 0, "e4m3"),  # Gemma 4 full layers: head dim 512, fp8 cache
    (512, 1, 8, 0, "fp32"),
])
def test_real_head_dims(d, kvh, G, window, dtype):
    storage, qdt, scales = DTYPES[dtype]
    gen = torch.Generator().manual_seed(d + G)
    lens = [40, 17]
    kc, vc, table, kv_len = _paged_case(gen, "TRITON_ATTN", storage, kvh, d, 16, lens, window, scales)
    q = _q(gen, len(lens), kvh, G, d, qdt)
    _check(q, kc, vc, table, kv_len, window, scales, num_splits=2)  # default config (BLOCK_N 32 / 16)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_gpu_code_path_in_the_interpreter(num_splits):
    """The kernel's GPU branch (operands cast to q's dtype for tl.dot, DOT_IN_FP32=False) with fp32 q,
    where the interpreter's tl.dot is exact; fp8 cache with scales."""
    gen = torch.Generator().manual_seed(13)
    storage, qdt, scales = DTYPES["e5m2"]
    kc, vc, table, kv_len = _paged_case(gen, "TRITON_ATTN", storage, 2, 32, 16, LENS, 24, scales)
    q = _q(gen, len(LENS), 2, 2, 32, qdt)
    _check(q, kc, vc, table, kv_len, 24, scales, num_splits=num_splits, dot_in_fp32=False)


def test_fp16_tensor_scales_and_strided_q():
    """0-d tensor scales, only one of them given, fp16, a q that is a strided view, a large G (tiled)."""
    gen = torch.Generator().manual_seed(11)
    lens = [20, 3]
    kc, vc, table, kv_len = _paged_case(gen, "CPU_ATTN", E4M3, 2, 32, 16, lens, 0, (0.5, 1.0))
    wide = _q(gen, 2, 2, 80, 48, torch.float16)
    q = wide[:, :, :, 8:40]  # [2, 2, 80, 32], row stride 48
    ks = torch.tensor(0.5)
    out = paged_attend(q, kc, vc, table, kv_len, 0, ks, None, impl="triton")
    _assert_close(out, paged_attend_ref(q, kc, vc, table, kv_len, 0, ks, None))
    assert out.is_contiguous()


def test_reference_is_todays_production_path():
    """impl='torch' (and 'auto' on CPU) is the reference exactly, and the reference is
    gather -> dequantize -> attend as the proposer and drafter.body run them."""
    gen = torch.Generator().manual_seed(3)
    lens = [1, 30, 17]
    for storage, qdt, scales, window in ((E4M3, torch.bfloat16, (0.37, 2.5), 24), (torch.float32, torch.float32, None, 0)):
        kc, vc, table, kv_len = _paged_case(gen, "CPU_ATTN", storage, 2, 32, 16, lens, window, scales)
        q = _q(gen, 3, 2, 4, 32, qdt)
        sc = scales or (None, None)
        ref = paged_attend_ref(q, kc, vc, table, kv_len, window, *sc)
        assert torch.equal(paged_attend(q, kc, vc, table, kv_len, window, *sc, impl="torch"), ref)
        assert torch.equal(paged_attend(q, kc, vc, table, kv_len, window, *sc, impl="auto"), ref)
        for max_len in (max(lens), 50):  # the proposer passes the batch's max_seq_len
            (K, V), mask = R.gather(kc, vc, table, kv_len, max_len, window)
            (K, V), = R.dequantize({"x": (K, V)}, None if scales is None else {"x": torch.tensor(scales)}, qdt).values()
            prod = attend(q, K.to(qdt), V.to(qdt), mask)
            if max_len == max(lens):
                assert torch.equal(prod, ref)
            else:  # more masked columns: the same maths, maybe another summation order
                _assert_close(prod, ref)


def test_bad_shapes_raise_value_error():
    gen = torch.Generator().manual_seed(5)
    kc, vc, table, kv_len = _paged_case(gen, "TRITON_ATTN", torch.float32, 2, 32, 16, [5, 9], 0)
    q = _q(gen, 2, 2, 2, 32, torch.float32)
    bad = {
        "q must be": (q[0], kc, vc, table, kv_len, 0),
        "KV heads": (q[:, :1], kc, vc, table, kv_len, 0),
        "of dim": (q[..., :16], kc, vc, table, kv_len, 0),
        "differ": (q, kc, vc[..., :16], table, kv_len, 0),
        "table must be": (q, kc, vc, table[:1], kv_len, 0),
        "kv_len must be": (q, kc, vc, table, kv_len[:, None], 0),
        "integer": (q, kc, vc, table.float(), kv_len, 0),
        "window": (q, kc, vc, table, kv_len, -1),
        "k_cache/v_cache": (q, kc[0], vc[0], table, kv_len, 0),
    }
    for match, args in bad.items():
        for impl in ("torch", "triton"):
            with pytest.raises(ValueError, match=match):
                paged_attend(*args, impl=impl)


def test_empty_batch():
    gen = torch.Generator().manual_seed(6)
    kc, vc, table, kv_len = _paged_case(gen, "TRITON_ATTN", torch.float32, 2, 32, 16, [5], 0)
    q = torch.empty(0, 2, 2, 32)
    for impl in ("torch", "triton"):
        assert paged_attend(q, kc, vc, table[:0], kv_len[:0], impl=impl).shape == (0, 2, 2, 32)


def test_kernels_compile_for_sm90():
    """What the interpreter cannot catch: the kernels compile for Hopper at Gemma 4's head dims, fp8
    caches included, without register spills."""
    mod = "vllm_gemma_mtp.kernels.paged_attn"
    ints = ("KVH G D BS window stride_qb stride_qh stride_qg stride_qd stride_kn stride_kt stride_kh stride_kd "
            "stride_vn stride_vt stride_vh stride_vd stride_tb stride_tc stride_ob stride_oh stride_og").split()

    def job(cache, qdt, d, G, splits, scales, window="i32"):
        bg, bn, bd, nw = pa._pick_config(G, d)
        sig = {"q_ptr": qdt, "k_ptr": cache, "v_ptr": cache, "tab_ptr": "*i32", "len_ptr": "*i64", "sc_ptr": "*fp32",
               "o_ptr": qdt, "ws_acc_ptr": "*fp32", "ws_ml_ptr": "*fp32", **{n: "i32" for n in ints}, "window": window}
        cx = {"NUM_SPLITS": splits, "HAS_SCALES": scales, "BLOCK_G": bg, "BLOCK_N": bn, "BLOCK_D": bd,
              "DOT_PRECISION": "ieee" if qdt == "*fp32" else "tf32", "DOT_IN_FP32": False}
        if window == "constexpr":
            cx["window"] = 1  # triton specialises an int argument equal to 1
        return dict(module=mod, kernel="_paged_attn_kernel", signature=sig, constexprs=cx, num_warps=nw, num_stages=2)

    jobs = [
        job("*bf16", "*bf16", 256, 2, 8, False),  # sliding, bf16 cache, split
        job("*fp8e4nv", "*bf16", 512, 8, 1, True),  # full, fp8 e4m3 cache
        job("*fp8e5", "*fp32", 64, 4, 1, True, window="constexpr"),
        dict(module=mod, kernel="_merge_splits_kernel", num_warps=8,
             signature={"ws_acc_ptr": "*fp32", "ws_ml_ptr": "*fp32", "o_ptr": "*bf16",
                        **{n: "i32" for n in "KVH G D NUM_SPLITS stride_ob stride_oh stride_og".split()}},
             constexprs={"BLOCK_G": 16, "BLOCK_D": 512}),
    ]
    usage = ku.compile_for_gpu(jobs)
    assert all(u["local"] == 0 for u in usage), usage


# --------------------------------------------------------------------------- the drafter reading in place


@pytest.mark.parametrize("flavor", ["31b", "e2b"])
@pytest.mark.parametrize("cache_dtype", ["fp32", "fp8"])
def test_draft_round_in_place_equals_gathered(pair, flavor, cache_dtype):
    """The whole greedy draft round with kv_reader.PagedKV (the Triton kernel reading the target's cache in
    place) drafts the tokens of today's gathered round, on a tiny pair's drafter: both layer types (sliding
    window 16 < context, full), scattered block tables per KV-cache group, fp8 with scales."""
    from transformers import AutoConfig

    from vllm_gemma_mtp.drafter import SLIDING, draft_greedy, load_drafter

    p = pair(flavor)
    d = load_drafter(str(p / "assistant"), AutoConfig.from_pretrained(p / "target"))
    gen = torch.Generator().manual_seed(3)
    B, bs, nb = 3, 16, 40
    kv_len = torch.tensor([5, 40, 70])
    max_len = int(kv_len.max())
    store = E4M3 if cache_dtype == "fp8" else torch.float32
    gathered, masks, paged, scales = {}, {}, {}, {}
    for gi, lt in enumerate(sorted(set(d.spec.layer_types))):
        L = d.layers[d.spec.layer_types.index(lt)]
        kvh, hd = L.num_kv_heads, L.head_dim
        cache = torch.full((nb, kvh, bs, 2 * hd), float("nan"))
        if store != torch.float32:
            cache = torch.zeros((nb, kvh, bs, 2 * hd), dtype=torch.uint8)
        perm = torch.randperm(nb, generator=gen)
        need = -(-max_len // bs)
        table = torch.stack([perm[i * need:(i + 1) * need] for i in range(B)]).to(torch.int32)
        ks, vs = (0.5 + gi, 0.25) if store != torch.float32 else (1.0, 1.0)
        for b in range(B):
            n = int(kv_len[b])
            pos = torch.arange(n)
            slots = table[b].long()[pos // bs] * bs + pos % bs
            R.write_reference(cache, "CPU_ATTN", torch.randn(n, kvh, hd, generator=gen),
                              torch.randn(n, kvh, hd, generator=gen), slots, store, ks, vs)
        k, v = R.split_paged(cache, "CPU_ATTN", "vec", store)
        window = d.spec.sliding_window if lt == SLIDING else 0
        gathered[lt], masks[lt] = R.gather(k, v, table, kv_len, max_len, window)
        paged[lt] = R.PagedKV(k, v, table, kv_len, window, max_len)
        scales[lt] = torch.tensor([ks, vs])
    assert 0 < d.spec.sliding_window < max_len
    sc = scales if store != torch.float32 else None
    emb = torch.randn(d.spec.vocab, d.spec.backbone, generator=gen)
    first = torch.randint(0, d.spec.vocab, (B,), generator=gen)
    hidden = torch.randn(B, d.spec.backbone, generator=gen)
    q_pos = kv_len.clone()
    d.kernel_impl = "triton"  # every kernel the same on both sides: only the attention differs
    ref = draft_greedy(d, emb, first, hidden, q_pos, gathered, masks, 4, sc)
    out = draft_greedy(d, emb, first, hidden, q_pos, paged, {lt: None for lt in paged}, 4, sc)
    assert torch.equal(out, ref)
    # and the drafter state itself, one step
    dt = torch.float32
    rope = d.rope_tables(q_pos[:, None], dt)
    z = d.input_projection(first, hidden, emb)[:, None]
    y_ref = d.body(z, rope, R.dequantize(gathered, sc, dt), masks)
    y = d.body(z, rope, R.dequantize(paged, sc, dt), {lt: None for lt in paged})
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
