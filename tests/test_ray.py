"""Ray with the plugin on one CPU machine: a local Ray head (loopback, started and stopped here), the plugin
shipped to it as a wheel in the job's runtime_env, then

- Ray Serve (vllm_gemma_mtp.ray.serve_app): OpenAI completions and streaming chat through the official
  `openai` client, greedy output identical to an offline no-speculation `LLM`; vLLM's spec-decode counters
  > 0 on Ray's metrics export; the plugin's startup line in the replica's log;
- Ray Data (vllm_gemma_mtp.ray.data_processor) over 32 rows: outputs identical to offline no speculation.

2 cores: the Serve ingress takes no CPU and the engine one; Ray's memory monitor is off (it kills busy
actors on a small box); Data's tokenize/detokenize stages are off (rows carry token ids)."""

import copy
import glob
import os
import time
import urllib.request
from pathlib import Path

import pytest

from engine_runs import free_port

ROOT = Path(__file__).resolve().parents[1]
PAIR = ROOT / "tests" / "assets" / "trained_pair"
TARGET, ASSISTANT = str(PAIR / "target"), str(PAIR / "assistant")
ENGINE = dict(dtype="float32", max_model_len=512, enforce_eager=True, max_num_seqs=8,
              kv_cache_memory_bytes=64 << 20, seed=0)
MAX_TOKENS = 24
TEXTS = ["def fibonacci(n):\n", "import os\nimport sys\n\n", "class Stack:\n    def __init__(self):\n",
         "for i in range(10):\n"]


