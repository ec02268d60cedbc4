"""Rejection sampler: Triton kernel (CPU interpreter) against the torch reference.

Exact checks: greedy requests, acceptance counts (same uniforms), accepted prefixes, bonus
tokens, placeholders. Random recovered tokens differ by design (different noise), so they
are checked for support, and their distribution by the frequency tests:

* reference path: 1e5 trials per drafting mode; Triton path: 1e5 trials per mode too
  (one request per trial, one batch, one draft each, V = 6).
* pass: chi-square p-value > 1e-3 against the target distribution, and total variation
  below a 5-sigma-per-cell bound (~0.011 at n = 1e5).
* power: the same test on a deliberately wrong rule (recovered token drawn from p_target
  instead of the residual) must give p < 1e-12; it does by a wide margin (TV ~ 0.06).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton decorates anything

import sys
import zlib

import pytest
import torch
import triton  # noqa: F401  -- a test dependency: missing triton must fail, not skip

sys.path.insert(0, os.path.dirname(__file__))
import kernel_utils as ku  # noqa: E402

import vllm_gemma_mtp.kernels.rejection as rj  # noqa: E402
from vllm_gemma_mtp.kernels.rejection import (  # noqa: E402
    GREEDY_TEMPERATURE_EPS,
    rejection_sample,
    rejection_sample_ref,
)

# The interpreter evaluates both sides of tl.where with numpy, so masked-off lanes
# (exp of huge numbers, log of 0) raise numpy RuntimeWarnings that mean nothing.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _batch(gen, counts, V, kind, temps, with_draft_probs, logits_dtype=torch.float32):
    counts = torch.tensor(counts, dtype=torch.long)
    B = counts.numel()
    cu = counts.cumsum(0)
    N = int(cu[-1]) if B else 0
    logits = ku.logits_like(kind, N, V, gen)
    argmax = logits.argmax(-1)
    draft_probs = torch.softmax(torch.randn(N, V, generator=gen), -1) if with_draft_probs else None
    # Mostly drafts the target likes, so that runs of acceptances actually happen.
    draft = torch.where(torch.rand(N, generator=gen) < 0.7, argmax, torch.randint(0, V, (N,), generator=gen))
    return dict(
        draft_token_ids=draft,
        cu_num_draft_tokens=cu,
        target_logits=logits.to(logits_dtype),
        bonus_token_ids=torch.randint(0, V, (B,), generator=gen),
        temperature=torch.tensor(temps, dtype=torch.float32),
        uniforms=torch.rand(N, generator=gen),
        draft_probs=draft_probs,
        seeds=torch.randint(0, 2**62, (B,), generator=gen),
        offset=int(torch.randint(0, 2**40, (1,), generator=gen)),
        max_spec_len=int(counts.max()) if B else 1,
    )


def _check_against_ref(tri, ref, inp):
    """Exact where the rules are deterministic; support check for random recovered tokens."""
    out_t, acc_t = tri
    out_r, acc_r = ref
    assert out_t.dtype == out_r.dtype and out_t.shape == out_r.shape
    assert torch.equal(acc_t, acc_r), (acc_t, acc_r)
    cu = inp["cu_num_draft_tokens"]
    counts = torch.diff(cu, prepend=cu.new_zeros(1))
    start = cu - counts
    greedy = inp["temperature"] < GREEDY_TEMPERATURE_EPS
    logits = inp["target_logits"].double()
    for b in range(counts.numel()):
        na, n = int(acc_r[b]), int(counts[b])
        if greedy[b] or na == n:
            assert torch.equal(out_t[b], out_r[b]), (b, out_t[b], out_r[b])
            continue
        # Random request rejected at position na: everything but that slot is exact.
        mask = torch.ones_like(out_t[b], dtype=torch.bool)
        mask[na] = False
        assert torch.equal(out_t[b][mask], out_r[b][mask])
        row = int(start[b]) + na
        p = torch.softmax(logits[row] / float(inp["temperature"][b]), -1)
        if inp["draft_probs"] is None:
            resid = p.clone()
            resid[inp["draft_token_ids"][row]] = 0
        else:
            resid = (p - inp["draft_probs"][row].double()).clamp_min(0)
        if resid.max() <= 1e-6:  # residual empty up to rounding: the fallback samples p
            resid = p
        v = int(out_t[b, na])
        assert resid[v] > 0, f"recovered token {v} outside the residual support"


def _run_both(inp, out_dtype=torch.int32, **triton_kw):
    tri = rejection_sample(**inp, impl="triton", out_dtype=out_dtype, **triton_kw)
    ref = rejection_sample(**inp, impl="torch", out_dtype=out_dtype)
    return tri, ref


def test_interpreter_is_active():
    rj._load()
    from triton.runtime.interpreter import InterpretedFunction

    assert isinstance(rj._rejection_rows_kernel, InterpretedFunction)


def test_impl_dispatch():
    inp = _batch(torch.Generator().manual_seed(1), [2], 5, "normal", [0.0], False)
    with pytest.raises(ValueError):
        rejection_sample(**inp, impl="cuda")
    # "auto" on CPU tensors is the reference path.
    a = rejection_sample(**inp, impl="auto")
    b = rejection_sample_ref(**inp)
    assert torch.equal(a.output_token_ids, b.output_token_ids)


# Grid: batch x vocab x draft length x logit shape x temperature x draft distribution.
BATCH_COUNTS = {1: [3], 5: [0, 2, 4, 1, 3]}  # per-request draft counts, incl. 0


@pytest.mark.parametrize("draft_probs", [False, True], ids=["pointmass", "denseq"])
@pytest.mark.parametrize("temp", ["greedy", "t0.7", "mixed"])
@pytest.mark.parametrize("kind", ["normal", "peaked", "flat"])
@pytest.mark.parametrize("max_k", [1, 4])
@pytest.mark.parametrize("vocab", [37, 300])
@pytest.mark.parametrize("batch", [1, 5])
def test_grid_against_reference(batch, vocab, max_k, kind, temp, draft_probs):
    seed = zlib.crc32(repr((batch, vocab, max_k, kind, temp, draft_probs)).encode())
    gen = torch.Generator().manual_seed(seed)
    counts = [min(c, max_k) for c in BATCH_COUNTS[batch]]
    temps = {"greedy": [0.0] * batch, "t0.7": [0.7] * batch, "mixed": [0.0, 1.3, 0.0, 0.5, 1.0][:batch]}[temp]
    if temp == "mixed" and batch == 1:
        temps = [1.3]
    inp = _batch(gen, counts, vocab, kind, temps, draft_probs)
    tri, ref = _run_both(inp, block_v=64)  # vocab 300 = 4 full tiles + a 44-token tail
    _check_against_ref(tri, ref, inp)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits(dtype):
    gen = torch.Generator().manual_seed(3)
    inp = _batch(gen, [4, 2, 3], 130, "normal", [0.0, 0.9, 0.0], True, logits_dtype=dtype)
    # Also the other accepted index / uniform dtypes: int32 ids and counts, fp64 uniforms.
    inp["draft_token_ids"] = inp["draft_token_ids"].int()
    inp["cu_num_draft_tokens"] = inp["cu_num_draft_tokens"].int()
    inp["uniforms"] = inp["uniforms"].double()
    inp["draft_probs"] = inp["draft_probs"].to(dtype)
    tri, ref = _run_both(inp, block_v=64)
    _check_against_ref(tri, ref, inp)


def test_gpu_launch_config_on_cpu():
    # One row per program and the linear request sweep: the layout used on a GPU.
    gen = torch.Generator().manual_seed(4)
    inp = _batch(gen, [3, 0, 2, 4], 257, "normal", [0.0, 0.8, 1.1, 0.0], True)
    tri, ref = _run_both(inp, rows_per_program=1, block_v=128, bisect=False)
    _check_against_ref(tri, ref, inp)


# ------------------------------------------------------------------------------ edge cases


def test_all_accepted_appends_bonus():
    gen = torch.Generator().manual_seed(5)
    inp = _batch(gen, [3, 2], 50, "normal", [0.0, 1.0], False)
    inp["draft_token_ids"] = inp["target_logits"].argmax(-1)
    inp["uniforms"] = torch.zeros_like(inp["uniforms"])  # p(d) > 0 = u: always accepted
    for impl in ("triton", "torch"):
        out, acc = rejection_sample(**inp, impl=impl)
        assert acc.tolist() == [3, 2]
        assert out[0].tolist() == inp["draft_token_ids"][:3].tolist() + [int(inp["bonus_token_ids"][0])]
        assert out[1].tolist() == inp["draft_token_ids"][3:5].tolist() + [int(inp["bonus_token_ids"][1]), -1]


def test_none_accepted():
    gen = torch.Generator().manual_seed(6)
    inp = _batch(gen, [3, 2], 50, "normal", [0.0, 0.0], False)
    am = inp["target_logits"].argmax(-1)
    inp["draft_token_ids"] = (am + 1) % 50
    out, acc = rejection_sample(**inp, impl="triton")
    assert acc.tolist() == [0, 0]
    assert out[0].tolist() == [int(am[0]), -1, -1, -1]
    assert out[1].tolist() == [int(am[3]), -1, -1, -1]


def test_zero_probability_draft_is_never_accepted():
    gen = torch.Generator().manual_seed(7)
    inp = _batch(gen, [1] * 64, 40, "normal", [1.0] * 64, False)
    inp["target_logits"][:, 5] = float("-inf")
    inp["draft_token_ids"][:] = 5
    inp["uniforms"][:] = 0.0  # the one case where p / q >= u alone would accept
    for impl in ("triton", "torch"):
        out, acc = rejection_sample(**inp, impl=impl)
        assert acc.sum() == 0
        assert (out[:, 0] != 5).all() and (out[:, 0] >= 0).all()


def test_near_zero_temperature_is_greedy():
    gen = torch.Generator().manual_seed(8)
    inp = _batch(gen, [4, 3, 2], 90, "normal", [1e-6, 0.0, 0.5 * GREEDY_TEMPERATURE_EPS], True)
    greedy = dict(inp, temperature=torch.zeros(3))
    for impl in ("triton", "torch"):
        assert torch.equal(rejection_sample(**inp, impl=impl)[0], rejection_sample(**greedy, impl=impl)[0])


def test_single_token_tail_tile_and_ties():
    # V = 65 with 64-wide tiles: the last tile holds one token, and the argmax lives there.
    gen = torch.Generator().manual_seed(9)
    inp = _batch(gen, [2, 2, 1], 65, "normal", [0.0, 0.0, 0.0], False)
    lg = inp["target_logits"]
    lg[0, 64] = 100.0  # row 0: argmax in the tail tile
    lg[1, 3] = lg[1, 64] = 100.0  # row 1: tie between the first and the tail tile -> 3
    lg[2, 10] = lg[2, 11] = 100.0  # row 2: tie inside a tile -> 10
    lg[4, 64] = 50.0
    inp["draft_token_ids"] = torch.tensor([64, 64, 11, 0, 64])
    tri, ref = _run_both(inp, block_v=64)
    assert torch.equal(tri.output_token_ids, ref.output_token_ids)
    assert tri.output_token_ids[0].tolist() == [64, 3, -1]  # accept 64, reject the tie at 3
    assert tri.output_token_ids[1].tolist() == [10, -1, -1]
    assert tri.output_token_ids[2].tolist() == [64, int(inp["bonus_token_ids"][2]), -1]


def _walk_greedy(lg, d, counts, bonus, K):
    """Greedy rules one request and one draft at a time: the oracle for the grid path."""
    rows, start = [], 0
    for b, n in enumerate(counts):
        want = []
        for j in range(n):
            t = int(lg[start + j].argmax())
            want.append(t)
            if t != int(d[start + j]):
                break
        else:
            want.append(int(bonus[b]))
        rows.append(want + [-1] * (K + 1 - len(want)))
        start += n
    return rows


@pytest.mark.parametrize("counts,V", [([1], 7), ([4], 512), ([2, 2, 2], 65), ([4] * 16, 300),
                                      ([4, 0, 1, 3], 65), ([0, 0, 2], 40), ([3, 1] * 8, 300)],
                         ids=["b1k1", "b1k4", "b3k2", "b16k4", "ragged", "ragged-zeros", "ragged-b16"])
def test_greedy_grid_path(counts, V, monkeypatch):
    """All-greedy batches, full or ragged (0 drafts included), take the reference's grid path; it must give
    what walking the drafts one by one gives (and what the kernel gives), ties and all-accepted rows
    included, and it must not look at the temperatures on the host when the caller says all_greedy."""
    B, K = len(counts), max(counts)
    gen = torch.Generator().manual_seed(B * 1000 + K * 10 + V)
    inp = _batch(gen, counts, V, "peaked", [0.0] * B, False)
    first = counts.index(next(c for c in counts if c > 0))
    row0 = sum(counts[:first])
    inp["target_logits"][row0, :3] = inp["target_logits"][row0].max() + 1.0  # a three-way tie -> token 0
    inp["draft_token_ids"][row0] = 0
    calls = []
    grid = rj._greedy_ref
    monkeypatch.setattr(rj, "_greedy_ref", lambda *a: calls.append(1) or grid(*a))

    # A meta tensor cannot be read: the grid path must not look at the temperatures when told all_greedy.
    out, acc = rejection_sample_ref(**dict(inp, temperature=torch.empty(B, device="meta")), all_greedy=True)
    assert calls, "the all-greedy batch did not take the grid path"
    want = _walk_greedy(inp["target_logits"], inp["draft_token_ids"], counts, inp["bonus_token_ids"], K)
    assert out.tolist() == want
    assert acc.tolist() == [len([t for t in r if t != -1]) - 1 for r in want]
    tri = rejection_sample(**inp, impl="triton", block_v=64)
    assert torch.equal(tri.output_token_ids, out) and torch.equal(tri.num_accepted, acc)
    gen_out = rejection_sample_ref(**dict(inp, temperature=torch.full((B,), 0.5 * GREEDY_TEMPERATURE_EPS)),
                                   all_greedy=False)  # the general path on the same batch
    assert torch.equal(gen_out.output_token_ids, out)


# ---------------------------------------------------------------------- invalid (placeholder) drafts


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("draft_probs", [False, True], ids=["pointmass", "denseq"])
@pytest.mark.parametrize("temp", ["greedy", "random", "mixed"])
def test_placeholder_drafts_are_rejected(impl, draft_probs, temp):
    """Draft ids outside [0, V) (-1 placeholders, V, huge) are rejected at their position: never read,
    never emitted; the position gets the target's token and the rest is -1. Ragged batch."""
    V = 100
    gen = torch.Generator().manual_seed(zlib.crc32(repr((impl, draft_probs, temp)).encode()))
    counts = [3, 0, 1, 4, 2]
    temps = {"greedy": [0.0] * 5, "random": [1.0] * 5, "mixed": [0.0, 1.0, 0.7, 0.0, 1.2]}[temp]
    inp = _batch(gen, counts, V, "peaked", temps, draft_probs)
    lg = inp["target_logits"]
    am = lg.argmax(-1)
    # Request 0: [argmax, argmax, -1]; request 2: [-1]; request 3: [argmax, V, argmax, 2**31-1];
    # request 4: [-5, argmax]. Every valid draft is the argmax and u = 0, so only the bad ids reject.
    d = am.clone()
    d[2], d[3], d[5], d[7], d[8] = -1, -1, V, 2**31 - 1, -5
    inp["draft_token_ids"] = d
    inp["uniforms"] = torch.zeros_like(inp["uniforms"])
    inp["target_logits"] = lg.masked_fill(torch.arange(V)[None, :] != am[:, None], -1e4)  # peaked: p(argmax)~1
    out, acc = rejection_sample(**inp, impl=impl, **({"block_v": 64} if impl == "triton" else {}))
    assert acc.tolist() == [2, 0, 0, 1, 0]
    stop_rows = {0: 2, 2: 3, 3: 5, 4: 8}
    for b, row in stop_rows.items():
        n = int(acc[b])
        assert out[b, :n].tolist() == am[row - n:row].tolist()
        assert int(out[b, n]) == int(am[row]), (b, out[b])  # the target's token (p is a point mass there)
        assert (out[b, n + 1:] == -1).all()
    assert out[1].tolist() == [int(inp["bonus_token_ids"][1])] + [-1] * 4
    assert ((out >= -1) & (out < V)).all()


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_placeholder_draft_random_recovered_is_a_sample_of_p(impl):
    """A random request whose draft is invalid emits a sample of p itself (no draft token is excluded):
    frequency test against p on V = 6."""
    n, V = 20_000, _P_LOGITS.numel()
    inp = _frequency_batch(n, True, seed=31)
    inp["draft_token_ids"] = torch.full((n,), -1, dtype=torch.long)
    out, acc = rejection_sample(**inp, impl=impl)
    assert acc.sum() == 0
    p = torch.softmax(_P_LOGITS / _TEMP, -1)
    counts = torch.bincount(out[:, 0].long(), minlength=V)
    assert ku.chi_square_pvalue(counts, p) > 1e-3, counts


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("temp", ["greedy", "mixed"])
def test_synthetic_rates(impl, temp):
    """vLLM's synthetic mode: acceptance is u < rate[position], whatever the target says; a rejected
    greedy position emits the argmax; invalid drafts are still rejected."""
    gen = torch.Generator().manual_seed(41)
    counts = [3, 2, 0, 3]
    temps = [0.0] * 4 if temp == "greedy" else [0.0, 1.0, 0.5, 0.0]
    inp = _batch(gen, counts, 50, "normal", temps, False)
    inp["draft_token_ids"] = (inp["target_logits"].argmax(-1) + 1) % 50  # never the target's choice
    inp["draft_token_ids"][6] = -1  # request 3, position 1
    rates = torch.tensor([1.0, 1.0, 0.0])
    inp["uniforms"] = torch.full_like(inp["uniforms"], 0.5)
    out, acc = rejection_sample(**inp, impl=impl, synthetic_rates=rates,
                                **({"block_v": 64} if impl == "triton" else {}))
    assert acc.tolist() == [2, 2, 0, 1]
    d, am = inp["draft_token_ids"], inp["target_logits"].argmax(-1)
    assert out[0, :2].tolist() == d[:2].tolist() and int(out[0, 2]) == int(am[2])
    assert out[1].tolist() == d[3:5].tolist() + [int(inp["bonus_token_ids"][1]), -1]
    assert int(out[3, 0]) == int(d[5]) and int(out[3, 1]) == int(am[6])


