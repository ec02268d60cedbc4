"""Fused rejection sampler for speculative decoding (Leviathan et al., 2023).

Output contract (that of vLLM's V1 rejection sampler): ``[B, max_spec_len + 1]`` token ids
per request -- the accepted drafts, then at the first rejection the recovered token and
stop; if every draft of the request is accepted, its bonus token is appended; every slot
after the stop holds ``PLACEHOLDER_TOKEN_ID`` (-1).

Per draft position j of a request with temperature T and draft token d:

* greedy request (``T < GREEDY_TEMPERATURE_EPS``): accept iff d == argmax(logits)
  (exact, ties toward the smallest token id); on rejection emit that argmax.
* random request: p = softmax(logits / T); accept iff ``q(d) > 0 and p(d) > 0 and
  p(d) / q(d) >= u_j`` with q the draft distribution (a point mass on d when
  ``draft_probs`` is None). ``p(d) > 0`` only matters when u_j == 0: a token the target
  forbids is never accepted. On rejection emit a sample of normalise(max(p - q, 0));
  if that residual is all zero (p == q up to rounding) sample from p instead.

The uniforms are inputs (compared in fp32), so both implementations accept on the very
same numbers; only the recovered token of a random request is random inside the
sampler. The Triton kernel draws it from Philox keyed by (seed of the request; vocab
index / 4, position in the request, offset low / high word) -- no noise tensor is ever
materialised -- while the torch reference hashes the same key with splitmix64 in one
vectorised pass over the rejected rows; the two agree in distribution, not bit for bit.

Draft ids outside [0, V) (vLLM pads grammar-rejected drafts with -1) are rejected at
their position without being read: a greedy request emits the target's argmax there, a
random one a sample of p itself (an invalid draft says nothing about q).

``synthetic_rates`` (vLLM's ``rejection_sample_method="synthetic"`` benchmark mode)
replaces the acceptance test by ``u_j < rate[j]`` for every request; what is emitted at a
rejection follows the rules above.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from . import jit_lazily, next_pow2, use_triton

tl = None  # triton.language, bound by _load()
triton = None

__all__ = [
    "GREEDY_TEMPERATURE_EPS",
    "PLACEHOLDER_TOKEN_ID",
    "keyed_sample",
    "RejectionOutput",
    "rejection_sample",
    "rejection_sample_ref",
    "rejection_sample_triton",
]

# Temperatures below this are greedy. 1e-5 keeps logits / T finite in fp32 for any
# realistic logit (|logit| < 1e33) and is far below any temperature anyone samples at,
# so e.g. T = 1e-6 is treated as greedy, not as a very peaked distribution.
GREEDY_TEMPERATURE_EPS = 1e-5
PLACEHOLDER_TOKEN_ID = -1


class RejectionOutput(NamedTuple):
    output_token_ids: torch.Tensor  # [B, max_spec_len + 1], -1 after the stop
    num_accepted: torch.Tensor  # [B] int32, accepted drafts (emitted tokens = num_accepted + 1)


def _check_inputs(draft_token_ids, cu_num_draft_tokens, target_logits, bonus_token_ids, temperature, uniforms, draft_probs, seeds):
    N, V = target_logits.shape
    B = cu_num_draft_tokens.shape[0]
    assert draft_token_ids.shape == (N,), draft_token_ids.shape
    assert uniforms.shape == (N,), uniforms.shape
    assert bonus_token_ids.reshape(-1).shape == (B,), bonus_token_ids.shape
    assert temperature.shape == (B,) and seeds.shape == (B,)
    assert draft_probs is None or draft_probs.shape == (N, V)
    return N, V, B


def _i64(c: int) -> int:
    """A 64-bit constant as the signed value torch's int64 arithmetic wraps with."""
    return c - (1 << 64) if c >= 1 << 63 else c


_M1, _M2, _M3, _M4, _M5 = (_i64(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB,
                                              0xD6E8FEB86659FD93, 0xA0761D6478BD642F))


def _lsr(z: torch.Tensor, s: int) -> torch.Tensor:
    return (z >> s) & ((1 << (64 - s)) - 1)  # logical shift: torch's >> on int64 is arithmetic


