"""A sweep of bad input: every --speculative-config field, every plugin option and every per-request control
gets a wrong type, an out-of-range value and a missing or contradictory value. Each either runs correctly or
fails with a message that names the problem, at startup in the front end (config, options) or as that
request's validation error (HTTP 400 from the server; tests/test_serve.py sends some through the server).

The config cases are built the way `LLM(...)` and `vllm serve` build them (EngineArgs.create_engine_config,
in the front-end process, where the plugin checks them) in one subprocess, so no engine starts for a case
that must fail; the cases that must run start real engines (test_accepted_spellings_run)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from engine_utils import MAX_TOKENS, PROMPTS

# name -> (speculative_config update (None value: key removed), env, expected: "ok" or a regex of the message)
CONFIG_CASES = {
    "k=0": ({"num_speculative_tokens": 0}, {}, r"num_speculative_tokens\s+Input should be greater than 0"),
    "k=-1": ({"num_speculative_tokens": -1}, {}, r"num_speculative_tokens\s+Input should be greater than 0"),
    "k=100": ({"num_speculative_tokens": 100}, {}, r"num_speculative_tokens=100 is more than vllm-gemma-mtp drafts per round \(at most 16\)"),
    "k=2.5": ({"num_speculative_tokens": 2.5}, {}, r"num_speculative_tokens\s+Input should be a valid integer"),
    "k='four'": ({"num_speculative_tokens": "four"}, {}, r"num_speculative_tokens\s+Input should be a valid integer"),
    "k missing": ({"num_speculative_tokens": None}, {}, r"num_speculative_tokens is required for Gemma 4 MTP"),
    "k='4'": ({"num_speculative_tokens": "4"}, {}, "ok"),  # pydantic reads the string as 4
    "method misspelt": ({"method": "mpt"}, {}, r"is a Gemma 4 MTP assistant \(model_type gemma4_assistant\), which runs with method 'mtp' \(or no method: vLLM recognises it\), not method 'mpt'"),
    "method eagle": ({"method": "eagle"}, {}, r"is a Gemma 4 MTP assistant \(model_type gemma4_assistant\), which runs with method 'mtp'"),
    "method missing": ({"method": None}, {}, "ok"),  # vLLM recognises the assistant
    "method=5": ({"method": 5}, {}, r"which runs with method 'mtp' .* not method 5"),
    "model missing": ({"model": None}, {}, r"method 'mtp' on a Gemma 4 target needs 'model'"),
    "model not a folder": ({"model": "/nonexistent/assistant"}, {}, r"Invalid repository ID or local directory specified: '/nonexistent/assistant'"),
    "model without config": ({"model": "@noconfig"}, {}, r"Invalid repository ID or local directory specified"),
    "model without weights": ({"model": "@noweights"}, {}, r"no \*\.safetensors weights in assistant folder"),
    "draft_tp=2": ({"draft_tensor_parallel_size": 2}, {}, r"speculative_draft_tensor_parallel_size=2 cannot be other value than 1 or target"),
    "draft_tp=0": ({"draft_tensor_parallel_size": 0}, {}, r"draft_tensor_parallel_size\s+Input should be greater than or equal to 1"),
    "draft_tp='one'": ({"draft_tensor_parallel_size": "one"}, {}, r"draft_tensor_parallel_size\s+Input should be a valid integer"),
    "draft_tp=1": ({"draft_tensor_parallel_size": 1}, {}, "ok"),
    "quantization fp8": ({"quantization": "fp8"}, {}, r"quantization='fp8' for the assistant is not supported by vllm-gemma-mtp"),
    "quantization bogus": ({"quantization": "bogus"}, {}, r"Unknown quantization method: bogus"),
    "draft max_model_len 64": ({"max_model_len": 64}, {}, r"max_model_len=64 for the assistant is shorter than the target's max_model_len=256"),
    "draft max_model_len -1": ({"max_model_len": -1}, {}, r"max_model_len\s+Input should be greater than or equal to 1"),
    "draft max_model_len 10**6": ({"max_model_len": 10**6}, {}, r"User-specified max_model_len \(1000000\) is greater than the derived"),
    "draft max_model_len = target": ({"max_model_len": 256}, {}, "ok"),
    "unknown key": ({"num_speculative_token": 3}, {}, r"num_speculative_token\s+Unexpected keyword argument"),
    "kv_cache_dtype fp8_inc": ({}, {"@kv_cache_dtype": "fp8_inc"}, r"(cannot read a target KV cache of kv_cache_dtype='fp8_inc'|fp8_inc)"),
}
# every plugin option: a wrong value, and an unknown name (options.py validates; the front end raises)
OPTION_CASES = {
    "ENABLE=maybe": ("VLLM_GEMMA_MTP_ENABLE", "maybe", r"VLLM_GEMMA_MTP_ENABLE='maybe' is not a boolean"),
    "QUERY_POSITION=p+2": ("VLLM_GEMMA_MTP_QUERY_POSITION", "p+2", r"VLLM_GEMMA_MTP_QUERY_POSITION='p\+2' is invalid; accepted values: p\+1, p"),
    "KERNELS=cuda": ("VLLM_GEMMA_MTP_KERNELS", "cuda", r"VLLM_GEMMA_MTP_KERNELS='cuda' is invalid; accepted values: auto, triton, torch"),
    "COMPILE=2": ("VLLM_GEMMA_MTP_COMPILE", "2", r"VLLM_GEMMA_MTP_COMPILE='2' is invalid; accepted values: auto, 1, 0"),
    "ADAPTIVE=''": ("VLLM_GEMMA_MTP_ADAPTIVE", "", r"VLLM_GEMMA_MTP_ADAPTIVE='' is not a boolean"),
    "PAGED_ATTENTION=yes": ("VLLM_GEMMA_MTP_PAGED_ATTENTION", "yes", r"VLLM_GEMMA_MTP_PAGED_ATTENTION='yes' is invalid"),
    "FORCE_V1_RUNNER=2": ("VLLM_GEMMA_MTP_FORCE_V1_RUNNER", "2", r"VLLM_GEMMA_MTP_FORCE_V1_RUNNER='2' is not a boolean"),
    "unknown option": ("VLLM_GEMMA_MTP_ADAPTIV", "1", r"unknown vllm-gemma-mtp option VLLM_GEMMA_MTP_ADAPTIV"),
}
# per-request controls (SamplingParams.extra_args = the OpenAI body's vllm_xargs)
REQUEST_CASES = {
    "speculate='yes'": ({"gemma_mtp_speculate": "yes"}, r"gemma_mtp_speculate must be true or false \(or 1/0\), got 'yes'"),
    "speculate=2": ({"gemma_mtp_speculate": 2}, r"gemma_mtp_speculate must be true or false"),
    "speculate=None": ({"gemma_mtp_speculate": None}, r"gemma_mtp_speculate must be true or false"),
    "speculate=[1]": ({"gemma_mtp_speculate": [1]}, r"gemma_mtp_speculate must be true or false"),
    "speculate=false": ({"gemma_mtp_speculate": False}, "ok"),
    "speculate=0": ({"gemma_mtp_speculate": 0}, "ok"),
    "max_draft=-1": ({"gemma_mtp_max_draft_tokens": -1}, r"gemma_mtp_max_draft_tokens must be an integer >= 0, got -1"),
    "max_draft='2'": ({"gemma_mtp_max_draft_tokens": "2"}, r"gemma_mtp_max_draft_tokens must be an integer >= 0, got '2'"),
    "max_draft=1.5": ({"gemma_mtp_max_draft_tokens": 1.5}, r"gemma_mtp_max_draft_tokens must be an integer >= 0"),
    "max_draft=True": ({"gemma_mtp_max_draft_tokens": True}, r"gemma_mtp_max_draft_tokens must be an integer >= 0"),
    "max_draft=None": ({"gemma_mtp_max_draft_tokens": None}, r"gemma_mtp_max_draft_tokens must be an integer >= 0"),
    "max_draft=100": ({"gemma_mtp_max_draft_tokens": 100}, "ok"),  # above the engine's K means the engine's K
    "unknown key": ({"gemma_mtp_speculat": False}, r"unknown vllm-gemma-mtp request option 'gemma_mtp_speculat'"),
    "other keys pass": ({"my_logits_processor_arg": 1}, "ok"),
}

PROGRAM = textwrap.dedent("""
    import json, os, sys
    cases = json.loads(sys.argv[1])
    target, assistant, extras = sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    import vllm_gemma_mtp
    vllm_gemma_mtp.register()
    from vllm.engine.arg_utils import EngineArgs
    from vllm.sampling_params import SamplingParams
    out = {}
    for name, case in cases["config"].items():
        update, env, = case
        sc = {"method": "mtp", "model": assistant, "num_speculative_tokens": 3}
        for k, v in update.items():
            if v is None:
                sc.pop(k, None)
            else:
                sc[k] = extras.get(v, v) if isinstance(v, str) else v
        kw = {k[1:]: v for k, v in env.items() if k.startswith("@")}
        saved = {k: os.environ.get(k) for k in env if not k.startswith("@")}
        os.environ.update({k: v for k, v in env.items() if not k.startswith("@")})
        try:
            EngineArgs(model=target, dtype="float32", max_model_len=256, enforce_eager=True,
                       speculative_config=sc, **kw).create_engine_config()
            out[name] = ["ok", ""]
        except Exception as e:
            out[name] = [type(e).__name__, " ".join(str(e).split())]
        finally:
            for k, v in saved.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    print("CASES", json.dumps(out))
