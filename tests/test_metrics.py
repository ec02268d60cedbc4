"""The plugin's metrics without an engine: the worker-side counters, their merge in the engine core, the
SchedulerStats field crossing vLLM's own engine-core -> front-end encoding, and the stat logger writing
Prometheus samples. (On a real server, against vLLM's spec-decode counters: tests/test_serve.py.)"""

from collections import Counter
from types import SimpleNamespace

import pytest

from vllm_gemma_mtp.metrics import StepCounters, merge


def test_counters_take_deltas_and_merge():
    c = StepCounters(max_k=4, adaptive=True)
    assert c.take() is None  # nothing happened: nothing to send
    c.record([4, 0, 2])
    c.record([0, 0, 0], probes=0)
    c.plain_steps += 1
    c.record([1, 0, 0], probes=1)
    c.costs = {"verify": [0.01, 1e-4, 2e-3], "draft": [1e-3, 2e-3, 1e-5], "step_estimate": 0.02}
    a = c.take()
    assert a["k_hist"] == [6, 1, 1, 0, 1] and a["steps"] == 3 and a["skipped_rounds"] == 1
    assert a["plain_steps"] == 1 and a["probes"] == 1
    assert c.take() is None  # taken: counts restart
    c.record([9, -1])  # out of range lengths are clipped into the histogram, never lost
    b = c.take()
    assert b["k_hist"] == [1, 0, 0, 0, 1] and b["costs"] == a["costs"]
    c.record([0])
    c.closed_decisions = 3
    c.remeasures = 1
    d = c.take()
    assert d["closed_decisions"] == 3 and c.closed_decisions == 0
    assert d["remeasures"] == 1 and c.remeasures == 0
    m = merge(a, b)
    assert m["k_hist"] == [7, 1, 1, 0, 2] and m["steps"] == 4 and merge(None, b) is b and merge(a, None) is a
    assert merge(m, d)["closed_decisions"] == 3 and merge(d, d)["remeasures"] == 2


def test_scheduler_stats_field_crosses_vllm_encoding():
    import vllm_gemma_mtp

    vllm_gemma_mtp.register()  # installs the transport (SchedulerStats.gemma_mtp)
    from vllm.v1.engine import EngineCoreOutputs
    from vllm.v1.metrics.stats import SchedulerStats
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

    st = SchedulerStats(num_running_reqs=3)
    assert st.gemma_mtp is None
    c = StepCounters(max_k=2, adaptive=False)
    c.record([2, 2])
    st.gemma_mtp = c.take()
    wire = MsgpackEncoder().encode(EngineCoreOutputs(scheduler_stats=st))
    back = MsgpackDecoder(EngineCoreOutputs).decode(wire)
    assert back.scheduler_stats.num_running_reqs == 3
    assert back.scheduler_stats.gemma_mtp["k_hist"] == [0, 0, 2]
    plain = MsgpackDecoder(EngineCoreOutputs).decode(MsgpackEncoder().encode(EngineCoreOutputs(
        scheduler_stats=SchedulerStats())))
    assert plain.scheduler_stats.gemma_mtp is None


