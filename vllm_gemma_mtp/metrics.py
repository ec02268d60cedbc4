"""The plugin's Prometheus metrics, on the same /metrics as vLLM's (and on Ray's metrics export when the
engine runs inside a Ray actor, as vLLM's own do under Ray Serve).

Where the numbers come from: the proposer, in the worker, counts what the policy chose each step
(`StepCounters`, plain code). Every step the rank-0 worker attaches the counts since the previous step to
its ModelRunnerOutput; the engine core adds them up and sends them to the front end inside the
SchedulerStats it already sends (compat.patch_metrics_transport); the front end's `GemmaMTPStatLogger`, a
`vllm.stat_logger_plugins` entry point that vLLM's AsyncLLM loads beside its own loggers, turns them into
metrics. vLLM's `vllm:spec_decode_*` counters are untouched: the scheduler computes them from what was
actually scheduled and accepted, so they stay right with variable draft lengths.

Metrics (labels model_name, engine, like vLLM's):
  gemma_mtp:draft_length                    histogram, one observation per request per step: its drafts
  gemma_mtp:steps_total                     steps the plugin's proposer ran
  gemma_mtp:draft_rounds_skipped_total      steps where no request drafted (no draft round ran)
  gemma_mtp:plain_steps_total               steps the runner ran as plain decoding (no drafts to verify)
  gemma_mtp:probes_total                    1-token probes of requests at 0 drafts
  gemma_mtp:probes_deferred_total           times due probes were put off to keep probes within 2% of the
                                            step time (policy.PolicyConfig.probe_budget)
  gemma_mtp:closed_batch_decisions_total    chooser runs for a closed batch (nothing waiting, nobody joined
                                            lately): lengths chosen by when the batch ends
                                            (policy.choose_closed_batch), not by tokens per step
  gemma_mtp:remeasure_steps_total           full-length steps run because the batch size moved far from
                                            where drafting was last timed (policy remeasure)
  gemma_mtp:gain_spread_tokens              between-request spread of the drafting gain (accepted tokens of
                                            a full draft) that closed batches are discounted by
  gemma_mtp:verify_cost_seconds{term}       the cost model's verify step: fixed, per_request, per_token, spec_step
  gemma_mtp:draft_cost_seconds{term}        its draft round: fixed, per_step, per_row_step
  gemma_mtp:step_seconds_estimate           predicted seconds of the latest step (verify + draft round)
  gemma_mtp:adaptive                        1 when draft lengths are chosen per step, 0 for fixed K
  gemma_mtp:fused_sampler_steps_total       verify steps sampled by the plugin's fused rejection sampler
  gemma_mtp:sampler_fallback_steps_total{reason}  verify steps handed to vLLM's rejection sampler, by reason
  gemma_mtp:sampler_feature_steps_total{feature}  fused steps that carried a sampling feature (penalties,
                                            top-k/top-p, logprobs, bad words, ...), by feature
  gemma_mtp:ragged_steps_total              fused steps whose requests had different draft counts
Only the offline `LLM` class loads no stat-logger plugins (vLLM's choice); there, `scripts/engine_runs.py`'s
`policy_state` reads the same numbers from the worker.
"""

from __future__ import annotations

from dataclasses import dataclass, field

PREFIX = "gemma_mtp:"


@dataclass
class StepCounters:
    """Worker side: what happened since the last `take()`. No vLLM imports."""

    max_k: int
    adaptive: bool
    k_hist: list = None
    steps: int = 0
    skipped_rounds: int = 0
    plain_steps: int = 0
    probes: int = 0
    probes_deferred: int = 0
    closed_decisions: int = 0
    remeasures: int = 0
    costs: dict = field(default_factory=dict)
    sampler: dict = None  # the rejection sampler's counts since the last take (GemmaMTPRejectionSampler.take_delta)

    def __post_init__(self):
        self.k_hist = self.k_hist or [0] * (self.max_k + 1)

    def record(self, lengths: list[int], probes: int = 0) -> None:
        self.steps += 1
        if not any(lengths):
            self.k_hist[0] += len(lengths)
            self.skipped_rounds += 1
        else:
            for n in lengths:
                self.k_hist[min(max(int(n), 0), self.max_k)] += 1
        self.probes += probes

    def add_sampler(self, delta: dict | None) -> None:
        self.sampler = merge_sampler(self.sampler, delta)

    def take(self) -> dict | None:
        """The counts since the previous take (None when nothing happened), and the latest cost estimates."""
        if not (self.steps or self.plain_steps or self.sampler):
            return None
        out = {"max_k": self.max_k, "adaptive": self.adaptive, "k_hist": list(self.k_hist), "steps": self.steps,
               "skipped_rounds": self.skipped_rounds, "plain_steps": self.plain_steps, "probes": self.probes,
               "probes_deferred": self.probes_deferred, "closed_decisions": self.closed_decisions,
               "remeasures": self.remeasures, "costs": dict(self.costs), "sampler": self.sampler}
        self.k_hist = [0] * (self.max_k + 1)
        self.steps = self.skipped_rounds = self.plain_steps = self.probes = self.probes_deferred = 0
        self.closed_decisions = self.remeasures = 0
        self.sampler = None
        return out