""")


def _sweep(target, assistant, config_cases, extras):
    p = subprocess.run([sys.executable, "-c", PROGRAM, json.dumps({"config": config_cases}), str(target),
                        str(assistant), json.dumps(extras)], capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, VLLM_LOGGING_LEVEL="ERROR"))
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("CASES ")), None)
    assert line, p.stdout[-3000:] + p.stderr[-3000:]
    return json.loads(line[6:])


@pytest.fixture(scope="module")
def sweep(pair, tmp_path_factory):
    import shutil

    p = pair("31b")
    root = tmp_path_factory.mktemp("sweep")
    noconfig = root / "noconfig"
    shutil.copytree(p / "assistant", noconfig)
    (noconfig / "config.json").unlink()
    noweights = root / "noweights"
    shutil.copytree(p / "assistant", noweights)
    for f in noweights.glob("*.safetensors"):
        f.unlink()
    extras = {"@noconfig": str(noconfig), "@noweights": str(noweights)}
    cases = {n: [u, e] for n, (u, e, _) in CONFIG_CASES.items()}
    cases.update({"option " + n: [{}, {var: val}] for n, (var, val, _) in OPTION_CASES.items()})
    return _sweep(p / "target", p / "assistant", cases, extras)


@pytest.mark.parametrize("name", list(CONFIG_CASES))
def test_speculative_config_field(sweep, name):
    import re

    kind, msg = sweep[name]
    expected = CONFIG_CASES[name][2]
    if expected == "ok":
        assert kind == "ok", f"{name}: {kind}: {msg}"
    else:
        assert kind != "ok", f"{name}: accepted, expected an error matching {expected!r}"
        assert re.search(expected, msg), f"{name}: {kind}: {msg}"


@pytest.mark.parametrize("name", list(OPTION_CASES))
def test_plugin_option(sweep, name):
    import re

    kind, msg = sweep["option " + name]
    assert kind == "OptionsError" and re.search(OPTION_CASES[name][2], msg), f"{name}: {kind}: {msg}"


@pytest.mark.parametrize("name", list(REQUEST_CASES))
def test_request_control(name):
    """A bad value is that request's validation error (vLLM's, naming extra_args: HTTP 400 from the server)."""
    import re

    import vllm_gemma_mtp

    vllm_gemma_mtp.register()
    from vllm.sampling_params import SamplingParams

    extra, expected = REQUEST_CASES[name]
    if expected == "ok":
        assert SamplingParams(max_tokens=4, extra_args=extra).extra_args == extra
        return
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError) as e:
        SamplingParams(max_tokens=4, extra_args=extra)
    assert re.search(expected, str(e.value)), str(e.value)
    assert e.value.parameter == "extra_args"


def test_accepted_spellings_run(pair, engine_runs):
    """The config cases that must run do run: K as a string, no method, draft TP 1, draft max_model_len equal to
    the target's, all in one engine; greedy output identical to the target alone."""
    from engine_utils import run_engine

    p = pair("31b")
    base = engine_runs(p / "target")
    r = run_engine(str(p / "target"), None, speculative_config={
        "model": str(p / "assistant"), "num_speculative_tokens": "4", "draft_tensor_parallel_size": 1,
        "max_model_len": 256})
    assert r.drafter_class == "GemmaMTPProposer" and r.stats["rounds"] > 0
    assert r.outputs == base.outputs and all(len(o) == MAX_TOKENS for o in r.outputs) and len(r.outputs) == len(PROMPTS)
