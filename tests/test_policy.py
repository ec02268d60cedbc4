"""The draft-length policy on synthetic acceptance and cost inputs: deterministic expected choices, the
optimum against brute force, and the online pieces (acceptance statistics, cost fits, probes)."""

import itertools
import random

import pytest

from vllm_gemma_mtp.policy import (AcceptanceStats, CostModel, DecayedLeastSquares, DraftPolicy, PolicyConfig,
                                   choose_draft_lengths)

GPU = dict(verify=(10e-3, 2e-6), draft=(0.3e-3, 0.2e-3, 1e-6))  # verifying K+1 tokens costs ~ 1 token
CPU = dict(verify=(4e-3, 0.6e-3), draft=(0.1e-3, 0.15e-3, 0.05e-3))  # every verified token costs


def test_perfect_drafter_on_gpu_costs_drafts_full_k():
    ks, rate = choose_draft_lengths([[1.0] * 4] * 8, [4] * 8, max_k=4, **GPU)
    assert ks == [4] * 8 and rate > 0


def test_drafter_never_right_drafts_nothing():
    for cost in (GPU, CPU):
        ks, _ = choose_draft_lengths([[0.0] * 4] * 16, [4] * 16, max_k=4, **cost)
        assert ks == [0] * 16


def test_load_turns_speculation_down_on_cpu():
    rates = [0.7, 0.6, 0.55, 0.5]
    one, _ = choose_draft_lengths([rates], [4], max_k=4, **CPU)
    many, _ = choose_draft_lengths([rates] * 64, [4] * 64, max_k=4, **CPU)
    assert one[0] >= 2, one  # batch 1: the step's fixed cost dominates, drafting pays
    assert sum(many) < sum(one) * 64 / 2, many  # batch 64: each verified token costs, far fewer drafts
    gpu_many, _ = choose_draft_lengths([rates] * 64, [4] * 64, max_k=4, **GPU)
    assert gpu_many == [4] * 64  # same acceptance, GPU-like costs: full K


def test_good_requests_draft_and_poor_ones_do_not():
    ks, _ = choose_draft_lengths([[0.9] * 4, [0.05] * 4, [0.9] * 4], [4, 4, 4], max_k=4, **CPU)
    assert ks[0] > 0 and ks[2] > 0 and ks[1] == 0


def test_caps_are_respected():
    ks, _ = choose_draft_lengths([[1.0] * 4] * 3, [0, 2, 4], max_k=4, **GPU)
    assert ks == [0, 2, 4]


@pytest.mark.parametrize("seed", range(30))
def test_optimal_against_brute_force(seed):
    rnd = random.Random(seed)
    B, K = rnd.randint(1, 4), rnd.randint(1, 3)
    rates = [[rnd.random() for _ in range(K)] for _ in range(B)]
    caps = [rnd.randint(0, K) for _ in range(B)]
    verify = (rnd.uniform(1e-3, 10e-3), rnd.uniform(1e-6, 2e-3))
    draft = (rnd.uniform(0, 1e-3), rnd.uniform(0, 1e-3), rnd.uniform(0, 1e-3))
    round_len = rnd.choice([None, K])
    ks, rate = choose_draft_lengths(rates, caps, verify, draft, K, round_len)

    def value(v):
        e = B + sum(sum(_prod(rates[i][:j + 1]) for j in range(k)) for i, k in enumerate(v))
        c, rows = max(v), sum(1 for k in v if k > 0)
        L = round_len or c
        t = verify[0] + verify[1] * (B + sum(v)) + ((draft[0] + draft[1] * L + draft[2] * rows * L) if c else 0)
        return e / t

    best = max(value(v) for v in itertools.product(*[range(c + 1) for c in caps]))
    assert all(0 <= k <= c for k, c in zip(ks, caps))
    assert value(ks) == pytest.approx(rate)
    assert rate >= best * (1 - 1e-9), (ks, rate, best)


def _prod(xs):
    p = 1.0
    for x in xs:
        p *= x
    return p


def test_least_squares_recovers_a_line_and_tracks_a_change():
    f = DecayedLeastSquares(2, decay=0.9)
    for t in range(40):
        x = 1 + t % 5
        f.add([1.0, x], 0.004 + 0.001 * x)
    assert f.coef == pytest.approx([0.004, 0.001], rel=1e-6)
    for t in range(200):  # the machine got slower per token
        x = 1 + t % 5
        f.add([1.0, x], 0.004 + 0.003 * x)
    assert f.coef[1] == pytest.approx(0.003, rel=1e-3)


def test_acceptance_statistics():
    cfg = PolicyConfig(max_k=3)
    st = AcceptanceStats(cfg)
    for _ in range(20):
        st.observe("a", 3, 3)  # always fully accepted
        st.observe("b", 3, 0)  # rejected at the first position
    ra, rb = st.rates("a"), st.rates("b")
    assert ra[0] > 0.8 and rb[0] < 0.3
    assert ra[2] > 0.8
    new = st.rates("c")  # a new request starts from the engine-wide rates
    assert 0.3 < new[0] < 0.7
    st.observe("d", 2, 5)  # more accepted than drafted is clipped
    assert all(0 <= r <= 1 for r in st.rates("d"))


def test_policy_calibrates_then_turns_off_a_useless_drafter_and_probes():
    cfg = PolicyConfig(max_k=4, probe_every=8)
    pol = DraftPolicy(cfg)
    keys = [f"r{i}" for i in range(4)]
    seen = set()
    for step in range(200):
        d = pol.decide(keys, [4] * 4)
        seen.add(d.reason)
        for key, k in zip(keys, d.lengths):
            pol.acceptance.observe(key, k, 0)  # zero-accept drafter
        rows = sum(1 for k in d.lengths if k)
        c = max(d.lengths)
        pol.costs.observe_verify(4 + sum(d.lengths), 0.004 + 0.0006 * (4 + sum(d.lengths)))
        if c:
            pol.costs.observe_draft(rows, c, 0.0001 + 0.00015 * c + 0.00005 * rows * c)
    assert "calibration" in seen and "policy" in seen and "probe" in seen
    late = [pol.decide(keys, [4] * 4).lengths for _ in range(32)]
    assert all(max(v) <= 1 for v in late)  # only probes
    assert sum(map(sum, late)) <= 4 * 32 / cfg.probe_every + 4  # a probe per request every probe_every steps
    assert pol.skipped_rounds > 100
    assert sum(pol.chosen_hist) == 4 * (200 + 32)


def test_cost_model_ready_needs_variety():
    cm = CostModel(PolicyConfig(max_k=2, min_samples=3))
    for _ in range(5):
        cm.observe_verify(4, 0.01)
        cm.observe_draft(4, 2, 0.001)
    assert not cm.ready()  # one token count only: the slope is unknown
    cm.observe_verify(8, 0.014)
    assert cm.ready()
