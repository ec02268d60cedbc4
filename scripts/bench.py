"""Side-by-side benchmark: no speculation vs vLLM's built-in Gemma 4 MTP vs this plugin, one run, one machine.

    python scripts/bench.py [--pairs trained,allaccept] [--ks 1,2,4] [--batches 1,4,16] [--runs 5]

For every pair and K the three engines (no speculation, built-in, plugin) are up together and each batch
size is timed round-robin: one run of each mode per round, --runs rounds, after one warm-up run each (not
counted). Each figure is the median of its runs, and the ratios compare runs of the same rounds, so drift in
the machine's speed (tens of percent over minutes on this VM) hits all modes alike. Acceptance comes from
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


def code_prompts(tokenizer, n: int, bos: int) -> list[list[int]]:
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
        start = (i * 997) % max(1, len(t) - 400)
        prompts.append([bos] + tokenizer(t[start:start + 300])["input_ids"][:48])
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
    colors = {"none": "#999999", "builtin": "#4477aa", "plugin": "#ee6677"}
    for i, pair in enumerate(pairs):
        for j, b in enumerate(batches):
            ax = axes[i][j]
            ks = sorted({r["k"] for r in rows if r["pair"] == pair and r["mode"] != "none"})
            w = 0.27
            for m, off in (("none", -w), ("builtin", 0.0), ("plugin", w)):
                ys = [next((r["tokens_per_s"] for r in rows if r["pair"] == pair and r["batch"] == b
                            and r["mode"] == m and r["rounds_of_k"] == k), 0) for k in ks]
                ax.bar([x + off for x in range(len(ks))], ys, w, label="no spec" if m == "none" else m,
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
    ap.add_argument("--out", default=str(ROOT / "artifacts" / "bench"))
    args = ap.parse_args()
    ks = [int(x) for x in args.ks.split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from tqdm import tqdm
    from transformers import AutoTokenizer

    from engine_runs import interleaved_runs, start_engine, stop_engine
    from vllm_gemma_mtp.fixtures import ensure_pair

    os.environ["VLLM_GEMMA_MTP_COMPILE"] = "1"
    pairs = args.pairs.split(",")
    rows = []
    outputs_identical = True
    bar = tqdm(total=len(pairs) * len(ks) * len(batches), desc="bench", unit="cell")
    for pair in pairs:
        d = TRAINED if pair == "trained" else ensure_pair(pair)
        tok = AutoTokenizer.from_pretrained(d / "target")
        prompts = (code_prompts(tok, max(batches), tok.bos_token_id or 2) if pair == "trained"
                   else [[2] + [(13 * i + j) % 400 + 5 for j in range(8 + i)] for i in range(max(batches))])

        def start(mode, k):
            bar.set_postfix_str(f"{pair} {mode} K={k}: starting engine")
            return start_engine(str(d / "target"), str(d / "assistant"), mode, max(k, 1), max_num_seqs=max(batches))

        # the no-speculation engine stays up for the pair; built-in and plugin engines per K; all three are
        # timed round-robin (see engine_runs.interleaved_runs)
        none = start("none", 0)
        try:
            for k in ks:
                engines = {"none": (none, 0)}
                try:
                    for mode in ("builtin", "plugin"):
                        engines[mode] = (start(mode, k), k)
                    for b in batches:
                        bar.set_postfix_str(f"{pair} K={k} batch={b}")
                        res = interleaved_runs(engines, prompts[:b], args.max_tokens, runs=args.runs, warmup=1)
                        outputs_identical &= res["builtin"].outputs == res["none"].outputs == res["plugin"].outputs
                        for r in res.values():
                            # the no-speculation row is kept per K: timed in the same rounds as that K
                            rows.append({"pair": pair, "rounds_of_k": k, **r.as_dict()})
                        bar.update()
                finally:
                    for mode in ("builtin", "plugin"):
                        if mode in engines:
                            stop_engine(engines.pop(mode)[0])
        finally:
            stop_engine(none)
    bar.close()

    def find(pair, mode, k, b):
        return next(r for r in rows if r["pair"] == pair and r["mode"] == mode and r["rounds_of_k"] == k
                    and r["batch"] == b)

    table = ["| pair | K | batch | none tok/s | built-in tok/s | plugin tok/s | plugin/built-in | plugin/none | "
             "built-in/none | MAL built-in | MAL plugin | plugin per-position acceptance |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    summary = []
    for pair in args.pairs.split(","):
        for k in ks:
            for b in batches:
                n, bi, pl = find(pair, "none", k, b), find(pair, "builtin", k, b), find(pair, "plugin", k, b)
                s = {"pair": pair, "k": k, "batch": b, "none": n["tokens_per_s"], "builtin": bi["tokens_per_s"],
                     "plugin": pl["tokens_per_s"], "plugin_over_builtin": pl["tokens_per_s"] / bi["tokens_per_s"],
                     "plugin_over_none": pl["tokens_per_s"] / n["tokens_per_s"],
                     "builtin_over_none": bi["tokens_per_s"] / n["tokens_per_s"],
                     "mal_builtin": bi["mean_acceptance_length"], "mal_plugin": pl["mean_acceptance_length"],
                     "per_pos_plugin": pl["per_position_acceptance"]}
                summary.append(s)
                pp = ", ".join(f"{x:.2f}" for x in (s["per_pos_plugin"] or []))
                table.append(f"| {pair} | {k} | {b} | {s['none']:.0f} | {s['builtin']:.0f} | {s['plugin']:.0f} | "
                             f"{s['plugin_over_builtin']:.2f}x | {s['plugin_over_none']:.2f}x | "
                             f"{s['builtin_over_none']:.2f}x | {s['mal_builtin'] or 0:.2f} | {s['mal_plugin'] or 0:.2f} | {pp} |")
    info = machine_info()
    settings = {"runs": args.runs, "max_tokens": args.max_tokens, "dtype": "float32", "enforce_eager": True,
                "plugin_compile": "torch.compile, C++ wrapper on CPU", "warmup_runs": 1, "greedy": True,
                "timing": "engines of one pair and K up together, timed round-robin, one run of each per round"}
    (out / "bench.json").write_text(json.dumps({"machine": info, "settings": settings,
                                                "greedy_outputs_identical_in_all_modes": outputs_identical,
                                                "rows": rows, "summary": summary}, indent=1))
    (out / "bench.md").write_text("\n".join(table) + "\n")
    plot(rows, out / "bench.png")
    print(f"\nmachine: {info['cpu']} ({info['cores']} cores), vllm {info['vllm']}, torch {info['torch']}")
    print("\n".join(table))
    print(f"greedy outputs identical in all three modes, every cell: {outputs_identical}")
    print(f"\nwrote {out / 'bench.json'}, {out / 'bench.md'}, {out / 'bench.png'}")


if __name__ == "__main__":
    main()
