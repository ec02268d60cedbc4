"""The CI version of scripts/soak.py (the full run is 1000 requests at concurrency 32): a real OpenAI server with
the plugin under a mixed load with dropped streams and preemption, checked afterwards (server alive, no
request left running, KV usage 0, RSS steady after warm-up, JSON valid) and every completed greedy request
replayed on a server without speculation.

The servers run with oneDNN's primitive cache off (`--onednn-cache 0`). That cache keeps one compiled matmul
per new input shape, up to 1024, and under this load's changing batch shapes it grew the worker by ~80-120 MiB
(+3.6 to +4.8 % of the server's RSS in 120 requests), with or without speculation, with glibc's malloc or
tcmalloc (README "Reliability", 2026-12-07). With it off the worker grew 11 MiB without speculation and
25 MiB with the plugin. So the RSS check here asserts what the plugin and vLLM hold, not how full a bounded
shape cache is, and it is asserted like every other check."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.engine
def test_soak_short(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "soak.py"), "--requests", "120", "--concurrency", "16",
                        "--max-prompt", "1500", "--onednn-cache", "0", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=1800)
    rep_path = tmp_path / "soak.json"
    assert rep_path.exists(), p.stdout[-3000:] + p.stderr[-3000:]
    rep = json.loads(rep_path.read_text())
    failed = [k for k, v in rep["checks"].items() if not v]
    assert not failed, (failed, rep)
    assert set(rep["rss_mib"]) == {"warm", "half", "three_quarters", "end"}
    mix = rep["mix"]
    assert mix["dropped_streams"] > 0 and mix["json schema"] > 0 and mix["n=2"] > 0 and mix["chat"] > 0
    # the sampler check above means something: the mix carried the features it looks for
    assert mix["penalties"] > 0 and mix["top_k/top_p"] > 0 and mix["logprobs"] > 0
    assert rep["sampler"]["features"].get("top-k/top-p", 0) > 0 and not rep["sampler"]["fallbacks"]
    assert rep["lossless"]["identical"] == rep["lossless"]["greedy_completed"] > 20
    assert rep["metrics_after"]["vllm:spec_decode_num_drafts_total"] > 0