def merge_sampler(a: dict | None, b: dict | None) -> dict | None:
    if a is None or b is None:
        return a or b
    out = {k: a[k] + b[k] for k in ("fused_steps", "ragged_steps", "rows_without_drafts")}
    for k in ("features", "fallbacks"):
        out[k] = {n: a[k].get(n, 0) + b[k].get(n, 0) for n in set(a[k]) | set(b[k])}
    return out


def merge(a: dict | None, b: dict | None) -> dict | None:
    """Two deltas as one (engine core: several worker outputs between two stats messages)."""
    if a is None or b is None:
        return a or b
    out = dict(b)
    n = max(len(a["k_hist"]), len(b["k_hist"]))
    out["k_hist"] = [(a["k_hist"][i] if i < len(a["k_hist"]) else 0) + (b["k_hist"][i] if i < len(b["k_hist"]) else 0)
                     for i in range(n)]
    for key in ("steps", "skipped_rounds", "plain_steps", "probes", "probes_deferred", "closed_decisions", "remeasures"):
        out[key] = a.get(key, 0) + b.get(key, 0)
    out["costs"] = b["costs"] or a["costs"]
    out["sampler"] = merge_sampler(a.get("sampler"), b.get("sampler"))
    return out


def observe_counts(hist, counts: list[int]) -> None:
    """counts[k] observations of the value k. A server at concurrency 32 makes 32 a step; prometheus_client's
    histogram child takes them as one add per bucket (its buckets hold per-bucket counts, summed when
    scraped). Anything else (Ray's wrapper) gets them one by one."""
    import bisect

    bounds, buckets, total = (getattr(hist, a, None) for a in ("_upper_bounds", "_buckets", "_sum"))
    if bounds is None or buckets is None or total is None:
        for k, n in enumerate(counts):
            for _ in range(n):
                hist.observe(k)
        return
    for k, n in enumerate(counts):
        if n:
            buckets[bisect.bisect_left(bounds, k)].inc(n)
            total.inc(k * n)


def _metric_classes():
    """prometheus_client's classes, or vLLM's Ray wrappers of ray.util.metrics inside a Ray worker process
    (Ray Serve / Ray Data replicas), where vLLM's own metrics go to Ray's export too."""
    try:
        import ray

        if ray.is_initialized():
            from vllm.v1.metrics.ray_wrappers import RayCounterWrapper, RayGaugeWrapper, RayHistogramWrapper

            return RayCounterWrapper, RayGaugeWrapper, RayHistogramWrapper, True
    except ImportError:
        pass
    import prometheus_client

    return prometheus_client.Counter, prometheus_client.Gauge, prometheus_client.Histogram, False


def _stat_logger_base():
    from vllm.v1.metrics.loggers import StatLoggerBase

    return StatLoggerBase


def draft_length_buckets(max_k: int, ray: bool) -> list[float]:
    """Upper bounds 0, 1, ..., max(K, 8). Ray's histograms refuse a bound of 0 (boundaries must be positive), so
    on Ray's export the first bucket is le=0.5: the same integer counts."""
    b = [float(k) for k in range(max(max_k, 8) + 1)]
    if ray:
        b[0] = 0.5
    return b


