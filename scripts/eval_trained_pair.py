#!/usr/bin/env python
"""Held-out greedy drafting acceptance of the trained tiny pair (tests/assets/trained_pair).

    python scripts/eval_trained_pair.py                     # K=4, query position P+1 (as trained)
    python scripts/eval_trained_pair.py --K 2 --q-offset 0  # vLLM's built-in convention (P)
    python scripts/eval_trained_pair.py --kv-cache-dtype fp8 # drafter reads an fp8 round trip of the K/V

Loads target/ with transformers and assistant/ with vllm_gemma_mtp.drafter.load_drafter, re-tokenizes the
held-out stdlib modules listed in train_log.json and runs the same simulation as train_tiny_pair.py
(greedy target continuation, one draft round per possible start P, longest-prefix acceptance walk).
With the defaults it reproduces train_log.json["eval"].
"""

from __future__ import annotations

import argparse
import json
import sys
import sysconfig
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_tiny_pair as T  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pair", default=str(T.REPO / "tests" / "assets" / "trained_pair"))
    ap.add_argument("--K", type=int, default=4)
    ap.add_argument("--q-offset", type=int, default=1, help="drafter query position = P + q_offset")
    ap.add_argument("--prompts-per-file", type=int, default=None)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--kv-cache-dtype", default="auto",
                    help="drafter reads the target K/V through this cache dtype (fp8, fp8_e4m3, fp8_e5m2)")
    ap.add_argument("--kv-scale", type=float, default=1.0, help="k/v scale of the quantized cache")
    ap.add_argument("--read-bytes-as-integers", action="store_true",
                    help="reproduce the pre-fix fp8 bug: the drafter read the cache's bytes as integers")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from vllm_gemma_mtp.drafter import load_drafter

    pair = Path(args.pair)
    log = json.loads((pair / "train_log.json").read_text())
    hp = log["hyper_parameters"]
    tok = AutoTokenizer.from_pretrained(pair / "target")
    target = AutoModelForCausalLM.from_pretrained(pair / "target", dtype=torch.float32).eval().requires_grad_(False)
    drafter = load_drafter(str(pair / "assistant"), AutoConfig.from_pretrained(pair / "target"))
    drafter.kernel_impl = "torch"
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    held = {f: torch.tensor(tok.backend_tokenizer.encode(T.read_text(stdlib / f), add_special_tokens=False).ids)
            for f in log["corpus"]["held_out_files"]}
    a = SimpleNamespace(seed=hp["seed"], K=args.K, e_prompt=hp["e_prompt"],
                        e_new=args.new_tokens or hp["e_new"], e_per_file=args.prompts_per_file or hp["e_per_file"])
    out = {}
    transform = None
    if args.kv_cache_dtype != "auto":
        from vllm_gemma_mtp import kv_reader as R

        f8 = R.storage_dtype(args.kv_cache_dtype, torch.float32)
        if args.read_bytes_as_integers:
            def transform(x):
                return R.quantize(x, f8, args.kv_scale).view(torch.uint8).float()
        else:
            def transform(x):
                return R.quantize(x, f8, args.kv_scale).float() * args.kv_scale
    res = T.evaluate(a, target, drafter, tok, held, "eval", out, q_offset=args.q_offset, kv_transform=transform)
    res["kv_cache_dtype"] = args.kv_cache_dtype + (" (bytes read as integers)" if args.read_bytes_as_integers else "")
    print(json.dumps({k: v for k, v in res.items() if k != "sample"}, indent=1))


if __name__ == "__main__":
    main()
