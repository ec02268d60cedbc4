"""Reading the target's paged KV cache (vllm_gemma_mtp/kv_reader.py) without an engine: block layouts,
fp8 caches with their per-layer scales, scattered block tables and the sliding window, checked against
an independent writer that lays tokens out by explicit element offsets, and (where this CPU can run it,
AVX-512 or AMX) against vLLM's own CPU cache writer."""

import pytest
import torch

from vllm_gemma_mtp import kv_reader as R

FP8 = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
# one fp8 step relative to the value: 2^-3 (e4m3, 3 mantissa bits), 2^-2 (e5m2); half of it when rounding
REL = {torch.float8_e4m3fn: 2 ** -3, torch.float8_e5m2: 2 ** -2, torch.float32: 1e-7}


def _cpu_has_fp8_attention() -> str | None:
    if torch.cpu._is_avx512_supported() or torch.cpu._is_amx_tile_supported():
        return None
    return "vLLM's CPU fp8 KV cache requires x86 with AVX-512 or AMX; this CPU has neither"


def _tokens(T, kvh, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, kvh, d, generator=g) * 2.0, torch.randn(T, kvh, d, generator=g) * 0.5


def _scattered_table(B, n_blocks, max_blocks, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n_blocks, generator=g)[:B * max_blocks].view(B, max_blocks).int()


