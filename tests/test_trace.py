"""VLLM_GEMMA_MTP_TRACE in a real engine: one line per decision and per cost sample, in step with the
proposer's own counters, and scripts/trace_summary.py reading it back."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
PAIR = ROOT / "tests" / "assets" / "trained_pair"


def test_trace_records_every_decision_and_cost_sample(engine_runs, tmp_path_factory):
    from vllm_gemma_mtp.decision_log import read

    path = tmp_path_factory.mktemp("trace") / "trace.jsonl"
    run = engine_runs(PAIR / "target", PAIR / "assistant", 4,
                      env={"VLLM_GEMMA_MTP_TRACE": str(path), "VLLM_GEMMA_MTP_ADAPTIVE": "1"})
    base = engine_runs(PAIR / "target")
    assert run.outputs == base.outputs  # tracing changes nothing the engine emits
    lines = read(path)
    assert {x["pid"] for x in lines} and len({x["pid"] for x in lines}) == 1  # one worker (rank 0)
    start = [x for x in lines if x["ev"] == "start"]
    assert len(start) == 1 and start[0]["k"] == 4 and start[0]["adaptive"] is True
    dec = [x for x in lines if x["ev"] == "decide"]
    st = run.stats
    assert len(dec) == sum(st["decisions"].values()) - st["held_fast"]  # held steps are counted, not lined
    assert sum(x["held"] for x in dec) <= st["held_fast"]  # (those after the last decision are not on a line)
    assert [x["step"] for x in dec] == sorted(x["step"] for x in dec)
    assert all(1 <= len(x["k"]) <= 8 and all(0 <= k <= 4 for k in x["k"]) for x in dec)
    assert {x["why"] for x in dec} >= {"calibration", "policy"}
    # the chooser's view is on every line once the cost model is ready
    ready = [x for x in dec if x["verify"] is not None]
    assert ready and all(len(x["verify"]) == 4 and x["verify"][0] >= 0 and x["est"] > 0 for x in ready)
    drafts = [x for x in lines if x["ev"] == "draft"]
    assert len(drafts) == st["rounds"] and all(x["ms"] > 0 and 1 <= x["rows"] <= 8 for x in drafts)
    ver = [x for x in lines if x["ev"] == "verify"]
    assert ver and all(x["ms"] > 0 for x in ver) and any(x["kept"] for x in ver)
    assert sum(x["kept"] for x in ver) == st["policy"]["verify_samples"]

    from trace_summary import main, segments, summarize

    text = summarize(lines)
    assert "segments" in text and "verify samples" in text and "draft rounds" in text
    segs = segments(dec)
    assert sum(s["decisions"] for s in segs) == len(dec)
    assert main([str(path), "--plot", str(path.with_suffix(".png"))]) == 0 and path.with_suffix(".png").stat().st_size
