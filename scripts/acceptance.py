"""Acceptance of the plugin on the trained pair (greedy, K=4, held-out code prompts), from vLLM's metrics.

    python scripts/acceptance.py            # measure and print
    python scripts/acceptance.py --record   # write tests/assets/trained_pair/acceptance_k4.json
    python scripts/acceptance.py --kv-table docs/kv_dtype_acceptance.json   # every KV dtype, plugin and built-in

tests/test_acceptance_regression.py re-measures this and compares it with the recorded file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
ROOT = Path(__file__).resolve().parents[1]
PAIR = ROOT / "tests" / "assets" / "trained_pair"
RECORD = PAIR / "acceptance_k4.json"
SETTINGS = {"k": 4, "num_prompts": 8, "max_tokens": 96}


def measure(pair: Path = PAIR, k: int = SETTINGS["k"], num_prompts: int = SETTINGS["num_prompts"],
            max_tokens: int = SETTINGS["max_tokens"], mode: str = "plugin", **engine_kw) -> dict:
    """mode: plugin (fixed K) or builtin; engine_kw go to the LLM (e.g. kv_cache_dtype="fp8")."""
    from transformers import AutoTokenizer

    from bench import code_prompts
    from engine_runs import start_engine, stop_engine, timed_runs

    tok = AutoTokenizer.from_pretrained(pair / "target")
    prompts = code_prompts(tok, num_prompts, tok.bos_token_id or 2)
    llm = start_engine(str(pair / "target"), str(pair / "assistant"), mode, k, max_num_seqs=num_prompts, **engine_kw)
    try:
        r = timed_runs(llm, prompts, max_tokens, runs=1, warmup=0, mode=mode, k=k)
    finally:
        stop_engine(llm)
    return {"mean_acceptance_length": r.mean_acceptance_length, "outputs": r.outputs,
            "per_position_acceptance": r.per_position_acceptance, "num_drafts": r.num_drafts, **SETTINGS,
            "mode": mode, **engine_kw}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--record", action="store_true")
    ap.add_argument("--mode", default="plugin", choices=["plugin", "builtin"])
    ap.add_argument("--kv-cache-dtype", default="auto", help="auto | fp8 | fp8_e4m3 | fp8_e5m2")
    ap.add_argument("--kv-table", metavar="JSON",
                    help="measure plugin and built-in on every KV cache dtype (fp8 ones need AVX-512/AMX on CPU), "
                         "check the plugin's outputs against the built-in's on the same cache, write JSON")
    args = ap.parse_args()
    if args.kv_table:
        return kv_table(Path(args.kv_table))
    m = measure(mode=args.mode, kv_cache_dtype=args.kv_cache_dtype)
    m.pop("outputs", None)
    print(json.dumps(m, indent=1))
    if args.record:
        if args.mode != "plugin" or args.kv_cache_dtype != "auto":
            raise SystemExit("--record keeps the default setting only (plugin, kv_cache_dtype auto)")
        RECORD.write_text(json.dumps(m, indent=1) + "\n")
        print("recorded", RECORD)


def kv_table(out: Path):
    import platform

    import torch

    rows = []
    for dtype in ("auto", "fp8", "fp8_e4m3", "fp8_e5m2"):
        got = {mode: measure(mode=mode, kv_cache_dtype=dtype) for mode in ("plugin", "builtin")}
        row = {"kv_cache_dtype": dtype,
               **{f"{m}_mean_acceptance_length": round(g["mean_acceptance_length"], 3) for m, g in got.items()},
               **{f"{m}_per_position": [round(x, 3) for x in g["per_position_acceptance"]] for m, g in got.items()},
               "outputs_identical_plugin_vs_builtin": got["plugin"]["outputs"] == got["builtin"]["outputs"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = rows[0]["plugin_mean_acceptance_length"]
    for r in rows:
        r["plugin_vs_auto"] = round(r["plugin_mean_acceptance_length"] / base, 3)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    res = {"machine": f"{cpu}, {torch.get_num_threads()} threads, avx512={torch.cpu._is_avx512_supported()}, "
                      f"amx={torch.cpu._is_amx_tile_supported()}", "python": platform.python_version(),
           "settings": {**SETTINGS, "pair": "trained", "dtype": "float32", "temperature": 0}, "rows": rows}
    out.write_text(json.dumps(res, indent=1) + "\n")
    print("wrote", out)


if __name__ == "__main__":
    main()
