"""The benchmark's helpers that need no engine: pooling replicates, and putting host processes on the cores
the workers leave free (a real child process stands in for a vLLM worker)."""

import os
import subprocess
import sys
import time

import pytest

from engine_runs import RunResult, merge_results, pin_host_processes, unpin_this_process


def test_merge_results_pools_runs_and_weights_acceptance_by_drafts():
    a = RunResult("adaptive", 4, 8, 100.0, [90.0, 100.0, 110.0], mean_acceptance_length=3.0,
                  per_position_acceptance=[1.0, 0.5], num_drafts=10, outputs=[[1]])
    b = RunResult("adaptive", 4, 8, 130.0, [120.0, 130.0, 140.0], mean_acceptance_length=1.0,
                  per_position_acceptance=[0.0, 0.0], num_drafts=30, outputs=[[2]])
    m = merge_results([a, b])
    assert m.tokens_per_s_all == [90.0, 100.0, 110.0, 120.0, 130.0, 140.0]
    assert m.tokens_per_s == pytest.approx(115.0)  # the median of all six runs, not of the two medians
    assert m.num_drafts == 40
    assert m.mean_acceptance_length == pytest.approx((3.0 * 10 + 1.0 * 30) / 40)
    assert m.per_position_acceptance == pytest.approx([0.25, 0.125])
    none = merge_results([RunResult("none", 0, 8, 1.0, [1.0]), RunResult("none", 0, 8, 3.0, [3.0])])
    assert none.mean_acceptance_length is None and none.tokens_per_s == 2.0


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 or more usable cores")
def test_pin_host_processes_moves_everything_but_workers_off_the_worker_cores():
    allowed = set(os.sched_getaffinity(0))
    worker_core = min(allowed)
    code = ("import os, time; open('/proc/self/comm', 'w').write('VLLM::Worker'); "
            f"os.sched_setaffinity(0, {{{worker_core}}}); print('ready', flush=True); time.sleep(60)")
    worker = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    host = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert worker.stdout.readline().strip() == "ready"
        time.sleep(0.2)
        got = pin_host_processes()
        assert got is not None
        assert got["worker_cores"] == [worker_core]
        assert got["host_cores"] == sorted(allowed - {worker_core})
        assert os.sched_getaffinity(0) == allowed - {worker_core}
        assert os.sched_getaffinity(host.pid) == allowed - {worker_core}
        assert os.sched_getaffinity(worker.pid) == {worker_core}  # the worker keeps its own binding
        unpin_this_process(allowed)  # what bench.py does before it starts the next engines
        assert all(os.sched_getaffinity(int(t)) == allowed for t in os.listdir("/proc/self/task"))
    finally:
        unpin_this_process(allowed)
        for p in (worker, host):
            p.kill()
            p.wait()


def test_pin_host_processes_does_nothing_without_workers():
    before = os.sched_getaffinity(0)
    assert pin_host_processes() is None
    assert os.sched_getaffinity(0) == before


def test_e2e_per_token_is_latency_over_tokens_of_successful_requests():
    from bench_online import e2e_per_token

    # a bursty stream and a smooth one of the same length and latency read the same here, whatever TTFT says
    out = e2e_per_token([0.5, 1.0, 2.0, 9.0], [100, 100, 100, 0], [None, "", None, None])
    # per request 5, 10 and 20 ms a token; the one with no tokens is left out
    assert out["median_e2e_ms_per_token"] == pytest.approx(10.0)
    assert 19.0 < out["p99_e2e_ms_per_token"] <= 20.0
    failed = e2e_per_token([0.5, 3.0], [100, 100], [None, "Server disconnected"])  # a failed request is left out
    assert failed["median_e2e_ms_per_token"] == pytest.approx(5.0)
    assert e2e_per_token([], [], [])["median_e2e_ms_per_token"] is None
