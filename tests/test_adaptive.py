"""Adaptive speculation in real engines: lossless under any schedule (the policy's own, a forced
4 -> 0 -> 2 -> 4 schedule, per-request off switches and caps beside default requests in one batch), draft
rounds skipped on a drafter that is never right, and bad per-request controls failing only that request.
(The chooser itself: tests/test_policy.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAIR = ROOT / "tests" / "assets" / "trained_pair"
K = 4
PROMPTS = ["    def __init__(self, ", "import os\nimport ", "    return self.", "class Foo(object):\n    ",
           "for i in range(", "if __name__ == ", "        raise ValueError(", "def main():\n    "]


def _engine(target, assistant=None, **env):
    import os

    from vllm import LLM

    from engine_utils import KV_CACHE_BYTES

    env = {"VLLM_GEMMA_MTP_ADAPTIVE": "1", "VLLM_GEMMA_MTP_ENABLE": "1", **env}  # the defaults, whatever ran before
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        kw = dict(model=str(target), dtype="float32", max_model_len=512, enforce_eager=True, max_num_seqs=16,
                  max_num_batched_tokens=512, kv_cache_memory_bytes=KV_CACHE_BYTES, disable_log_stats=False,
                  seed=0 if assistant is None else 1)  # independent samples for the two-sample test
        if assistant is not None:
            kw["speculative_config"] = {"method": "mtp", "model": str(assistant), "num_speculative_tokens": K}
        return LLM(**kw)
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(scope="module")
def trained():
    from engine_utils import shutdown

    base = _engine(PAIR / "target")
    spec = None
    try:
        spec = _engine(PAIR / "target", PAIR / "assistant")
        yield base, spec
    finally:
        if spec is not None:
            shutdown(spec)
        shutdown(base)


def _proposer_stats(llm):
    from engine_utils import _worker_probe

    return llm.collective_rpc(_worker_probe)[0][1]


def _keep_recent(worker):
    worker.model_runner.drafter.stats.keep_recent = 100000
    worker.model_runner.drafter.stats.recent.clear()


def _script(schedule):
    def install(worker):
        from vllm_gemma_mtp.policy import PolicyConfig, ScriptedPolicy

        d = worker.model_runner.drafter
        d.policy = ScriptedPolicy(PolicyConfig(max_k=K), schedule) if schedule else None
        if not schedule:  # back to the default policy
            from vllm_gemma_mtp.policy import DraftPolicy

            d.policy = DraftPolicy(PolicyConfig(max_k=K))
    return install


def _count_draft_rpcs(worker):
    """Count the engine core's take_draft_token_ids RPCs to this worker (installed on the instance, which
    collective_rpc looks up first); returns the count so far."""
    if not hasattr(worker, "_draft_rpcs"):
        orig = worker.take_draft_token_ids
        worker._draft_rpcs = 0

        def take():
            worker._draft_rpcs += 1
            return orig()

        worker.take_draft_token_ids = take
    return worker._draft_rpcs


def _greedy(llm, params_list, prompts=PROMPTS):
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params_list, use_tqdm=False)]


def test_adaptive_default_lossless_with_per_request_controls(trained):
    from vllm import SamplingParams

    base, spec = trained
    spec.collective_rpc(_keep_recent)
    plain = dict(temperature=0.0, max_tokens=160, ignore_eos=True)  # well past the calibration steps
    params = [SamplingParams(**plain) for _ in PROMPTS]
    params[1] = SamplingParams(**plain, extra_args={"gemma_mtp_speculate": False})
    params[2] = SamplingParams(**plain, extra_args={"gemma_mtp_max_draft_tokens": 2})
    params[3] = SamplingParams(**plain, extra_args={"gemma_mtp_max_draft_tokens": 0})
    out = _greedy(spec, params)
    ref = _greedy(base, [SamplingParams(**plain)] * len(PROMPTS))
    assert out == ref
    st = _proposer_stats(spec)
    assert st["decisions"].get("policy", 0) > 0 and st["policy"]["verify_s_per_token"] > 0
    given = {}  # request index -> draft lengths it was given
    for rnd in st["recent"]:
        for rid, n in zip(rnd[0], rnd[4]):
            given.setdefault(rid, []).append(n)
    lens = [n for ns in given.values() for n in ns]
    assert max(lens) <= K and any(n > 0 for n in lens)
    assert len(given) <= len(PROMPTS) - 2, "requests with speculation off were drafted for"
    assert sum(1 for ns in given.values() if max(ns) <= 2) >= 1  # the capped request


def test_forced_schedule_within_requests_is_lossless(trained):
    from vllm import SamplingParams

    base, spec = trained
    from engine_utils import collect_metrics as metrics

    sp = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    spec.collective_rpc(_script([4, 0, 2, 4]))
    rpcs = spec.collective_rpc(_count_draft_rpcs)[0]
    before = metrics(spec)
    try:
        out = _greedy(spec, [sp] * len(PROMPTS))
        st = _proposer_stats(spec)
    finally:
        spec.collective_rpc(_script(None))
    assert out == _greedy(base, [sp] * len(PROMPTS))
    assert st["decisions"].get("scripted", 0) > 8
    assert st["skipped_rounds"] > 0
    # the drafts reached the scheduler with each step's output (compat.patch_drafts_with_output), not by a
    # second RPC per step: vLLM verified them (its own counters), and the engine core never asked
    m = metrics(spec)
    assert m["vllm:spec_decode_num_draft_tokens"] - before["vllm:spec_decode_num_draft_tokens"] > 8 * len(PROMPTS)
    assert spec.collective_rpc(_count_draft_rpcs)[0] == rpcs


def test_seeded_requests_reproduce_under_any_schedule(trained):
    """A seeded request's tokens are drawn by sequence position, so they do not depend on the draft
    lengths it got: the policy's own choice, a forced 4 -> 0 -> 2 -> 4 schedule and never drafting give
    the same text; and the drafts were really verified (accepted tokens counted) on the way."""
    from vllm import SamplingParams

    from engine_utils import collect_metrics as metrics

    base, spec = trained
    sps = [SamplingParams(temperature=1.0, max_tokens=48, ignore_eos=True, seed=77 + i) for i in range(len(PROMPTS))]
    runs = {}
    for name, schedule in (("policy", None), ("4-0-2-4", [4, 0, 2, 4]), ("never", [0])):
        spec.collective_rpc(_script(schedule))
        before = metrics(spec)["vllm:spec_decode_num_accepted_tokens"]
        plain_before = _proposer_stats(spec)["sampler"]["keyed_plain_steps"]
        try:
            runs[name] = _greedy(spec, sps)
        finally:
            spec.collective_rpc(_script(None))
        runs[name + " accepted"] = metrics(spec)["vllm:spec_decode_num_accepted_tokens"] - before
        runs[name + " keyed plain"] = _proposer_stats(spec)["sampler"]["keyed_plain_steps"] - plain_before
    assert runs["4-0-2-4"] == runs["policy"]
    assert runs["never"] == runs["policy"]
    assert runs["4-0-2-4 accepted"] > 0 and runs["never accepted"] == 0
    # steps without drafts ran as plain decoding with the seeded rows drawn by position (sampler.sample_plain),
    # not through the verify path: every step of "never" (the prefill's included), the 0 steps of 4-0-2-4
    assert runs["never keyed plain"] >= 48 and runs["4-0-2-4 keyed plain"] > 0, runs
    greedy = _greedy(base, [SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)] * len(PROMPTS))
    assert runs["policy"] != greedy, "the requests must be sampled, not greedy"


def test_seeded_logprobs_are_the_emitted_tokens_on_plain_and_verify_steps(trained):
    """Seeded requests with logprobs: on plain steps the plugin's sampler redraws the seeded rows after vLLM's
    sampler has gathered logprobs for its own draw, so they are gathered again for the emitted token. The
    same requests drafting (4 -> 0 -> 2 -> 4) and never drafting emit the same tokens with the same logprobs,
    and every emitted token is among its position's returned logprobs, with a rank that agrees with them."""
    import math

    from vllm import SamplingParams

    _, spec = trained
    sps = [SamplingParams(temperature=1.0, max_tokens=32, ignore_eos=True, seed=500 + i, logprobs=2)
           for i in range(len(PROMPTS))]
    runs = {}
    for name, schedule in (("4-0-2-4", [4, 0, 2, 4]), ("never", [0])):
        spec.collective_rpc(_script(schedule))
        try:
            outs = spec.generate(PROMPTS, sps, use_tqdm=False)
        finally:
            spec.collective_rpc(_script(None))
        runs[name] = [(list(o.outputs[0].token_ids), o.outputs[0].logprobs) for o in outs]
    for (ta, la), (tb, lb) in zip(runs["4-0-2-4"], runs["never"]):
        assert ta == tb
        for tok, pa, pb in zip(ta, la, lb):
            assert tok in pa and tok in pb, "the emitted token's logprob is returned"
            assert math.isclose(pa[tok].logprob, pb[tok].logprob, rel_tol=1e-4, abs_tol=1e-5)
            assert pa[tok].rank == pb[tok].rank
            higher = sum(1 for t, v in pb.items() if t != tok and v.logprob > pb[tok].logprob)
            assert pb[tok].rank >= 1 + higher and (pb[tok].rank > 2 or len(pb) == 2), (tok, pb)