def _fill(backend, storage, cache_dtype_str, kvh, d, bs, lens, ks, vs, writer="ours"):
    """A paged cache holding len_b tokens per request at scattered blocks; returns cache, table, K/V [B, T, kvh, d]."""
    B, T = len(lens), max(lens)
    max_blocks = (T + bs - 1) // bs
    nb = B * max_blocks + 3
    table = _scattered_table(B, nb, max_blocks)
    cache = torch.zeros(nb, kvh, bs, 2 * d, dtype=torch.uint8 if storage.itemsize == 1 else storage)
    Ks, Vs = [], []
    for b, n in enumerate(lens):
        k, v = _tokens(n, kvh, d, seed=10 + b)
        pos = torch.arange(n)
        slots = table[b, pos // bs].long() * bs + pos % bs
        if writer == "vllm":
            import vllm._custom_ops as ops

            kc, vc = cache.view(nb, kvh, 2 * bs, d).chunk(2, dim=2)
            ops.cpu_attn_reshape_and_cache(k, v, kc, vc, slots, "vec", k_scale=ks, v_scale=vs,
                                           kv_cache_dtype=cache_dtype_str)
        else:
            R.write_reference(cache, backend, k, v, slots, storage, ks, vs)
        Ks.append(torch.nn.functional.pad(k, (0, 0, 0, 0, 0, T - n)))
        Vs.append(torch.nn.functional.pad(v, (0, 0, 0, 0, 0, T - n)))
    return cache, table, torch.stack(Ks), torch.stack(Vs)


def _expected(X, kv_len, S, window):
    """X [B, T, kvh, d] -> [B, kvh, S, d] keys of the round, zero where masked."""
    B = X.shape[0]
    out = torch.zeros(B, X.shape[2], S, X.shape[3])
    for b in range(B):
        n = int(kv_len[b])
        lo = max(0, n - S) if window else 0
        sel = X[b, lo:n].transpose(0, 1)
        out[b, :, (S - sel.shape[1]) if window else 0:][:, :sel.shape[1]] = sel
    return out


# vLLM's writer runs here for CPU_ATTN only (the TRITON_ATTN writer is a GPU kernel)
@pytest.mark.parametrize("writer,backend", [("ours", "CPU_ATTN"), ("ours", "TRITON_ATTN"), ("vllm", "CPU_ATTN")])
@pytest.mark.parametrize("cache_dtype", ["auto", "fp8", "fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("window", [0, 8])
def test_gather_reads_values_and_scales(writer, backend, cache_dtype, window):
    if writer == "vllm" and cache_dtype != "auto" and (why := _cpu_has_fp8_attention()):
        pytest.skip(why)
    storage = R.storage_dtype(cache_dtype, torch.float32)
    assert storage == FP8.get(cache_dtype, torch.float32)
    kvh, d, bs = 2, 32, 32
    lens = [5, 40, 70]
    ks, vs = (0.25, 3.0) if cache_dtype != "auto" else (1.0, 1.0)
    cache, table, K, V = _fill(backend, storage, cache_dtype, kvh, d, bs, lens, ks, vs, writer)
    kc, vc = R.split_paged(cache, backend, "vec", storage)
    assert kc.shape == (cache.shape[0], bs, kvh, d) and kc.dtype == storage
    kv_len = torch.tensor(lens)
    (Kg, Vg), mask = R.gather(kc, vc, table, kv_len, max_len=max(lens), window=window)
    scales = None if cache_dtype == "auto" else {"x": torch.tensor([ks, vs])}
    (Kd, Vd), = R.dequantize({"x": (Kg, Vg)}, scales, torch.float32).values()
    assert Kd.dtype == torch.float32
    S = Kg.shape[2]
    m = mask[:, 0, 0, :, None].expand(-1, -1, d).unsqueeze(1)  # [B, 1, S, d]
    for X, got in ((K, Kd), (V, Vd)):
        want = _expected(X, kv_len, S, window)
        err = ((got - want).abs() * m).amax()
        tol = REL[storage] * want.abs().amax() + (1e-6 if storage == torch.float32 else 0.0)
        assert err <= tol, (cache_dtype, float(err), float(tol))
    # the mask marks exactly the real keys
    assert mask[:, 0, 0].sum(-1).tolist() == [min(n, S) if window else n for n in lens]


def test_reading_fp8_bytes_as_integers_is_what_collapsed_acceptance():
    """The old read (uint8 bytes cast to float) is far from the values: this test would catch it."""
    storage = torch.float8_e4m3fn
    cache, table, K, _ = _fill("CPU_ATTN", storage, "fp8", 1, 32, 32, [20], 1.0, 1.0)
    raw_k, raw_v = R.split_paged(cache, "CPU_ATTN", "vec", torch.uint8)  # no fp8 view: the bug
    (Kg, _), _ = R.gather(raw_k, raw_v, table, torch.tensor([20]), 20)
    want = _expected(K, torch.tensor([20]), Kg.shape[2], 0)
    assert (Kg.float() - want).abs().amax() > 10 * want.abs().amax()


@pytest.mark.parametrize("dtype", ["fp8_per_token_head", "turboquant_k8v4", "int8", "fp8_inc"])
def test_unreadable_cache_dtypes_are_refused_by_name(dtype):
    with pytest.raises(R.KVCacheNotReadable, match=dtype):
        R.check_cache_dtype(dtype)


def test_unknown_layouts_are_refused_by_name():
    cache = torch.zeros(2, 1, 32, 64)
    with pytest.raises(R.KVCacheNotReadable, match="'amx'"):
        R.split_paged(cache, "CPU_ATTN", "amx", torch.float32)
    with pytest.raises(R.KVCacheNotReadable, match="FLASHINFER"):
        R.split_paged(cache, "FLASHINFER", None, torch.float32)
    with pytest.raises(R.KVCacheNotReadable, match="cannot be read as"):
        R.split_paged(cache, "CPU_ATTN", "vec", torch.float8_e4m3fn)  # 4-byte cache is not fp8 bytes


def test_draft_round_on_an_fp8_cache_matches_dequantized_inputs():
    """The compiled/eager round converts fp8 K/V with their scales at its start: same drafts as handing it
    the dequantized fp32 K/V."""
    from vllm_gemma_mtp.drafter import FULL, SLIDING, draft_greedy, load_drafter
    from transformers import AutoConfig
    from pathlib import Path

    pair = Path(__file__).parent / "assets" / "trained_pair"
    tcfg = AutoConfig.from_pretrained(pair / "target")
    d = load_drafter(str(pair / "assistant"), tcfg)
    d.kernel_impl = "torch"
    g = torch.Generator().manual_seed(0)
    B, S = 3, 24
    kv8, kv32, scales, mask = {}, {}, {}, {}
    for lt in (SLIDING, FULL):
        geo = d.spec.geometry[d.spec.layer_types.index(lt)]
        k = torch.randn(B, geo.num_kv_heads, S, geo.head_dim, generator=g)
        v = torch.randn(B, geo.num_kv_heads, S, geo.head_dim, generator=g)
        ks, vs = 0.5, 0.125
        k8, v8 = R.quantize(k, torch.float8_e4m3fn, ks), R.quantize(v, torch.float8_e4m3fn, vs)
        kv8[lt] = (k8, v8)
        kv32[lt] = (k8.float() * ks, v8.float() * vs)
        scales[lt] = torch.tensor([ks, vs])
        mask[lt] = torch.ones(B, 1, 1, S, dtype=torch.bool)
    tok = torch.tensor([5, 17, 300])
    h = torch.randn(B, tcfg.hidden_size, generator=g)
    E = torch.randn(tcfg.vocab_size, tcfg.hidden_size, generator=g) * 0.05
    q = torch.tensor([S, S, S])
    a = draft_greedy(d, E, tok, h, q, kv8, mask, 4, scales)
    b = draft_greedy(d, E, tok, h, q, kv32, mask, 4)
    assert torch.equal(a, b)
    # and the scales matter (a round that ignored them would draft something else for some row)
    c = draft_greedy(d, E, tok, h, q, kv8, mask, 4, {lt: torch.tensor([8.0, 8.0]) for lt in scales})
    assert not torch.equal(a, c)
