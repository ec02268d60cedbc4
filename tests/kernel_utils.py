"""Shared helpers for the kernel tests (tests/test_kernel_*.py).

Not a conftest: imported explicitly by the kernel test modules.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

import numpy as np
import torch


def logits_like(kind: str, n: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    """[n, vocab] fp32 logits of a named shape, FlashInfer-test style."""
    if kind == "normal":
        return torch.randn(n, vocab, generator=gen) * 2.0
    if kind == "peaked":  # low entropy: one token dominates
        x = torch.randn(n, vocab, generator=gen)
        hot = torch.randint(0, vocab, (n,), generator=gen)
        x[torch.arange(n), hot] += 12.0
        return x
    if kind == "flat":  # near-uniform
        return torch.randn(n, vocab, generator=gen) * 0.05
    raise ValueError(kind)


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square goodness-of-fit p-value of `counts` against `probs`.

    Categories with an expected count below 5 are pooled into one, as the test requires.
    """
    from scipy.stats import chi2

    counts = counts.double().cpu().numpy()
    n = counts.sum()
    exp = probs.double().cpu().numpy() * n
    small = exp < 5
    if small.any():
        counts = np.append(counts[~small], counts[small].sum())
        exp = np.append(exp[~small], exp[small].sum())
        if exp[-1] == 0:
            if counts[-1] > 0:
                return 0.0
            counts, exp = counts[:-1], exp[:-1]
    stat = float(((counts - exp) ** 2 / exp).sum())
    return float(chi2.sf(stat, len(exp) - 1))


def total_variation(counts: torch.Tensor, probs: torch.Tensor) -> float:
    emp = counts.double() / counts.sum()
    return 0.5 * float((emp - probs.double()).abs().sum())


def tv_bound(probs: torch.Tensor, n: int, sigmas: float = 5.0) -> float:
    """A loose bound on TV(empirical, probs) for n iid draws: each cell's deviation is
    at most `sigmas` standard deviations, i.e. 0.5 * sum_v sigmas * sqrt(p_v (1 - p_v) / n)."""
    p = probs.double()
    return 0.5 * sigmas * float(torch.sqrt(p * (1 - p) / n).sum())


# ----------------------------------------------------------------- ahead-of-time GPU compile


def compile_for_gpu(jobs: list[dict], arch: int = 90) -> list[dict]:
    """Compile kernels to sm_`arch` cubins without a GPU; return their resource usage.

    The interpreter runs kernels as Python, so it cannot catch what only the compiler
    rejects (loop-carried type changes, unsupported ops, layouts) or register spills.
    Each job: {"module": "vllm_gemma_mtp.kernels.x", "kernel": name, "signature": {...},
    "constexprs": {...}, "num_warps": int}. Runs in a subprocess with TRITON_INTERPRET=0:
    once the interpreter has run in a process, triton.language stays patched for it.
    Returns, per job, {"regs", "shared", "local"} (local > 0 means spills).
    """
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    code = "import sys, json; sys.path.insert(0, %r); import kernel_utils as k; k._compile_main(%d)" % (os.path.dirname(__file__), arch)
    res = subprocess.run([sys.executable, "-c", code], input=json.dumps(jobs), capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise AssertionError("GPU compile failed:\n" + res.stderr[-6000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def _compile_main(arch: int) -> None:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    out = []
    for job in json.loads(sys.stdin.read()):
        mod = importlib.import_module(job["module"])
        mod._load()
        src = ASTSource(fn=getattr(mod, job["kernel"]), signature=job["signature"], constexprs=job["constexprs"])
        opts = {"num_warps": job.get("num_warps", 4), "num_stages": job.get("num_stages", 3)}
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
        out.append(_resource_usage(compiled))
    print(json.dumps(out))


def _resource_usage(compiled) -> dict:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        txt = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+).*?SHARED:(\d+).*?LOCAL:(\d+)", txt)
    return {"regs": int(m.group(1)), "shared": int(m.group(2)), "local": int(m.group(3))} if m else {"raw": txt}
