"""Demo: a tiny Gemma 4 pair, offline LLM.generate on a batch with and without speculation.

    python scripts/demo.py [--pair trained|31b|e2b|allaccept] [--k 3]

Prints output tokens/s for both, the plugin's mean acceptance length and per-position acceptance (read
from vLLM's own spec-decode metrics), and checks that the greedy outputs are identical.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
ROOT = Path(__file__).resolve().parents[1]
TRAINED = ROOT / "tests" / "assets" / "trained_pair"


def pair_dir(name: str) -> Path:
    if name == "trained":
        if not (TRAINED / "assistant").exists():
            raise SystemExit(f"trained pair not found at {TRAINED} (scripts/train_tiny_pair.py builds it)")
        return TRAINED
    from vllm_gemma_mtp.fixtures import ensure_pair

    return ensure_pair(name)


def prompts_for(pair: Path, n: int):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(pair / "target")
    texts = ["def parse_args(argv):\n    ", "class Stack:\n    def __init__(self):\n        ",
             "import os\nimport sys\n\n\ndef main():\n    ", "    for i in range(len(items)):\n        ",
             "try:\n    import json\nexcept ImportError:\n    ", "def __repr__(self):\n        return ",
             "if __name__ == '__main__':\n    ", "    with open(path) as f:\n        "]
    return [[tok.bos_token_id or 2] + tok(texts[i % len(texts)])["input_ids"] for i in range(n)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default = "trained" if (TRAINED / "assistant").exists() else "31b"
    ap.add_argument("--pair", default=default, choices=["trained", "31b", "26b", "e2b", "allaccept"])
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--no-compile", action="store_true",
                    help="draft eagerly (by default the plugin compiles its draft round at engine start, ~1 min)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3, help="timed runs of each engine (the median is shown)")
    args = ap.parse_args()

    from tqdm import tqdm

    from engine_runs import interleaved_runs, start_engine, stop_engine

    os.environ["VLLM_GEMMA_MTP_COMPILE"] = "0" if args.no_compile else "1"
    pair = pair_dir(args.pair)
    prompts = prompts_for(pair, args.batch)
    engines = {}
    try:
        with tqdm(total=2, desc="starting engines", unit="engine") as bar:
            for mode in ("none", "plugin"):
                bar.set_postfix_str(mode)
                engines[mode] = (start_engine(str(pair / "target"), str(pair / "assistant"), mode, args.k), args.k)
                bar.update()
        # both engines up, timed alternately, so the machine's drift hits both alike
        results = interleaved_runs(engines, prompts, args.max_tokens, runs=args.runs, warmup=1)
    finally:
        for llm, _ in engines.values():
            stop_engine(llm)
    base, spec = results["none"], results["plugin"]
    print(f"\npair={args.pair} ({pair}) batch={args.batch} max_tokens={args.max_tokens} K={args.k} "
          f"median of {args.runs} alternating runs, "
          f"compiled draft round={not args.no_compile} "
          f"machine: {os.cpu_count()} CPU cores")
    print(f"no speculation : {base.tokens_per_s:8.1f} output tokens/s")
    print(f"vllm-gemma-mtp : {spec.tokens_per_s:8.1f} output tokens/s  ({spec.tokens_per_s / base.tokens_per_s:.2f}x)")
    if spec.mean_acceptance_length is not None:
        print(f"mean acceptance length: {spec.mean_acceptance_length:.2f} (of {args.k + 1} possible)")
        print("per-position acceptance: " + ", ".join(f"{x:.2f}" for x in spec.per_position_acceptance))
    same = base.outputs == spec.outputs
    print("greedy outputs identical to the target alone:", same)
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
