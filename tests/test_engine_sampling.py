"""Sampling through the plugin's rejection sampler in real engines, at temperature > 0, for every feature a
Gemma 4 MTP request can carry: plugin (K=3) against a no-speculation engine on the committed trained pair,
by two-sample chi-square tests on the emitted tokens, with a power check per feature (the plugin with the
feature against no speculation without it must be told apart). Plus exact checks: greedy identity (with
logprobs, structured output), hard constraints (allowed ids, bad words, min_tokens), seeded reproducibility,
and the sampler's counters (every step on the fused path, ragged batches with 0-draft requests seen).

The plugin engine drafts a fixed K (VLLM_GEMMA_MTP_ADAPTIVE=0) so that every step carries drafts and each
feature goes through the fused sampler: under adaptive speculation a low-acceptance T=1 workload runs mostly
plain steps (vLLM's own sampler, correct by construction). The mixed batch also runs on a third, adaptive
engine: seeded reproducibility whatever draft lengths the policy gives the batch. (Adaptive random
sampling's distribution: tests/test_adaptive.py.) Three engines stay up for the module (tiny models, 64 MiB
of KV each)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAIR = ROOT / "tests" / "assets" / "trained_pair"
K = 3
N = 400  # samples per engine and configuration
MAX_TOKENS = 6  # position 0 is prefill-sampled in both engines; 1..5 come from verification
PROMPT = "    def __init__(self, "
PVALUE = 1e-3  # per comparison; about a dozen comparisons run


@pytest.fixture(scope="module")
def engines():
    from vllm import LLM

    from engine_utils import KV_CACHE_BYTES, shutdown

    kw = dict(model=str(PAIR / "target"), dtype="float32", max_model_len=512, enforce_eager=True,
              max_num_seqs=64, max_num_batched_tokens=512, kv_cache_memory_bytes=KV_CACHE_BYTES,
              # JSON without free whitespace: the tiny pair, trained on Python, would fill it with newlines
              structured_outputs_config={"backend": "xgrammar", "disable_any_whitespace": True})
    spec_cfg = {"method": "mtp", "model": str(PAIR / "assistant"), "num_speculative_tokens": K}
    # a seed per engine: the two-sample tests need independent samples, and engines started from one seed
    # draw the same unseeded random numbers wherever their call histories line up
    base = LLM(**kw, seed=0)
    up = {"none": base}
    saved = os.environ.get("VLLM_GEMMA_MTP_ADAPTIVE")
    try:
        for seed, (name, adaptive) in enumerate((("plugin", "0"), ("adaptive", "1")), start=1):
            os.environ["VLLM_GEMMA_MTP_ADAPTIVE"] = adaptive  # read by the engine's processes at start
            up[name] = LLM(**kw, seed=seed, speculative_config=spec_cfg)
        yield up
    finally:
        if saved is None:
            os.environ.pop("VLLM_GEMMA_MTP_ADAPTIVE", None)
        else:
            os.environ["VLLM_GEMMA_MTP_ADAPTIVE"] = saved
        for llm in reversed(list(up.values())):
            shutdown(llm)


def _sample(llm, sp, n=N, prompt=PROMPT):
    outs = llm.generate([prompt] * n, sp, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def _position_pvalue(ta: list[int], tb: list[int]) -> float | None:
    """Chi-square homogeneity test of one position's tokens; categories with fewer than 10 observations in
    both samples together are pooled. None when there is no variation to test."""
    import numpy as np
    from scipy.stats import chi2

    cats = sorted(set(ta) | set(tb))
    ca = np.array([ta.count(c) for c in cats], float)
    cb = np.array([tb.count(c) for c in cats], float)
    small = (ca + cb) < 10
    if small.any():
        ca = np.append(ca[~small], ca[small].sum())
        cb = np.append(cb[~small], cb[small].sum())
    keep = (ca + cb) > 0
    ca, cb = ca[keep], cb[keep]
    if len(ca) < 2:
        return None
    tot = ca + cb
    ea, eb = tot * ca.sum() / tot.sum(), tot * cb.sum() / tot.sum()
    stat = float(((ca - ea) ** 2 / ea).sum() + ((cb - eb) ** 2 / eb).sum())
    return float(chi2.sf(stat, len(ca) - 1))


def _two_sample_pvalue(a: list[list[int]], b: list[list[int]], positions=range(1, MAX_TOKENS)) -> float:
    """Do two sets of samples come from one distribution? A chi-square test per position (a missing
    position - the request stopped - is its own category), combined by Bonferroni: the tokens of one
    sequence depend on each other, so the positions' statistics are not independent and their sum is not
    chi-square. Summed, no-spec against no-spec resamples of 400 gave p < 1e-3 in 1.25 % of splits and
    p < 1e-4 in 0.6 % (2000 splits; CI failed on such a p = 2.7e-6 once); Bonferroni, p < 1e-3 in 0.17 %
    (top_k) and 0 % (top_p) of 3000 splits."""
    ps = []
    for j in positions:
        p = _position_pvalue([s[j] if j < len(s) else -1 for s in a], [s[j] if j < len(s) else -1 for s in b])
        if p is not None:
            ps.append(p)
    assert ps, "no variation to test: pick a prompt with a spread next-token distribution"
    return min(1.0, len(ps) * min(ps))


def _sampler_stats(llm):
    from engine_utils import _worker_probe

    return llm.collective_rpc(_worker_probe)[0][1]["sampler"]


def _proposer_stats(llm):
    from engine_utils import _worker_probe

    st = llm.collective_rpc(_worker_probe)[0][1]
    return {k: st[k] for k in ("rounds", "skipped_rounds", "plain_steps")}


def _frequent_tokens(samples, n):
    from collections import Counter

    c = Counter(t for s in samples for t in s[1:])
    return [t for t, _ in c.most_common(n)]


def _single_token_word(llm, candidates):
    tok = llm.get_tokenizer()
    for t in candidates:
        s = tok.decode([t])
        if s.strip() and s == s.strip() and tok.encode(s, add_special_tokens=False) == [t]:
            return t, s
    raise AssertionError("no frequent token that is a word of its own")


@pytest.fixture(scope="module")
def base_samples(engines):
    from vllm import SamplingParams

    return _sample(engines["none"], SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS, ignore_eos=True, seed=None))


def _compare(engines, sp_feature, sp_plain=None):
    """Plugin with the feature vs no speculation with it: same distribution; vs no speculation without it:
    different (the test can see the feature)."""
    a = _sample(engines["plugin"], sp_feature)
    b = _sample(engines["none"], sp_feature)
    p_same = _two_sample_pvalue(a, b)
    assert p_same > PVALUE, f"plugin and no-spec differ: p = {p_same:.2e}"
    if sp_plain is not None:
        c = _sample(engines["none"], sp_plain)
        p_power = _two_sample_pvalue(a, c)
        # 1e-4, far below PVALUE: a feature the test cannot see fails it (at N=400 top_p, the weakest feature,
        # gave 1e-15 .. 1e-6 in 9 local draws)
        assert p_power < 1e-4, f"the test cannot see the feature: p = {p_power:.2e}"
    return a, b


def test_temperature_only(engines, base_samples):
    from vllm import SamplingParams

    before = _sampler_stats(engines["plugin"])
    a = _sample(engines["plugin"], SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS, ignore_eos=True))
    assert _two_sample_pvalue(a, base_samples) > PVALUE
    # power: a lower temperature is a different distribution
    cold = _sample(engines["none"], SamplingParams(temperature=0.6, max_tokens=MAX_TOKENS, ignore_eos=True))
    assert _two_sample_pvalue(a, cold) < 1e-6
    st = _sampler_stats(engines["plugin"])
    assert st["fused_steps"] > before["fused_steps"] and not st["fallbacks"], st


def test_penalties(engines):
    from vllm import SamplingParams

    plain = SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    feat = SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS, ignore_eos=True, repetition_penalty=1.6,
                          frequency_penalty=1.0, presence_penalty=0.8)
    _compare(engines, feat, plain)
    assert _sampler_stats(engines["plugin"])["features"].get("penalties", 0) > 0


def test_bad_words(engines, base_samples):
    from vllm import SamplingParams

    t, word = _single_token_word(engines["none"], _frequent_tokens(base_samples, 20))
    plain = SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    feat = SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS, ignore_eos=True, bad_words=[word])
    a, _ = _compare(engines, feat, plain)
    assert all(t not in s for s in a), f"bad word {word!r} ({t}) emitted"
    assert _sampler_stats(engines["plugin"])["features"].get("bad words", 0) > 0


def test_allowed_token_ids(engines, base_samples):
    from vllm import SamplingParams

    allowed = _frequent_tokens(base_samples, 12)
    plain = SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    feat = SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS, ignore_eos=True, allowed_token_ids=allowed)
    a, _ = _compare(engines, feat, plain)
    assert all(set(s) <= set(allowed) for s in a)
    assert _sampler_stats(engines["plugin"])["features"].get("allowed token ids", 0) > 0


def test_min_tokens(engines, base_samples):
    from vllm import SamplingParams

    stop = _frequent_tokens(base_samples, 1)[0]
    plain = SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS, stop_token_ids=[stop])
    feat = SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS, stop_token_ids=[stop], min_tokens=4)
    a, _ = _compare(engines, feat, plain)
    assert all(stop not in s[:4] for s in a)
    assert any(len(s) < MAX_TOKENS for s in a)  # the stop token does end requests after min_tokens
    assert _sampler_stats(engines["plugin"])["features"].get("min_tokens", 0) > 0


@pytest.mark.parametrize("kind", ["top_k", "top_p"])
def test_top_k_top_p(engines, kind):
    from vllm import SamplingParams

    plain = SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    extra = {"top_k": 4} if kind == "top_k" else {"top_p": 0.7}
    _compare(engines, SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS, ignore_eos=True, **extra), plain)
    assert _sampler_stats(engines["plugin"])["features"].get("top-k/top-p", 0) > 0


def test_logprobs(engines):
    """Greedy: the same tokens and logprobs as no speculation. Random: the distribution holds, and each
    emitted token's logprob is the one no speculation gives that token after the same prefix."""
    import math

    from vllm import SamplingParams

    g = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=3)
    prompts = [PROMPT, "import os\nimport ", "    return self."]
    pa = engines["plugin"].generate(prompts, g, use_tqdm=False)
    pb = engines["none"].generate(prompts, g, use_tqdm=False)
    for x, y in zip(pa, pb):
        xo, yo = x.outputs[0], y.outputs[0]
        assert xo.token_ids == yo.token_ids
        for lx, ly in zip(xo.logprobs, yo.logprobs):
            assert set(lx) == set(ly)
            for t in lx:
                assert math.isclose(lx[t].logprob, ly[t].logprob, abs_tol=1e-3), (t, lx[t], ly[t])
    feat = SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=2)
    outs = engines["plugin"].generate([PROMPT] * N, feat, use_tqdm=False)
    a = [list(o.outputs[0].token_ids) for o in outs]
    assert _two_sample_pvalue(a, _sample(engines["none"], feat)) > PVALUE
    for o in outs[:20]:  # the logprob reported for each emitted token is the target's for that prefix
        out = o.outputs[0]
        assert len(out.logprobs) == len(out.token_ids)
        ref = engines["none"].generate(
            [{"prompt_token_ids": o.prompt_token_ids + list(out.token_ids)}],
            SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
        plen = len(o.prompt_token_ids)
        for j, t in enumerate(out.token_ids):
            want = ref.prompt_logprobs[plen + j][t].logprob
            assert math.isclose(out.logprobs[j][t].logprob, want, abs_tol=1e-3), (j, t)
    assert _sampler_stats(engines["plugin"])["features"].get("logprobs", 0) > 0


def test_structured_output_greedy_identical(engines):
    """JSON-schema structured output under speculative decoding: greedy output identical to no speculation
    and valid against the schema; the grammar trims the drafts it rejects, so batches get ragged."""
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    schema = {"type": "object", "properties": {"kind": {"enum": ["list", "dict", "tuple", "set"]},
                                               "size": {"enum": [0, 1, 2, 3]}, "ok": {"type": "boolean"}},
              "required": ["kind", "size", "ok"], "additionalProperties": False}
    sp = SamplingParams(temperature=0.0, max_tokens=64,
                        structured_outputs=StructuredOutputsParams(json=schema))
    prompts = [PROMPT, "x = {", "config = ", "    return {"]
    a = engines["plugin"].generate(prompts, sp, use_tqdm=False)
    b = engines["none"].generate(prompts, sp, use_tqdm=False)
    for x, y in zip(a, b):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        assert x.outputs[0].finish_reason == "stop", x.outputs[0].text
        obj = json.loads(x.outputs[0].text)
        assert set(obj) == {"kind", "size", "ok"} and obj["kind"] in schema["properties"]["kind"]["enum"]


@pytest.mark.parametrize("mode", ["plugin", "adaptive"])
def test_structured_output_sampled_tokens_valid(engines, mode):
    """Sampled JSON-schema output (temperature 0.7, top-k 5) under speculative decoding: every finished
    answer's tokens form JSON valid against the schema. Checked on the token ids: with a prompt of raw ids
    that ends inside a multi-byte character, vLLM's detokenizer puts the prompt's undecoded tail in front of
    the first output text, with or without speculation (9 of 200 such texts here, the same 9 without it)."""
    import random

    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    schema = {"type": "object", "properties": {"name": {"enum": ["alpha", "beta", "gamma"]},
                                               "count": {"enum": [1, 2, 3]}},
              "required": ["name", "count"], "additionalProperties": False}
    llm = engines[mode]
    rnd = random.Random(5)
    vocab = llm.llm_engine.model_config.get_vocab_size()
    prompts = [{"prompt_token_ids": [2] + [rnd.randrange(4, vocab) for _ in range(rnd.randint(3, 60))]}
               for _ in range(48)]
    sp = SamplingParams(temperature=0.7, top_k=5, max_tokens=150, structured_outputs=StructuredOutputsParams(json=schema))
    before = _sampler_stats(llm)
    outs = llm.generate(prompts, sp, use_tqdm=False)
    tok = llm.get_tokenizer()
    done = [o.outputs[0] for o in outs if o.outputs[0].finish_reason == "stop"]
    assert len(done) >= 40, [o.outputs[0].finish_reason for o in outs]
    for c in done:
        obj = json.loads(tok.decode(c.token_ids, skip_special_tokens=True))
        assert obj["name"] in ("alpha", "beta", "gamma") and obj["count"] in (1, 2, 3) and set(obj) == {"name", "count"}
    st = _sampler_stats(llm)
    assert not st["fallbacks"], st
    if mode == "plugin":  # fixed K: these requests were verified with drafts (adaptive may hold them at 0)
        assert st["fused_steps"] > before["fused_steps"], st


def test_seeded_requests_keep_the_distribution_and_reproduce_across_schedules(engines, base_samples):
    """Seeded requests are sampled by sequence position (kernels.rejection.keyed_sample), whatever their
    draft lengths: N requests with distinct seeds give the same tokens on the fixed-K engine and on the
    adaptive one (other draft lengths, other batch histories), and as a sample they have the target's
    distribution (against no speculation, unseeded)."""
    from vllm import SamplingParams

    sps = [SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS, ignore_eos=True, seed=5000 + i) for i in range(N)]
    before = _sampler_stats(engines["plugin"])
    fixed = [list(o.outputs[0].token_ids) for o in engines["plugin"].generate([PROMPT] * N, sps, use_tqdm=False)]
    after = _sampler_stats(engines["plugin"])
    adaptive = [list(o.outputs[0].token_ids) for o in engines["adaptive"].generate([PROMPT] * N, sps,
                                                                                   use_tqdm=False)]
    assert fixed == adaptive, sum(a != b for a, b in zip(fixed, adaptive))
    assert len({tuple(x) for x in fixed}) > N // 4, "distinct seeds must give distinct samples"
    assert _two_sample_pvalue(fixed, base_samples) > PVALUE
    assert after["fused_steps"] > before["fused_steps"] and not after["fallbacks"], after


