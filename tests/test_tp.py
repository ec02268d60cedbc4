"""Tensor parallelism on CPU: the trained pair at tensor_parallel_size=2 (one core per rank), greedy, K=4, on
the held-out code prompts of the acceptance record. The plugin's output must equal no speculation at TP=1,
its acceptance must equal the TP=1 record, both ranks must draft the same tokens, and no worker may log an
ERROR; the adaptive policy (whose draft lengths rank 0 broadcasts) must stay lossless too."""

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
PAIR = ROOT / "tests" / "assets" / "trained_pair"


def _keep_recent(worker):
    worker.model_runner.drafter.stats.keep_recent = 100000


def _rank_report(worker):
    d = worker.model_runner.drafter
    return {"rank": d.tp_rank, "size": d.tp_size, "recent": d.stats.recent, "rounds": d.stats.rounds,
            "q_heads": [L.num_heads for L in d.drafter.layers], "kv_heads": [L.num_kv_heads for L in d.drafter.layers]}


def _prompts():
    from transformers import AutoTokenizer

    from acceptance import SETTINGS
    from bench import code_prompts

    tok = AutoTokenizer.from_pretrained(PAIR / "target")
    return code_prompts(tok, SETTINGS["num_prompts"], tok.bos_token_id or 2)


def _run(mode, tp, prompts, reports=False):
    from acceptance import SETTINGS
    from engine_runs import start_engine, stop_engine, timed_runs

    saved = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    if tp > 1:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i) for i in range(tp))
    try:
        llm = start_engine(str(PAIR / "target"), str(PAIR / "assistant"), mode, SETTINGS["k"],
                           max_num_seqs=len(prompts), tensor_parallel_size=tp)
    finally:
        if saved is None:
            os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
        else:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = saved
    try:
        if reports:
            llm.collective_rpc(_keep_recent)
        r = timed_runs(llm, prompts, SETTINGS["max_tokens"], runs=1, warmup=0, mode=mode, k=SETTINGS["k"])
        ranks = llm.collective_rpc(_rank_report) if reports else None
    finally:
        stop_engine(llm)
    return r, ranks


@pytest.fixture(scope="module")
def prompts():
    return _prompts()


@pytest.fixture(scope="module")
def plain_tp1(prompts):
    return _run("none", 1, prompts)[0]


def test_tp2_plugin_is_lossless_with_tp1_acceptance_on_every_rank(prompts, plain_tp1, capfd):
    r, ranks = _run("plugin", 2, prompts, reports=True)
    logs = capfd.readouterr()
    assert r.outputs == plain_tp1.outputs
    rec = json.loads((PAIR / "acceptance_k4.json").read_text())
    assert abs(r.mean_acceptance_length - rec["mean_acceptance_length"]) <= 0.02 * rec["mean_acceptance_length"], (
        r.mean_acceptance_length, rec["mean_acceptance_length"])
    assert [x["rank"] for x in ranks] == [0, 1] and all(x["size"] == 2 for x in ranks)
    # each rank computes its half of the query heads over its one KV head (the pair has 4 and 2)
    assert all(x["q_heads"] == [2] * len(x["q_heads"]) and x["kv_heads"] == [1] * len(x["kv_heads"]) for x in ranks)
    assert ranks[0]["rounds"] > 20 and ranks[0]["recent"] == ranks[1]["recent"], "the ranks drafted different tokens"
    text = logs.out + logs.err
    # the workers' log lines are in what we captured (both ranks' startup lines), so no ERROR means none
    assert "tensor parallel rank 0/2" in text and "tensor parallel rank 1/2" in text
    errors = [ln for ln in text.splitlines() if " ERROR " in ln or "Traceback" in ln]
    assert not errors, errors[:5]


def test_tp2_adaptive_is_lossless(prompts, plain_tp1, capfd):
    r, _ = _run("adaptive", 2, prompts)
    logs = capfd.readouterr()
    assert r.outputs == plain_tp1.outputs
    assert r.num_drafts > 0
    errors = [ln for ln in (logs.out + logs.err).splitlines() if " ERROR " in ln or "Traceback" in ln]
    assert not errors, errors[:5]


def test_pipeline_parallelism_is_refused_with_its_reason():
    from vllm import LLM

    with pytest.raises(Exception, match="pipeline parallelism") as e:
        LLM(model=str(PAIR / "target"), dtype="float32", max_model_len=256, enforce_eager=True,
            pipeline_parallel_size=2, kv_cache_memory_bytes=32 << 20,
            speculative_config={"method": "mtp", "model": str(PAIR / "assistant"), "num_speculative_tokens": 4})
    assert "vllm-gemma-mtp" in str(e.value)


def test_draft_tp_other_than_the_target_tp_is_refused():
    from vllm import LLM

    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"
    try:
        with pytest.raises(Exception, match="draft_tensor_parallel_size=1") as e:
            LLM(model=str(PAIR / "target"), dtype="float32", max_model_len=256, enforce_eager=True,
                tensor_parallel_size=2, kv_cache_memory_bytes=32 << 20,
                speculative_config={"method": "mtp", "model": str(PAIR / "assistant"), "num_speculative_tokens": 4,
                                    "draft_tensor_parallel_size": 1})
    finally:
        os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
    assert "vllm-gemma-mtp" in str(e.value)


def test_ray_executor_on_cpu_gets_the_plugins_explanation():
    from vllm import LLM

    with pytest.raises(Exception, match="not available on a CPU platform") as e:
        LLM(model=str(PAIR / "target"), dtype="float32", max_model_len=256, enforce_eager=True,
            distributed_executor_backend="ray", kv_cache_memory_bytes=32 << 20,
            speculative_config={"method": "mtp", "model": str(PAIR / "assistant"), "num_speculative_tokens": 4})
    assert "vllm-gemma-mtp" in str(e.value) and "Ray Serve" in str(e.value)
