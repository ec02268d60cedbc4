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
