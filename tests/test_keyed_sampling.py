"""Keyed sampling of seeded requests (kernels.rejection.keyed_sample; sampler.py uses it for every request
with its own generator): the token at a sequence position depends on the key, the position and the
target's distribution there only, so a seeded request emits the same text under any draft-length
schedule - and the rule is still exact rejection sampling for point-mass drafts (frequency tests)."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import kernel_utils as ku  # noqa: E402

from vllm_gemma_mtp.kernels.rejection import keyed_sample  # noqa: E402

V = 7


def _position_logits(n_pos, gen):
    """A target whose distribution depends on the position only (the test's stand-in for a model)."""
    return torch.randn(n_pos, V, generator=gen) * 1.5


def _generate(table, key, schedule, draft_of, temperature=0.8):
    """Decode len(table) - 5 tokens of one request: each step drafts schedule(step) tokens (draft_of picks
    them), the keyed sampler verifies; returns the emitted tokens and (accepted, drafted) counts."""
    out, step, acc, drafted = [], 0, 0, 0
    n_out = table.shape[0] - 5
    while len(out) < n_out:
        pos = len(out)
        k = min(schedule(step), n_out - pos)
        drafts = torch.tensor([draft_of(pos + j) for j in range(k)], dtype=torch.long)
        res = keyed_sample(drafts, [k], table[pos:pos + k + 1], torch.tensor([temperature]),
                           torch.tensor([key]), torch.tensor([pos]), max(k, 1))
        row = res.output_token_ids[0]
        emitted = row[row >= 0].tolist()
        assert len(emitted) == int(res.num_accepted[0]) + 1
        assert emitted[:-1] == drafts[:len(emitted) - 1].tolist(), "accepted tokens are the drafts"
        out.extend(emitted)
        acc += int(res.num_accepted[0])
        drafted += k
        step += 1
    return out[:n_out], acc, drafted


def test_same_tokens_under_any_schedule():
    gen = torch.Generator().manual_seed(0)
    table = _position_logits(125, gen)
    key = 123456789
    plain, _, _ = _generate(table, key, lambda s: 0, lambda p: 0)
    rnd = torch.Generator().manual_seed(1)
    good = lambda p: plain[p] if p < len(plain) else 0  # noqa: E731  a drafter that is always right
    noisy = lambda p: plain[p] if (p * 7919) % 3 else (plain[p] + 1) % V  # noqa: E731  wrong every 3rd
    sched = [int(x) for x in torch.randint(0, 5, (200,), generator=rnd)]
    runs = {
        "K=4, always right": (lambda s: 4, good),
        "K=4 -> 0 -> 2 -> 4, wrong every 3rd": (lambda s: [4, 0, 2, 4][s % 4], noisy),
        "random K, random drafts": (lambda s: sched[s], lambda p: (p * 31 + 3) % V),
        "random K, wrong every 3rd": (lambda s: sched[s], noisy),
    }
    for name, (schedule, drafter) in runs.items():
        toks, acc, drafted = _generate(table, key, schedule, drafter)
        assert toks == plain, name
        assert drafted > 0, name
        if drafter is good:
            assert acc == drafted, name
    # a different key is a different sample (the test can fail)
    other, _, _ = _generate(table, key + 1, lambda s: 0, lambda p: 0)
    assert other != plain


def test_batch_rows_are_independent():
    """A request's tokens do not depend on which other requests share its call, or on their drafts."""
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(3 + 1 + 0 + 1 + 2 + 1, V, generator=gen)
    drafts = torch.randint(0, V, (5,), generator=gen)
    keys, pos = torch.tensor([11, 22, 33]), torch.tensor([5, 40, 7])
    t = torch.tensor([1.0, 0.7, 1.3])
    both = keyed_sample(drafts, [3, 0, 2], logits, t, keys, pos, 3).output_token_ids
    alone = keyed_sample(drafts[3:], [2], logits[5:], t[2:], keys[2:], pos[2:], 3).output_token_ids
    assert torch.equal(both[2], alone[0])
    alone0 = keyed_sample(drafts[:3], [3], logits[:4], t[:1], keys[:1], pos[:1], 4).output_token_ids
    assert torch.equal(both[0], alone0[0, :4])


def test_a_plain_step_draws_what_a_verify_step_draws():
    """A plain step's seeded rows (sampler.sample_plain: bonus rows only, max_spec_len 0, no draft grids) get
    the token a verify step gives the same request with 0 drafts beside requests that have drafts, so a
    seeded request's text does not depend on which kind of step it lands in."""
    gen = torch.Generator().manual_seed(3)
    R, W = 64, 4096
    bonus = torch.randn(R, W, generator=gen) * 3
    bonus[:, ::5] = float("-inf")
    keys = torch.randint(-2**62, 2**62, (R,), generator=gen)
    pos = torch.randint(0, 10000, (R,), generator=gen)
    t = torch.rand(R, generator=gen) + 0.3
    plain = keyed_sample(torch.tensor([], dtype=torch.long), [0] * R, bonus, t, keys, pos, 0)
    assert plain.output_token_ids.shape == (R, 1) and plain.num_accepted.eq(0).all()
    assert torch.isfinite(bonus.gather(1, plain.output_token_ids.long())).all(), "masked tokens are never drawn"
    for i in range(R):
        others = torch.randn(7, W, generator=gen)  # request 0: 2 drafts + bonus, request 2: 3 drafts + bonus
        logits = torch.cat([others[:3], bonus[i:i + 1], others[3:]])
        drafts = torch.randint(0, W, (5,), generator=gen)
        pick = lambda x, o: torch.stack([o, x[i], o])  # noqa: E731
        out = keyed_sample(drafts, [2, 0, 3], logits, pick(t, torch.tensor(1.0)), pick(keys, torch.tensor(5)),
                           pick(pos, torch.tensor(9)), 3).output_token_ids
        assert int(out[1, 0]) == int(plain.output_token_ids[i, 0]) and out[1, 1:].eq(-1).all(), i


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_exact_rejection_sampling_frequencies(temperature):
    """One draft d per trial, n trials with distinct keys: P(accept) = p(d), the token at a rejection is
    p without d normalised, and every emitted first token is p. Power: the residual test rejects p."""
    n = 60_000
    logits = torch.tensor([1.2, 0.9, 0.1, 0.0, -0.6, -1.1, 0.5])
    p = torch.softmax(logits / temperature, -1)
    d = 1
    B = 2000
    firsts, acc = [], 0
    for c in range(n // B):
        keys = torch.arange(c * B, (c + 1) * B, dtype=torch.int64) * 1_000_003 + 17
        res = keyed_sample(torch.full((B,), d), [1] * B, logits.repeat(2 * B, 1), torch.full((B,), temperature),
                           keys, torch.zeros(B, dtype=torch.int64), 1)
        firsts.append(res.output_token_ids[:, 0])
        acc += int(res.num_accepted.sum())
    first = torch.cat(firsts).long()
    rate = acc / n
    sigma = (p[d] * (1 - p[d]) / n) ** 0.5
    assert abs(rate - float(p[d])) < 5 * sigma, (rate, float(p[d]))
    assert ku.chi_square_pvalue(torch.bincount(first, minlength=V), p) > 1e-3
    rec = first[first != d]
    want = p.clone()
    want[d] = 0
    want /= want.sum()
    counts = torch.bincount(rec, minlength=V)
    assert counts[d] == 0
    assert ku.chi_square_pvalue(counts, want) > 1e-3
    # power: a rule whose first tokens were not p-distributed would be caught; here, p tilted
    tilted = torch.softmax(logits / temperature + torch.linspace(0, 0.15, V), -1)
    assert ku.chi_square_pvalue(torch.bincount(first, minlength=V), tilted) < 1e-6


def test_invalid_drafts_are_rejected_and_masked_tokens_never_emitted():
    logits = torch.zeros(6, V)
    logits[:, 3:] = float("-inf")  # only tokens 0..2 allowed
    drafts = torch.tensor([-1, 5, 2, 7, 1])  # -1 and out-of-range ids can never match
    res = keyed_sample(drafts[:2], [2], logits[:3], torch.tensor([1.0]), torch.tensor([9]), torch.tensor([0]), 2)
    assert int(res.num_accepted[0]) == 0
    assert 0 <= int(res.output_token_ids[0, 0]) <= 2 and res.output_token_ids[0, 1:].eq(-1).all()
    many = keyed_sample(torch.tensor([], dtype=torch.long), [0] * 500, torch.zeros(500, V).index_fill_(
        1, torch.arange(3, V), float("-inf")), torch.ones(500), torch.arange(500), torch.zeros(500, dtype=torch.long), 1)
    assert many.output_token_ids[:, 0].max() <= 2 and many.output_token_ids[:, 1].eq(-1).all()


@pytest.mark.parametrize("u", [1.0 - 2.0 ** -54, 2.0 ** -54])
def test_uniform_at_the_edges_lands_on_an_allowed_token(monkeypatch, u):
    """The largest and smallest uniform the hash can give: u * total can round up to the total, and a
    cumulative sum is flat over masked tokens; the token is still one with probability mass."""
    from vllm_gemma_mtp.kernels import rejection

    monkeypatch.setattr(rejection, "_counter_uniforms", lambda seeds, positions: torch.full(
        seeds.shape, u, dtype=torch.float64))
    logits = torch.full((4, V), float("-inf"))
    logits[:, 2:5] = torch.tensor([0.3, -1.0, 2.0])  # tokens 0, 1, 5, 6 masked
    res = keyed_sample(torch.tensor([], dtype=torch.long), [0] * 4, logits, torch.ones(4),
                       torch.arange(4), torch.zeros(4, dtype=torch.long), 1)
    want = 4 if u > 0.5 else 2
    assert res.output_token_ids[:, 0].eq(want).all(), res.output_token_ids