def test_requests_without_drafts():
    gen = torch.Generator().manual_seed(10)
    inp = _batch(gen, [0, 3, 0, 0], 20, "normal", [0.0, 1.0, 0.7, 0.0], True)
    tri, ref = _run_both(inp, out_dtype=torch.int64)
    _check_against_ref(tri, ref, inp)
    assert tri.output_token_ids.dtype == torch.int64
    for b in (0, 2, 3):
        assert tri.output_token_ids[b].tolist() == [int(inp["bonus_token_ids"][b]), -1, -1, -1]
    # A batch without a single draft token.
    empty = _batch(gen, [0, 0], 20, "normal", [0.0, 1.0], False)
    empty["max_spec_len"] = 2
    tri, ref = _run_both(empty)
    assert torch.equal(tri.output_token_ids, ref.output_token_ids)
    assert tri.output_token_ids[:, 0].tolist() == empty["bonus_token_ids"].tolist()


def test_seed_reproducibility():
    gen = torch.Generator().manual_seed(11)
    B = 400
    inp = _batch(gen, [1] * B, 50, "flat", [1.0] * B, False)
    inp["uniforms"][:] = 0.999  # nearly always rejected: the recovered token is random
    for impl in ("triton", "torch"):
        a = rejection_sample(**inp, impl=impl).output_token_ids
        b = rejection_sample(**inp, impl=impl).output_token_ids
        assert torch.equal(a, b)
        c = rejection_sample(**dict(inp, seeds=inp["seeds"] + 1), impl=impl).output_token_ids
        d = rejection_sample(**dict(inp, offset=inp["offset"] + 1), impl=impl).output_token_ids
        # Near-uniform over 49 tokens: a redraw repeats with probability ~1/49.
        assert (a[:, 0] != c[:, 0]).float().mean() > 0.85
        assert (a[:, 0] != d[:, 0]).float().mean() > 0.85
    # Philox counters depend on (vocab index, position, offset), not on the tiling.
    tiles = [rejection_sample(**inp, impl="triton", block_v=bv, rows_per_program=r).output_token_ids for bv, r in ((8, 32), (64, 128))]
    assert torch.equal(tiles[0], tiles[1])
    # A request's result depends on its own seed only, not on its batch neighbours.
    sub = {k: (v[:7] if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}
    sub["cu_num_draft_tokens"] = torch.arange(1, 8)
    full = rejection_sample(**inp, impl="triton").output_token_ids
    assert torch.equal(rejection_sample(**sub, impl="triton").output_token_ids, full[:7])


# ------------------------------------------------------------------------ frequency tests

_P_LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
_Q = torch.softmax(torch.tensor([0.0, 1.5, 0.5, 1.0, 0.0, -1.0]), -1)
_TEMP = 0.8


def _frequency_batch(n, with_draft_probs, seed):
    gen = torch.Generator().manual_seed(seed)
    V = _P_LOGITS.numel()
    # d ~ q. A point-mass draft is correct for any choice of d, but with d uniform the
    # wrong rule below would be correct too (by symmetry), and the power check moot.
    draft = torch.multinomial(_Q, n, replacement=True, generator=gen)
    dp = _Q.expand(n, V).contiguous() if with_draft_probs else None
    return dict(
        draft_token_ids=draft,
        cu_num_draft_tokens=torch.arange(1, n + 1),
        target_logits=_P_LOGITS.expand(n, V).contiguous(),
        bonus_token_ids=torch.zeros(n, dtype=torch.long),
        temperature=torch.full((n,), _TEMP),
        uniforms=torch.rand(n, generator=gen),
        draft_probs=dp,
        seeds=torch.randint(0, 2**62, (n,), generator=gen),
        offset=12345,
        max_spec_len=1,
    )


def _wrong_rule_first_tokens(out, acc, n, seed):
    """Same acceptances, but rejected slots redrawn from p_target instead of the residual."""
    gen = torch.Generator().manual_seed(seed + 1)
    p = torch.softmax(_P_LOGITS / _TEMP, -1)
    first = out[:, 0].long().clone()
    rej = acc == 0
    first[rej] = torch.multinomial(p, int(rej.sum()), replacement=True, generator=gen)
    return first


def _assert_frequencies(first, n):
    p = torch.softmax(_P_LOGITS / _TEMP, -1)
    counts = torch.bincount(first, minlength=p.numel())[: p.numel()]
    assert counts.sum() == n
    pval = ku.chi_square_pvalue(counts, p)
    tv = ku.total_variation(counts, p)
    assert pval > 1e-3, (pval, tv, counts)
    assert tv < ku.tv_bound(p, n), (tv, ku.tv_bound(p, n))
    return pval


def _assert_wrong_rule_fails(out, acc, n, seed):
    p = torch.softmax(_P_LOGITS / _TEMP, -1)
    counts = torch.bincount(_wrong_rule_first_tokens(out, acc, n, seed), minlength=p.numel())
    assert ku.chi_square_pvalue(counts, p) < 1e-12


@pytest.mark.parametrize("with_draft_probs", [True, False], ids=["denseq", "pointmass"])
def test_frequency_reference_1e5(with_draft_probs):
    n = 100_000
    inp = _frequency_batch(n, with_draft_probs, seed=21)
    out, acc = rejection_sample_ref(**inp)
    _assert_frequencies(out[:, 0].long(), n)
    _assert_wrong_rule_fails(out, acc, n, seed=21)


@pytest.mark.parametrize("with_draft_probs", [True, False], ids=["denseq", "pointmass"])
def test_frequency_triton_1e5(with_draft_probs):
    n = 100_000
    inp = _frequency_batch(n, with_draft_probs, seed=22)
    out, acc = rejection_sample(**inp, impl="triton")
    _assert_frequencies(out[:, 0].long(), n)
    _assert_wrong_rule_fails(out, acc, n, seed=22)
    # Acceptance decisions are the reference's on the very same uniforms.
    ref_out, ref_acc = rejection_sample_ref(**inp)
    assert torch.equal(acc, ref_acc)
    accepted = acc == 1
    assert torch.equal(out[accepted], ref_out[accepted])


# ---------------------------------------------------------------- compiled (sm_90) kernels


def test_kernels_compile_for_sm90():
    rows_sig = {
        "logits_ptr": "*bf16", "draft_ptr": "*i64", "cu_ptr": "*i32", "temp_ptr": "*fp32", "unif_ptr": "*fp32",
        "dprobs_ptr": "*fp32", "seeds_ptr": "*i64", "rates_ptr": "*fp32", "accepted_ptr": "*i8", "recovered_ptr": "*i32",
        "N": "i32", "V": "i32", "B": "i32", "stride_l": "i32", "stride_dp": "i32",
        "offset_lo": "i64", "offset_hi": "i32", "eps": "fp32",
    }
    fin_sig = {
        "draft_ptr": "*i64", "cu_ptr": "*i32", "bonus_ptr": "*i64", "accepted_ptr": "*i8", "recovered_ptr": "*i32",
        "out_ptr": "*i32", "num_acc_ptr": "*i32", "B": "i32", "K1": "i32", "stride_o": "i32",
    }
    mod = "vllm_gemma_mtp.kernels.rejection"
    jobs = [
        # The default large-vocabulary configuration, with and without draft probabilities.
        # Large-vocabulary configuration (one row per program, linear request sweep).
        dict(module=mod, kernel="_rejection_rows_kernel", signature=rows_sig, num_warps=8,
             constexprs={"HAS_DRAFT_PROBS": True, "SYNTHETIC": False, "ROWS": 1, "BLOCK_V": 2048, "BLOCK_B": 256, "BISECT_STEPS": 0}),
        # Small-vocabulary configuration: several rows per program and the bisection.
        dict(module=mod, kernel="_rejection_rows_kernel", signature=rows_sig, num_warps=4,
             constexprs={"HAS_DRAFT_PROBS": False, "SYNTHETIC": True, "ROWS": 4, "BLOCK_V": 1024, "BLOCK_B": 256, "BISECT_STEPS": 9}),
        dict(module=mod, kernel="_rejection_finalize_kernel", signature=fin_sig, constexprs={"RB": 64, "BLOCK_K": 8}),
    ]
    usage = ku.compile_for_gpu(jobs)
    assert all(u["local"] == 0 for u in usage), usage  # no register spills
