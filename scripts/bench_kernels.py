#!/usr/bin/env python
"""Benchmark the Triton kernels of vllm_gemma_mtp.kernels against unfused torch, on a GPU.

  python scripts/bench_kernels.py                      # all kernels, Gemma 4 shapes
  python scripts/bench_kernels.py --kernels rejection --ks 1 2 3 4 5 6 7 8
  python scripts/bench_kernels.py --dry-run            # tiny shapes, CPU, torch paths only

Each case: median time (triton.testing.do_bench, CUDA events, L2 flushed between runs) of
the kernel and of its unfused torch baseline, achieved GB/s from the bytes the fused kernel
must move at least, % of the device's peak bandwidth, and the speed-up. A correctness
check against the torch reference runs before timing. Results: a table on stdout, a JSON
file and a PNG plot in --out.

Baselines:
  input_proj  : embedding gather * scale, torch.cat, then one matmul (the reference).
  rejection   : vectorised torch that materialises softmax probabilities, residuals and
                a [N, V] exponential-noise tensor (vLLM-style unfused sampler).
  centroid    : a dense LM head, (h @ lm_head.T).argmax(-1), over the full vocabulary;
                the unfused torch centroid path is reported alongside for reference.
  paged_attn  : today's drafter path, kv_reader.gather (a copy of the context K/V) +
                kv_reader.dequantize + drafter.attend, against the kernel reading the paged
                cache in place; GB/s counts the K/V bytes of the window read once.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

# Known HBM peaks in GB/s, matched against torch.cuda.get_device_name().
PEAK_GBPS = [
    ("H200", 4800.0),
    ("H100 NVL", 3900.0),
    ("H100 PCIe", 2000.0),
    ("H100", 3350.0),  # SXM5 (HBM3); "NVIDIA H100 80GB HBM3"
    ("A100-SXM4-80GB", 2039.0),
    ("A100", 1555.0),
]

GOALS = {
    "rejection": "speed-up >= 2.0x vs unfused torch at 256 tokens and >= 70% of peak bandwidth",
    "input_proj": "speed-up >= 1.2x vs cat+matmul at <= 64 tokens",
    "centroid": "speed-up >= 3.0x vs dense-head argmax",
    "paged_attn": "speed-up >= 1.5x vs gather+attend at 8k context",
}

GEMMA = dict(
    vocab=262_144,
    target_hidden=[1536, 2560, 2816, 5376],
    drafter_hidden=[256, 1024],
    tokens=[1, 8, 64, 256],
    ks=[1, 2, 3, 4, 5, 6, 7, 8],
    centroids=2048,
    centroid_top_k=32,
    # Gemma 4 31B attention, (name, kv heads, head dim, sliding window (0: full), G = query heads per KV head)
    attn_layers=[("sliding", 16, 256, 1024, 2), ("full", 4, 512, 0, 8)],
    batch_sizes=[1, 8],
    contexts=[1024, 8192],
    block_size=16,
)
DRY = dict(vocab=512, target_hidden=[64], drafter_hidden=[32], tokens=[1, 8], ks=[1, 2], centroids=16, centroid_top_k=4,
           attn_layers=[("sliding", 2, 32, 16, 2), ("full", 1, 64, 0, 4)], batch_sizes=[1, 2], contexts=[32, 64],
           block_size=16)


def _peak(args) -> tuple[float | None, str]:
    if args.peak_gbps:
        return args.peak_gbps, "--peak-gbps"
    if not torch.cuda.is_available():
        return None, "cpu"
    name = torch.cuda.get_device_name()
    for key, gbps in PEAK_GBPS:
        if key in name:
            return gbps, name
    return None, name


def _timer(dry: bool, rep_ms: int):
    if not dry:
        import triton.testing

        def run(fn):
            return triton.testing.do_bench(fn, warmup=max(5, rep_ms // 4), rep=rep_ms, return_mode="median")

        return run

    def run_cpu(fn):
        fn()
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(ts)

    return run_cpu


# ----------------------------------------------------------------------------- input proj


def bench_input_proj(cfg, dev, dtype, timer, impl, progress):
    from vllm_gemma_mtp.kernels.input_proj import drafter_input_proj, drafter_input_proj_ref

    rows = []
    V = cfg["vocab"]
    elt = torch.tensor([], dtype=dtype).element_size()
    g = torch.Generator(device=dev).manual_seed(0)
    for Ht in cfg["target_hidden"]:
        emb = torch.randn(V, Ht, device=dev, dtype=dtype, generator=g)
        for Hd in cfg["drafter_hidden"]:
            w = (torch.randn(Hd, 2 * Ht, device=dev, generator=g) / math.sqrt(2 * Ht)).to(dtype)
            for T in cfg["tokens"]:
                ids = torch.randint(0, V, (T,), device=dev, generator=g)
                hid = torch.randn(T, Ht, device=dev, dtype=dtype, generator=g)
                scale = math.sqrt(Ht)
                out = drafter_input_proj(ids, emb, scale, hid, w, impl=impl)
                ref = drafter_input_proj_ref(ids, emb, scale, hid, w)
                err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6)).item()
                t_k = timer(lambda: drafter_input_proj(ids, emb, scale, hid, w, impl=impl))
                t_b = timer(lambda: drafter_input_proj_ref(ids, emb, scale, hid, w))
                nbytes = (Hd * 2 * Ht + 2 * T * Ht + T * Hd) * elt + T * 8
                rows.append(dict(kernel="input_proj", shape=f"Ht={Ht} Hd={Hd}", tokens=T, ms=t_k, base_ms=t_b,
                                 bytes=nbytes, check=f"relerr={err:.1e}", ok=err < 2e-2,
                                 goal_applies=T <= 64, goal_speedup=1.2))
                progress.update(1)
    return rows


# ------------------------------------------------------------------------------ rejection


def rejection_unfused_torch(draft, cu, logits, bonus, temperature, uniforms, draft_probs, gen, max_spec_len):
    """Vectorised, unfused torch rejection sampling (the baseline; one noise tensor [N, V])."""
    N, V = logits.shape
    B = cu.numel()
    counts = torch.diff(cu, prepend=cu.new_zeros(1))
    req = torch.repeat_interleave(torch.arange(B, device=logits.device), counts, output_size=N)
    start = cu - counts
    pos = torch.arange(N, device=logits.device) - start[req]
    t = temperature[req]
    greedy = t < 1e-5
    draft = draft.clamp(0, V - 1)  # the baseline does not reject placeholders; it only must not crash
    lf = logits.float()
    argmax = lf.argmax(-1)
    probs = torch.softmax(lf / torch.where(greedy, 1.0, t)[:, None], -1)  # [N, V] fp32
    p_t = probs.gather(1, draft[:, None]).squeeze(1)
    if draft_probs is None:
        p_d = torch.ones_like(p_t)
        resid = probs.scatter(1, draft[:, None], 0.0)  # [N, V]
    else:
        p_d = draft_probs.gather(1, draft[:, None]).squeeze(1)
        resid = (probs - draft_probs).clamp_min_(0.0)  # [N, V]
    noise = torch.empty_like(resid).exponential_(generator=gen)  # [N, V]
    recovered = torch.where(greedy, argmax, (resid / noise).argmax(-1))
    ok = (p_d > 0) & (p_t > 0) & (p_t / p_d.clamp_min(1e-30) >= uniforms)
    acc = torch.where(greedy, draft == argmax, ok)
    mat = torch.zeros(B, max_spec_len + 1, dtype=torch.int32, device=logits.device)
    mat[req, pos] = acc.int()
    nacc = mat.cumprod(1).sum(1)
    out = torch.full((B, max_spec_len + 1), -1, dtype=torch.int32, device=logits.device)
    keep = pos < nacc[req]
    out[req[keep], pos[keep]] = draft[keep].int()
    stop = (start + nacc).clamp(max=N - 1)
    last = torch.where(nacc < counts, recovered[stop], bonus)
    out[torch.arange(B, device=logits.device), nacc] = last.int()
    return out, nacc


def draft_counts(N: int, K: int, layout: str) -> list[int]:
    """Per-request draft counts summing to N: K each ("full"; the last request takes the remainder), or
    "ragged" - what adaptive draft lengths and late arrivals give: K, 0, K//2, 1, K-1, 0, ... repeating."""
    if layout == "full":
        return [min(K, N - i) for i in range(0, N, K)]
    pattern = [K, 0, K // 2, 1, max(K - 1, 0), 0]
    counts, total, i = [], 0, 0
    while total < N:
        c = min(pattern[i % len(pattern)], N - total)
        counts.append(c)
        total += c
        i += 1
    return counts


def bench_rejection(cfg, dev, timer, impl, progress, logits_dtype):
    from vllm_gemma_mtp.kernels.rejection import rejection_sample, rejection_sample_ref

    rows = []
    V = cfg["vocab"]
    g = torch.Generator(device=dev).manual_seed(0)
    elt = torch.tensor([], dtype=logits_dtype).element_size()
    for N, K, layout in [(n, k, lay) for n in cfg["tokens"] for k in cfg["ks"] for lay in ("full", "ragged")]:
        counts = draft_counts(N, K, layout)
        B = len(counts)
        cu = torch.tensor(counts, device=dev, dtype=torch.int32).cumsum(0).to(torch.int32)
        logits = torch.randn(N, V, device=dev, generator=g) * 2.0
        draft = torch.randint(0, V, (N,), device=dev, generator=g)
        # Realistic acceptance: the target likes 70% of the drafts a lot.
        liked = torch.rand(N, device=dev, generator=g) < 0.7
        logits[torch.arange(N, device=dev)[liked], draft[liked]] += 14.0
        if layout == "ragged":  # grammar-rejected drafts arrive as -1 placeholders
            draft[torch.rand(N, device=dev, generator=g) < 0.05] = -1
        logits = logits.to(logits_dtype)
        bonus = torch.randint(0, V, (B,), device=dev, generator=g)
        u = torch.rand(N, device=dev, generator=g)
        seeds = torch.randint(0, 2**62, (B,), device=dev, generator=g)
        draft_l, cu_l = draft.long(), cu.long()
        for mode in ("greedy", "random", "random+q"):
            temp = torch.full((B,), 0.0 if mode == "greedy" else 1.0, device=dev)
            dp = None
            if mode == "random+q":
                dp = torch.softmax(torch.randn(N, V, device=dev, generator=g), -1)
                dp[torch.arange(N, device=dev), draft] += 0.5
                dp /= dp.sum(-1, keepdim=True)
            args = (draft, cu, logits, bonus, temp, u, dp, seeds, 7, K)
            hint = dict(all_greedy=mode == "greedy")  # what the sampler knows on the host
            out = rejection_sample(*args, impl=impl, **hint)
            ref = rejection_sample_ref(*args, **hint)
            same_acc = bool(torch.equal(out.num_accepted, ref.num_accepted))
            if mode == "greedy":
                same_acc = same_acc and bool(torch.equal(out.output_token_ids, ref.output_token_ids))
            t_k = timer(lambda: rejection_sample(*args, impl=impl, **hint))
            t_b = timer(lambda: rejection_unfused_torch(draft_l, cu_l, logits, bonus, temp, u, dp, g, K))
            nbytes = N * V * elt + (N * V * 4 if dp is not None else 0) + N * 24 + B * 40
            rows.append(dict(kernel="rejection", shape=f"{mode} K={K} {layout}", batch=B, tokens=N, ms=t_k, base_ms=t_b,
                             bytes=nbytes, check=f"acc={out.num_accepted.sum().item() / N:.2f}",
                             ok=same_acc, goal_applies=N == 256, goal_speedup=2.0, goal_peak=0.7))
            progress.update(1)
    return rows


# ------------------------------------------------------------------------------- centroid


def bench_centroid(cfg, dev, dtype, timer, impl, progress):
    from vllm_gemma_mtp.kernels.centroid_head import centroid_argmax, centroid_argmax_ref

    rows = []
    V, C, k = cfg["vocab"], cfg["centroids"], cfg["centroid_top_k"]
    S = k * (V // C)
    elt = torch.tensor([], dtype=dtype).element_size()
    g = torch.Generator(device=dev).manual_seed(0)
    for Hd in cfg["drafter_hidden"]:
        cw = torch.randn(C, Hd, device=dev, generator=g).to(dtype)
        lm = torch.randn(V, Hd, device=dev, generator=g).to(dtype)
        order = torch.randperm(V, device=dev, generator=g)
        for T in cfg["tokens"]:
            h = torch.randn(T, Hd, device=dev, generator=g).to(dtype)
            out = centroid_argmax(h, cw, order, lm, k, impl=impl)
            ref = centroid_argmax_ref(h, cw, order, lm, k)
            bad = (out != ref).nonzero().flatten()
            check = "exact"
            if bad.numel():
                # fp32 sums in another order may flip a near-tie; anything else is a bug.
                hd = h[bad].double()
                gap = ((lm[out[bad]].double() * hd).sum(-1) - (lm[ref[bad]].double() * hd).sum(-1)).abs()
                check = f"{bad.numel()} near-ties" if bool((gap <= 1e-3).all()) else f"{bad.numel()} MISMATCH"
            ok = "MISMATCH" not in check
            t_k = timer(lambda: centroid_argmax(h, cw, order, lm, k, impl=impl))
            t_b = timer(lambda: (h @ lm.t()).argmax(-1))
            t_u = timer(lambda: centroid_argmax_ref(h, cw, order, lm, k))
            nbytes = C * Hd * elt + T * S * (Hd * elt + 8) + T * Hd * elt
            rows.append(dict(kernel="centroid", shape=f"Hd={Hd} C={C} k={k}", tokens=T, ms=t_k, base_ms=t_b,
                             unfused_ms=t_u, bytes=nbytes, check=check, ok=ok,
                             goal_applies=True, goal_speedup=3.0))
            progress.update(1)
    return rows


# ----------------------------------------------------------------------------- paged attn


def gather_attend(q, kc, vc, table, kv_len, max_len, window, scales):
    """Today's drafter path: copy the context K/V out of the paged cache, dequantize the copy, attend."""
    from vllm_gemma_mtp.drafter import attend
    from vllm_gemma_mtp.kv_reader import dequantize, gather

    (K, V), mask = gather(kc, vc, table, kv_len, max_len, window)
    (K, V), = dequantize({"x": (K, V)}, None if scales is None else {"x": scales}, q.dtype).values()
    return attend(q, K.to(q.dtype), V.to(q.dtype), mask)


def bench_paged_attn(cfg, dev, dtype, timer, impl, progress, cache_dtypes):
    from vllm_gemma_mtp.kernels.paged_attn import paged_attend, paged_attend_ref
    from vllm_gemma_mtp.kv_reader import split_paged

    rows = []
    bs = cfg["block_size"]
    backend = "TRITON_ATTN" if dev.type == "cuda" else "CPU_ATTN"
    g = torch.Generator(device=dev).manual_seed(0)
    for name, kvh, d, window, G in cfg["attn_layers"]:
        for B in cfg["batch_sizes"]:
            for ctx in cfg["contexts"]:
                nblk = (ctx + bs - 1) // bs
                nb = B * nblk + 1
                for cache_name, storage in cache_dtypes:
                    # a [nb, kvh, bs, 2d] cache of random values, viewed the way the drafter reads it
                    raw = torch.randn(nb, kvh, bs, 2 * d, device=dev, generator=g, dtype=dtype).to(storage)
                    if storage.itemsize == 1:
                        raw = raw.view(torch.uint8)  # vLLM keeps fp8 caches as bytes
                    kc, vc = split_paged(raw, backend, "vec", storage)
                    table = torch.randperm(nb, device=dev, generator=g)[:B * nblk].view(B, nblk).to(torch.int32)
                    kv_len = torch.full((B,), ctx, device=dev, dtype=torch.int32)
                    q = (torch.randn(B, kvh, G, d, device=dev, generator=g) / math.sqrt(d)).to(dtype)
                    scales = None
                    ks = vs = None
                    if storage.itemsize == 1:
                        scales = torch.tensor([0.5, 0.25], device=dev)
                        ks, vs = scales[0], scales[1]
                    kw = {} if impl == "torch" else dict(max_len=ctx)
                    out = paged_attend(q, kc, vc, table, kv_len, window, ks, vs, impl=impl, **kw)
                    ref = paged_attend_ref(q, kc, vc, table, kv_len, window, ks, vs)
                    err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6)).item()
                    t_k = timer(lambda: paged_attend(q, kc, vc, table, kv_len, window, ks, vs, impl=impl, **kw))
                    t_b = timer(lambda: gather_attend(q, kc, vc, table, kv_len, ctx, window, scales))
                    keys = min(window, ctx) if window else ctx
                    elt = q.element_size()
                    nbytes = 2 * B * kvh * keys * d * storage.itemsize + 2 * q.numel() * elt + table.numel() * 4
                    rows.append(dict(kernel="paged_attn", shape=f"{name} B={B} {cache_name}", batch=B, tokens=ctx,
                                     ms=t_k, base_ms=t_b, bytes=nbytes, check=f"relerr={err:.1e}", ok=err < 2e-2,
                                     goal_applies=ctx == 8192, goal_speedup=1.5))
                    del raw, kc, vc
                    progress.update(1)
    return rows


