"""The target's paged KV cache, as the drafter reads it.

One room for every fact about the cache: each attention backend's block layout, the quantized dtypes and
their per-layer scales, the block tables of the KV-cache groups, and (under tensor parallelism) the fact that
a rank's cache holds only its own KV heads. The proposer asks `gather` for a round's keys and values and
`scales` for what multiplies them; it knows nothing of layouts.

Quantized caches: vLLM stores fp8 K/V as uint8 bytes, quantized as x / scale with a per-layer scale
(`_k_scale_float` / `_v_scale_float`, 1.0 unless the checkpoint or `calculate_kv_scales` sets one). Reading
those bytes as integers is what collapsed acceptance (3.15 -> 1.23 mean acceptance length): we gather the
bytes through an fp8 view and hand the draft round (K8, V8) plus (k_scale, v_scale); the round converts them
once at its start, so no dequantized copy of the cache is made outside the gathered context.
"""

from __future__ import annotations

import dataclasses

import torch

from vllm_gemma_mtp import compat

# kv_cache_dtype -> the fp8 format of its bytes (None: the cache holds the model dtype). vLLM's "fp8" means
# e4m3 everywhere it offers it; the platform decides which e4m3 (e4m3fn, or e4m3fnuz on some ROCm GPUs).
_FP8_FORMATS = {"fp8": "e4m3", "fp8_e4m3": "e4m3", "fp8_e5m2": "e5m2"}
UNQUANTIZED = ("auto", "float32", "float16", "bfloat16", "half", "float")
READABLE_CACHE_DTYPES = UNQUANTIZED + tuple(_FP8_FORMATS)
# block layouts we read (see split_paged); CPU_ATTN only for the ISAs whose layout is known to us
READABLE_BACKENDS = ("CPU_ATTN", "TRITON_ATTN", "FLASH_ATTN")
CPU_ISAS = ("vec", "vec16")


class KVCacheNotReadable(ValueError):
    """The drafter cannot read this target KV cache (dtype, backend or layout); raised at startup."""


def check_cache_dtype(cache_dtype: str) -> None:
    if str(cache_dtype) not in READABLE_CACHE_DTYPES:
        raise KVCacheNotReadable(
            f"vllm-gemma-mtp cannot read a target KV cache of kv_cache_dtype={cache_dtype!r}: the drafter reads "
            f"the target's cache directly and knows {', '.join(READABLE_CACHE_DTYPES)}. Use one of those, or "
            f"vLLM's built-in MTP path (VLLM_GEMMA_MTP_ENABLE=0)")


