"""Triton kernels for the Gemma 4 MTP drafter and the rejection sampler.

Every kernel module exposes a plain-torch reference (``*_ref``: the CPU production
path and the test oracle) and a dispatch function taking ``impl``:

* ``"auto"``   -- Triton when the tensors live on CUDA and triton imports, torch otherwise;
* ``"torch"``  -- always the reference;
* ``"triton"`` -- always Triton. On CPU tensors this only works under ``TRITON_INTERPRET=1``
  (the test suite uses that to run the kernels without a GPU).

Triton is imported lazily, and kernels are only decorated on first use, so the package
imports without triton and ``TRITON_INTERPRET`` may be set any time before the first call.
"""

from __future__ import annotations

import functools
import os

import torch

__all__ = ["triton_available", "interpreter_enabled", "use_triton", "next_pow2", "jit_lazily", "sm_count"]

_IMPLS = ("auto", "torch", "triton")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install (missing driver libs, ...)
        return False
    return True


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def use_triton(t: torch.Tensor, impl: str = "auto") -> bool:
    """Decide the implementation for tensors living where ``t`` lives."""
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
    if impl == "torch":
        return False
    if impl == "auto":
        return t.is_cuda and triton_available()
    if not triton_available():
        raise RuntimeError("impl='triton' requested but triton is not importable")
    if not t.is_cuda and not interpreter_enabled():
        raise RuntimeError(
            "impl='triton' on a CPU tensor needs TRITON_INTERPRET=1 set before the first kernel call"
        )
    return True


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def jit_lazily(module_globals: dict, names: tuple[str, ...]):
    """Replace the plain functions ``names`` in a kernel module by ``triton.jit`` versions.

    Kernel modules keep their kernels as undecorated functions (with
    ``from __future__ import annotations`` so ``tl.constexpr`` annotations stay strings)
    and call this once, on first use. Decorating at call time rather than import time
    means the interpreter switch is honoured even if another module imported the kernel
    module before ``TRITON_INTERPRET`` was set -- pytest imports every test module
    before running any of them, and the repository is shared.
    """
    import triton
    import triton.language

    module_globals["triton"] = triton
    module_globals["tl"] = triton.language
    for name in names:
        module_globals[name] = triton.jit(module_globals[name])
    return triton


@functools.lru_cache(maxsize=None)
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count