# -------------------------------------------------------------------------------- report


def _finish(rows, peak):
    for r in rows:
        r["gbps"] = r["bytes"] / (r["ms"] * 1e-3) / 1e9
        r["pct_peak"] = (r["gbps"] / peak) if peak else None
        r["speedup"] = r["base_ms"] / r["ms"]
        verdict = ""
        if r.get("goal_applies"):
            good = r["speedup"] >= r["goal_speedup"]
            if "goal_peak" in r:
                good = good and r["pct_peak"] is not None and r["pct_peak"] >= r["goal_peak"]
            verdict = "MET" if good else "missed"
        r["goal"] = verdict
    return rows


def _print_table(rows, peak_label):
    hdr = f"{'kernel':<11}{'shape':<26}{'tok':>5}{'kernel ms':>11}{'base ms':>10}{'x':>7}{'GB/s':>9}{'%peak':>7}  {'check':<18}{'goal':<7}"
    print(f"\npeak bandwidth source: {peak_label}")
    last = None
    for r in rows:
        if r["kernel"] != last:
            print("\n" + hdr + "\n" + "-" * len(hdr))
            last = r["kernel"]
        pct = f"{100 * r['pct_peak']:.0f}%" if r["pct_peak"] is not None else "n/a"
        print(f"{r['kernel']:<11}{r['shape']:<26}{r['tokens']:>5}{r['ms']:>11.4f}{r['base_ms']:>10.4f}{r['speedup']:>6.2f}x"
              f"{r['gbps']:>9.1f}{pct:>7}  {r['check'] + ('' if r['ok'] else ' FAIL'):<18}{r['goal']:<7}")
    print("\nGoals:")
    for kern, text in GOALS.items():
        rel = [r for r in rows if r["kernel"] == kern and r.get("goal_applies")]
        if rel:
            met = sum(r["goal"] == "MET" for r in rel)
            print(f"  {kern:<11} {text}: met in {met}/{len(rel)} applicable cases")