@pytest.mark.parametrize("mode", ["plugin", "adaptive"])
def test_mixed_batch(engines, mode):
    """One generate call mixing greedy, random and seeded requests, more requests than max_num_seqs (late
    arrivals are verified with 0 drafts beside decoding ones) and grammar-trimmed drafts: greedy identical
    to no speculation, seeded requests reproduce in another batch, random ones keep the distribution, and
    the sampler saw ragged steps (fixed K) - nothing handed to vLLM's rejection sampler."""
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    greedy = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    rand = SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    seeded = [SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS, ignore_eos=True, seed=100 + i) for i in range(8)]
    grammar = SamplingParams(temperature=0.0, max_tokens=16, structured_outputs=StructuredOutputsParams(
        regex=r"[a-z_]{1,6}\((self|x|y)(, [a-z]{1,4}){0,2}\)"))
    prompts, params = [], []
    for i in range(N):
        prompts.append(PROMPT)
        params.append(rand)
        if i % 50 == 0:
            prompts += ["    return self.", "import os\nimport "]
            params += [greedy, grammar]
        if i % 50 == 25 and i // 50 < len(seeded):
            prompts.append(PROMPT)
            params.append(seeded[i // 50])
    before, rounds_before = _sampler_stats(engines[mode]), _proposer_stats(engines[mode])
    outs = engines[mode].generate(prompts, params, use_tqdm=False)
    after, rounds_after = _sampler_stats(engines[mode]), _proposer_stats(engines[mode])
    got = [list(o.outputs[0].token_ids) for o in outs]
    ref = engines["none"].generate(prompts, params, use_tqdm=False)
    for p, x, y in zip(params, got, ref):
        if p.temperature == 0.0:
            assert x == list(y.outputs[0].token_ids)
    rand_a = [x for p, x in zip(params, got) if p is rand]
    rand_b = [list(y.outputs[0].token_ids) for p, y in zip(params, ref) if p is rand]
    assert _two_sample_pvalue(rand_a, rand_b) > PVALUE
    alone = engines[mode].generate([PROMPT] * len(seeded), seeded, use_tqdm=False)
    want = {id(p): list(o.outputs[0].token_ids) for p, o in zip(seeded, alone)}
    for p, x in zip(params, got):
        if id(p) in want:
            assert x == want[id(p)], "a seeded request must reproduce, whatever else is in the batch"
    assert not after["fallbacks"], after
    if mode == "plugin":
        assert after["fused_steps"] > before["fused_steps"], after
        # fixed K: every decoding request drafts K, so the late arrivals make ragged steps
        assert after["ragged_steps"] > before["ragged_steps"], after
        assert after["rows_without_drafts"] > before["rows_without_drafts"], after
    else:
        # adaptive: the policy may give the whole batch one length (0 throughout, once it has learnt this
        # low-acceptance T=1 load from the module's earlier tests), so neither ragged steps nor draft rounds
        # are guaranteed here (forced schedules: tests/test_adaptive.py); the policy decided every step
        steps = sum(rounds_after[k] - rounds_before[k] for k in ("rounds", "skipped_rounds"))
        assert steps >= MAX_TOKENS - 1, (rounds_before, rounds_after)
        # the seeded rows went through the plugin's sampler: on verify steps, or on plain steps drawn by position
        assert sum(after[k] - before[k] for k in ("fused_steps", "keyed_plain_steps")) > 0, (before, after)