def storage_dtype(cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype whose bytes the cache holds: model dtype for an unquantized cache, else the fp8 format."""
    check_cache_dtype(cache_dtype)
    fmt = _FP8_FORMATS.get(str(cache_dtype))
    if fmt is None:
        named = {"float32": torch.float32, "float": torch.float32, "float16": torch.float16,
                 "half": torch.float16, "bfloat16": torch.bfloat16}
        return named.get(str(cache_dtype), model_dtype)
    return torch.float8_e5m2 if fmt == "e5m2" else compat.platform_fp8_e4m3()


def split_paged(kv_cache: torch.Tensor, backend: str, isa: str | None,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, V) views of one layer's paged cache, both [num_blocks, block_size, kv_heads, head_dim] of `dtype`
    (the storage dtype: an fp8 cache is uint8 in vLLM and is viewed as its fp8 format)."""
    if kv_cache.dtype != dtype:
        if kv_cache.element_size() != torch.empty((), dtype=dtype).element_size():
            raise KVCacheNotReadable(
                f"vllm-gemma-mtp: target KV cache of dtype {kv_cache.dtype} cannot be read as {dtype}")
        kv_cache = kv_cache.view(dtype)
    if backend == "CPU_ATTN":
        # [nb, kvh, bs, 2d]: per (block, head) the key region is stored transposed ([d, bs], so a query
        # dot-products contiguous rows) and the value region as [bs, d]; the fp8 cache of the 'vec' ISA
        # keeps the same layout in bytes (key column-major, value row-major). Other ISAs (amx, neon, ...)
        # pack blocks differently.
        if isa not in CPU_ISAS:
            raise KVCacheNotReadable(
                f"vllm-gemma-mtp reads the CPU_ATTN cache layout of the {'/'.join(CPU_ISAS)} kernels, not "
                f"{isa!r}")
        nb, kvh, bs, d2 = kv_cache.shape
        kv = kv_cache.view(nb, kvh, 2, bs * (d2 // 2))
        k = kv[:, :, 0].view(nb, kvh, d2 // 2, bs).permute(0, 3, 1, 2)
        v = kv[:, :, 1].view(nb, kvh, bs, d2 // 2).transpose(1, 2)
        return k, v
    if backend in ("TRITON_ATTN", "FLASH_ATTN") and kv_cache.dim() == 4:
        # logical [nb, kvh, bs, d_k + d_v], split on the last dim (vLLM 0.33 triton_attn/flash_attn)
        t = kv_cache.transpose(1, 2)
        d = kv_cache.shape[-1] // 2
        return t[..., :d], t[..., d:]
    raise KVCacheNotReadable(
        f"vllm-gemma-mtp cannot read the paged KV cache of attention backend {backend} "
        f"(shape {tuple(kv_cache.shape)}); supported: CPU_ATTN ({'/'.join(CPU_ISAS)}), TRITON_ATTN, FLASH_ATTN")


def gather(k_cache: torch.Tensor, v_cache: torch.Tensor, table: torch.Tensor, kv_len: torch.Tensor,
           max_len: int, window: int = 0):
    """K/V [B, kvh, S, d] (storage dtype) of keys (P-W, P] (window W > 0) or [0, P] per request, and the mask
    [B, 1, 1, S] of real keys. k_cache/v_cache [nb, bs, kvh, d]; table [B, max_blocks] the requests' block
    table rows; kv_len [B] = P + 1."""
    bs = k_cache.shape[1]
    B = kv_len.shape[0]
    if window:
        S = max(2, min(window, max_len))  # >= 2: size-1 dims would specialise the compiled round
        pos = kv_len[:, None] - S + torch.arange(S, device=kv_len.device)
    else:
        S = max(2, max_len)
        pos = torch.arange(S, device=kv_len.device).expand(B, S)
    valid = (pos >= 0) & (pos < kv_len[:, None])
    pos = torch.minimum(pos.clamp(min=0), (kv_len - 1)[:, None])
    blk = table.gather(1, torch.div(pos, bs, rounding_mode="floor")).long()
    off = pos % bs
    # one advanced-indexing gather straight into [B, kvh, S, d] (fresh, standard strides: the compiled
    # draft round is traced for those)
    heads = torch.arange(k_cache.shape[2], device=blk.device)[None, :, None]
    blk, off = blk[:, None, :], off[:, None, :]
    return (k_cache[blk, off, heads], v_cache[blk, off, heads]), valid[:, None, None, :]


@dataclasses.dataclass(frozen=True)
class PagedKV:
    """One layer type's K/V left in the target's paged cache: the drafter attends it in place
    (kernels.paged_attn) instead of a gathered copy. Same keys as gather(): (P-W, P] or [0, P]."""
    k_cache: torch.Tensor  # [nb, bs, kvh, d] storage dtype (split_paged view)
    v_cache: torch.Tensor
    table: torch.Tensor  # [B, max_blocks] the drafted requests' block-table rows
    kv_len: torch.Tensor  # [B] = P + 1
    window: int  # 0: full attention
    max_len: int  # host bound on kv_len (sizes the kernel's context split)
    scales: torch.Tensor | None = None  # [2] (k_scale, v_scale) for a quantized cache

    def attend(self, q: torch.Tensor, impl: str = "auto") -> torch.Tensor:
        """q [B, kvh, G, d] -> [B, kvh, G, d]."""
        from vllm_gemma_mtp.kernels.paged_attn import paged_attend

        ks, vs = (None, None) if self.scales is None else (self.scales[0], self.scales[1])
        return paged_attend(q, self.k_cache, self.v_cache, self.table, self.kv_len, self.window, ks, vs,
                            impl=impl, max_len=self.max_len)


class TargetKVReader:
    """The paged K/V of the target layers the drafter reads (one per layer type), for one worker (rank)."""

    def __init__(self, vllm_config, store_names: dict[str, str], windows: dict[str, int]):
        self.vllm_config = vllm_config
        self.store_names = store_names  # layer type -> target attention layer name
        self.windows = windows  # layer type -> sliding window (0: full attention)
        self.cache_dtype = str(vllm_config.cache_config.cache_dtype)
        self.dtype = storage_dtype(self.cache_dtype, vllm_config.model_config.dtype)
        self.quantized = self.cache_dtype in _FP8_FORMATS
        self.group_of: dict[str, int] = {}
        self._views: dict[str, tuple] = {}
        self._scale_cache: dict[str, tuple] = {}

    def describe(self) -> str:
        return f"{self.cache_dtype} ({str(self.dtype).replace('torch.', '')})"

    def bind_groups(self, kv_cache_groups) -> None:
        """Find the KV-cache group of each layer we read (each group has its own block table)."""
        self.group_of = {}
        for gid, group in enumerate(kv_cache_groups):
            for lt, name in self.store_names.items():
                if name in group.layer_names:
                    self.group_of[lt] = gid
        missing = set(self.store_names) - set(self.group_of)
        if missing:
            raise RuntimeError(f"vllm-gemma-mtp: no KV-cache group holds the target layers for {missing}")
        self._views = {}

    def _layer(self, lt: str):
        return compat.forward_context_layer(self.vllm_config, self.store_names[lt])

    def check_layout(self) -> bool:
        """Refuse a cache whose layout we cannot read (KVCacheNotReadable); True once every cache we read is
        bound (before that, nothing to check yet)."""
        bound = [lt for lt in self.store_names if compat.layer_kv_cache(self._layer(lt)) is not None]
        for lt in bound:
            self.views(lt)
        return len(bound) == len(self.store_names)

    def views(self, lt: str) -> tuple[torch.Tensor, torch.Tensor]:
        # rebuilt when the runner rebinds the cache tensor (e.g. after a KV re-init)
        layer = self._layer(lt)
        cache = compat.layer_kv_cache(layer)
        cached = self._views.get(lt)
        if cached is None or cached[0] is not cache:
            k, v = split_paged(cache, compat.backend_name(layer), getattr(layer, "isa", None), self.dtype)
            cached = (cache, k, v)
            self._views[lt] = cached
        return cached[1], cached[2]

    def local_kv_heads(self, lt: str) -> int:
        """KV heads this rank's cache holds for layer type lt (all of them at TP=1, a shard under TP)."""
        return int(self.views(lt)[0].shape[2])

    def gather(self, lt: str, block_tables, kv_len: torch.Tensor, max_len: int, rows: torch.Tensor | None = None):
        """See gather(); block_tables: the runner's per-group tables; rows: the batch rows drafted."""
        k_cache, v_cache = self.views(lt)
        table = block_tables[self.group_of[lt]]
        table = table[:kv_len.shape[0]] if rows is None else table[rows]
        return gather(k_cache, v_cache, table, kv_len, max_len, self.windows.get(lt, 0))

    def paged(self, lt: str, block_tables, kv_len: torch.Tensor, max_len: int,
              rows: torch.Tensor | None = None) -> PagedKV:
        """The same keys as gather(), left in place for the paged attention kernel."""
        k_cache, v_cache = self.views(lt)
        table = block_tables[self.group_of[lt]]
        table = table[:kv_len.shape[0]] if rows is None else table[rows]
        return PagedKV(k_cache, v_cache, table, kv_len, self.windows.get(lt, 0), int(max_len))

    def scales(self, device) -> dict[str, torch.Tensor] | None:
        """Per layer type, tensor [2] = (k_scale, v_scale) that multiplies the stored K / V; None when the cache
        is unquantized (nothing to multiply). Read every round: calculate_kv_scales may set them late."""
        if not self.quantized:
            return None
        out = {}
        for lt in self.store_names:
            ks, vs = compat.layer_kv_scales(self._layer(lt))
            cached = self._scale_cache.get(lt)
            if cached is None or cached[0] != (ks, vs):
                cached = ((ks, vs), torch.tensor([ks, vs], dtype=torch.float32, device=device))
                self._scale_cache[lt] = cached
            out[lt] = cached[1]
        return out


def dequantize(kv: dict, scales: dict | None, dtype: torch.dtype) -> dict:
    """kv[type] = (K, V) in the storage dtype -> the drafter's dtype, times the layer's scales. Called once at
    the start of a draft round (inside the compiled round when it is compiled)."""
    if scales is None:
        return kv
    out = {}
    for lt, entry in kv.items():
        if isinstance(entry, PagedKV):  # dequantized in the kernel's registers
            out[lt] = dataclasses.replace(entry, scales=scales[lt])
            continue
        K, V = entry
        s = scales[lt].to(dtype)
        out[lt] = (K.to(dtype) * s[0], V.to(dtype) * s[1])
    return out


def quantize(x: torch.Tensor, dtype: torch.dtype, scale: float) -> torch.Tensor:
    """x / scale in `dtype` (saturating for fp8), as vLLM stores a quantized cache. vLLM's CPU e4m3 writer
    truncates the mantissa where torch rounds to nearest: the stored values may differ by one fp8 step."""
    if dtype in (torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.float8_e5m2):
        lim = torch.finfo(dtype).max
        return (x.float() / scale).clamp(-lim, lim).to(dtype)
    return x.to(dtype)


def write_reference(cache: torch.Tensor, backend: str, key: torch.Tensor, value: torch.Tensor,
                    slots: torch.Tensor, dtype: torch.dtype, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """Write tokens into a paged cache the way vLLM's kernels lay them out, by explicit element offsets (an
    oracle independent of split_paged's views; tests and scripts use it, vLLM writes the real cache).
    cache [nb, kvh, bs, 2d] (uint8 for fp8); key/value [T, kvh, d]; slots [T] = block * bs + offset."""
    nb, kvh, bs, d2 = cache.shape
    d = d2 // 2
    flat = cache.view(dtype).reshape(-1) if cache.dtype != dtype else cache.reshape(-1)
    blk, off = slots // bs, slots % bs
    h = torch.arange(kvh)[None, :, None]
    i = torch.arange(d)[None, None, :]
    base = (blk[:, None, None] * kvh + h) * (bs * d2)  # start of (block, head) [T, kvh, 1]
    if backend == "CPU_ATTN":  # key column-major [d, bs], then value row-major [bs, d]
        k_at = base + i * bs + off[:, None, None]
        v_at = base + bs * d + off[:, None, None] * d + i
    else:  # TRITON_ATTN / FLASH_ATTN logical [nb, kvh, bs, d_k + d_v]
        k_at = base + off[:, None, None] * d2 + i
        v_at = k_at + d
    flat[k_at.reshape(-1)] = quantize(key, dtype, k_scale).reshape(-1)
    flat[v_at.reshape(-1)] = quantize(value, dtype, v_scale).reshape(-1)
