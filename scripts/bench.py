"""Side-by-side benchmark: no speculation vs vLLM's built-in Gemma 4 MTP vs this plugin at fixed K vs the
plugin's adaptive draft lengths (its default), one run, one machine.

    python scripts/bench.py [--pairs trained,allaccept,zeroaccept] [--ks 1,2,4] [--batches 1,4,16] [--runs 5]
                            [--prompt-tokens 48] [--modes builtin,plugin,adaptive] [--seeded 0.5]

For every pair and K the engines (no speculation, built-in, plugin, adaptive) are up together and each batch
size is timed round-robin: one run of each mode per round, --runs rounds, after one warm-up run each (not
counted). Each figure is the median of its runs, and the ratios compare runs of the same rounds, so drift in
the machine's speed (tens of percent over minutes on this VM) hits all modes alike. With --replicates R the
engines are started R times (the start order rotating) and every figure pools the runs of all R: two engines
of one configuration ran at speeds up to ~10 % apart for their whole life on this VM (the target forward
itself, same ops), so one engine per mode leaves that difference in every ratio. The host processes (front
end, engine cores) go on the core the workers leave free (engine_runs.pin_host_processes; --no-pin keeps
vLLM's layout). Acceptance comes from
vLLM's own spec-decode metrics over the timed runs. Greedy outputs are checked to be identical across the
modes. Writes JSON + a PNG plot + a markdown table under --out.

Settings shared by all modes: fp32, enforce_eager (the target runs eagerly in every mode), max_model_len
1024, 256 MiB KV cache, ignore_eos. The plugin's draft round is compiled (VLLM_GEMMA_MTP_COMPILE=1, built at
engine start, not timed; on CPU with a C++ wrapper); vLLM's built-in drafter runs eagerly under enforce_eager.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
ROOT = Path(__file__).resolve().parents[1]
TRAINED = ROOT / "tests" / "assets" / "trained_pair"


def code_prompts(tokenizer, n: int, bos: int, length: int = 48) -> list[list[int]]:
    """Held-out standard-library code (modules the trained pair never saw), cut into prompts."""
    log = json.loads((TRAINED / "train_log.json").read_text()) if (TRAINED / "train_log.json").exists() else {}
    held = log.get("corpus", {}).get("held_out_files") or []
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for rel in held:
        p = Path(rel) if Path(rel).is_absolute() else stdlib / rel
        if p.exists():
            texts.append(p.read_text(errors="replace"))
    if not texts:
        texts = [(stdlib / "textwrap.py").read_text()]
    prompts, i = [], 0
    while len(prompts) < n:
        t = texts[i % len(texts)]
        span = max(300, 6 * length)
        if len(t) < span + 100:
            t = t * (span // max(len(t), 1) + 2)
        start = (i * 997) % max(1, len(t) - span - 100)
        prompts.append([bos] + tokenizer(t[start:start + span])["input_ids"][:length])
        i += 1
    return prompts


def machine_info() -> dict:
    import torch
    import transformers
    import vllm

    import vllm_gemma_mtp

    cpu = ""
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu or platform.processor(), "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "vllm": vllm.__version__,
            "transformers": transformers.__version__, "vllm_gemma_mtp": vllm_gemma_mtp.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = sorted({r["pair"] for r in rows})
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(len(pairs), len(batches), figsize=(4 * len(batches), 3.2 * len(pairs)), squeeze=False)
    colors = {"none": "#999999", "control": "#cccccc", "builtin": "#4477aa", "plugin": "#ee6677", "adaptive": "#228833"}
    modes = [m for m in ("none", "control", "builtin", "plugin", "adaptive") if any(r["mode"] == m for r in rows)]
    for i, pair in enumerate(pairs):
        for j, b in enumerate(batches):
            ax = axes[i][j]
            ks = sorted({r["k"] for r in rows if r["pair"] == pair and r["mode"] != "none"})
            w = 0.8 / len(modes)
            for m, off in ((m, (n - (len(modes) - 1) / 2) * w) for n, m in enumerate(modes)):
                ys = [next((r["tokens_per_s"] for r in rows if r["pair"] == pair and r["batch"] == b
                            and r["mode"] == m and r["rounds_of_k"] == k), 0) for k in ks]
                ax.bar([x + off for x in range(len(ks))], ys, w,
                       label={"none": "no spec", "control": "no spec, 2nd engine", "plugin": "plugin fixed K"}.get(m, m),
                       color=colors[m])
            ax.set_xticks(range(len(ks)), [f"K={k}" for k in ks])
            ax.set_title(f"{pair}, batch {b}")
            ax.set_ylabel("output tokens/s")
            if i == 0 and j == 0:
                ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", default="trained,allaccept")
    ap.add_argument("--ks", default="1,2,4")
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=48, help="prompt length in tokens (about)")
    ap.add_argument("--modes", default="builtin,plugin,adaptive",
                    help="modes beside no speculation: builtin, plugin (fixed K), adaptive, and control (a second "
                         "engine without speculation, timed in the same rounds: control/none is the noise floor)")
    ap.add_argument("--seeded", type=float, default=0.0,
                    help="fraction of each batch sampled at temperature 1 with a seed of its own, the rest greedy "
                         "(greedy outputs are still compared across modes; seeded ones differ by design: vLLM draws "
                         "them from the request's generator, the plugin by sequence position)")
    ap.add_argument("--out", default=str(ROOT / "artifacts" / "bench"))
    ap.add_argument("--replicates", type=int, default=1,
                    help="start every engine this many times (start order rotating) and pool the runs of all")
    ap.add_argument("--no-pin", action="store_true",
                    help="leave the front end and engine cores where vLLM puts them (floating over every core)")
    ap.add_argument("--tensor-parallel-size", type=int, default=1,
                    help="TP ranks per engine (CPU: one core per rank via VLLM_CPU_OMP_THREADS_BIND)")
    args = ap.parse_args()
    tp = args.tensor_parallel_size
    if tp > 1:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(i) for i in range(tp)))
    ks = [int(x) for x in args.ks.split(",")]
    spec_modes = args.modes.split(",")
    batches = [int(x) for x in args.batches.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from tqdm import tqdm
    from transformers import AutoTokenizer

    from engine_runs import (SETTLE_S, interleaved_runs, merge_results, pin_host_processes, policy_state,
                             seeded_mix, start_engine, stop_engine, unpin_this_process)
    from vllm_gemma_mtp.fixtures import ensure_pair

    os.environ["VLLM_GEMMA_MTP_COMPILE"] = "1"
    all_cores = set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else set()
    pairs = args.pairs.split(",")
    rows = []
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    outputs_identical = True
    bar = tqdm(total=len(pairs) * len(ks) * len(batches), desc="bench", unit="cell",
               bar_format="{l_bar}{bar}| {n:.1f}/{total} [{elapsed}<{remaining}{postfix}]")
    for pair in pairs:
        d = TRAINED if pair == "trained" else ensure_pair(pair)
        tok = AutoTokenizer.from_pretrained(d / "target")
        L = args.prompt_tokens
        prompts = (code_prompts(tok, max(batches), tok.bos_token_id or 2, L) if pair == "trained"
                   else [[2] + [(13 * i + j) % 400 + 5 for j in range(max(1, L - 40) + i)] for i in range(max(batches))])
        mml = max(1024, max(len(p) for p in prompts) + args.max_tokens + 16)

        def start(mode, k):
            bar.set_postfix_str(f"{pair} {mode} K={k}: starting engine")
            return start_engine(str(d / "target"), str(d / "assistant"), "none" if mode == "control" else mode,
                                max(k, 1), max_num_seqs=max(batches),
                                max_model_len=mml, tensor_parallel_size=tp)

        # all engines of a pair and K are up together and timed round-robin (see engine_runs.interleaved_runs);
        # with replicates they are started again, in another order, and the runs pooled
        for k in ks:
            per_rep = {b: [] for b in batches}  # batch -> [{mode: RunResult}] one per replicate
            policies = {b: [] for b in batches}
            order = ["none"] + spec_modes
            for rep in range(args.replicates):
                engines = {}
                if not args.no_pin and all_cores:
                    unpin_this_process(all_cores)  # the engines started below must see every core
                try:
                    for mode in order[rep % len(order):] + order[:rep % len(order)]:
                        engines[mode] = (start(mode, k), k)
                    engines = {m: engines[m] for m in order}  # rounds in the usual order (they rotate anyway)
                    pinned = None if args.no_pin else pin_host_processes()
                    for b in batches:
                        bar.set_postfix_str(f"{pair} K={k} batch={b}" + (f" replicate {rep + 1}" if args.replicates > 1
                                                                          else ""))
                        params = seeded_mix(b, args.seeded, args.max_tokens)
                        res = interleaved_runs(engines, prompts[:b], args.max_tokens, runs=args.runs, warmup=1,
                                               params=params)
                        greedy = [i for i in range(b) if params is None or params[i].temperature == 0.0]
                        outputs_identical &= all([res[m].outputs[i] for i in greedy]
                                                 == [res["none"].outputs[i] for i in greedy] for m in spec_modes)
                        per_rep[b].append(res)
                        if "adaptive" in engines:
                            policies[b].append(policy_state(engines["adaptive"][0]))
                        bar.update(1 / args.replicates)
                finally:
                    for mode in list(engines):
                        stop_engine(engines.pop(mode)[0])
            for b in batches:
                for mode in order:
                    r = merge_results([res[mode] for res in per_rep[b]])
                    # the no-speculation row is kept per K: timed in the same rounds as that K
                    rows.append({"pair": pair, "rounds_of_k": k, "prompt_tokens": L, "seeded": args.seeded,
                                 **r.as_dict(), "host_pinning": pinned,
                                 "replicate_medians": [res[mode].tokens_per_s for res in per_rep[b]]})
                    if mode == "adaptive":
                        rows[-1]["policy"] = policies[b][-1]
                        rows[-1]["policy_replicates"] = policies[b]
    bar.close()

    def find(pair, mode, k, b):
        return next((r for r in rows if r["pair"] == pair and r["mode"] == mode and r["rounds_of_k"] == k
                     and r["batch"] == b), None)

    label = {"builtin": "built-in", "plugin": "plugin fixed K", "adaptive": "adaptive", "control": "control (no spec)"}
    cols = ["pair", "K", "batch", "prompt tok", "none tok/s"] + [f"{label[m]} tok/s" for m in spec_modes]
    cols += [f"{label[m]}/none" for m in spec_modes]
    if "plugin" in spec_modes and "builtin" in spec_modes:
        cols.append("plugin/built-in")
    if "adaptive" in spec_modes and "plugin" in spec_modes:
        cols.append("adaptive/max(none, fixed K)")
    cols += [f"MAL {label[m]}" for m in spec_modes]
    table = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    summary = []
    for pair in pairs:
        for k in ks:
            for b in batches:
                n = find(pair, "none", k, b)
                got = {m: find(pair, m, k, b) for m in spec_modes}
                tps = {m: got[m]["tokens_per_s"] for m in spec_modes}
                s_ = {"pair": pair, "k": k, "batch": b, "prompt_tokens": args.prompt_tokens, "none": n["tokens_per_s"],
                      **tps, **{f"{m}_over_none": tps[m] / n["tokens_per_s"] for m in spec_modes},
                      **{f"mal_{m}": got[m]["mean_acceptance_length"] for m in spec_modes},
                      **{f"per_pos_{m}": got[m]["per_position_acceptance"] for m in spec_modes}}
                cells = [pair, str(k), str(b), str(args.prompt_tokens), f"{n['tokens_per_s']:.0f}"]
                cells += [f"{tps[m]:.0f}" for m in spec_modes]
                cells += [f"{tps[m] / n['tokens_per_s']:.2f}x" for m in spec_modes]
                if "plugin" in spec_modes and "builtin" in spec_modes:
                    s_["plugin_over_builtin"] = tps["plugin"] / tps["builtin"]
                    cells.append(f"{s_['plugin_over_builtin']:.2f}x")
                if "adaptive" in spec_modes and "plugin" in spec_modes:
                    s_["adaptive_over_best"] = tps["adaptive"] / max(n["tokens_per_s"], tps["plugin"])
                    cells.append(f"{s_['adaptive_over_best']:.2f}x")
                    if args.replicates > 1:  # each replicate's own engines, medians of its rounds
                        s_["adaptive_over_best_per_replicate"] = [
                            a / max(x, f) for a, x, f in zip(got["adaptive"]["replicate_medians"],
                                                             n["replicate_medians"], got["plugin"]["replicate_medians"])]
                        cells[-1] += " (" + ", ".join(f"{v:.2f}" for v in s_["adaptive_over_best_per_replicate"]) + ")"
                cells += [f"{got[m]['mean_acceptance_length'] or 0:.2f}" for m in spec_modes]
                summary.append(s_)
                table.append("| " + " | ".join(cells) + " |")
    info = machine_info()
    settings = {"runs": args.runs, "replicates": args.replicates, "host_pinned": not args.no_pin,
                "max_tokens": args.max_tokens, "dtype": "float32", "enforce_eager": True,
                "tensor_parallel_size": tp,
                "plugin_compile": "torch.compile, C++ wrapper on CPU", "warmup_runs": 1,
                "greedy": args.seeded == 0, "seeded_fraction_at_t1": args.seeded,
                "timing": "engines of one pair and K up together, timed round-robin, one run of each per round, the "
                          f"order rotating every round, each timed run {SETTLE_S} s after the previous one ended"}
    (out / "bench.json").write_text(json.dumps({"machine": info, "settings": settings,
                                                "greedy_outputs_identical_in_all_modes": outputs_identical,
                                                "rows": rows, "summary": summary}, indent=1))
    (out / "bench.md").write_text("\n".join(table) + "\n")
    plot(rows, out / "bench.png")
    print(f"\nmachine: {info['cpu']} ({info['cores']} cores), vllm {info['vllm']}, torch {info['torch']}")
    print("\n".join(table))
    print(f"greedy outputs identical in every mode, every cell: {outputs_identical}"
          + (f" (the greedy {1 - args.seeded:.0%} of each batch)" if args.seeded else ""))
    print(f"\nwrote {out / 'bench.json'}, {out / 'bench.md'}, {out / 'bench.png'}")


if __name__ == "__main__":
    main()
