"""Centroid-masked ("ordered embeddings") LM head of the Gemma 4 E2B/E4B MTP drafter.

    c    = h @ centroids_w.T                                   # [T, C]
    top  = the top_k clusters of c                             # [T, top_k]
    cand = token_ordering.view(C, V // C)[top].reshape(T, S)   # [T, S], S = top_k * V // C
    z    = <lm_head_w[cand], h>                                # [T, S] candidate logits

Greedy drafting takes the candidate with the largest logit -- the same token as an argmax
over a full-vocabulary row holding -inf outside the candidates, ties going to the smallest
vocab id. Probabilistic drafting takes softmax(z / temperature) over the candidates.

Tie rule for the cluster selection: larger centroid logit first, equal logits in increasing
cluster index (a stable descending sort); the candidate order is that cluster order, then
``token_ordering`` order inside a cluster. All logits are computed in fp32 from the
(possibly bf16) inputs, in both implementations.

Triton path, 4 launches, each input byte read once:
  1. centroid logits, tiles of tokens x clusters on tensor cores      -> [T, C] fp32
  2. per-token top-k by repeated max over packed (value, index) keys  -> [T, top_k]
  3. grid (token, split of the selected clusters): gather the candidate rows of lm_head_w,
     dot with h, running (max, smallest id) and online sum-exp per split
  4. per-token combine of the splits (and, for probabilities, one normalising pass over
     the [T, S] candidate logits).
"""

from __future__ import annotations

import functools

import torch

from . import jit_lazily, next_pow2, sm_count, use_triton

tl = None  # triton.language, bound by _load()
triton = None

__all__ = [
    "GREEDY_TEMPERATURE_EPS",
    "centroid_topk_ref",
    "centroid_candidates_ref",
    "centroid_argmax",
    "centroid_argmax_ref",
    "centroid_sparse_probs",
    "centroid_sparse_probs_ref",
    "sparse_to_dense_probs",
]

# Same convention as the rejection sampler: a temperature below this is greedy, and
# centroid_sparse_probs returns a one-hot on the argmax candidate for such rows.
GREEDY_TEMPERATURE_EPS = 1e-5


def _temperature_vector(temperature, T: int, device) -> torch.Tensor:  # [T] fp32
    if isinstance(temperature, torch.Tensor):
        t = temperature.to(device=device, dtype=torch.float32).reshape(-1)
        return t.expand(T).contiguous() if t.numel() == 1 else t
    return torch.full((T,), float(temperature), dtype=torch.float32, device=device)


def centroid_topk_ref(h: torch.Tensor, centroids_w: torch.Tensor, top_k: int) -> torch.Tensor:
    """[T, Hd], [C, Hd] -> [T, top_k] int64 cluster ids, best first, ties to the smaller id."""
    c = h.float() @ centroids_w.float().t()  # [T, C]
    return torch.sort(c, dim=-1, descending=True, stable=True).indices[:, :top_k]