def test_stat_logger_writes_prometheus_samples():
    import prometheus_client
    from vllm.v1.metrics.stats import SchedulerStats

    import vllm_gemma_mtp
    from vllm_gemma_mtp.metrics import GemmaMTPStatLogger

    vllm_gemma_mtp.register()
    cfg = SimpleNamespace(speculative_config=SimpleNamespace(use_gemma4_mtp=lambda: True, num_speculative_tokens=3),
                          model_config=SimpleNamespace(served_model_name="t"))
    lg = GemmaMTPStatLogger(cfg, engine_index=7)
    c = StepCounters(max_k=3, adaptive=True)
    for lens in ([3, 0], [0, 0], [1, 1]):
        c.record(lens)
    c.costs = {"verify": [0.01, 5e-4, 1e-4, 2e-3], "draft": [1e-3, 2e-3, 1e-5], "step_estimate": 0.025,
               "gain_spread": 0.4}
    c.closed_decisions += 2
    c.remeasures += 1
    st = SchedulerStats()
    st.gemma_mtp = c.take()
    lg.record(st, None)
    lg.record(SchedulerStats(), None)  # a step without plugin data changes nothing
    text = prometheus_client.generate_latest().decode()

    def val(name, extra=""):
        key = f'{name}{{engine="7",{extra}model_name="t"}}'  # the text sorts the labels by name
        return float(next(ln for ln in text.splitlines() if ln.startswith(key)).split()[-1])

    assert val("gemma_mtp:draft_length_count") == 6 and val("gemma_mtp:draft_length_sum") == 5
    assert val("gemma_mtp:draft_length_bucket", 'le="0.0",') == 3
    assert val("gemma_mtp:steps_total") == 3 and val("gemma_mtp:draft_rounds_skipped_total") == 1
    assert val("gemma_mtp:step_seconds_estimate") == 0.025
    assert val("gemma_mtp:closed_batch_decisions_total") == 2 and val("gemma_mtp:remeasure_steps_total") == 1
    assert val("gemma_mtp:gain_spread_tokens") == 0.4
    assert any(ln.startswith('gemma_mtp:verify_cost_seconds{engine="7",model_name="t",term="spec_step"} 0.002')
               for ln in text.splitlines())
    assert any(ln.startswith('gemma_mtp:verify_cost_seconds{engine="7",model_name="t",term="per_request"} 0.0005')
               for ln in text.splitlines())
    # the rejection sampler's counts ride along: deltas, merged, summed into counters by label
    c.record([1, 1])
    c.add_sampler({"fused_steps": 2, "ragged_steps": 1, "rows_without_drafts": 1, "features": {"logprobs": 2},
                   "fallbacks": {}})
    c.add_sampler({"fused_steps": 1, "ragged_steps": 0, "rows_without_drafts": 0,
                   "features": {"logprobs": 1, "top-k/top-p": 1}, "fallbacks": {"not Gemma 4 MTP": 1}})
    st = SchedulerStats()
    st.gemma_mtp = merge(c.take(), None)
    assert c.take() is None
    lg.record(st, None)
    text = prometheus_client.generate_latest().decode()
    assert val("gemma_mtp:fused_sampler_steps_total") == 3 and val("gemma_mtp:ragged_steps_total") == 1
    assert val("gemma_mtp:sampler_feature_steps_total", 'feature="logprobs",') == 3
    assert val("gemma_mtp:sampler_feature_steps_total", 'feature="top-k/top-p",') == 1
    assert 'gemma_mtp:sampler_fallback_steps_total{engine="7",model_name="t",reason="not Gemma 4 MTP"} 1.0' in text


def test_sampler_take_delta_reports_changes_once():
    from vllm_gemma_mtp.sampler import GemmaMTPRejectionSampler, _host_counts

    s = GemmaMTPRejectionSampler.__new__(GemmaMTPRejectionSampler)  # the counters only: no engine
    s.fused_steps = s.ragged_steps = s.rows_without_drafts = 0
    s.features, s.fallbacks = Counter(), Counter()
    s._taken = _host_counts(s)
    assert s.take_delta() is None
    s.fused_steps += 2
    s.features["penalties"] += 2
    s.fallbacks["not Gemma 4 MTP"] += 1
    d = s.take_delta()
    assert d == {"fused_steps": 2, "ragged_steps": 0, "rows_without_drafts": 0, "features": {"penalties": 2},
                 "fallbacks": {"not Gemma 4 MTP": 1}}
    assert s.take_delta() is None
    s.features["logprobs"] += 1
    assert s.take_delta()["features"] == {"logprobs": 1}  # only what changed


def test_draft_length_buckets_are_valid_ray_boundaries():
    """Ray's histograms refuse a bound of 0: on Ray's export the first bucket is 0.5 (the replica crashed
    at startup under Ray Serve before this)."""
    from ray.util.metrics import Histogram

    from vllm_gemma_mtp.metrics import draft_length_buckets

    assert draft_length_buckets(4, ray=False)[:2] == [0.0, 1.0]
    b = draft_length_buckets(4, ray=True)
    assert b[0] == 0.5 and all(x > 0 for x in b) and len(b) == 9
    Histogram("gemma_mtp_test_draft_length", "test", boundaries=b)  # raises on a bad boundary


@pytest.mark.parametrize("counts", [[5, 0, 3, 0, 1], [0, 0, 0, 0, 0, 0, 0, 0, 0, 2], [1]])
def test_observe_counts_matches_one_observation_at_a_time(counts):
    import prometheus_client

    from vllm_gemma_mtp.metrics import draft_length_buckets, observe_counts

    reg = prometheus_client.CollectorRegistry()
    kw = dict(buckets=draft_length_buckets(4, False), registry=reg, labelnames=["way"])
    h = prometheus_client.Histogram("t_draft_length", "test", **kw)
    observe_counts(h.labels(way="bulk"), counts)
    one = h.labels(way="single")
    for k, n in enumerate(counts):
        for _ in range(n):
            one.observe(k)

    def samples(way):
        return [(s.name, s.labels.get("le"), s.value) for m in reg.collect() for s in m.samples
                if s.labels.get("way") == way and not s.name.endswith("_created")]

    assert samples("bulk") == samples("single") and samples("bulk")
