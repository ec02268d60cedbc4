"""Rejection sampling for Gemma 4 MTP on the fused kernel (kernels/rejection.py), with a counted fallback.

The fused path reads the target logits once per draft position (vocabulary tiles, online softmax with
temperature; no fp32 [tokens, V] probability tensor on CUDA). It covers greedy and plain-temperature random
requests, mixed in one batch, with or without per-request seeds. Anything that needs a pre-pass over the
logits - top-k/top-p, penalties, bad words, allowed-token masks, min_tokens, a thinking budget,
logprobs, dense draft probabilities, synthetic acceptance - goes through vLLM's own sampler, and each such
step is counted (per reason) and logged once.
"""

from __future__ import annotations

import logging
from collections import Counter

import torch

from vllm_gemma_mtp import compat
from vllm_gemma_mtp.kernels.rejection import rejection_sample

logger = logging.getLogger("vllm.gemma_mtp")

_Base = compat.builtin_rejection_sampler_class()


def fallback_reason(sm, draft_probs, synthetic: bool) -> str | None:
    """Why the fused kernel cannot take this step, or None when it can."""
    if synthetic:
        return "synthetic acceptance"
    if draft_probs is not None:
        return "draft probabilities"
    if sm.max_num_logprobs is not None:
        return "logprobs"
    if not sm.no_penalties:
        return "penalties"
    if sm.bad_words_token_ids:
        return "bad words"
    if sm.allowed_token_ids_mask is not None:
        return "allowed token ids"
    # vLLM's rejection path applies only min-tokens among the logits processors (plus the thinking budget);
    # the fused path must fall back exactly where those would change the logits
    for proc in sm.logitsprocs.non_argmax_invariant:
        if type(proc).__name__ == "MinTokensLogitsProcessor" and getattr(proc, "min_toks", None):
            return "min_tokens"
    holder = getattr(sm, "thinking_budget_state_holder", None)
    if holder is not None and holder.has_tracked_requests():
        return "thinking budget"
    return None


def truncate_top_k_top_p(logits, temperature, top_k, top_p, num_draft_tokens):
    """Random requests: logits / T restricted to the top-k tokens, then to the smallest set whose probability
    reaches top-p (the rest -inf), returned with temperature 1; greedy requests keep raw logits and T = 0
    (truncation never changes an argmax). logits [N, V]; temperature, top_k, top_p [B]."""
    from vllm_gemma_mtp.kernels.rejection import GREEDY_TEMPERATURE_EPS

    dev = logits.device
    req = torch.repeat_interleave(torch.arange(len(num_draft_tokens), device=dev),
                                  torch.tensor(num_draft_tokens, device=dev))  # [N] request of each row
    t = temperature.float()[req]
    rand = t >= GREEDY_TEMPERATURE_EPS
    x = logits.float() / torch.where(rand, t, torch.ones_like(t))[:, None]
    srt, idx = x.sort(-1, descending=True)
    V = x.shape[-1]
    drop = torch.zeros_like(srt, dtype=torch.bool)
    if top_k is not None:
        k = top_k[req].long()
        k = torch.where((k <= 0) | (k > V), torch.full_like(k, V), k)
        drop |= torch.arange(V, device=dev)[None, :] >= k[:, None]
    if top_p is not None:
        p = torch.softmax(srt.masked_fill(drop, float("-inf")), -1)
        before = p.cumsum(-1) - p  # mass strictly ahead of each token; the first token always stays
        drop |= before >= top_p[req].float()[:, None]
    srt = srt.masked_fill(drop, float("-inf"))
    out = torch.empty_like(x).scatter_(-1, idx, srt)
    out = torch.where(rand[:, None], out, logits.float())
    return out, (temperature.float() >= GREEDY_TEMPERATURE_EPS).float()


class GemmaMTPRejectionSampler(_Base):
    def __init__(self, sampler, spec_config=None, device=None):
        super().__init__(sampler, spec_config, device)
        self.fused_enabled = spec_config is not None and spec_config.use_gemma4_mtp()
        self.fused_steps = 0
        self.fallbacks: Counter = Counter()
        from vllm_gemma_mtp.plugin import current_options

        opts = current_options()
        self.impl = "torch" if opts.kernels == "torch" else ("triton" if opts.kernels == "triton" else "auto")

    def forward(self, metadata, draft_probs, logits, sampling_metadata):
        reason = "not Gemma 4 MTP" if not self.fused_enabled else fallback_reason(
            sampling_metadata, draft_probs, self.synthetic_conditional_rates is not None)
        if reason is not None:
            if reason not in self.fallbacks:
                logger.info("vllm-gemma-mtp: rejection sampling falls back to vLLM's sampler (%s)", reason)
            self.fallbacks[reason] += 1
            return super().forward(metadata, draft_probs, logits, sampling_metadata)
        from vllm.v1.outputs import SamplerOutput

        sm = sampling_metadata
        bonus = self.sampler(logits=logits[metadata.bonus_logits_indices], sampling_metadata=sm,
                             predict_bonus_token=True).sampled_token_ids  # [B, 1]
        target_logits = logits[metadata.target_logits_indices]  # [N, V], raw (no processors apply)
        B = len(metadata.num_draft_tokens)
        dev = target_logits.device
        temperature = sm.temperature if sm.temperature is not None else torch.zeros(B, device=dev)
        if (sm.top_k is not None or sm.top_p is not None) and target_logits.shape[0] > 0:
            # top-k/top-p need a pre-pass over the logits: done here in torch (vLLM 0.32's CPU path for it
            # crashes the engine: "max(): Expected reduction dim ..." in apply_top_k_only), counted
            self.fallbacks["top-k/top-p pre-pass"] += 1
            target_logits, temperature = truncate_top_k_top_p(
                target_logits, temperature, sm.top_k, sm.top_p, metadata.num_draft_tokens)
        uniforms, seeds = self._randomness(metadata, sm, B, dev)
        # offset 0: every step draws fresh per-request seeds (from the request's own generator when seeded),
        # so a global step counter would only make seeded requests depend on the engine's history
        out = rejection_sample(metadata.draft_token_ids, metadata.cu_num_draft_tokens, target_logits,
                               bonus.view(-1), temperature.float(), uniforms, None, seeds, 0,
                               metadata.max_spec_len, impl=self.impl)
        self.fused_steps += 1
        return SamplerOutput(sampled_token_ids=out.output_token_ids.to(torch.int32), logprobs_tensors=None)

    @staticmethod
    def _randomness(metadata, sm, B, dev):
        """Acceptance uniforms [N] and recovered-token seeds [B]; requests with their own generator draw
        both from it, so a seeded request reproduces whatever else is in the batch."""
        N = int(metadata.draft_token_ids.shape[0])
        if sm.all_greedy:
            return torch.zeros(N, device=dev), torch.zeros(B, dtype=torch.int64, device=dev)
        uniforms = torch.rand(N, device=dev, dtype=torch.float64)
        seeds = torch.randint(0, 2**62, (B,), device=dev, dtype=torch.int64)
        if sm.generators:
            starts = [0]
            for n in metadata.num_draft_tokens:
                starts.append(starts[-1] + n)
            for i, g in sm.generators.items():
                n = metadata.num_draft_tokens[i]
                if n:
                    uniforms[starts[i]:starts[i] + n] = torch.rand(n, generator=g, device=dev, dtype=torch.float64)
                seeds[i] = torch.randint(0, 2**62, (1,), generator=g, device=dev, dtype=torch.int64)[0]
        return uniforms, seeds

    def stats(self) -> dict:
        return {"fused_steps": self.fused_steps, "fallbacks": dict(self.fallbacks)}
