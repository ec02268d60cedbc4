"""Plugin options.

vLLM's SpeculativeConfig forbids unknown keys, so the plugin's options come from environment variables
(they reach every vLLM process, Ray workers included, because vLLM forwards the driver's environment).
Every variable is validated when the plugin loads; a bad value or an unknown VLLM_GEMMA_MTP_* name is an
error that names the variable and the accepted values.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

PREFIX = "VLLM_GEMMA_MTP_"


class OptionsError(ValueError):
    pass


_PATH = "path"  # a free-form file path (kept as written), or empty
_BOOL = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}

# name -> (env var, default, accepted values or None for bool, help)
_SPEC = {
    "enabled": ("ENABLE", "1", None,
                "0 turns the plugin off: vLLM's built-in Gemma 4 MTP proposer runs (logged at startup)"),
    "query_position": ("QUERY_POSITION", "p+1", ("p+1", "p"),
                       "RoPE position of the drafter's queries: p+1 (transformers' reference) or p (vLLM built-in)"),
    "kernels": ("KERNELS", "auto", ("auto", "triton", "torch"),
                "auto: Triton kernels on CUDA, torch references elsewhere"),
    "compile": ("COMPILE", "auto", ("auto", "1", "0"),
                "torch.compile the draft round (one graph for batch 1, one for batch >= 2, built at startup): "
                "auto = when the engine is not enforce_eager"),
    "adaptive": ("ADAPTIVE", "1", None,
                 "choose each request's draft length every step (0..num_speculative_tokens) from its acceptance "
                 "and the learned step costs; 0 drafts the fixed num_speculative_tokens (benchmarks, bisecting)"),
    "paged_attention": ("PAGED_ATTENTION", "auto", ("auto", "1", "0"),
                        "the drafter attends the target's paged K/V in place (Triton kernel) instead of copying "
                        "the round's context first: auto = when the draft round is eager and the kernels are "
                        "Triton (CUDA); 1 = always (an eager round; on CPU through the torch reference)"),
    "force_v1_runner": ("FORCE_V1_RUNNER", "1", None,
                        "on vLLM >= 0.33 route Gemma 4 MTP through the V1 model runner, where the plugin's "
                        "proposer lives; 0 leaves Model Runner V2 and vLLM's built-in speculator (logged)"),
    "trace": ("TRACE", "", _PATH,
              "a file the rank-0 worker appends a JSON line to for every draft-length decision and step-cost "
              "sample (decision_log.py; read it with scripts/trace_summary.py); empty: off"),
}


@dataclass(frozen=True)
class Options:
    enabled: bool = True
    query_position: str = "p+1"
    kernels: str = "auto"
    compile: str = "auto"
    adaptive: bool = True
    paged_attention: str = "auto"
    force_v1_runner: bool = True
    trace: str = ""

    @property
    def query_offset(self) -> int:
        return 1 if self.query_position == "p+1" else 0

    def describe(self) -> str:
        return ", ".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self))


def from_env(environ=None) -> Options:
    env = os.environ if environ is None else environ
    known = {PREFIX + v[0] for v in _SPEC.values()}
    unknown = sorted(k for k in env if k.startswith(PREFIX) and k not in known)
    if unknown:
        raise OptionsError(f"unknown vllm-gemma-mtp option {unknown[0]}; known options: {sorted(known)}")
    vals = {}
    for name, (var, default, choices, _) in _SPEC.items():
        if choices is _PATH:
            vals[name] = _check_path(PREFIX + var, env.get(PREFIX + var, default).strip())
            continue
        raw = env.get(PREFIX + var, default).strip().lower()
        if choices is None:
            if raw not in _BOOL:
                raise OptionsError(f"{PREFIX + var}={raw!r} is not a boolean (use 1/0, true/false)")
            vals[name] = _BOOL[raw]
        else:
            if raw not in choices:
                raise OptionsError(f"{PREFIX + var}={raw!r} is invalid; accepted values: {', '.join(choices)}")
            vals[name] = raw
    if vals["paged_attention"] == "1" and vals["compile"] == "1":
        raise OptionsError(f"{PREFIX}PAGED_ATTENTION=1 runs the draft round eagerly (the paged kernel is not "
                           f"traced), which contradicts {PREFIX}COMPILE=1; set one of them to auto")
    return Options(**vals)


def _check_path(var: str, raw: str) -> str:
    """A file the plugin will append to: its folder must exist and be writable, and it must not be a folder."""
    if not raw:
        return ""
    path = os.path.abspath(os.path.expanduser(raw))
    folder = os.path.dirname(path)
    if os.path.isdir(path):
        raise OptionsError(f"{var}={raw!r} is a folder; give a file path (it is appended to)")
    if not os.path.isdir(folder):
        raise OptionsError(f"{var}={raw!r}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise OptionsError(f"{var}={raw!r} is not writable")
    return path


def env_name(option: str) -> str:
    """The variable suffix of an option name (e.g. "adaptive" -> "ADAPTIVE"); OptionsError if unknown."""
    if option not in _SPEC:
        raise OptionsError(f"unknown vllm-gemma-mtp option {option!r}; known options: {sorted(_SPEC)}")
    return _SPEC[option][0]


def help_text() -> str:
    return "\n".join(f"{PREFIX + v[0]} (default {v[1] or 'empty'}): {v[3]}" for v in _SPEC.values())
