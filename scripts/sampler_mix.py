"""Where the plugin's rejection sampler sends a mixed workload: one engine (trained pair, K=3), one batch
that carries every sampling feature a Gemma 4 MTP request can have, then the sampler's counters - steps on
the fused path, the features they carried, and any step handed to vLLM's own sampler (by reason).

    python scripts/sampler_mix.py                      # --verbose shows vLLM's log lines
    python scripts/sampler_mix.py --skip top-k/top-p   # leave a kind of request out
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
PAIR = ROOT / "tests" / "assets" / "trained_pair"


def mixed_requests():
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    base = dict(max_tokens=24, ignore_eos=True)
    kinds = {
        "greedy": SamplingParams(temperature=0.0, **base),
        "random": SamplingParams(temperature=1.0, **base),
        "seeded": SamplingParams(temperature=0.8, seed=7, **base),
        "penalties": SamplingParams(temperature=1.0, repetition_penalty=1.3, frequency_penalty=0.5,
                                    presence_penalty=0.5, **base),
        "bad words": SamplingParams(temperature=1.0, bad_words=["self"], **base),
        "allowed ids": SamplingParams(temperature=1.0, allowed_token_ids=list(range(0, 2048, 3)), **base),
        "min_tokens": SamplingParams(temperature=1.0, min_tokens=8, max_tokens=24, stop_token_ids=[10]),
        "top-k/top-p": SamplingParams(temperature=1.0, top_k=8, top_p=0.9, **base),
        "logprobs": SamplingParams(temperature=0.7, logprobs=2, **base),
        "json": SamplingParams(temperature=0.0, max_tokens=48, structured_outputs=StructuredOutputsParams(
            json={"type": "object", "properties": {"a": {"enum": [1, 2, 3]}}, "required": ["a"]})),
    }
    prompts = ["    def __init__(self, ", "import os\nimport ", "    return self.", "class "]
    return [(k, p, sp) for k, sp in kinds.items() for p in prompts]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--verbose", action="store_true", help="show vLLM's own log lines")
    ap.add_argument("--skip", nargs="*", default=[], help="kinds of request to leave out")
    args = ap.parse_args()
    if not args.verbose:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        logging.getLogger("vllm").setLevel(logging.ERROR)
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    from vllm import LLM

    from engine_utils import KV_CACHE_BYTES, _worker_probe, shutdown

    llm = LLM(model=str(PAIR / "target"), dtype="float32", max_model_len=512, enforce_eager=True, max_num_seqs=16,
              kv_cache_memory_bytes=KV_CACHE_BYTES, seed=0,
              structured_outputs_config={"backend": "xgrammar", "disable_any_whitespace": True},
              speculative_config={"method": "mtp", "model": str(PAIR / "assistant"), "num_speculative_tokens": 3})
    try:
        reqs = [r for r in mixed_requests() if r[0] not in args.skip]
        outs = llm.generate([p for _, p, _ in reqs], [sp for _, _, sp in reqs], use_tqdm=True)
        stats = llm.collective_rpc(_worker_probe)[0][1]["sampler"]
        print(json.dumps({"requests": len(reqs), "tokens": sum(len(o.outputs[0].token_ids) for o in outs),
                          "sampler": stats}, indent=1))
    finally:
        shutdown(llm)


if __name__ == "__main__":
    main()