def test_random_sampling_keeps_the_distribution_adaptive(trained):
    """The in-engine frequency check at temperature 1 (ragged adaptive drafts): plugin against no speculation,
    two-sample chi-square over the tokens after the first."""
    from vllm import SamplingParams

    from test_engine_sampling import _two_sample_pvalue

    base, spec = trained
    sp = SamplingParams(temperature=1.0, max_tokens=6, ignore_eos=True)
    a = _greedy(spec, [sp] * 400, prompts=[PROMPTS[0]] * 400)
    b = _greedy(base, [sp] * 400, prompts=[PROMPTS[0]] * 400)
    assert _two_sample_pvalue(a, b, positions=range(1, 6)) > 1e-3


def test_bad_controls_fail_the_request_not_the_engine(trained):
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError  # a client error: the server answers HTTP 400

    import vllm_gemma_mtp

    vllm_gemma_mtp.register()
    bad = [({"gemma_mtp_max_draft_tokens": -1}, "gemma_mtp_max_draft_tokens must be an integer >= 0"),
           ({"gemma_mtp_max_draft_tokens": "4"}, "gemma_mtp_max_draft_tokens must be an integer"),
           ({"gemma_mtp_max_draft_tokens": True}, "gemma_mtp_max_draft_tokens must be an integer"),
           ({"gemma_mtp_speculate": "no"}, "gemma_mtp_speculate must be true or false"),
           ({"gemma_mtp_max_draft": 2}, "unknown vllm-gemma-mtp request option 'gemma_mtp_max_draft'")]
    for args, msg in bad:
        with pytest.raises(VLLMValidationError, match=msg):
            SamplingParams(max_tokens=4, extra_args=args)
    _, spec = trained
    ok = spec.generate(["x = "], SamplingParams(max_tokens=4, extra_args={"other_plugin_key": 1}), use_tqdm=False)
    assert len(ok[0].outputs[0].token_ids) == 4  # foreign keys pass; the engine serves on


