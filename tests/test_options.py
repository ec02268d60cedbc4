import pytest

from vllm_gemma_mtp.options import Options, OptionsError, from_env


def test_defaults():
    o = from_env({})
    assert o == Options() and o.query_offset == 1 and o.enabled


@pytest.mark.parametrize("env,match", [
    ({"VLLM_GEMMA_MTP_QUERY_POSITION": "p+2"}, "VLLM_GEMMA_MTP_QUERY_POSITION"),
    ({"VLLM_GEMMA_MTP_ENABLE": "maybe"}, "not a boolean"),
    ({"VLLM_GEMMA_MTP_KERNELS": "cuda"}, "accepted values: auto, triton, torch"),
    ({"VLLM_GEMMA_MTP_QUERY_POS": "p"}, "unknown vllm-gemma-mtp option VLLM_GEMMA_MTP_QUERY_POS"),
])
def test_invalid_options_name_the_problem(env, match):
    with pytest.raises(OptionsError, match=match):
        from_env(env)


def test_values():
    o = from_env({"VLLM_GEMMA_MTP_QUERY_POSITION": "P", "VLLM_GEMMA_MTP_ENABLE": "off"})
    assert o.query_offset == 0 and not o.enabled
    assert "query_position=p" in o.describe()