def centroid_candidates_ref(
    h: torch.Tensor,  # [T, Hd]
    centroids_w: torch.Tensor,  # [C, Hd]
    token_ordering: torch.Tensor,  # [V] int64
    lm_head_w: torch.Tensor,  # [V, Hd]
    top_k: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # ([T, S] int64 ids, [T, S] fp32 logits)
    T = h.shape[0]
    C = centroids_w.shape[0]
    V = token_ordering.numel()
    per = V // C
    assert per * C == V, "vocab size must be a multiple of the number of centroids"
    top = centroid_topk_ref(h, centroids_w, top_k)  # [T, top_k]
    cand = token_ordering.long().view(C, per)[top].reshape(T, top_k * per)  # [T, S]
    logits = torch.empty(cand.shape, dtype=torch.float32, device=h.device)
    hf = h.float()
    # The gathered rows are [T, S, Hd]; bound the fp32 copy to ~64 MiB per chunk.
    step = max(1, (1 << 24) // max(1, cand.shape[1] * h.shape[1]))
    for t0 in range(0, T, step):
        rows = lm_head_w[cand[t0 : t0 + step]].float()  # [t, S, Hd]
        logits[t0 : t0 + step] = torch.bmm(rows, hf[t0 : t0 + step, :, None]).squeeze(-1)
    return cand, logits


def _argmax_smallest_id(ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:  # [T, S] -> [T]
    best = logits.max(dim=-1, keepdim=True).values
    big = torch.iinfo(torch.int64).max
    return torch.where(logits == best, ids, torch.full_like(ids, big)).min(dim=-1).values


def centroid_argmax_ref(h, centroids_w, token_ordering, lm_head_w, top_k: int) -> torch.Tensor:  # [T] int64
    ids, logits = centroid_candidates_ref(h, centroids_w, token_ordering, lm_head_w, top_k)
    return _argmax_smallest_id(ids, logits)


def centroid_sparse_probs_ref(h, centroids_w, token_ordering, lm_head_w, top_k: int, temperature=1.0):
    """-> (ids [T, S] int64, probs [T, S] fp32): softmax(logits / temperature) over the candidates."""
    ids, logits = centroid_candidates_ref(h, centroids_w, token_ordering, lm_head_w, top_k)
    temp = _temperature_vector(temperature, h.shape[0], h.device)  # [T]
    greedy = temp < GREEDY_TEMPERATURE_EPS
    probs = torch.softmax(logits / torch.where(greedy, 1.0, temp)[:, None], dim=-1)
    if bool(greedy.any()):
        onehot = (ids == _argmax_smallest_id(ids, logits)[:, None]).float()
        probs = torch.where(greedy[:, None], onehot, probs)
    return ids, probs


def sparse_to_dense_probs(ids: torch.Tensor, probs: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Scatter [T, S] candidate probabilities into a dense [T, V] fp32 tensor (zeros elsewhere)."""
    dense = torch.zeros((ids.shape[0], vocab_size), dtype=torch.float32, device=probs.device)
    return dense.scatter_(1, ids.long(), probs.float())


# --------------------------------------------------------------------------- Triton


def _dot_acc(a, b, acc, DOT_IN_FP32: tl.constexpr):
    if DOT_IN_FP32:
        # Interpreter only: its bf16 tl.dot multiplies raw bits. Exact either way.
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    if a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


def _centroid_logits_kernel(
    h_ptr,  # [T, Hd]
    cw_ptr,  # [C, Hd]
    c_ptr,  # [T, C] fp32 out
    T,
    C,
    HD,
    stride_h,
    stride_c,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_H: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mt = offs_t < T
    mc = offs_c < C
    acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    for h0 in range(0, HD, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        mh = offs_h < HD
        hv = tl.load(h_ptr + offs_t[:, None] * stride_h + offs_h[None, :], mask=mt[:, None] & mh[None, :], other=0.0)  # [BT, BH]
        w = tl.load(cw_ptr + offs_c[None, :].to(tl.int64) * stride_c + offs_h[:, None], mask=mh[:, None] & mc[None, :], other=0.0)  # [BH, BC]
        acc = _dot_acc(hv, w.to(hv.dtype), acc, DOT_IN_FP32)
    # -0.0 and +0.0 must tie (as they do in torch), but their packed sort keys would not.
    acc = tl.where(acc == 0.0, 0.0, acc)
    tl.store(c_ptr + offs_t[:, None] * C + offs_c[None, :], acc, mask=mt[:, None] & mc[None, :])


def _topk_kernel(
    c_ptr,  # [T, C] fp32
    top_ptr,  # [T, TOPK] int32 out
    C,
    TOPK,
    C_PAD: tl.constexpr,
):
    t = tl.program_id(0)
    offs = tl.arange(0, C_PAD)
    valid = offs < C
    c = tl.load(c_ptr + t * C + offs, mask=valid, other=0.0)
    # Order-preserving fp32 -> u32 map in the high word, reversed index in the low word:
    # a single u64 max then yields the largest logit and, among equal ones, the smallest
    # cluster index -- the stable-sort rule of the reference.
    bits = c.to(tl.uint32, bitcast=True)
    mono = tl.where((bits >> 31) != 0, ~bits, bits | 0x80000000)
    key = (mono.to(tl.uint64) << 32) | (C_PAD - 1 - offs).to(tl.uint64)
    key = tl.where(valid, key, 0)
    for i in range(0, TOPK):
        kmax = tl.max(key, axis=0)
        tl.store(top_ptr + t * TOPK + i, (C_PAD - 1 - (kmax & 0xFFFFFFFF)).to(tl.int32))
        key = tl.where(key == kmax, 0, key)


def _candidate_kernel(
    h_ptr,  # [T, Hd]
    lm_ptr,  # [V, Hd]
    ord_ptr,  # [V] int64
    top_ptr,  # [T, TOPK] int32
    temp_ptr,  # [T] fp32
    ids_ptr,  # [T, S] int64 out (WRITE_CANDIDATES)
    z_ptr,  # [T, S] fp32 out (WRITE_CANDIDATES)
    pbest_ptr,  # [T, NSPLIT] fp32 out: max logit of the split
    pid_ptr,  # [T, NSPLIT] int32 out: its smallest vocab id
    pm_ptr,  # [T, NSPLIT] fp32 out: max of logit / temperature
    ps_ptr,  # [T, NSPLIT] fp32 out: sum exp(logit / temperature - pm)
    HD,
    TOPK,
    PER,  # V // C
    NSPLIT,
    clusters_per_split,
    stride_h,
    stride_lm,
    eps,
    PER_PAD: tl.constexpr,
    BLOCK_H: tl.constexpr,
    WRITE_CANDIDATES: tl.constexpr,
):
    t = tl.program_id(0)
    sp = tl.program_id(1)
    S = TOPK * PER
    offs_p = tl.arange(0, PER_PAD)
    mp = offs_p < PER
    tau = tl.load(temp_ptr + t)
    tau = tl.where(tau < eps, 1.0, tau)
    best = tl.full((PER_PAD,), float("-inf"), dtype=tl.float32)
    best_id = tl.full((PER_PAD,), 2147483647, dtype=tl.int32)
    m = -3.0e38
    s = 0.0
    r0 = sp * clusters_per_split
    r1 = tl.minimum(r0 + clusters_per_split, TOPK)
    for r in range(r0, r1):
        cid = tl.load(top_ptr + t * TOPK + r).to(tl.int64)
        vid = tl.load(ord_ptr + cid * PER + offs_p, mask=mp, other=0)  # [PER_PAD] int64
        z = tl.zeros((PER_PAD,), dtype=tl.float32)
        for h0 in range(0, HD, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            mh = offs_h < HD
            hv = tl.load(h_ptr + t * stride_h + offs_h, mask=mh, other=0.0).to(tl.float32)  # [BH]
            w = tl.load(lm_ptr + vid[:, None] * stride_lm + offs_h[None, :], mask=mp[:, None] & mh[None, :], other=0.0)
            z += tl.sum(w.to(tl.float32) * hv[None, :], axis=1)
        z = tl.where(mp, z, float("-inf"))
        vid32 = vid.to(tl.int32)
        # Lanes see different vocab ids from cluster to cluster, so ties must compare ids.
        up = mp & ((z > best) | ((z == best) & (vid32 < best_id)))
        best = tl.where(up, z, best)
        best_id = tl.where(up, vid32, best_id)
        zs = z / tau
        m_new = tl.maximum(m, tl.max(zs, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(zs - m_new), axis=0)
        m = m_new
        if WRITE_CANDIDATES:
            out = t.to(tl.int64) * S + r * PER + offs_p
            tl.store(ids_ptr + out, vid, mask=mp)
            tl.store(z_ptr + out, z, mask=mp)
    bmax = tl.max(best, axis=0)
    bid = tl.min(tl.where(best == bmax, best_id, 2147483647), axis=0)
    tl.store(pbest_ptr + t * NSPLIT + sp, bmax)
    tl.store(pid_ptr + t * NSPLIT + sp, bid)
    tl.store(pm_ptr + t * NSPLIT + sp, m)
    tl.store(ps_ptr + t * NSPLIT + sp, s)


def _combine_kernel(
    pbest_ptr,
    pid_ptr,
    pm_ptr,
    ps_ptr,  # [T, NSPLIT] each
    temp_ptr,  # [T] fp32
    ids_ptr,  # [T, S] int64
    z_ptr,  # [T, S] fp32 logits in, probabilities out (in place)
    argmax_ptr,  # [T] int64 out
    NSPLIT,
    S,
    eps,
    NS_PAD: tl.constexpr,
    BLOCK_S: tl.constexpr,
    WRITE_PROBS: tl.constexpr,
):
    t = tl.program_id(0)
    offs = tl.arange(0, NS_PAD)
    ms = offs < NSPLIT
    pb = tl.load(pbest_ptr + t * NSPLIT + offs, mask=ms, other=float("-inf"))
    pi = tl.load(pid_ptr + t * NSPLIT + offs, mask=ms, other=2147483647)
    bmax = tl.max(pb, axis=0)
    bid = tl.min(tl.where(pb == bmax, pi, 2147483647), axis=0)
    tl.store(argmax_ptr + t, bid.to(tl.int64))
    if WRITE_PROBS:
        pm = tl.load(pm_ptr + t * NSPLIT + offs, mask=ms, other=-3.0e38)
        ps = tl.load(ps_ptr + t * NSPLIT + offs, mask=ms, other=0.0)
        m = tl.max(pm, axis=0)
        s = tl.sum(ps * tl.exp(pm - m), axis=0)
        tau = tl.load(temp_ptr + t)
        greedy = tau < eps
        tau = tl.where(greedy, 1.0, tau)
        for s0 in range(0, S, BLOCK_S):
            o = s0 + tl.arange(0, BLOCK_S)
            mo = o < S
            z = tl.load(z_ptr + t.to(tl.int64) * S + o, mask=mo, other=float("-inf"))
            p = tl.exp(z / tau - m) / s
            if greedy:
                vid = tl.load(ids_ptr + t.to(tl.int64) * S + o, mask=mo, other=-1)
                p = tl.where(vid == bid, 1.0, 0.0)
            tl.store(z_ptr + t.to(tl.int64) * S + o, p, mask=mo)


# Plain functions until _load() swaps in their triton.jit versions.
_JIT_NAMES = ("_dot_acc", "_centroid_logits_kernel", "_topk_kernel", "_candidate_kernel", "_combine_kernel")


@functools.lru_cache(maxsize=None)
def _load():
    return jit_lazily(globals(), _JIT_NAMES)


def _centroid_triton(h, centroids_w, token_ordering, lm_head_w, top_k, temperature, write_probs, *, num_splits=None, block_sizes=None):
    _load()
    T, Hd = h.shape
    C = centroids_w.shape[0]
    V = token_ordering.numel()
    per = V // C
    assert per * C == V, "vocab size must be a multiple of the number of centroids"
    assert 1 <= top_k <= C
    assert centroids_w.shape[1] == Hd and lm_head_w.shape[1] == Hd
    assert h.stride(1) == 1 and centroids_w.stride(1) == 1 and lm_head_w.stride(1) == 1
    dev = h.device
    S = top_k * per
    token_ordering = token_ordering.contiguous()
    temp = _temperature_vector(temperature, T, dev)
    argmax = torch.empty((T,), dtype=torch.int64, device=dev)
    ids = torch.empty((T, S) if write_probs else (1, 1), dtype=torch.int64, device=dev)
    z = torch.empty((T, S) if write_probs else (1, 1), dtype=torch.float32, device=dev)
    if T == 0:
        return argmax, ids, z

    bt, bc, bh = block_sizes or (16 if T <= 16 else 32 if T <= 32 else 64, 64, 64)
    clog = torch.empty((T, C), dtype=torch.float32, device=dev)
    _centroid_logits_kernel[(triton.cdiv(T, bt), triton.cdiv(C, bc))](
        h, centroids_w, clog, T, C, Hd, h.stride(0), centroids_w.stride(0),
        BLOCK_T=bt, BLOCK_C=bc, BLOCK_H=bh, DOT_IN_FP32=not h.is_cuda,
    )
    top = torch.empty((T, top_k), dtype=torch.int32, device=dev)
    _topk_kernel[(T,)](clog, top, C, top_k, C_PAD=next_pow2(C), num_warps=8 if C >= 1024 else 4)

    if num_splits is None:
        # Enough (token, split) programs to cover the SMs twice over.
        num_splits = top_k
        if h.is_cuda:
            num_splits = max(1, min(top_k, triton.cdiv(2 * sm_count(dev.index or 0), T)))
    cps = triton.cdiv(top_k, max(1, min(num_splits, top_k)))
    nsplit = triton.cdiv(top_k, cps)
    parts = [torch.empty((T, nsplit), dtype=dt, device=dev) for dt in (torch.float32, torch.int32, torch.float32, torch.float32)]
    per_pad = next_pow2(per)
    block_h = min(next_pow2(Hd), max(16, 8192 // per_pad))
    _candidate_kernel[(T, nsplit)](
        h, lm_head_w, token_ordering, top, temp, ids, z, *parts,
        Hd, top_k, per, nsplit, cps, h.stride(0), lm_head_w.stride(0), GREEDY_TEMPERATURE_EPS,
        PER_PAD=per_pad, BLOCK_H=block_h, WRITE_CANDIDATES=write_probs,
    )
    _combine_kernel[(T,)](
        *parts, temp, ids, z, argmax, nsplit, S, GREEDY_TEMPERATURE_EPS,
        NS_PAD=next_pow2(nsplit), BLOCK_S=min(next_pow2(S), 4096), WRITE_PROBS=write_probs,
    )
    return argmax, ids, z


def centroid_argmax(
    h: torch.Tensor,  # [T, Hd]
    centroids_w: torch.Tensor,  # [C, Hd]
    token_ordering: torch.Tensor,  # [V] int64
    lm_head_w: torch.Tensor,  # [V, Hd]
    top_k: int,
    impl: str = "auto",
    **triton_kwargs,
) -> torch.Tensor:  # [T] int64
    """Greedy draft token: the best candidate of the top_k clusters (ties -> smallest vocab id)."""
    if use_triton(h, impl):
        return _centroid_triton(h, centroids_w, token_ordering, lm_head_w, top_k, 1.0, False, **triton_kwargs)[0]
    return centroid_argmax_ref(h, centroids_w, token_ordering, lm_head_w, top_k)


def centroid_sparse_probs(
    h: torch.Tensor,  # [T, Hd]
    centroids_w: torch.Tensor,  # [C, Hd]
    token_ordering: torch.Tensor,  # [V] int64
    lm_head_w: torch.Tensor,  # [V, Hd]
    top_k: int,
    temperature: float | torch.Tensor = 1.0,  # scalar or [T]
    impl: str = "auto",
    **triton_kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:  # (ids [T, S] int64, probs [T, S] fp32)
    """softmax(candidate logits / temperature) over the candidates; one-hot where T < eps."""
    if use_triton(h, impl):
        _, ids, probs = _centroid_triton(h, centroids_w, token_ordering, lm_head_w, top_k, temperature, True, **triton_kwargs)
        return ids, probs
    return centroid_sparse_probs_ref(h, centroids_w, token_ordering, lm_head_w, top_k, temperature)