def test_zero_accept_pair_skips_draft_rounds(pair):
    """A drafter that is never right: after calibration the policy stops drafting (rounds skipped, counted),
    probing now and then, and the output stays the target's."""
    from vllm import SamplingParams

    from engine_utils import shutdown

    p = pair("zeroaccept")
    sp = SamplingParams(temperature=0.0, max_tokens=256, ignore_eos=True)
    prompts = [{"prompt_token_ids": [2, 10 + i]} for i in range(16)]
    spec = _engine(p / "target", p / "assistant")
    try:
        out = [list(o.outputs[0].token_ids) for o in spec.generate(prompts, sp, use_tqdm=False)]
        st = _proposer_stats(spec)
    finally:
        shutdown(spec)
    assert all(o == [0] * 256 for o in out)  # the target's own output (every logit ties at token 0)
    assert st["skipped_rounds"] > 0.6 * st["steps"], st
    # every step after a skipped round ran as plain decoding (no speculative metadata, plain sampler)
    assert st["plain_steps"] >= st["skipped_rounds"] - 1, st
    # most held steps were answered before vLLM's propose path ran (compat.patch_held_zero_steps): all but the
    # ones where the held answer is rechecked (every zero_recheck_every steps) or a probe is due
    assert st["held_fast"] > 0.5 * st["skipped_rounds"], st
    assert st["decisions"].get("probe", 0) > 0
    # rejected probes back off: far fewer than one per request every 16 steps
    assert 0 < st["policy"]["probes"] < 16 * 256 / 16 / 2, st["policy"]
    hist = st["policy"]["chosen_k_hist"]
    assert hist[0] > 0.8 * sum(hist), hist
    assert st["policy"]["engine_acceptance"][0] < 0.1
