#!/usr/bin/env python
"""Soak test: an OpenAI server with the plugin under a long, mixed, faulty load, then every completed greedy
request replayed on a server without speculation.

    python scripts/soak.py --onednn-cache 0                  # 1000 requests at concurrency 32 (the full run)
    python scripts/soak.py --requests 120 --concurrency 16 --max-prompt 1500 --onednn-cache 0   # tests/test_soak.py

One server (`vllm.entrypoints.openai.api_server` on loopback, trained pair, K=4, adaptive, fp32, a KV cache small
enough to force preemption), driven by the official `openai` client with a seeded request mix: completions and
chat, streaming and not, prompts up to --max-prompt tokens, max_tokens 1..300, 20 % of streams dropped at a
random chunk, n=2, logprobs, prompt_logprobs, stop strings, seeds, penalties, top-k/top-p, JSON-schema
structured output, per-request speculation off / capped (vllm_xargs); EOS ends requests inside accepted drafts.
Afterwards: the server is alive, no request running or waiting, KV usage back to 0, preemptions happened,
server RSS (all its processes; each one sampled every 2 s too) grew < 5 % after warm-up (the first 25 % of
requests; --onednn-cache 0 keeps oneDNN's shape cache out of it), every JSON output
parses and matches its schema, and a no-speculation server gives the same text for every completed greedy
request. Writes soak.json and soak.md in --out; exit code 1 when a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from engine_runs import free_port, server_metrics, stop_server, wait_for_server  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PAIR = ROOT / "tests" / "assets" / "trained_pair"
# bounded (enums): a tiny model inside an open string or integer may never close it before max_tokens
SCHEMA = {"type": "object", "properties": {"name": {"enum": ["alpha", "beta", "gamma"]}, "count": {"enum": [1, 2, 3]}},
          "required": ["name", "count"], "additionalProperties": False}
STOPS = ["\n\n", "return", ":"]


def start_server(spec: bool, args, log: Path):
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(PAIR / "target"),
           "--served-model-name", "soak", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--max-model-len", str(args.max_prompt + 320), "--enforce-eager", "--max-num-seqs", str(args.concurrency),
           "--max-num-batched-tokens", "1024", "--kv-cache-memory-bytes", str(args.kv_cache_mib << 20),
           "--seed", "0", "--structured-outputs-config", json.dumps({"backend": "xgrammar",
                                                                      "disable_any_whitespace": True})]
    if spec:
        cmd += ["--speculative-config", json.dumps({"method": "mtp", "model": str(PAIR / "assistant"),
                                                    "num_speculative_tokens": 4})]
    env = dict(os.environ)
    if args.onednn_cache is not None:
        env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = str(args.onednn_cache)
    f = open(log, "w")
    proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return wait_for_server(proc, port, log, timeout_s=400)


def rss_by_process(proc) -> dict[str, int]:
    """RSS of the server and each of its processes, by process title (vLLM names its engine core and workers:
    'VLLM::EngineCore', 'VLLM::Worker...'), so a climb can be put on one of them."""
    import psutil

    out: dict[str, int] = {}
    try:
        root = psutil.Process(proc.pid)
        for q in [root] + root.children(recursive=True):
            try:
                name = "api_server" if q.pid == root.pid else q.name()
                key, i = name, 1
                while key in out:
                    i += 1
                    key = f"{name}#{i}"
                out[key] = q.memory_info().rss
            except psutil.Error:
                continue
    except psutil.Error:
        pass
    return out


class RssSampler:
    """Samples the server's per-process RSS every `every_s` seconds while the load runs (RSS against completed
    requests: the soak's plot)."""

    def __init__(self, proc, every_s: float = 2.0):
        import threading

        self.proc, self.every_s, self.done, self.samples = proc, every_s, 0, []
        self._stop = threading.Event()
        self._t0 = time.time()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(self.every_s):
            self.samples.append({"t": round(time.time() - self._t0, 1), "done": self.done,
                                 "rss_mib": {k: round(v / 2**20, 1) for k, v in rss_by_process(self.proc).items()}})

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def make_requests(n: int, seed: int, max_prompt: int, vocab: int, end_token: int | None = None) -> list[dict]:
    """The seeded request mix. Prompts are token ids (completions) or text (chat). A completions prompt ends
    on `end_token` (a newline): random ids can end inside a multi-byte character, and vLLM's incremental
    detokenizer then puts the prompt's undecoded tail ('...\ufffd') at the front of the first output text, with
    or without speculation, so a JSON answer whose tokens are valid reads as invalid text (2026-12-05: 9 of
    200 sampled JSON requests, the same 9 without speculation; the soak's one invalid JSON output)."""
    rnd = random.Random(seed)
    words = ["def", "return", "self", "for", "in", "if", "else", "import", "print", "value", "list", "data", "x",
             "class", "None", "True", "result", "(", ")", ":", "=", "+", "1", "0"]
    reqs = []
    for i in range(n):
        r: dict = {"id": i, "api": "chat" if rnd.random() < 0.4 else "completions", "stream": rnd.random() < 0.5}
        plen = int(round(2 ** rnd.uniform(2, max(2.1, __import__("math").log2(max_prompt)))))
        if r["api"] == "completions":
            r["prompt"] = [2] + [rnd.randrange(4, vocab) for _ in range(plen - 1)]
            if end_token is not None and len(r["prompt"]) > 1:
                r["prompt"][-1] = end_token
        else:
            r["messages"] = [{"role": "user", "content": " ".join(rnd.choice(words) for _ in range(max(1, plen // 2)))}]
        r["max_tokens"] = rnd.randint(1, 300)
        r["greedy"] = rnd.random() < 0.5
        body: dict = {"temperature": 0.0} if r["greedy"] else {"temperature": rnd.choice([0.7, 1.0])}
        extra: dict = {}
        if not r["greedy"]:
            if rnd.random() < 0.4:
                extra["top_k"] = rnd.choice([5, 20])
            if rnd.random() < 0.4:
                body["top_p"] = rnd.choice([0.8, 0.95])
            if rnd.random() < 0.4:
                body["seed"] = rnd.randrange(1 << 30)
        if rnd.random() < 0.2:
            body[rnd.choice(["presence_penalty", "frequency_penalty"])] = 0.5
        if rnd.random() < 0.1:
            extra["repetition_penalty"] = 1.2
        if not r["greedy"] and rnd.random() < 0.2:  # vLLM refuses n > 1 with greedy sampling (HTTP 400)
            body["n"] = 2
        if rnd.random() < 0.15:
            body["stop"] = [rnd.choice(STOPS)]
        if rnd.random() < 0.15:
            if r["api"] == "chat":
                body["logprobs"], body["top_logprobs"] = True, 2
            else:
                body["logprobs"] = 2
        if r["api"] == "completions" and not r["stream"] and rnd.random() < 0.15:
            extra["prompt_logprobs"] = 1
        if rnd.random() < 0.1:
            extra["vllm_xargs"] = rnd.choice([{"gemma_mtp_speculate": False}, {"gemma_mtp_max_draft_tokens": 1}])
        r["json"] = rnd.random() < 0.06
        if r["json"]:
            r["max_tokens"] = max(r["max_tokens"], 150)
            body.pop("stop", None)
            if r["api"] == "chat":
                body["response_format"] = {"type": "json_schema", "json_schema": {"name": "item", "schema": SCHEMA}}
            else:
                extra["structured_outputs"] = {"json": SCHEMA}
        r["drop_at"] = rnd.randint(1, 12) if r["stream"] and rnd.random() < 0.2 else None
        r["body"], r["extra"] = body, extra
        reqs.append(r)
    return reqs


async def send(client, r: dict, stream: bool) -> dict:
    kw = dict(model="soak", max_tokens=r["max_tokens"], stream=stream, extra_body=r["extra"] or None, **r["body"])
    n = r["body"].get("n", 1)
    texts = [""] * n
    finish = [None] * n
    if r["api"] == "chat":
        call = client.chat.completions.create(messages=r["messages"], **kw)
    else:
        call = client.completions.create(prompt=r["prompt"], **kw)
    res = await call
    if not stream:
        for c in res.choices:
            texts[c.index] = c.message.content if r["api"] == "chat" else c.text
            finish[c.index] = c.finish_reason
        return {"texts": texts, "finish": finish, "dropped": False}
    chunks = 0
    async for ch in res:
        chunks += 1
        for c in ch.choices:
            piece = (c.delta.content if r["api"] == "chat" else c.text) or ""
            texts[c.index] += piece
            if c.finish_reason:
                finish[c.index] = c.finish_reason
        if r["drop_at"] is not None and chunks >= r["drop_at"]:
            await res.close()  # the client goes away mid-stream
            return {"texts": texts, "finish": finish, "dropped": True}
    return {"texts": texts, "finish": finish, "dropped": False}


async def drive(port: int, reqs: list[dict], concurrency: int, stream_as_sent: bool = True, progress=None,
                on_done=None) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=600, max_retries=0)
    sem = asyncio.Semaphore(concurrency)
    out: dict = {}

    async def one(r):
        async with sem:
            try:
                out[r["id"]] = await send(client, r, r["stream"] and stream_as_sent)
            except Exception as e:  # noqa: BLE001 - recorded per request; the summary counts them
                out[r["id"]] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            if progress is not None:
                progress.update(1)
            if on_done is not None:
                on_done(len(out))

    await asyncio.gather(*(one(r) for r in reqs))
    await client.close()
    return out


def schema_ok(text: str) -> bool:
    import jsonschema

    try:
        jsonschema.validate(json.loads(text), SCHEMA)
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--max-prompt", type=int, default=3000, help="longest prompt in tokens")
    ap.add_argument("--kv-cache-mib", type=int, default=12, help="KV cache size: small, to force preemption")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup-frac", type=float, default=0.25,
                    help="RSS growth is measured from the moment this share of the requests has completed")
    ap.add_argument("--onednn-cache", type=int, default=None, metavar="N",
                    help="ONEDNN_PRIMITIVE_CACHE_CAPACITY for the servers (default: the environment's, oneDNN's "
                         "own default 1024). The worker's RSS climb under this load is oneDNN's primitive cache, "
                         "one entry per new matmul shape: 0 turns it off (README 'Reliability')")
    ap.add_argument("--no-spec", action="store_true",
                    help="the same load on a server without speculation (a baseline for RSS growth)")
    ap.add_argument("--out", default="artifacts/soak")
    args = ap.parse_args(argv)
    from tqdm import tqdm

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    vocab = json.loads((PAIR / "target" / "config.json").read_text())["vocab_size"]
    from transformers import AutoTokenizer

    newline = AutoTokenizer.from_pretrained(str(PAIR / "target")).encode("\n", add_special_tokens=False)
    reqs = make_requests(args.requests, args.seed, args.max_prompt, vocab,
                         newline[0] if len(newline) == 1 else None)
    rep: dict = {"command": " ".join(["soak.py"] + (argv if argv is not None else sys.argv[1:])),
                 "requests": args.requests, "concurrency": args.concurrency, "max_prompt": args.max_prompt,
                 "kv_cache_mib": args.kv_cache_mib, "checks": {}}
    t0 = time.time()
    proc, port = start_server(not args.no_spec, args, out / "server_spec.log")
    rep["server_start_s"] = round(time.time() - t0, 1)
    rss_parts: dict[str, dict[str, int]] = {}  # mark -> process -> bytes
    marks = {max(1, int(args.requests * f)): name for f, name in ((args.warmup_frac, "warm"), (0.5, "half"),
                                                                   (0.75, "three_quarters"))}

    def on_done(n):
        sampler.done = n
        if n in marks and marks[n] not in rss_parts:
            rss_parts[marks[n]] = rss_by_process(proc)

    try:
        t = time.time()
        with tqdm(total=len(reqs), desc="soak (" + ("no-spec" if args.no_spec else "plugin") + " server)",
                  unit="req") as bar, RssSampler(proc) as sampler:
            res = asyncio.run(drive(port, reqs, args.concurrency, progress=bar, on_done=on_done))
        rep["load_s"] = round(time.time() - t, 1)
        time.sleep(3)  # finished and aborted requests leave the scheduler
        m = server_metrics(port, by=("feature", "reason"))
        rss_parts["end"] = rss_by_process(proc)
        alive = proc.poll() is None
    finally:
        stop_server(proc)
    errors = {i: r["error"] for i, r in res.items() if "error" in r}
    done = {i: r for i, r in res.items() if "error" not in r}
    dropped = [i for i, r in done.items() if r["dropped"]]
    by = lambda f: sum(1 for r in reqs if f(r))  # noqa: E731
    rep["mix"] = {"completions": by(lambda r: r["api"] == "completions"), "chat": by(lambda r: r["api"] == "chat"),
                  "streaming": by(lambda r: r["stream"]), "dropped_streams": len(dropped),
                  "greedy": by(lambda r: r["greedy"]), "n=2": by(lambda r: r["body"].get("n") == 2),
                  "logprobs": by(lambda r: "logprobs" in r["body"]),
                  "prompt_logprobs": by(lambda r: "prompt_logprobs" in r["extra"]),
                  "stop strings": by(lambda r: "stop" in r["body"]), "seeded": by(lambda r: "seed" in r["body"]),
                  "penalties": by(lambda r: any(k in r["body"] for k in ("presence_penalty", "frequency_penalty"))
                                  or "repetition_penalty" in r["extra"]),
                  "top_k/top_p": by(lambda r: "top_k" in r["extra"] or "top_p" in r["body"]),
                  "json schema": by(lambda r: r["json"]), "vllm_xargs": by(lambda r: "vllm_xargs" in r["extra"]),
                  "longest prompt": max(len(r.get("prompt", [])) or len(r["messages"][0]["content"].split()) * 2
                                        for r in reqs)}
    finish = [f for r in done.values() if not r["dropped"] for f in r["finish"]]
    rep["finish_reasons"] = {k: finish.count(k) for k in sorted(set(map(str, finish)))}
    rep["errors"] = len(errors)
    rep["error_examples"] = list(errors.values())[:5]
    rep["metrics_after"] = {k: m.get(k) for k in ("vllm:num_requests_running", "vllm:num_requests_waiting",
                                                 "vllm:kv_cache_usage_perc", "vllm:num_preemptions_total",
                                                 "vllm:spec_decode_num_drafts_total",
                                                 "vllm:spec_decode_num_accepted_tokens_total",
                                                 "gemma_mtp:draft_rounds_skipped_total", "gemma_mtp:plain_steps_total",
                                                 "gemma_mtp:probes_total")}
    feats = {k.split("=", 1)[1][:-1]: v for k, v in m.items() if k.startswith("gemma_mtp:sampler_feature_steps_total{")}
    falls = {k.split("=", 1)[1][:-1]: v for k, v in m.items() if k.startswith("gemma_mtp:sampler_fallback_steps_total{")}
    rep["sampler"] = {"fused_steps": m.get("gemma_mtp:fused_sampler_steps_total"), "features": feats,
                      "fallbacks": falls, "ragged_steps": m.get("gemma_mtp:ragged_steps_total")}
    # what the fused sampler must have seen, given the mix (prompt logprobs, seeds and JSON schemas are not
    # sampler features); every request is Gemma 4 MTP, so nothing may fall back to vLLM's sampler
    want = [f for f, key in (("penalties", "penalties"), ("top-k/top-p", "top_k/top_p"), ("logprobs", "logprobs"))
            if rep["mix"][key]]
    sampler_ok = args.no_spec or (bool(rep["sampler"]["fused_steps"]) and not falls
                                  and all(feats.get(f, 0) > 0 for f in want))
    rss = {mark: sum(parts.values()) for mark, parts in rss_parts.items()}
    rep["rss_mib"] = {k: round(v / 2**20, 1) for k, v in rss.items()}
    growth = (rss["end"] - rss["warm"]) / rss["warm"] if rss.get("warm") else None
    rep["rss_growth_after_warmup"] = growth
    rep["rss_by_process_mib"] = {mark: {k: round(v / 2**20, 1) for k, v in parts.items()}
                                 for mark, parts in rss_parts.items()}
    rep["rss_growth_by_process_mib"] = ({k: round((v - rss_parts["warm"].get(k, 0)) / 2**20, 1)
                                         for k, v in rss_parts["end"].items()} if "warm" in rss_parts else None)
    rep["rss_samples"] = sampler.samples
    rep["memory_env"] = {k: os.environ[k] for k in ("LD_PRELOAD", "MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_",
                                                     "ONEDNN_PRIMITIVE_CACHE_CAPACITY") if os.environ.get(k)}
    if args.onednn_cache is not None:
        rep["memory_env"]["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = str(args.onednn_cache)
    json_reqs = [r for r in reqs if r["json"] and r["id"] in done and not done[r["id"]]["dropped"]
                 and all(f == "stop" for f in done[r["id"]]["finish"])]
    json_bad = [r["id"] for r in json_reqs if not all(schema_ok(t) for t in done[r["id"]]["texts"])]
    # the no-speculation server answers every completed greedy request (not streamed: same text)
    greedy = [r for r in reqs if r["greedy"] and r["id"] in done and not done[r["id"]]["dropped"]]
    proc, port = start_server(False, args, out / "server_base.log")
    try:
        with tqdm(total=len(greedy), desc="replay (no speculation)", unit="req") as bar:
            base = asyncio.run(drive(port, greedy, args.concurrency, stream_as_sent=False, progress=bar))
    finally:
        stop_server(proc)
    same = [r["id"] for r in greedy if "error" not in base[r["id"]] and base[r["id"]]["texts"] == done[r["id"]]["texts"]]
    diff = [r["id"] for r in greedy if r["id"] not in same]
    rep["lossless"] = {"greedy_completed": len(greedy), "identical": len(same), "differ": diff[:20]}
    rep["json"] = {"completed": len(json_reqs), "invalid": json_bad}
    mm = rep["metrics_after"]
    rep["checks"] = {
        "server alive after the load": alive,
        "no request failed": not errors,
        "every completed greedy request identical to no speculation": not diff and len(greedy) > 0,
        "JSON outputs valid against the schema": not json_bad and len(json_reqs) > 0,
        "no request running or waiting": mm["vllm:num_requests_running"] == 0 and mm["vllm:num_requests_waiting"] == 0,
        "KV cache usage back to 0": mm["vllm:kv_cache_usage_perc"] == 0,
        "preemption happened": (mm["vllm:num_preemptions_total"] or 0) > 0,
        "RSS growth after warm-up < 5 %": growth is not None and growth < 0.05,
        "streams dropped": len(dropped) > 0,
        "sampler counters match the request mix (features seen, no fallback)": sampler_ok,
    }
    rep["wall_s"] = round(time.time() - t0, 1)
    (out / "soak.json").write_text(json.dumps(rep, indent=1, default=str))
    lines = [f"# soak: {args.requests} requests at concurrency {args.concurrency}", "",
             f"`{rep['command']}`: load {rep['load_s']} s, whole run {rep['wall_s']} s", "",
             "| check | result |", "|---|---|"]
    lines += [f"| {k} | {'pass' if v else 'FAIL'} |" for k, v in rep["checks"].items()]
    lines += ["", f"- request mix: {rep['mix']}", f"- finish reasons: {rep['finish_reasons']}",
              f"- lossless: {len(same)}/{len(greedy)} completed greedy requests identical",
              f"- JSON: {len(json_reqs)} completed, {len(json_bad)} invalid",
              f"- RSS (MiB): {rep['rss_mib']}, growth after warm-up {growth if growth is None else f'{100 * growth:.2f} %'}",
              f"- RSS growth after warm-up by process (MiB): {rep['rss_growth_by_process_mib']}",
              f"- after the load: {mm}", f"- rejection sampler: {rep['sampler']}",
              f"- errors: {len(errors)} {rep['error_examples']}"]
    (out / "soak.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(rep["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