def _counter_exponentials(seeds: torch.Tensor, positions: torch.Tensor, offset: int, V: int) -> torch.Tensor:
    """Exp(1) noise [R, V] from a counter-based hash of (seed, offset, position, vocab index): one
    vectorised pass for every rejected row, no generator object and no loop over requests, and a
    request's noise depends on its own seed only. seeds, positions [R] int64."""
    v = torch.arange(V, device=seeds.device, dtype=torch.int64)
    off = _i64((int(offset) * (_M3 % (1 << 64)) + 1) % (1 << 64))  # host-side: a Python int
    base = seeds * _M1 + positions * _M2 + off  # [R] (int64 arithmetic wraps)
    z = base[:, None] + v[None, :] * _M4  # [R, V]
    z = (z ^ _lsr(z, 30)) * _M2
    z = (z ^ _lsr(z, 27)) * _M3
    z = z ^ _lsr(z, 31)
    u = (_lsr(z, 11).double() + 0.5) * (1.0 / (1 << 53))  # (0, 1), 53 bits
    return -torch.log(u)


def _counter_uniforms(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One U(0, 1) per row [R] (fp64, 53 bits) from a counter-based hash of (seed, position); another
    stream than _counter_exponentials' (its own constant)."""
    z = seeds * _M1 + positions * _M2 + _M5
    z = (z ^ _lsr(z, 30)) * _M2
    z = (z ^ _lsr(z, 27)) * _M3
    z = z ^ _lsr(z, 31)
    return (_lsr(z, 11).double() + 0.5) * (1.0 / (1 << 53))


def _valid_drafts(d: torch.Tensor, V: int):
    """Draft ids outside [0, V) - vLLM pads grammar-rejected drafts with -1 - are rejected at their
    position; they are never used as an index (a safe 0 stands in) and never emitted."""
    valid = (d >= 0) & (d < V)
    return valid, torch.where(valid, d, torch.zeros_like(d))


def rejection_sample_ref(
    draft_token_ids: torch.Tensor,  # [N] int; ids outside [0, V) are rejected
    cu_num_draft_tokens: torch.Tensor,  # [B] int, cumulative
    target_logits: torch.Tensor,  # [N, V] fp32/bf16/fp16, pre-temperature
    bonus_token_ids: torch.Tensor,  # [B] (or [B, 1]) int
    temperature: torch.Tensor,  # [B] fp32
    uniforms: torch.Tensor,  # [N] fp32/fp64 in [0, 1)
    draft_probs: torch.Tensor | None,  # [N, V] or None (point-mass drafts)
    seeds: torch.Tensor,  # [B] int64
    offset: int,
    max_spec_len: int,
    *,
    out_dtype: torch.dtype = torch.int32,
    synthetic_rates: torch.Tensor | None = None,  # [>= max_spec_len] conditional acceptance per position
    all_greedy: bool | None = None,  # the caller's host-side knowledge; None: looked up (a sync on a GPU)
) -> RejectionOutput:
    N, V, B = _check_inputs(draft_token_ids, cu_num_draft_tokens, target_logits, bonus_token_ids, temperature, uniforms, draft_probs, seeds)
    dev = target_logits.device
    K = max_spec_len
    if all_greedy is None:
        all_greedy = bool((temperature < GREEDY_TEMPERATURE_EPS).all())
    if all_greedy and synthetic_rates is None:
        # Greedy rules need only the argmax (no softmax, no scatter): the common decode step on the CPU
        # path, where ~10 tensor ops instead of ~40 matter at batch 1.
        return _greedy_ref(draft_token_ids, cu_num_draft_tokens, target_logits, bonus_token_ids, B, K, out_dtype)
    cu = cu_num_draft_tokens.to(device=dev, dtype=torch.long)
    counts = torch.diff(cu, prepend=cu.new_zeros(1))  # [B]
    start = cu - counts  # [B]
    req = torch.repeat_interleave(torch.arange(B, device=dev), counts, output_size=N)  # [N]
    pos = torch.arange(N, device=dev) - start[req]  # [N]
    valid, d = _valid_drafts(draft_token_ids.to(dev).long(), V)  # [N]

    temp_req = temperature.to(dev).float()  # [B]
    greedy_req = temp_req < GREEDY_TEMPERATURE_EPS
    greedy = greedy_req[req]  # [N]
    logits = target_logits.float()  # [N, V]
    argmax = logits.argmax(dim=-1)  # [N]; first maximum = smallest id on ties
    t_row = torch.where(greedy, torch.ones_like(temp_req[req]), temp_req[req])  # [N]
    probs = torch.softmax(logits / t_row[:, None], dim=-1)  # [N, V]
    p_t = probs.gather(1, d[:, None]).squeeze(1)  # [N]
    if draft_probs is None:
        p_d = torch.ones_like(p_t)
    else:
        p_d = draft_probs.float().gather(1, d[:, None]).squeeze(1)
    u = uniforms.to(dev).float()
    if synthetic_rates is not None:
        # Benchmark mode: acceptance by a per-position rate, whatever the target says.
        accepted = valid & (u < synthetic_rates.to(dev).float()[pos.clamp(max=synthetic_rates.numel() - 1)])
    else:
        accept_random = (p_d > 0) & (p_t > 0) & (p_t / torch.where(p_d > 0, p_d, 1.0) >= u)
        accepted = valid & torch.where(greedy, d == argmax, accept_random)  # [N]

    acc_mat = torch.zeros((B, K + 1), dtype=torch.int32, device=dev)  # [B, K+1]; unused slots stay 0
    acc_mat[req, pos] = accepted.int()
    num_acc = acc_mat.cumprod(dim=1).sum(dim=1)  # [B]: length of the accepted prefix
    rejected = num_acc < counts  # [B]
    row_of_stop = (start + num_acc).clamp(max=max(N - 1, 0))  # [B] flat row of the first rejection

    out = torch.full((B, K + 1), PLACEHOLDER_TOKEN_ID, dtype=out_dtype, device=dev)
    keep = pos < num_acc[req]
    out[req[keep], pos[keep]] = d[keep].to(out_dtype)

    last = bonus_token_ids.reshape(-1).to(dev).long().clone()  # [B]
    if N > 0:
        last = torch.where(rejected, argmax[row_of_stop], last)
    # Random requests that stopped early draw the recovered token. Only those rows get noise (their
    # indices are data-dependent; this reference runs on CPU tensors, where that costs no device sync).
    rr = (rejected & ~greedy_req).nonzero().flatten()  # [R]
    if rr.numel() > 0:
        rows = row_of_stop[rr]  # [R]
        p = probs[rows]  # [R, V]
        ok = valid[rows]  # [R]; an invalid draft carries no draft distribution: the residual is p
        if draft_probs is None:
            w = p.clone()
            w[torch.arange(rr.numel(), device=dev)[ok], d[rows][ok]] = 0.0
        else:
            w = torch.where(ok[:, None], (p - draft_probs[rows].float()).clamp_min(0.0), p)
        empty = ~(w > 0).any(dim=1)
        w = torch.where(empty[:, None], p, w)
        e = _counter_exponentials(seeds.to(dev).long()[rr], num_acc[rr].long(), offset, V)  # [R, V]
        # Exponential race: argmax w / E ~ Categorical(w / sum(w)) without normalising.
        last[rr] = torch.argmax(w.double() / e, dim=1)
    out[torch.arange(B, device=dev), num_acc] = last.to(out_dtype)
    return RejectionOutput(out, num_acc.to(torch.int32))


def keyed_sample(
    draft_token_ids: torch.Tensor,  # [N] int; ids outside [0, V) are rejected
    num_draft_tokens: list[int],  # [B] host-side
    logits: torch.Tensor,  # [N + B, V] every request's draft rows then its bonus row, processed, pre-temperature
    temperature: torch.Tensor,  # [B] fp32, >= GREEDY_TEMPERATURE_EPS (random requests)
    keys: torch.Tensor,  # [B] int64, one per request
    first_positions: torch.Tensor,  # [B] int64, sequence position of each request's first row
    max_spec_len: int,
    *,
    out_dtype: torch.dtype = torch.int32,
) -> RejectionOutput:
    """Point-mass drafts, sampled by position: every row j of request b draws t_j ~ p_j by inverting its
    cumulative distribution at one uniform keyed by (keys[b], first_positions[b] + j); the drafts are
    accepted while t_j == d_j, and the first t_j that differs (or the bonus row's) ends the request's
    output. One uniform and one cumulative sum per row: an exponential race over the vocabulary (a hash
    per token) cost 13 ms a row at V=262144 on one CPU core, the inversion under 1 ms.

    For a point-mass draft this is exact rejection sampling: P(accept) = p(d), and a rejected t_j is a
    draw of p without d, normalised - the rules of rejection_sample. What it adds is that the token at
    a sequence position is a function of the key, the position and p there only: a request emits the
    same tokens whatever its draft lengths were, so a seeded request reproduces under any schedule,
    adaptive draft lengths included. Not for dense draft probabilities (there P(accept) would be
    sum p q, below sum min(p, q)). Shapes are small: only the rows of the requests asked for."""
    dev = logits.device
    B, K = len(num_draft_tokens), max_spec_len
    V = logits.shape[-1]
    if K == 0:  # bonus rows only (a plain step's seeded rows): the same draw, without the draft grids
        t = temperature.to(dev).float().clamp_min(GREEDY_TEMPERATURE_EPS)
        tok = _inverse_cdf(logits, t, _counter_uniforms(keys.to(dev).long(), first_positions.to(dev).long()), V)
        return RejectionOutput(tok.view(B, 1).to(out_dtype), torch.zeros(B, dtype=torch.int32, device=dev))
    rows_per_req = torch.tensor([n + 1 for n in num_draft_tokens], device=dev)
    req = torch.repeat_interleave(torch.arange(B, device=dev), rows_per_req, output_size=logits.shape[0])
    start = torch.cumsum(rows_per_req, 0) - rows_per_req
    j = torch.arange(logits.shape[0], device=dev) - start[req]  # [N + B] row inside the request
    t = temperature.to(dev).float().clamp_min(GREEDY_TEMPERATURE_EPS)[req]
    u = _counter_uniforms(keys.to(dev).long()[req], first_positions.to(dev).long()[req] + j)  # [N + B]
    tok = _inverse_cdf(logits, t, u, V)  # [N + B]
    tok_grid = torch.full((B, K + 1), PLACEHOLDER_TOKEN_ID, dtype=torch.long, device=dev)
    tok_grid[req, j] = tok
    draft_grid = torch.full((B, K + 1), -2, dtype=torch.long, device=dev)  # -2 never equals a token
    is_draft = j < (rows_per_req - 1)[req]
    draft_grid[req[is_draft], j[is_draft]] = draft_token_ids.to(dev).long()
    num_acc = (tok_grid == draft_grid)[:, :K].int().cumprod(dim=1).sum(dim=1)  # [B]
    keep = torch.arange(K + 1, device=dev)[None, :] <= num_acc[:, None]
    out = torch.where(keep, tok_grid, PLACEHOLDER_TOKEN_ID).to(out_dtype)
    return RejectionOutput(out, num_acc.to(torch.int32))


def _inverse_cdf(logits: torch.Tensor, t: torch.Tensor, u: torch.Tensor, V: int) -> torch.Tensor:
    """Each row's token at its uniform u [R] (fp64) in softmax(logits / t) [R, V]: a row's token depends on
    that row alone."""
    # fp32 probabilities (as vLLM samples), accumulated in fp64 so the tail of a 262144-wide sum keeps its mass
    cdf = torch.cumsum(torch.softmax(logits.float() / t[:, None], dim=-1), dim=-1, dtype=torch.float64)
    # the first token whose cumulative mass passes u (a zero-probability token never does); u * total can
    # round up to the total, so the index is clamped and moved back to the last token with mass
    at = (u * cdf[:, -1]).unsqueeze(1)
    tok = torch.searchsorted(cdf, at, right=True).clamp_max(V - 1)
    return torch.searchsorted(cdf, cdf.gather(1, tok), right=False).squeeze(1)


def _greedy_ref(draft_token_ids, cu_num_draft_tokens, target_logits, bonus_token_ids, B: int, K: int, out_dtype):
    """Every request greedy: the same rules as the general reference on a [B, K] grid. A ragged batch
    (fewer than K drafts for some requests, 0 included) is scattered into the grid; data-independent
    shapes throughout, so no host sync and no loop over requests."""
    dev = target_logits.device
    N, V = target_logits.shape
    bonus = bonus_token_ids.reshape(-1).to(dev).long()
    out = torch.full((B, K + 1), PLACEHOLDER_TOKEN_ID, dtype=out_dtype, device=dev)
    if K == 0 or B == 0:
        out[:, 0] = bonus.to(out_dtype)
        return RejectionOutput(out, torch.zeros(B, dtype=torch.int32, device=dev))
    d = draft_token_ids.to(dev).long()
    argmax = target_logits.argmax(dim=-1)  # [N]; first maximum = smallest id on ties
    if N == B * K:  # full drafts: plain views
        counts = None
        dm, am = d.view(B, K), argmax.view(B, K)
    else:
        cu = cu_num_draft_tokens.to(device=dev, dtype=torch.long)
        counts = torch.diff(cu, prepend=cu.new_zeros(1))  # [B]
        req = torch.repeat_interleave(torch.arange(B, device=dev), counts, output_size=N)  # [N]
        pos = torch.arange(N, device=dev) - (cu - counts)[req]
        dm = torch.full((B, K), PLACEHOLDER_TOKEN_ID, dtype=torch.long, device=dev)
        am = torch.full((B, K), -2, dtype=torch.long, device=dev)  # never equal to a draft: slot unused
        dm[req, pos] = d
        am[req, pos] = argmax
    num_acc = ((dm == am) & (dm >= 0) & (dm < V)).int().cumprod(dim=1).sum(dim=1)  # [B]
    keep = torch.arange(K, device=dev)[None, :] < num_acc[:, None]
    out[:, :K] = torch.where(keep, dm, PLACEHOLDER_TOKEN_ID).to(out_dtype)
    stop = am.gather(1, num_acc.clamp(max=K - 1).long()[:, None])[:, 0]  # target's token at the stop
    full = num_acc == K if counts is None else num_acc == counts
    last = torch.where(full, bonus, stop)
    out.scatter_(1, num_acc.long()[:, None], last.to(out_dtype)[:, None])
    return RejectionOutput(out, num_acc.to(torch.int32))


# --------------------------------------------------------------------------- Triton


def _rejection_rows_kernel(
    logits_ptr,  # [N, V]
    draft_ptr,  # [N] int
    cu_ptr,  # [B] int
    temp_ptr,  # [B] fp32
    unif_ptr,  # [N] fp32/fp64
    dprobs_ptr,  # [N, V], or any pointer when HAS_DRAFT_PROBS is False
    seeds_ptr,  # [B] int64
    rates_ptr,  # [K] fp32 synthetic acceptance rates, or any pointer when SYNTHETIC is False
    accepted_ptr,  # [N] int8 out
    recovered_ptr,  # [N] int32 out
    N,
    V,
    B,
    stride_l,
    stride_dp,
    offset_lo,
    offset_hi,
    eps,
    HAS_DRAFT_PROBS: tl.constexpr,
    SYNTHETIC: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BISECT_STEPS: tl.constexpr,  # 0: linear sweep over cu
):
    # One program decides ROWS draft positions. Pass 1 streams the logits once: online
    # softmax (for p(d)) plus a per-lane running argmax (for greedy rows). Pass 2 re-reads
    # them only if some row here is a rejected random row, to race for the recovered token;
    # noise is thus generated only where it is used.
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)  # [R]
    rmask = rows < N

    # Request of each row = number of requests whose cumulative draft count is <= row.
    if BISECT_STEPS > 0:
        # Many rows per program: a binary search costs O(ROWS log B), not O(ROWS * B).
        lo = tl.zeros((ROWS,), dtype=tl.int32)
        hi = tl.zeros((ROWS,), dtype=tl.int32) + B
        for _ in tl.static_range(BISECT_STEPS):
            mid = (lo + hi) // 2
            active = lo < hi
            c = tl.load(cu_ptr + mid, mask=active & rmask, other=0).to(tl.int32)
            right = c <= rows
            lo = tl.where(active & right, mid + 1, lo)
            hi = tl.where(active & (right == 0), mid, hi)
        req = lo
    else:
        # One row per program (GPU): one coalesced sweep beats log B dependent loads.
        req = tl.zeros((ROWS,), dtype=tl.int32)
        for b0 in range(0, B, BLOCK_B):
            bo = b0 + tl.arange(0, BLOCK_B)
            cu = tl.load(cu_ptr + bo, mask=bo < B, other=2147483647).to(tl.int32)  # [BB]
            req += tl.sum((cu[None, :] <= rows[:, None]).to(tl.int32), axis=1)
    req = tl.minimum(req, B - 1)
    start = tl.load(cu_ptr + req - 1, mask=rmask & (req > 0), other=0).to(tl.int32)  # [R]
    pos = rows - start  # [R] position inside the request

    temp = tl.load(temp_ptr + req, mask=rmask, other=1.0).to(tl.float32)  # [R]
    greedy = temp < eps
    inv_t = 1.0 / tl.where(greedy, 1.0, temp)  # [R]; a multiply per element, not a divide
    d = tl.load(draft_ptr + rows, mask=rmask, other=0).to(tl.int32)  # [R]
    u = tl.load(unif_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    row_l = logits_ptr + rows.to(tl.int64) * stride_l  # [R]

    lanes = tl.arange(0, BLOCK_V)
    m = tl.full((ROWS,), -3.0e38, dtype=tl.float32)  # finite: an all -inf tile must not give nan
    s = tl.zeros((ROWS,), dtype=tl.float32)
    best = tl.full((ROWS, BLOCK_V), float("-inf"), dtype=tl.float32)
    best_i = tl.zeros((ROWS, BLOCK_V), dtype=tl.int32)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + lanes
        msk = rmask[:, None] & (offs < V)[None, :]
        x = tl.load(row_l[:, None] + offs[None, :], mask=msk, other=float("-inf")).to(tl.float32)  # [R, BV]
        # Strict '>' keeps each lane's earliest maximum; the final reduction takes the
        # smallest index among lanes holding the max -> ties go to the smallest token id.
        up = x > best
        best = tl.where(up, x, best)
        best_i = tl.where(up, offs[None, :], best_i)
        xs = x * inv_t[:, None]
        m_new = tl.maximum(m, tl.max(xs, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(xs - m_new[:, None]), axis=1)
        m = m_new
    bmax = tl.max(best, axis=1)
    argmax = tl.min(tl.where(best == bmax[:, None], best_i, 2147483647), axis=1)  # [R]

    # An id outside [0, V) (a -1 placeholder) is never read and never accepted.
    valid = (d >= 0) & (d < V)
    dmask = rmask & valid
    x_d = tl.load(row_l + d, mask=dmask, other=0.0).to(tl.float32) * inv_t
    p_t = tl.exp(x_d - m) / s
    if HAS_DRAFT_PROBS:
        p_d = tl.load(dprobs_ptr + rows.to(tl.int64) * stride_dp + d, mask=dmask, other=1.0).to(tl.float32)
    else:
        p_d = tl.full((ROWS,), 1.0, dtype=tl.float32)
    ok = (p_d > 0) & (p_t > 0) & (p_t / tl.where(p_d > 0, p_d, 1.0) >= u)
    accepted = valid & tl.where(greedy, d == argmax, ok)
    if SYNTHETIC:
        rate = tl.load(rates_ptr + pos, mask=rmask, other=0.0).to(tl.float32)
        accepted = valid & (u < rate)
    recovered = argmax

    need = rmask & (greedy == 0) & (accepted == 0)
    if tl.max(need.to(tl.int32), axis=0) > 0:
        seed = tl.load(seeds_ptr + req, mask=rmask, other=0).to(tl.int64)  # [R]
        Q: tl.constexpr = BLOCK_V // 4
        seed_q = tl.broadcast_to(seed[:, None], (ROWS, Q))
        c1 = tl.broadcast_to(pos[:, None], (ROWS, Q)).to(tl.uint32)
        # offset_* may arrive as i32, i64 or a specialised constant: widen, then truncate.
        c2 = (tl.zeros((ROWS, Q), dtype=tl.int64) + offset_lo).to(tl.uint32)
        c3 = (tl.zeros((ROWS, Q), dtype=tl.int64) + offset_hi).to(tl.uint32)
        best_a = tl.full((ROWS, BLOCK_V), float("-inf"), dtype=tl.float32)
        idx_a = tl.zeros((ROWS, BLOCK_V), dtype=tl.int32)
        best_b = tl.full((ROWS, BLOCK_V), float("-inf"), dtype=tl.float32)
        idx_b = tl.zeros((ROWS, BLOCK_V), dtype=tl.int32)
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + lanes
            vmask = (offs < V)[None, :]
            msk = need[:, None] & vmask
            x = tl.load(row_l[:, None] + offs[None, :], mask=msk, other=float("-inf")).to(tl.float32)
            xs = x * inv_t[:, None]
            # One Philox call yields 4 words: vocab index v uses word v % 4 of counter v // 4,
            # so the noise of (seed, position, offset, v) does not depend on the tiling.
            c0 = tl.broadcast_to((v0 // 4 + tl.arange(0, Q))[None, :], (ROWS, Q)).to(tl.uint32)
            r0, r1, r2, r3 = tl.philox(seed_q, c0, c1, c2, c3)
            r = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), (ROWS, BLOCK_V))
            unif = ((r >> 8).to(tl.float32) + 0.5) * 5.9604644775390625e-08  # in (0, 1), 24 bits
            gumbel = -tl.log(-tl.log(unif))
            # Gumbel race: argmax_v log w_v + G_v samples v with probability w_v / sum(w).
            key_b = tl.where(vmask, xs + gumbel, float("-inf"))  # over p itself
            if HAS_DRAFT_PROBS:
                q = tl.load(dprobs_ptr + rows.to(tl.int64)[:, None] * stride_dp + offs[None, :], mask=msk, other=0.0).to(tl.float32)
                resid = tl.exp(xs - m[:, None]) / s[:, None] - q
                key_a = tl.where(resid > 0, tl.log(resid) + gumbel, float("-inf"))
                key_a = tl.where(vmask, key_a, float("-inf"))
                # The fallback race over p, for a residual that rounds to all zeros.
                up_b = key_b > best_b
                best_b = tl.where(up_b, key_b, best_b)
                idx_b = tl.where(up_b, offs[None, :], idx_b)
            else:
                # Point-mass draft: the residual is p without d; softmax's normaliser is a
                # constant shift of every key, so the raw scaled logits race directly. It
                # cannot be empty: p(d) == 1 makes the acceptance test always pass.
                # An invalid d matches no offset, so the race is over p itself.
                key_a = tl.where(offs[None, :] == d[:, None], float("-inf"), key_b)
            up_a = key_a > best_a
            best_a = tl.where(up_a, key_a, best_a)
            idx_a = tl.where(up_a, offs[None, :], idx_a)
        max_a = tl.max(best_a, axis=1)
        rec = tl.min(tl.where(best_a == max_a[:, None], idx_a, 2147483647), axis=1)
        if HAS_DRAFT_PROBS:
            max_b = tl.max(best_b, axis=1)
            arg_b = tl.min(tl.where(best_b == max_b[:, None], idx_b, 2147483647), axis=1)
            # An empty residual, or an invalid draft (no q to subtract): the race over p.
            rec = tl.where((max_a > float("-inf")) & valid, rec, arg_b)
        recovered = tl.where(need, rec, recovered)

    tl.store(accepted_ptr + rows, accepted.to(tl.int8), mask=rmask)
    tl.store(recovered_ptr + rows, recovered, mask=rmask)


def _rejection_finalize_kernel(
    draft_ptr,  # [N] int
    cu_ptr,  # [B] int
    bonus_ptr,  # [B] int
    accepted_ptr,  # [N] int8
    recovered_ptr,  # [N] int32
    out_ptr,  # [B, K+1]
    num_acc_ptr,  # [B] int32
    B,
    K1,  # max_spec_len + 1
    stride_o,
    RB: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    b = tl.program_id(0) * RB + tl.arange(0, RB)  # [RB]
    bmask = b < B
    end = tl.load(cu_ptr + b, mask=bmask, other=0).to(tl.int32)
    start = tl.load(cu_ptr + b - 1, mask=bmask & (b > 0), other=0).to(tl.int32)
    n = end - start  # [RB]
    j = tl.arange(0, BLOCK_K)[None, :]  # [1, BK]
    jm = bmask[:, None] & (j < n[:, None])
    idx = start[:, None] + j
    acc = tl.load(accepted_ptr + idx, mask=jm, other=0)
    num_acc = tl.min(tl.where(jm & (acc == 0), j, n[:, None]), axis=1)  # [RB]: first rejection, else n
    drafts = tl.load(draft_ptr + idx, mask=jm, other=0).to(tl.int64)
    rec = tl.load(recovered_ptr + idx, mask=jm, other=0).to(tl.int64)
    rec_at = tl.sum(tl.where(j == num_acc[:, None], rec, 0), axis=1)
    bonus = tl.load(bonus_ptr + b, mask=bmask, other=0).to(tl.int64)
    last = tl.where(num_acc < n, rec_at, bonus)
    val = tl.where(j < num_acc[:, None], drafts, tl.where(j == num_acc[:, None], last[:, None], -1))
    tl.store(out_ptr + b[:, None].to(tl.int64) * stride_o + j, val.to(out_ptr.dtype.element_ty), mask=bmask[:, None] & (j < K1))
    tl.store(num_acc_ptr + b, num_acc, mask=bmask)


# Plain functions until _load() swaps in their triton.jit versions.
_JIT_NAMES = ("_rejection_rows_kernel", "_rejection_finalize_kernel")


@functools.lru_cache(maxsize=None)
def _load():
    return jit_lazily(globals(), _JIT_NAMES)


def _pick_config(N: int, V: int, on_cuda: bool):
    if not on_cuda:
        # Interpreter: per-op Python overhead dominates, so give each program lots of rows.
        block_v = min(next_pow2(max(V, 4)), 1024)
        rows = max(1, min(next_pow2(max(N, 1)), 32768 // block_v, 4096))
        return rows, block_v, 4
    if V >= 8192:
        return 1, 2048, 8
    block_v = max(next_pow2(V), 4)
    return max(1, min(4096 // block_v, next_pow2(max(N, 1)))), block_v, 4


def rejection_sample_triton(
    draft_token_ids: torch.Tensor,
    cu_num_draft_tokens: torch.Tensor,
    target_logits: torch.Tensor,
    bonus_token_ids: torch.Tensor,
    temperature: torch.Tensor,
    uniforms: torch.Tensor,
    draft_probs: torch.Tensor | None,
    seeds: torch.Tensor,
    offset: int,
    max_spec_len: int,
    *,
    out_dtype: torch.dtype = torch.int32,
    synthetic_rates: torch.Tensor | None = None,
    all_greedy: bool | None = None,  # unused: the kernel decides per row without a host look-up
    rows_per_program: int | None = None,
    block_v: int | None = None,
    num_warps: int | None = None,
    bisect: bool | None = None,
) -> RejectionOutput:
    _load()
    N, V, B = _check_inputs(draft_token_ids, cu_num_draft_tokens, target_logits, bonus_token_ids, temperature, uniforms, draft_probs, seeds)
    dev = target_logits.device
    out = torch.empty((B, max_spec_len + 1), dtype=out_dtype, device=dev)
    num_acc = torch.empty((B,), dtype=torch.int32, device=dev)
    if B == 0:
        return RejectionOutput(out, num_acc)
    if target_logits.stride(1) != 1:
        target_logits = target_logits.contiguous()
    if draft_probs is not None and draft_probs.stride(1) != 1:
        draft_probs = draft_probs.contiguous()
    rows, bv, warps = _pick_config(N, V, target_logits.is_cuda)
    rows = rows_per_program or rows
    bv = block_v or bv
    warps = num_warps or warps
    assert bv >= 4 and bv & (bv - 1) == 0 and rows & (rows - 1) == 0
    accepted = torch.empty((max(N, 1),), dtype=torch.int8, device=dev)
    recovered = torch.empty((max(N, 1),), dtype=torch.int32, device=dev)
    if N > 0:
        dp = draft_probs if draft_probs is not None else target_logits
        rates = synthetic_rates.float().contiguous() if synthetic_rates is not None else temperature
        offset = int(offset)
        _rejection_rows_kernel[(triton.cdiv(N, rows),)](
            target_logits, draft_token_ids, cu_num_draft_tokens, temperature, uniforms, dp, seeds, rates,
            accepted, recovered,
            N, V, B, target_logits.stride(0), dp.stride(0),
            offset & 0xFFFFFFFF, (offset >> 32) & 0xFFFFFFFF, GREEDY_TEMPERATURE_EPS,
            HAS_DRAFT_PROBS=draft_probs is not None, SYNTHETIC=synthetic_rates is not None, ROWS=rows, BLOCK_V=bv,
            BLOCK_B=min(next_pow2(B), 1024),
            BISECT_STEPS=int(B).bit_length() if (rows > 1 if bisect is None else bisect) else 0,
            num_warps=warps,
        )
    rb = min(next_pow2(B), 64 if target_logits.is_cuda else 4096)
    _rejection_finalize_kernel[(triton.cdiv(B, rb),)](
        draft_token_ids, cu_num_draft_tokens, bonus_token_ids.reshape(-1), accepted, recovered, out, num_acc,
        B, max_spec_len + 1, out.stride(0),
        RB=rb, BLOCK_K=next_pow2(max_spec_len + 1),
    )
    return RejectionOutput(out, num_acc)


def rejection_sample(
    draft_token_ids: torch.Tensor,  # [N] int
    cu_num_draft_tokens: torch.Tensor,  # [B] int, cumulative
    target_logits: torch.Tensor,  # [N, V] raw logits
    bonus_token_ids: torch.Tensor,  # [B] int
    temperature: torch.Tensor,  # [B] fp32
    uniforms: torch.Tensor,  # [N] in [0, 1)
    draft_probs: torch.Tensor | None,  # [N, V] or None
    seeds: torch.Tensor,  # [B] int64
    offset: int,
    max_spec_len: int,
    impl: str = "auto",
    *,
    out_dtype: torch.dtype = torch.int32,
    synthetic_rates: torch.Tensor | None = None,  # [>= max_spec_len] fp32, vLLM's synthetic mode
    all_greedy: bool | None = None,  # host-side hint: lets the reference skip a device look-up
    **triton_kwargs,
) -> RejectionOutput:
    """Rejection-sample a batch of drafts; see the module docstring for the rules."""
    args = (draft_token_ids, cu_num_draft_tokens, target_logits, bonus_token_ids, temperature, uniforms, draft_probs, seeds, offset, max_spec_len)
    kw = dict(out_dtype=out_dtype, synthetic_rates=synthetic_rates, all_greedy=all_greedy)
    if use_triton(target_logits, impl):
        return rejection_sample_triton(*args, **kw, **triton_kwargs)
    return rejection_sample_ref(*args, **kw)