class _Metrics:
    """One set of metric objects per process (prometheus_client refuses to register a name twice); each
    engine is a label value."""

    _instance = None

    @classmethod
    def get(cls, max_k: int):
        if cls._instance is None:
            cls._instance = cls(max_k)
        return cls._instance

    def __init__(self, max_k: int):
        Counter, Gauge, Histogram, self.ray = _metric_classes()
        labels = ["model_name", "engine"]
        gauge_kw = {} if self.ray else {"multiprocess_mode": "mostrecent"}
        self.draft_length = Histogram(PREFIX + "draft_length", "Draft tokens given to a request in one step "
                                      "(0: plain decoding for it)", labelnames=labels,
                                      buckets=draft_length_buckets(max_k, self.ray))
        self.steps = Counter(PREFIX + "steps", "Engine steps run by the plugin's proposer", labelnames=labels)
        self.skipped = Counter(PREFIX + "draft_rounds_skipped", "Steps where no request drafted, so no draft "
                               "round ran", labelnames=labels)
        self.plain = Counter(PREFIX + "plain_steps", "Steps the runner ran as plain decoding (no drafts to "
                             "verify)", labelnames=labels)
        self.probes = Counter(PREFIX + "probes", "1-token probes of requests at 0 drafts", labelnames=labels)
        self.probes_deferred = Counter(PREFIX + "probes_deferred", "Times due probes were put off to stay "
                                       "within the probe budget", labelnames=labels)
        self.closed = Counter(PREFIX + "closed_batch_decisions", "Chooser runs for a closed batch (nothing "
                              "waiting, nobody joined lately): lengths chosen by when the batch ends",
                              labelnames=labels)
        self.remeasures = Counter(PREFIX + "remeasure_steps", "Full-length steps run because the batch size "
                                  "moved far from where drafting was last timed", labelnames=labels)
        self.spread = Gauge(PREFIX + "gain_spread_tokens", "Between-request spread of the drafting gain that "
                            "closed batches are discounted by", labelnames=labels, **gauge_kw)
        self.verify = Gauge(PREFIX + "verify_cost_seconds", "Learned verify-step cost: fixed + per_request * "
                            "(requests - 1) + per_token * tokens + spec_step (when any request drafts)",
                            labelnames=labels + ["term"], **gauge_kw)
        self.draft = Gauge(PREFIX + "draft_cost_seconds", "Learned draft-round cost: fixed + per_step * K + "
                           "per_row_step * rows * K", labelnames=labels + ["term"], **gauge_kw)
        self.step = Gauge(PREFIX + "step_seconds_estimate", "The cost model's prediction for the latest step",
                          labelnames=labels, **gauge_kw)
        self.adaptive = Gauge(PREFIX + "adaptive", "1: draft lengths chosen per step; 0: fixed K",
                              labelnames=labels, **gauge_kw)
        self.fused = Counter(PREFIX + "fused_sampler_steps", "Verify steps sampled by the plugin's fused "
                             "rejection sampler", labelnames=labels)
        self.fallback = Counter(PREFIX + "sampler_fallback_steps", "Verify steps handed to vLLM's rejection "
                                "sampler, by reason", labelnames=labels + ["reason"])
        self.feature = Counter(PREFIX + "sampler_feature_steps", "Fused sampler steps that carried a sampling "
                               "feature, by feature", labelnames=labels + ["feature"])
        self.ragged = Counter(PREFIX + "ragged_steps", "Fused sampler steps whose requests had different draft "
                              "counts", labelnames=labels)


def make_stat_logger_class():
    base = _stat_logger_base()

    class GemmaMTPStatLogger(base):
        """vLLM stat-logger plugin: the plugin's metrics from the SchedulerStats of each engine step."""

        def __init__(self, vllm_config, engine_index: int = 0):
            sc = vllm_config.speculative_config
            self.active = bool(sc is not None and getattr(sc, "use_gemma4_mtp", lambda: False)())
            if self.active:
                from vllm_gemma_mtp.plugin import current_options

                self.active = current_options().enabled
            if not self.active:
                return
            self.m = _Metrics.get(int(sc.num_speculative_tokens))
            self.labels = {"model_name": vllm_config.model_config.served_model_name, "engine": str(engine_index)}
            self._label_cache: dict = {}

        def _l(self, metric, **extra):
            key = (id(metric), tuple(sorted(extra.items())))
            if key not in self._label_cache:
                self._label_cache[key] = metric.labels(**self.labels, **extra)
            return self._label_cache[key]

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
            if not self.active or scheduler_stats is None:
                return
            d = getattr(scheduler_stats, "gemma_mtp", None)
            if not d:
                return
            m = self.m
            observe_counts(self._l(m.draft_length), d["k_hist"])
            self._l(m.steps).inc(d["steps"])
            self._l(m.skipped).inc(d["skipped_rounds"])
            self._l(m.plain).inc(d["plain_steps"])
            self._l(m.probes).inc(d["probes"])
            self._l(m.probes_deferred).inc(d.get("probes_deferred", 0))
            self._l(m.closed).inc(d.get("closed_decisions", 0))
            self._l(m.remeasures).inc(d.get("remeasures", 0))
            self._l(m.adaptive).set(1.0 if d["adaptive"] else 0.0)
            c = d.get("costs") or {}
            if c:
                # three terms from a worker of an older plugin version (no per-request term)
                names = ("fixed", "per_request", "per_token", "spec_step") if len(c["verify"]) == 4 else (
                    "fixed", "per_token", "spec_step")
                for term, v in zip(names, c["verify"]):
                    self._l(m.verify, term=term).set(v)
                for term, v in zip(("fixed", "per_step", "per_row_step"), c["draft"]):
                    self._l(m.draft, term=term).set(v)
                self._l(m.step).set(c["step_estimate"])
                if c.get("gain_spread") is not None:
                    self._l(m.spread).set(c["gain_spread"])
            smp = d.get("sampler")
            if smp:
                self._l(m.fused).inc(smp["fused_steps"])
                self._l(m.ragged).inc(smp["ragged_steps"])
                for reason, n in smp["fallbacks"].items():
                    self._l(m.fallback, reason=reason).inc(n)
                for feat, n in smp["features"].items():
                    self._l(m.feature, feature=feat).inc(n)

        def log_engine_initialized(self):
            pass

    return GemmaMTPStatLogger


def __getattr__(name):
    # the entry point names `vllm_gemma_mtp.metrics:GemmaMTPStatLogger`; the class is built on first access
    # so that importing this module (worker side: StepCounters) needs no vLLM
    if name == "GemmaMTPStatLogger":
        cls = make_stat_logger_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)
