"""Run a real vLLM engine once per configuration and keep what the tests need.

Engine starts cost ~25 s on CPU, so every (pair, speculation) configuration is started once per test
session; its outputs, vLLM metrics and the worker-side proposer stats are cached, and the engine is shut
down before the next one starts (only one engine holds memory at a time).
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc with a function

# Prompts of different lengths (token ids; 2 = <bos>), and outputs longer than the fixtures' sliding window.
PROMPTS = [
    [2, 40, 41, 42],
    [2] + list(range(100, 109)),
    [2] + list(range(200, 220)),
    [2] + [(7 * i) % 500 + 5 for i in range(37)],
]
MAX_TOKENS = 48
KV_CACHE_BYTES = 64 << 20  # fixed KV budget so block counts compare across configurations


@dataclass
class EngineResult:
    outputs: list[list[int]]
    request_ids: list[str]
    metrics: dict
    drafter_class: str | None
    stats: dict | None
    num_blocks: int
    kv_layer_names: list[str]


def _worker_probe(worker):
    r = worker.model_runner
    d = getattr(r, "drafter", None)
    st = getattr(d, "stats", None)
    names = [n for g in r.kv_cache_config.kv_cache_groups for n in g.layer_names]
    stats = st.as_dict() if st is not None else None
    rs = getattr(r, "rejection_sampler", None)
    if stats is not None and hasattr(rs, "stats"):
        stats["sampler"] = rs.stats()
    return (type(d).__name__ if d is not None else None, stats, int(r.kv_cache_config.num_blocks), names)


def _keep_recent(worker):
    d = getattr(worker.model_runner, "drafter", None)
    if d is not None and hasattr(d, "stats"):
        d.stats.keep_recent = 100000


def collect_metrics(llm) -> dict:
    out = {}
    for m in llm.get_metrics():
        if m.name.startswith("vllm:spec_decode"):
            out[m.name] = getattr(m, "values", None) if hasattr(m, "values") else getattr(m, "value", None)
    return out


def run_engine(target: str, assistant: str | None, k: int = 3, prompts=None, max_tokens: int = MAX_TOKENS,
               env: dict | None = None, record_rounds: bool = False, sampling_params=None,
               **engine_kw) -> EngineResult:
    from vllm import LLM, SamplingParams

    saved = {key: os.environ.get(key) for key in (env or {})}
    os.environ.update(env or {})
    kw = dict(model=target, dtype="float32", max_model_len=256, enforce_eager=True, max_num_seqs=8,
              max_num_batched_tokens=512, kv_cache_memory_bytes=KV_CACHE_BYTES, disable_log_stats=False,
              seed=0)
    kw.update(engine_kw)
    if assistant is not None:
        kw["speculative_config"] = {"method": "mtp", "model": assistant, "num_speculative_tokens": k}
    llm = LLM(**kw)
    try:
        if record_rounds:
            llm.collective_rpc(_keep_recent)
        sp = sampling_params or SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": list(p)} for p in (prompts or PROMPTS)], sp, use_tqdm=False)
        cls, stats, nb, names = llm.collective_rpc(_worker_probe)[0]
        return EngineResult([list(o.outputs[0].token_ids) for o in outs], [o.request_id for o in outs],
                            collect_metrics(llm), cls, stats, nb, names)
    finally:
        shutdown(llm)
        for key, v in saved.items():
            if v is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = v


def shutdown(llm) -> None:
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # noqa: BLE001 - best effort; the process exit cleans up anyway
        pass
    del llm
    gc.collect()