def _plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kernels = [k for k in ("input_proj", "rejection", "centroid", "paged_attn") if any(r["kernel"] == k for r in rows)]
    fig, axes = plt.subplots(1, len(kernels), figsize=(6 * len(kernels), 4.5), squeeze=False)
    for ax, kern in zip(axes[0], kernels):
        sub = [r for r in rows if r["kernel"] == kern]
        for shape in dict.fromkeys(r["shape"] for r in sub):
            pts = sorted((r["tokens"], r["speedup"]) for r in sub if r["shape"] == shape)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=shape)
        goal = next((r["goal_speedup"] for r in sub), None)
        if goal:
            ax.axhline(goal, color="k", ls="--", lw=1, label=f"goal {goal}x")
        ax.axhline(1.0, color="gray", lw=0.5)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context tokens" if kern == "paged_attn" else "tokens")
        ax.set_ylabel("speed-up vs torch baseline")
        ax.set_title(kern)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    kernel_names = ["input_proj", "rejection", "centroid", "paged_attn"]
    ap.add_argument("--kernels", nargs="+", default=kernel_names, choices=kernel_names)
    ap.add_argument("--tokens", nargs="+", type=int, help="token counts (default 1 8 64 256)")
    ap.add_argument("--ks", nargs="+", type=int, help="draft lengths for the rejection sampler (default 1..8)")
    ap.add_argument("--target-hidden", nargs="+", type=int)
    ap.add_argument("--drafter-hidden", nargs="+", type=int)
    ap.add_argument("--vocab", type=int, help="vocabulary size (default 262144; 512 with --dry-run)")
    ap.add_argument("--contexts", nargs="+", type=int, help="paged_attn context lengths (default 1024 8192)")
    ap.add_argument("--batch-sizes", nargs="+", type=int, help="paged_attn batch sizes (default 1 8)")
    ap.add_argument("--kv-cache-dtypes", nargs="+", default=["model", "fp8_e4m3"], choices=["model", "fp8_e4m3", "fp8_e5m2"],
                    help="paged_attn cache dtypes (model: the --dtype)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--logits-dtype", default="float32", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--peak-gbps", type=float, help="peak memory bandwidth, if the device is not in the built-in table")
    ap.add_argument("--rep-ms", type=int, default=100, help="do_bench measuring time per case")
    ap.add_argument("--out", default="artifacts/bench_kernels", help="output folder for the JSON and the PNG")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU through the torch paths (checks the script)")
    args = ap.parse_args(argv)

    if not args.dry_run and not torch.cuda.is_available():
        print("bench_kernels: CUDA is not available -- this benchmark needs a GPU. "
              "Use --dry-run to exercise the script on CPU with tiny shapes.", file=sys.stderr)
        return 2
    from tqdm import tqdm

    cfg = dict(DRY if args.dry_run else GEMMA)
    for key in ("tokens", "ks", "target_hidden", "drafter_hidden", "vocab", "contexts", "batch_sizes"):
        if getattr(args, key):
            cfg[key] = getattr(args, key)
    dev = torch.device("cpu" if args.dry_run else "cuda")
    impl = "torch" if args.dry_run else "triton"
    dtype = getattr(torch, args.dtype)
    timer = _timer(args.dry_run, args.rep_ms)
    peak, peak_label = _peak(args)
    if args.dry_run:
        torch.set_num_threads(1)

    total = 0
    if "input_proj" in args.kernels:
        total += len(cfg["target_hidden"]) * len(cfg["drafter_hidden"]) * len(cfg["tokens"])
    if "rejection" in args.kernels:
        total += len(cfg["tokens"]) * len(cfg["ks"]) * 3 * 2
    if "centroid" in args.kernels:
        total += len(cfg["drafter_hidden"]) * len(cfg["tokens"])
    fp8 = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
    cache_dtypes = [(args.dtype if c == "model" else c, fp8.get(c, dtype)) for c in dict.fromkeys(args.kv_cache_dtypes)]
    if "paged_attn" in args.kernels:
        total += len(cfg["attn_layers"]) * len(cfg["batch_sizes"]) * len(cfg["contexts"]) * len(cache_dtypes)
    rows = []
    with torch.inference_mode(), tqdm(total=total, desc="bench", unit="case") as progress:
        if "input_proj" in args.kernels:
            rows += bench_input_proj(cfg, dev, dtype, timer, impl, progress)
        if "rejection" in args.kernels:
            rows += bench_rejection(cfg, dev, timer, impl, progress, getattr(torch, args.logits_dtype))
        if "centroid" in args.kernels:
            rows += bench_centroid(cfg, dev, dtype, timer, impl, progress)
        if "paged_attn" in args.kernels:
            rows += bench_paged_attn(cfg, dev, dtype, timer, impl, progress, cache_dtypes)
    rows = _finish(rows, peak)
    if args.dry_run:
        print("\nDRY RUN: both columns are torch code on CPU at toy sizes; the numbers only show the script works.")
    _print_table(rows, peak_label)

    os.makedirs(args.out, exist_ok=True)
    meta = dict(device=peak_label, peak_gbps=peak, dry_run=args.dry_run, dtype=args.dtype, logits_dtype=args.logits_dtype,
                torch=torch.__version__, goals=GOALS, config=cfg)
    try:
        import triton

        meta["triton"] = triton.__version__
    except Exception:
        pass
    json_path = os.path.join(args.out, "bench_kernels.json")
    with open(json_path, "w") as f:
        json.dump(dict(meta=meta, results=rows), f, indent=1)
    png_path = os.path.join(args.out, "bench_kernels.png")
    _plot(rows, png_path)
    print(f"\nwrote {json_path} and {png_path}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
