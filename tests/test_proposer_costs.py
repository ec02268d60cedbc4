"""What the proposer feeds the cost model: decode steps are verify-cost samples, steps that carry prompt tokens
are not (a prefill token costs several decode tokens, and fitted as decode tokens it made a plain step look
~5 ms dearer than it was, so the chooser drafted full K where no K pays). No engine: the proposer's step
bookkeeping runs on a bare instance."""

from __future__ import annotations

import time

from vllm_gemma_mtp.metrics import StepCounters
from vllm_gemma_mtp.policy import DraftPolicy, PolicyConfig


def _bare_proposer(keys):
    from vllm_gemma_mtp.proposer import GemmaMTPProposer, ProposerStats

    p = object.__new__(GemmaMTPProposer)  # no runner, no model: only what _decide reads
    p.policy = DraftPolicy(PolicyConfig(max_k=4))
    p.stats, p.counters, p.tp_size = ProposerStats(), StepCounters(max_k=4, adaptive=True), 1
    p._keys, p._cap_list = tuple(keys), [4] * len(keys)
    p._row = {r: i for i, r in enumerate(keys)}
    p._pending, p._last_end, p._last_start, p._last_draft = {}, 0.0, 0.0, 0.0
    p.waiting, p._joined, p._limit, p._last_arrival = None, {r: 0 for r in keys}, {}, 0
    return p


def _step(p, keys, num_tokens, drafts, pending, seconds=0.01):
    p._pending = dict(pending)
    t0 = p._last_start + seconds
    before = p.policy.costs.verify.count
    p._decide(list(keys), [10] * len(keys), t0, num_tokens, 4, drafts)
    p._last_start, p._last_draft = t0, 0.0
    return p.policy.costs.verify.count - before


def test_only_decode_steps_are_verify_cost_samples():
    keys = ["a", "b", "c", "d"]
    p = _bare_proposer(keys)
    assert _step(p, keys, 4, 0, {}) == 1  # plain decode: one token per request
    assert _step(p, keys, 4 + 37, 0, {}) == 0  # a request's prefill (or a chunk of it) rides along
    # drafts of two requests verified: 4 + 3 + 2 tokens is a decode step
    assert _step(p, keys, 4 + 3 + 2, 5, {"a": (9, 3), "b": (9, 2)}) == 1
    # the same drafts beside 30 prompt tokens: not a decode step
    assert _step(p, keys, 4 + 3 + 2 + 30, 35, {"a": (9, 3), "b": (9, 2)}) == 0
    # drafts of a request that has left do not make room for prompt tokens
    assert _step(p, keys, 4 + 3, 3, {"a": (9, 3), "gone": (5, 4)}) == 1
    assert _step(p, keys, 4 + 3 + 4, 7, {"a": (9, 3), "gone": (5, 4)}) == 0
    # the scheduler may verify fewer drafts than given (max_model_len): still a decode step
    assert _step(p, keys, 4 + 1, 1, {"a": (9, 3)}) == 1


class _Batch:
    def __init__(self, ids):
        self.req_ids = list(ids)


class _Runner:
    def __init__(self, ids):
        self.input_batch = _Batch(ids)


def test_held_zero_steps_are_answered_early_and_counted_as_any_step():
    """A step the policy holds at 0 for everyone is answered before vLLM's propose path
    (held_zero_drafts), with the same bookkeeping as the full path: a step, a skipped round, a timing
    sample, the policy's decision. Anything the held answer depends on changing sends the step the full way."""
    keys = ["a", "b", "c", "d"]
    p = _bare_proposer(keys)
    p.num_speculative_tokens = 4
    pol = p.policy
    for _ in range(40):  # past calibration, costs learned: drafting never pays (nothing is ever accepted)
        pol.costs.observe_verify(4, 0.01)
        pol.costs.observe_verify(20, 0.05, 16)
        pol.costs.observe_draft(4, 4, 0.02)
    pol.acceptance.engine = type(pol.acceptance.engine)([0.0] * 4, [1000.0] * 4)
    pol.steps = 100
    runner = _Runner(keys)
    assert p.held_zero_drafts(runner, 4) is None  # no all-zero answer yet: the chooser must run
    assert _step(p, keys, 4, 0, {}) == 1 and p._pending == {}  # it chooses 0 for everyone
    fast = 0
    for i in range(12):
        steps, skipped, samples = p.stats.steps, p.stats.skipped_rounds, pol.costs.verify.count
        p._last_start = time.perf_counter() - 0.01  # the previous step began 10 ms ago
        out = p.held_zero_drafts(runner, 4)
        if out is None:
            p._last_start = 0.0
            _step(p, keys, 4, 0, {})
            continue
        fast += 1
        assert out == [[], [], [], []]
        assert (p.stats.steps, p.stats.skipped_rounds, pol.costs.verify.count) == (steps + 1, skipped + 1, samples + 1)
    assert fast >= 6, fast  # most steps; every zero_recheck_every-th one is rechecked by the chooser
    assert p.stats.held_fast == fast and pol.held_zero >= fast
    assert p.held_zero_drafts(_Runner(keys + ["e"]), 5) is None  # a new request: the full path
    assert p.held_zero_drafts(_Runner(keys[::-1]), 4) is None  # the batch reordered
    p._pending = {"a": (9, 1)}
    assert p.held_zero_drafts(runner, 4) is None  # someone drafted last step: acceptance to learn


def test_a_batch_is_closed_when_nothing_waits_and_nobody_joined_lately():
    """What the proposer tells the policy (remaining tokens, or None for "every token counts alike"): an
    offline batch that started together is closed from its first step; requests waiting for a place, or a
    request that joined within the last half of the batch's mean age (a stream of requests), open it."""
    keys = ["a", "b", "c"]
    p = _bare_proposer(keys)
    p._limit = {"a": 60, "b": 60, "c": 40}  # prompt + max_tokens
    P = [20, 30, 20]  # last accepted positions: 22, 32 and 22 tokens so far
    assert p._remaining_if_closed(keys, P) is None  # the scheduler's count not known: open
    p.waiting = 2
    assert p._remaining_if_closed(keys, P) is None
    p.waiting = 0
    assert p._remaining_if_closed(keys, P) == [38, 28, 18]
    assert p._remaining_if_closed(["a"], [20]) is None  # one request: both objectives are the same
    p.stats.steps = 100  # a, b, c joined at step 0; d joins now
    p._joined["d"] = p._last_arrival = 100
    p._limit["d"] = 80
    assert p._remaining_if_closed(keys + ["d"], P + [30]) is None
    p.stats.steps = 150  # 50 steps without arrivals, mean age (150 * 3 + 50) / 4 = 125: still open
    assert p._remaining_if_closed(keys + ["d"], P + [30]) is None
    p.stats.steps = 250  # 150 steps without, mean age 225: closed
    assert p._remaining_if_closed(keys + ["d"], P + [30]) == [38, 28, 18, 48]