def _draft_samples(metrics_port: int) -> dict[str, float]:
    """{labels: value} of ray_vllm_spec_decode_num_drafts* samples on Ray's metrics export."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        page = r.read().decode()
    out = {}
    for ln in page.splitlines():
        if ln.startswith("ray_vllm_spec_decode_num_drafts"):
            head, val = ln.rsplit(" ", 1)
            out[head] = float(val)
    return out


def _wait_for_new_drafts(metrics_port: int, seen: dict, timeout_s: float = 90) -> dict:
    """Samples with drafts > 0 that are not in `seen` (an engine that drafted since), waited for up to timeout_s
    (Ray exports every few seconds)."""
    deadline, new = time.time() + timeout_s, {}
    while time.time() < deadline:
        new = {k: v for k, v in _draft_samples(metrics_port).items() if v > 0 and seen.get(k) != v}
        if new:
            break
        time.sleep(3)
    return new


@pytest.fixture(scope="module")
def offline():
    """No-speculation reference: completions of TEXTS, the chat answer, and 32 token-id prompts."""
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from engine_utils import shutdown

    tok = AutoTokenizer.from_pretrained(TARGET)
    rows = [[2] + tok.encode(TEXTS[i % 4], add_special_tokens=False) + [5 + i] for i in range(32)]
    llm = LLM(model=TARGET, **ENGINE)
    try:
        sp = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
        comp = [o.outputs[0].text for o in llm.generate(TEXTS, sp, use_tqdm=False)]
        chat = llm.chat([{"role": "user", "content": "def add(a, b):"}], sp, use_tqdm=False)[0].outputs[0].text
        data = [list(o.outputs[0].token_ids) for o in
                llm.generate([{"prompt_token_ids": r} for r in rows], sp, use_tqdm=False)]
    finally:
        shutdown(llm)
    return {"completions": comp, "chat": chat, "rows": rows, "data": data}


@pytest.fixture(scope="module")
def cluster(offline, tmp_path_factory):
    import ray

    from vllm_gemma_mtp import ray as gm_ray

    os.environ["RAY_memory_monitor_refresh_ms"] = "0"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    metrics_port = free_port()
    t0 = time.perf_counter()
    rt = gm_ray.job_runtime_env(options={"adaptive": False}, ship_plugin=True)
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", _metrics_export_port=metrics_port,
             runtime_env=copy.deepcopy(rt),  # ray.init rewrites py_modules to gcs:// URIs in place
             _temp_dir=str(tmp_path_factory.mktemp("ray")), log_to_driver=False)
    started = time.perf_counter() - t0
    try:
        yield {"metrics_port": metrics_port, "start_s": started, "runtime_env": rt,
               "logs": ray._private.worker.global_worker.node.get_logs_dir_path()}
    finally:
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            os.environ.pop("RAY_memory_monitor_refresh_ms", None)


def test_runtime_env_ships_a_wheel_with_the_entry_points(cluster):
    import zipfile

    wheel = cluster["runtime_env"]["py_modules"][0]
    assert wheel.endswith(".whl")
    with zipfile.ZipFile(wheel) as z:
        eps = next(n for n in z.namelist() if n.endswith("entry_points.txt"))
        text = z.read(eps).decode()
    assert "vllm.general_plugins" in text and "gemma_mtp = vllm_gemma_mtp:register" in text
    assert cluster["runtime_env"]["env_vars"]["VLLM_GEMMA_MTP_ADAPTIVE"] == "0"


def test_serve_app_answers_openai_like_offline_no_spec(cluster, offline):
    import openai
    from ray import serve

    from vllm_gemma_mtp import ray as gm_ray

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    t0 = time.perf_counter()
    app = gm_ray.serve_app(TARGET, ASSISTANT, model_id="tiny-gemma4", num_speculative_tokens=4,
                           engine_kwargs=ENGINE, ingress_deployment_config={"ray_actor_options": {"num_cpus": 0}})
    serve.run(app, blocking=False)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=300)
    deadline = time.time() + 600
    while True:
        try:
            client.models.list()
            break
        except Exception:  # noqa: BLE001 - the replica is still starting
            if time.time() > deadline:
                raise
            time.sleep(2)
    print(f"Serve app ready in {time.perf_counter() - t0:.1f} s (Ray head {cluster['start_s']:.1f} s)")
    for text, want in zip(TEXTS, offline["completions"]):
        got = client.completions.create(model="tiny-gemma4", prompt=text, max_tokens=MAX_TOKENS, temperature=0)
        assert got.choices[0].text == want
    stream = client.chat.completions.create(model="tiny-gemma4", messages=[{"role": "user", "content": "def add(a, b):"}],
                                            max_tokens=MAX_TOKENS, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == offline["chat"]
    # per-request control through vllm_xargs, and a bad one is a 400, not a dead replica
    off = client.completions.create(model="tiny-gemma4", prompt=TEXTS[0], max_tokens=MAX_TOKENS, temperature=0,
                                    extra_body={"vllm_xargs": {"gemma_mtp_speculate": False}})
    assert off.choices[0].text == offline["completions"][0]
    with pytest.raises(openai.BadRequestError, match="gemma_mtp"):
        client.completions.create(model="tiny-gemma4", prompt=TEXTS[0], max_tokens=4,
                                  extra_body={"vllm_xargs": {"gemma_mtp_max_draft_tokens": -1}})

    # vLLM's spec-decode counters on Ray's metrics export (scraped every few seconds)
    drafts = _wait_for_new_drafts(cluster["metrics_port"], {})
    assert drafts, "no ray_vllm_spec_decode_num_drafts > 0 on Ray's metrics export"
    # the plugin's own metrics reach Ray's export too (vLLM's Ray wrappers: ':' becomes '_')
    deadline = time.time() + 60
    while time.time() < deadline:
        with urllib.request.urlopen(f"http://127.0.0.1:{cluster['metrics_port']}/metrics", timeout=10) as r:
            steps = [float(ln.rsplit(" ", 1)[1]) for ln in r.read().decode().splitlines()
                     if ln.startswith("ray_gemma_mtp_steps")]
        if steps and max(steps) > 0:
            break
        time.sleep(3)
    assert steps and max(steps) > 0, "the plugin's gemma_mtp metrics are not on Ray's metrics export"
    time.sleep(6)  # one more export period: the final counts
    cluster["drafts_after_serve"] = _draft_samples(cluster["metrics_port"])
    # the plugin's startup line in the replica's log
    lines = [ln for f in glob.glob(os.path.join(cluster["logs"], "**", "*"), recursive=True) if os.path.isfile(f)
             for ln in open(f, errors="replace") if "vllm-gemma-mtp" in ln and "active" in ln]
    assert lines, "the plugin's startup line is in no Ray log"
    serve.delete("default")


def test_data_processor_matches_offline_no_spec(cluster, offline):
    import ray

    from vllm_gemma_mtp import ray as gm_ray

    t0 = time.perf_counter()
    proc = gm_ray.data_processor(TARGET, ASSISTANT, num_speculative_tokens=4, engine_kwargs=ENGINE,
                                 sampling_params={"temperature": 0.0, "max_tokens": MAX_TOKENS},
                                 batch_size=16, tokenize=False, detokenize=False)
    ds = ray.data.from_items([{"i": i, "tokenized_prompt": r} for i, r in enumerate(offline["rows"])])
    out = sorted(proc(ds).take_all(), key=lambda r: r["i"])
    print(f"Ray Data: {len(out)} rows in {time.perf_counter() - t0:.1f} s")
    assert [list(r["generated_tokens"]) for r in out] == offline["data"]
    # the Data engine drafted (its spec-decode counters reach Ray's export too)
    assert _wait_for_new_drafts(cluster["metrics_port"], cluster.get("drafts_after_serve", {})), \
        "the Data engine's spec-decode counters did not reach Ray's metrics export"
