"""Ray demo: a local Ray cluster, the trained tiny pair served by Ray Serve with the plugin, a batch of
OpenAI requests, then throughput and acceptance, and everything shut down.

    python scripts/ray_demo.py [--requests 32] [--concurrency 8] [--max-tokens 64] [--k 4] [--verbose]

The plugin reaches the cluster as a wheel in the job's runtime_env (vllm_gemma_mtp.ray.job_runtime_env);
acceptance comes from vLLM's spec-decode counters on Ray's metrics export. vLLM's and Ray's own log lines
are hidden unless --verbose.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from engine_runs import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PAIR = ROOT / "tests" / "assets" / "trained_pair"
TEXTS = ["def parse_args(argv):\n    ", "class Stack:\n    def __init__(self):\n        ",
         "import os\nimport sys\n\n\ndef main():\n    ", "    for i in range(len(items)):\n        ",
         "try:\n    import json\nexcept ImportError:\n    ", "def __repr__(self):\n        return "]


def spec_counters(port: int) -> dict[str, float]:
    """Sum of each ray_vllm_spec_decode_* counter on Ray's metrics export."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        page = r.read().decode()
    out: dict[str, float] = {}
    for ln in page.splitlines():
        if ln.startswith("ray_vllm_spec_decode_") and "_per_pos" not in ln:
            head, val = ln.rsplit(" ", 1)
            name = head.split("{")[0]
            out[name] = out.get(name, 0.0) + float(val)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--verbose", action="store_true", help="show vLLM's and Ray's log lines")
    args = ap.parse_args()
    if not args.verbose:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("RAY_LOG_TO_STDERR", "0")
    os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")  # a busy small box: keep Ray from killing actors
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    import logging

    import openai
    import ray
    from ray import serve
    from tqdm import tqdm

    from vllm_gemma_mtp import ray as gm_ray

    if not args.verbose:
        for name in ("ray", "ray.serve", "ray.data"):
            logging.getLogger(name).setLevel(logging.WARNING)
    metrics_port, http_port = free_port(), free_port()
    t0 = time.perf_counter()
    rt = gm_ray.job_runtime_env(env_vars={} if args.verbose else {"VLLM_LOGGING_LEVEL": "WARNING"})
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, _node_ip_address="127.0.0.1",
             _metrics_export_port=metrics_port, runtime_env=copy.deepcopy(rt), log_to_driver=args.verbose,
             logging_level=logging.INFO if args.verbose else logging.WARNING)
    t_ray = time.perf_counter() - t0
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": http_port})
        t1 = time.perf_counter()
        app = gm_ray.serve_app(str(PAIR / "target"), str(PAIR / "assistant"), model_id="tiny-gemma4",
                               num_speculative_tokens=args.k,
                               engine_kwargs=dict(dtype="float32", max_model_len=1024, max_num_seqs=args.concurrency,
                                                  kv_cache_memory_bytes=128 << 20, enforce_eager=True),
                               ingress_deployment_config={"ray_actor_options": {"num_cpus": 0}})
        serve.run(app, blocking=False)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="none", timeout=600)
        with tqdm(desc="deploying (engine start)", bar_format="{desc}: {elapsed}") as bar:
            while True:
                try:
                    client.models.list()
                    break
                except Exception:  # noqa: BLE001 - still starting
                    time.sleep(2)
                    bar.update()
        t_app = time.perf_counter() - t1
        before = spec_counters(metrics_port)
        if not args.verbose:  # Ray (init and Serve) installs its own JSON root handler: warnings only
            for name in ("", "httpx", "openai"):
                logging.getLogger(name).setLevel(logging.WARNING)

        def one(i):
            r = client.completions.create(model="tiny-gemma4", prompt=TEXTS[i % len(TEXTS)],
                                          max_tokens=args.max_tokens, temperature=0)
            return r.usage.completion_tokens

        t2 = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as ex:
            tokens = sum(tqdm(ex.map(one, range(args.requests)), total=args.requests, desc="requests"))
        dt = time.perf_counter() - t2
        time.sleep(8)  # one Ray metrics export period
        after = spec_counters(metrics_port)
        drafts = after.get("ray_vllm_spec_decode_num_drafts_total", after.get("ray_vllm_spec_decode_num_drafts", 0)) - \
            before.get("ray_vllm_spec_decode_num_drafts_total", before.get("ray_vllm_spec_decode_num_drafts", 0))
        acc = after.get("ray_vllm_spec_decode_num_accepted_tokens_total",
                        after.get("ray_vllm_spec_decode_num_accepted_tokens", 0)) - \
            before.get("ray_vllm_spec_decode_num_accepted_tokens_total",
                       before.get("ray_vllm_spec_decode_num_accepted_tokens", 0))
        print(f"Ray head {t_ray:.1f} s, Serve app ready {t_app:.1f} s")
        print(f"{args.requests} requests, concurrency {args.concurrency}: {tokens} tokens in {dt:.1f} s = "
              f"{tokens / dt:.1f} output tokens/s")
        if drafts:
            print(f"mean acceptance length {1 + acc / drafts:.2f} ({drafts:.0f} draft rounds, K={args.k}; "
                  "from Ray's metrics export)")
        else:
            print("no spec-decode counters on Ray's metrics export yet")
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
