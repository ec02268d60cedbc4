"""Engine edge cases (issue #10 item 3), plugin against no speculation, greedy, trained pair, K=4, fixed K
so that every step drafts: one batch per engine carries all of them at once.

- requests whose length + K reaches max_model_len (drafts must stop at the end: vLLM would otherwise verify
  past max_model_len, vllm#58080);
- prompts longer than max_num_batched_tokens (chunked prefill);
- a KV cache too small for the batch (preemption and resume; vLLM's preemption counter must move);
- min_tokens and bad words;
- prefix caching on (shared prefixes) and off.
"""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
PAIR = ROOT / "tests" / "assets" / "trained_pair"
MAX_LEN = 320
BATCHED = 96  # < the long prompts: chunked prefill


def _requests():
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    from bench import code_prompts

    tok = AutoTokenizer.from_pretrained(PAIR / "target")
    bos = tok.bos_token_id or 2
    short = code_prompts(tok, 6, bos, 40)
    long = code_prompts(tok, 3, bos, 200)  # > BATCHED
    # a common 150-token prefix: longer than a KV block (prefix caching reuses whole blocks only)
    shared = [long[0][:150] + p[1:12] for p in short[1:4]]
    g = dict(temperature=0.0, ignore_eos=True)
    bad = tok.decode(short[1][5:7])  # words the target would like to emit soon
    reqs = []
    for p in short:
        reqs.append((p, SamplingParams(max_tokens=96, **g)))
    for p in long:
        # runs into max_model_len: MAX_LEN - 200 - a few tokens left, less than the requested max_tokens
        reqs.append((p, SamplingParams(max_tokens=200, **g)))
    for p in shared:
        reqs.append((p, SamplingParams(max_tokens=48, **g)))
    reqs.append((short[2], SamplingParams(max_tokens=48, min_tokens=40, temperature=0.0)))
    reqs.append((short[1], SamplingParams(max_tokens=48, bad_words=[bad], **g)))
    return reqs


def _run(spec: bool, prefix_caching: bool, reqs):
    from vllm import LLM

    from engine_runs import _spec_counters, stop_engine

    kw = dict(model=str(PAIR / "target"), dtype="float32", max_model_len=MAX_LEN, enforce_eager=True,
              max_num_seqs=16, max_num_batched_tokens=BATCHED, enable_chunked_prefill=True,
              enable_prefix_caching=prefix_caching, kv_cache_memory_bytes=2 << 20, disable_log_stats=False, seed=0)
    if spec:
        kw["speculative_config"] = {"method": "mtp", "model": str(PAIR / "assistant"), "num_speculative_tokens": 4}
    import os

    saved = os.environ.get("VLLM_GEMMA_MTP_ADAPTIVE")
    os.environ["VLLM_GEMMA_MTP_ADAPTIVE"] = "0"  # fixed K: every step drafts, the edge is always hit
    try:
        llm = LLM(**kw)
    finally:
        if saved is None:
            os.environ.pop("VLLM_GEMMA_MTP_ADAPTIVE", None)
        else:
            os.environ["VLLM_GEMMA_MTP_ADAPTIVE"] = saved
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p, _ in reqs], [sp for _, sp in reqs], use_tqdm=False)
        metrics = {m.name: getattr(m, "value", None) for m in llm.get_metrics()}
        metrics.update(_spec_counters(llm))
    finally:
        stop_engine(llm)
    return [list(o.outputs[0].token_ids) for o in outs], [o.outputs[0].finish_reason for o in outs], metrics


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_edge_cases_are_lossless(prefix_caching):
    reqs = _requests()
    base, base_fin, _ = _run(False, prefix_caching, reqs)
    spec, spec_fin, m = _run(True, prefix_caching, reqs)
    for i, ((p, sp), a, b) in enumerate(zip(reqs, base, spec)):
        assert len(p) + len(b) <= MAX_LEN, f"request {i} ran past max_model_len"
        assert a == b, f"request {i} ({sp}) differs from no speculation"
    assert spec_fin == base_fin
    assert any(len(p) + len(o) == MAX_LEN for (p, _), o in zip(reqs, spec)), "no request reached max_model_len"
    assert len(spec[-2]) >= 40  # min_tokens held
    assert m.get("vllm:num_preemptions", 0) > 0, "the small KV cache forced no preemption"
    assert m["vllm:spec_decode_num_drafts"] > 0
    # prefix caching on: the scheduler queried the cache (in this small, preempting cache it records no hits,
    # with or without speculation: the shared blocks are evicted before the next request's prefill)
    assert (m.get("vllm:prefix_cache_queries", 0) > 0) == prefix_caching
