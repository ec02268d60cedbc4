"""The plugin's Gemma 4 MTP proposer (V1 model runner).

It subclasses vLLM's `Gemma4Proposer` only to pass the runner's isinstance gates and to receive the
per-KV-group block tables; the drafting itself is ours:

- no draft `Attention` modules are created, so the drafter registers no KV cache of its own; it reads the
  target's paged K/V directly (the last KV-owning sliding / full target layer, each through the block
  table of its own KV-cache group);
- a round needs the target hidden state of only the last accepted token per request (vLLM's built-in path
  re-runs the drafter over every scheduled token first); K/V, mask and query position are gathered once
  and reused for all draft steps, since the drafter writes no KV and its position is constant;
- no CUDA graphs are captured, so the E2B/E4B centroid head works on a CPU-only vLLM;
- with adaptive speculation (the default) each request's draft length comes from policy.py every step:
  the proposer feeds it the acceptance it observes (how far each request's position moved since its last
  drafts) and the step timings (verify: previous propose start -> this one, less the previous draft round;
  draft: the round itself), and
  returns ragged per-request drafts (lists under synchronous scheduling; -1-padded rows under async). A step
  where no request drafts runs no draft round at all.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from vllm_gemma_mtp import __version__, compat, controls
from vllm_gemma_mtp.decision_log import DecisionLog
from vllm_gemma_mtp.kv_reader import TargetKVReader, dequantize
from vllm_gemma_mtp.drafter import FULL, SLIDING, TPShard, draft_greedy, load_drafter, target_store_layers
from vllm_gemma_mtp.kernels import use_triton
from vllm_gemma_mtp.metrics import StepCounters
from vllm_gemma_mtp.plugin import current_options
from vllm_gemma_mtp.policy import DraftPolicy, PolicyConfig

logger = logging.getLogger("vllm.gemma_mtp")

_Base = compat.builtin_proposer_class()
_DEFERRED = object()  # next_token_ids not worked out yet (prepare_next_token_ids_padded)


@dataclass
class ProposerStats:
    rounds: int = 0
    drafted_tokens: int = 0
    propose_seconds: float = 0.0
    # (req_ids, q_pos, first_tokens, drafts, lengths given) of the most recent rounds, for tests that replay
    # them offline
    recent: list = field(default_factory=list)
    keep_recent: int = 0
    compiled: bool = False  # the draft round runs as a torch.compile graph
    paged: bool = False  # the drafter reads the target's cache in place (paged attention kernel)
    steps: int = 0  # propose calls
    skipped_rounds: int = 0  # steps where no request drafted (no draft round ran)
    plain_steps: int = 0  # steps the runner ran as plain decoding (no request carried drafts)
    held_fast: int = 0  # of the skipped rounds, steps answered before vLLM's propose path (held_zero_drafts)
    decisions: dict = field(default_factory=dict)  # policy reason -> steps
    source: object = None  # the DraftPolicy, read when asked (not rebuilt every step)

    @property
    def policy(self) -> dict | None:
        """The policy's state: chosen-K histogram, cost estimates, engine-wide acceptance."""
        pol = self.source
        if pol is None:
            return None
        return {"chosen_k_hist": list(pol.chosen_hist), "skipped_rounds": pol.skipped_rounds, "probes": pol.probes,
                "probes_deferred": pol.probes_deferred, "held_zero": pol.held_zero,
                "closed_decisions": pol.closed_decisions, "remeasures": pol.remeasures, **pol.costs.snapshot(),
                "engine_acceptance": pol.acceptance.engine_rates(), "gain_spread": pol.acceptance.gain_spread()}

    def as_dict(self) -> dict:
        return {"rounds": self.rounds, "drafted_tokens": self.drafted_tokens,
                "propose_seconds": self.propose_seconds, "recent": list(self.recent), "compiled": self.compiled,
                "paged": self.paged,
                "steps": self.steps, "skipped_rounds": self.skipped_rounds, "plain_steps": self.plain_steps,
                "held_fast": self.held_fast,
                "decisions": dict(self.decisions), "policy": self.policy}


class GemmaMTPProposer(_Base):
    plugin_name = "vllm-gemma-mtp"
    trace: DecisionLog | None = None  # VLLM_GEMMA_MTP_TRACE (rank 0; opened in load_model)
    _traced_held = 0  # stats.held_fast at the last decide line

    def __init__(self, vllm_config, device, runner=None):
        super().__init__(vllm_config, device, runner)
        self.runner = runner
        self.options = current_options()
        self.stats = ProposerStats()
        text = vllm_config.model_config.hf_config.get_text_config()
        self._store_index = target_store_layers(text)  # layer type -> target layer index
        self._store_name: dict[str, str] = {}
        self.kv: TargetKVReader | None = None  # built in load_model, once the layer names are known
        self._layout_checked = False
        self.paged = False  # attend the target's cache in place (load_model decides)
        self.tp_rank, self.tp_size = 0, 1  # this worker's tensor-parallel rank (load_model reads vLLM's)
        self.draft_attn_groups = []  # nothing for the runner to bind: we own no KV
        self.sliding_window = int(text.sliding_window or 0)
        K = int(self.speculative_config.num_speculative_tokens)
        self.policy = DraftPolicy(PolicyConfig(max_k=K)) if self.options.adaptive else None
        self.stats.source = self.policy
        self.counters = StepCounters(max_k=K, adaptive=self.options.adaptive)  # -> Prometheus (metrics.py)
        self._pending: dict = {}  # req_id -> (last accepted position when drafted, drafts given > 0)
        self._caps: dict = {}  # req_id -> per-request draft cap (extra_args)
        self._keys: tuple = ()  # the previous step's requests, in batch order
        self._cap_list: list = []  # their caps
        self._row: dict = {}  # req_id -> row
        self._deferred = None  # prepare_next_token_ids_padded's inputs, for a step that may not draft
        self._last_end: float | None = None  # perf_counter at the end of the previous propose
        self._last_start = 0.0  # ... at its start
        self._last_draft = 0.0  # seconds its draft round took (0 when none ran)
        self.waiting = None  # requests waiting for a place (the scheduler's, per step; None: not known)
        self._joined: dict = {}  # req_id -> the step it joined the batch
        self._limit: dict = {}  # req_id -> the length it stops at, at the latest (prompt + max_tokens)
        self._last_arrival = 0  # the step the newest request joined

    # ---- lifecycle hooks called by the runner ---------------------------------------------------------
    def load_model(self, target_model: torch.nn.Module) -> None:
        layers = compat.attention_layers(self.vllm_config)
        prefix = "model.layers"
        for name in layers:
            if ".layers." in name:
                prefix = name.split(".layers.")[0] + ".layers"
                break
        for lt, idx in self._store_index.items():
            name = f"{prefix}.{idx}.self_attn.attn"
            if name not in layers:
                raise RuntimeError(f"vllm-gemma-mtp: target attention layer {name} not found")
            self._store_name[lt] = name
        self.kv = TargetKVReader(self.vllm_config, self._store_name,
                                 {lt: self.sliding_window if lt == SLIDING else 0 for lt in self._store_name})
        compat.bind_rejection_sampler(self.runner)
        self.target_embed = compat.embed_weight(target_model)
        self.drafter = load_drafter(self.speculative_config.draft_model_config.model,
                                    self.vllm_config.model_config.hf_config,
                                    dtype=self.dtype, device=self.device,
                                    load_format=compat.load_format(self.vllm_config))
        self.tp_rank, self.tp_size = compat.tp_rank_size()
        if self.tp_size > 1:
            v0, nv = compat.embed_shard(target_model)
            self.drafter.shard_for_tp(TPShard(self.tp_rank, self.tp_size, compat.tp_all_reduce, v0, nv))
        self.drafter.kernel_impl = "torch" if self.options.kernels == "torch" else (
            "triton" if self.options.kernels == "triton" else "auto")
        self.model = self.drafter  # the runner looks for `drafter.model` (LoRA/EPLB introspection)
        self._draft_fn = draft_greedy
        compile_round = self.options.compile == "1" or (self.options.compile == "auto"
                                                        and not self.vllm_config.model_config.enforce_eager)
        # in place (no copy of the context per round) where the kernel is Triton and the round eager; the
        # kernel is not traced, so an explicit PAGED_ATTENTION=1 turns the compiled round off (logged)
        self.paged = self.options.paged_attention == "1" or (
            self.options.paged_attention == "auto" and not compile_round
            and use_triton(self.target_embed, self.drafter.kernel_impl))
        if self.paged and compile_round:
            logger.info("vllm-gemma-mtp: VLLM_GEMMA_MTP_PAGED_ATTENTION=1: the draft round runs eagerly")
            compile_round = False
        self.stats.paged = self.paged
        if compile_round:
            self._draft_fn = self._compile_draft_round()
            self.stats.compiled = True
        if self.options.trace and self.tp_rank == 0:
            self.trace = DecisionLog(self.options.trace)
            self.trace.start(self.options.describe(), int(self.speculative_config.num_speculative_tokens),
                             self.tp_size, self.policy is not None)
            logger.info("vllm-gemma-mtp: tracing draft-length decisions and step costs to %s", self.options.trace)
        logger.info("vllm-gemma-mtp %s: drafter loaded (%s head, H=%d%s); reads target KV of %s, cache %s, "
                    "%s; tensor parallel rank %d/%d; options: %s", __version__,
                    "centroid" if self.drafter.spec.centroids else "dense", self.drafter.spec.hidden,
                    ", random weights: load_format=dummy" if compat.load_format(self.vllm_config) == "dummy" else "",
                    self._store_name, self.kv.describe(),
                    "in place (paged attention kernel)" if self.paged else "gathered per round",
                    self.tp_rank, self.tp_size, self.options.describe())

    def _compile_draft_round(self):
        """Per-op overhead dominates a small drafter on CPU (~300 tiny ops per step); inductor fuses them.
        Compiled here, at startup, for batch 1 and a symbolic batch >= 2 (matmul specialises batch 1),
        with a symbolic key length; later rounds hit these two graphs."""
        t0 = time.perf_counter()
        # On CPU the generated wrapper is C++ too: ~200 extern/fused-kernel calls per round then cost no
        # Python each (0.99 -> 0.57 ms per K=4 round, batch 1, one thread), for ~40 s more compile time.
        options = {"cpp_wrapper": True} if torch.device(self.device).type == "cpu" else {}
        fn = torch.compile(draft_greedy, dynamic=True, options=options)
        d, spec = self.drafter, self.drafter.spec
        dt = d.pre_projection.weight.dtype
        K = self.num_speculative_tokens
        lens = (K, 1) if self.policy is not None and K > 1 else (K,)  # adaptive: 1-token rounds (probes) too
        with torch.inference_mode():  # the runner drafts under inference mode: guards see its tensors
            for B, L in [(B, L) for L in lens for B in (2, 1)]:
                kv, mask = {}, {}
                for lt in set(spec.layer_types):
                    g = d.layers[spec.layer_types.index(lt)]  # this rank's KV heads (all at TP=1)
                    S = 5 if lt == SLIDING else 7
                    kv[lt] = tuple(torch.zeros(B, g.num_kv_heads, S, g.head_dim, dtype=self.kv.dtype,
                                               device=self.device) for _ in range(2))
                    mask[lt] = torch.ones(B, 1, 1, S, dtype=torch.bool, device=self.device)
                    for t in (*kv[lt], mask[lt]):
                        if B > 1:
                            torch._dynamo.mark_dynamic(t, 0)
                        torch._dynamo.mark_dynamic(t, 3 if t.dtype == torch.bool else 2)
                args = [torch.zeros(B, dtype=torch.long, device=self.device),
                        torch.zeros(B, spec.backbone, dtype=dt, device=self.device),
                        torch.full((B,), 6, dtype=torch.long, device=self.device)]
                if B > 1:
                    for t in args:
                        torch._dynamo.mark_dynamic(t, 0)
                scales = ({lt: torch.ones(2, device=self.device) for lt in kv} if self.kv.quantized else None)
                fn(d, self.target_embed, args[0], args[1], args[2], kv, mask, L, scales)
        logger.info("vllm-gemma-mtp: compiled the draft round in %.1f s", time.perf_counter() - t0)
        return fn

    def initialize_attn_backend(self, kv_cache_config, kernel_block_sizes=None) -> None:
        self.kv.bind_groups(kv_cache_config.kv_cache_groups)
        self.draft_attn_groups = []
        self.kv_cache_gid = self.kv.group_of.get(FULL, next(iter(self.kv.group_of.values())))

    def initialize_cudagraph_keys(self, cudagraph_mode) -> None:
        pass  # the drafter runs eagerly

    def note_plain_step(self) -> None:
        """The runner runs this step as plain decoding (compat.patch_plain_steps)."""
        self.stats.plain_steps += 1
        self.counters.plain_steps += 1

    def dummy_run(self, num_tokens, use_cudagraphs=True, is_graph_capturing=False, slot_mappings=None):
        # nothing to capture or warm; the warm-up runs after the KV cache is bound, so a cache layout we
        # cannot read fails here, before the engine serves (the profile run comes before: no cache yet)
        if not self._layout_checked and self.kv is not None and self.kv.group_of:
            self._layout_checked = self.kv.check_layout()
            if self._layout_checked:
                for L in self.drafter.layers:
                    have = self.kv.local_kv_heads(L.layer_type)
                    if have != L.num_kv_heads:
                        raise RuntimeError(
                            f"vllm-gemma-mtp: rank {self.tp_rank} of {self.tp_size} holds {have} KV heads of the "
                            f"target's {L.layer_type} layer, the drafter expects {L.num_kv_heads}")

    # ---- drafting -------------------------------------------------------------------------------------
    def prepare_next_token_ids_padded(self, sampled_token_ids, requests, gpu_input_batch, discard_request_mask):
        """vLLM's version loops over every request in Python for the backup tokens of discarded rows (0.2 ms
        a step at batch 64 on CPU) before the proposer knows whether anyone drafts. A step that verified
        no drafts (one sampled token per row) under synchronous scheduling needs only the valid counts
        now; the next tokens are worked out in propose when a draft round runs."""
        if (self.policy is None or sampled_token_ids.shape[1] != 1
                or not compat.next_token_ids_deferrable(self.runner)):
            self._deferred = None
            return super().prepare_next_token_ids_padded(sampled_token_ids, requests, gpu_input_batch,
                                                         discard_request_mask)
        n = sampled_token_ids.shape[0]
        self._deferred = (sampled_token_ids, requests, gpu_input_batch, discard_request_mask)
        valid = (~discard_request_mask[:n]).to(torch.int32)  # [B]: one valid token per row unless discarded
        return _DEFERRED, valid

    def _next_token_ids(self, next_token_ids):
        if next_token_ids is _DEFERRED:
            next_token_ids, _ = super().prepare_next_token_ids_padded(*self._deferred)
        self._deferred = None
        return next_token_ids

    def gather_kv(self, lt: str, kv_len: torch.Tensor, max_len: int, rows: torch.Tensor | None = None):
        """K/V [B, kvh, S, d] of the round (storage dtype) and its mask; see kv_reader.gather."""
        return self.kv.gather(lt, self._per_group_block_tables, kv_len, max_len, rows)

    def propose(self, num_speculative_tokens, target_token_ids, target_positions, target_hidden_states,
                next_token_ids, token_indices_to_sample, common_attn_metadata, sampling_metadata,
                mm_embed_inputs=None, num_rejected_tokens_gpu=None, slot_mappings=None):
        t0 = time.perf_counter()
        k = int(num_speculative_tokens)
        self.num_speculative_tokens = k
        self._last_draft_probs = None
        cad = common_attn_metadata
        B = cad.batch_size()
        st = self.stats
        st.steps += 1
        # the runner passes sample indices only for a step with speculative metadata, i.e. one that verified
        # drafts (compat.patch_plain_steps runs a step without drafts as plain decoding)
        verified_drafts = token_indices_to_sample is not None
        if token_indices_to_sample is None:
            token_indices_to_sample = cad.query_start_loc[1:] - 1
        idx = token_indices_to_sample[:B].long()
        if k == 0:
            self._deferred = None
            return torch.empty(B, 0, dtype=torch.int64, device=self.device)
        P = target_positions[idx].long()  # [B] last accepted position
        lengths, rows = [k] * B, None
        if self.policy is not None:
            req_ids = list(self.runner.input_batch.req_ids[:B])
            n_tok = int(cad.num_actual_tokens)
            lengths = self._decide(req_ids, P.tolist(), t0, n_tok, k, n_tok - B if verified_drafts else 0)
        self.counters.record(lengths)
        if self.policy is not None:
            self._last_start, self._last_draft = t0, 0.0
            if not any(lengths):  # nobody drafts: no draft round, the step is plain decoding
                self._deferred = None
                st.skipped_rounds += 1
                self._last_end = time.perf_counter()
                return self._ragged(None, lengths, B, k)
            if min(lengths) == 0:
                rows = torch.tensor([i for i, n in enumerate(lengths) if n > 0], device=self.device)
        # a compiled round is traced for K and, with adaptive lengths, for 1 (probes: a 16-row 1-token probe at
        # full K cost ~2.5 plain steps on a 2-core CPU): it drafts one of those and the lists are cut; an eager
        # round drafts the max
        kk = max(lengths) if self.policy is not None else k
        if self.stats.compiled and kk > 1:
            kk = k
        hidden = target_hidden_states[idx]  # [B, H_t], post-norm, at the last accepted position P
        first = self._next_token_ids(next_token_ids)[:B].long()
        if rows is not None:
            hidden, P, first = hidden[rows], P[rows], first[rows]
        kv_len = P + 1
        max_len = int(cad.max_seq_len)
        q_pos = P + self.options.query_offset
        probabilistic = self._enable_probabilistic_draft_probs and not sampling_metadata.all_greedy
        t_draft = time.perf_counter()
        with torch.inference_mode():
            kv, mask = {}, {}
            for lt in self._store_name:
                if self.paged:
                    kv[lt], mask[lt] = self.kv.paged(lt, self._per_group_block_tables, kv_len, max_len, rows), None
                else:
                    kv[lt], mask[lt] = self.gather_kv(lt, kv_len, max_len, rows)
            scales = self.kv.scales(self.device)
            if probabilistic and rows is None and kk == k:
                kv = dequantize(kv, scales, self.drafter.pre_projection.weight.dtype)
                drafts = self._draft_probabilistic(first, hidden, q_pos, kv, mask, k, sampling_metadata)
            else:
                drafts = self._draft_fn(self.drafter, self.target_embed, first, hidden, q_pos, kv, mask, kk,
                                        scales)
        n_rows = drafts.shape[0]
        st.rounds += 1
        st.drafted_tokens += sum(lengths)
        if st.keep_recent:
            req_ids = list(self.runner.input_batch.req_ids[:B]) if self.runner is not None else [None] * B
            sel = range(B) if rows is None else rows.tolist()
            st.recent.append(([req_ids[i] for i in sel], q_pos.tolist(), first.tolist(), drafts.tolist(),
                              [lengths[i] for i in sel]))
            del st.recent[:-st.keep_recent]
        now = time.perf_counter()
        if self.policy is not None:
            self._last_draft = now - t_draft
            self.policy.costs.observe_draft(n_rows, kk, self._last_draft)
            if self.trace is not None:
                self.trace.draft(n_rows, kk, self._last_draft)
        st.propose_seconds += now - t0
        self._last_end = now
        if rows is None and all(n == k for n in lengths):
            return drafts
        return self._ragged(drafts, lengths, B, k, rows)

    def held_zero_drafts(self, runner, num_tokens: int) -> list | None:
        """This step's drafts, all empty, when the policy holds every request at 0 and nothing it reads has
        changed since it chose so (the same requests and caps, no acceptance to learn: nobody drafted last
        step); None otherwise, and the full propose path runs. compat.patch_held_zero_steps calls it in place
        of vLLM's propose_draft_token_ids, whose input preparation and this proposer's (the positions, the
        host copy) were ~0.1 ms of a plain 3-4 ms step at batch 1 on CPU. The step is counted and timed as
        any other."""
        pol = self.policy
        if pol is None or self._pending or self.tp_size > 1:
            return None
        keys = self._keys
        ids = runner.input_batch.req_ids
        if len(ids) != len(keys) or tuple(ids) != keys or not pol.holds_zero(keys, self._cap_list):
            return None
        t0 = time.perf_counter()
        st = self.stats
        st.steps += 1
        self._last_draft_probs = None
        self._deferred = None
        req_ids = list(keys)
        self._observe_step(req_ids, t0, num_tokens, 0)
        dec = pol.take_held(len(req_ids))  # the cost gauges stay as the last decision left them
        st.decisions[dec.reason] = st.decisions.get(dec.reason, 0) + 1
        st.held_fast += 1
        self.counters.record(dec.lengths)
        st.skipped_rounds += 1
        self._last_start, self._last_draft = t0, 0.0
        self._last_end = time.perf_counter()
        return [[] for _ in req_ids]

    def _observe_step(self, req_ids, t0, num_tokens, drafts) -> None:
        """The previous step's time as a verify-cost sample (decode steps only)."""
        pol = self.policy
        if self._last_end is not None:
            # everything of the step but the draft round: scheduling, verify forward, sampling, and this
            # proposer's own bookkeeping (the policy included) - previous propose start -> this one, less the
            # previous draft round
            dt = t0 - self._last_start - self._last_draft
            # decode steps only: a step that carries prompt tokens (a new request's prefill, a chunk of one)
            # costs several times a decode token per token, and fitted as decode tokens it made a plain step
            # look ~5 ms dearer than it is (trained pair, batch 16 after batch 4: v0 13 ms against 7.4 ms
            # measured), so the chooser drafted full K for a whole run where no K pays
            verified = 0
            if drafts:
                here = set(req_ids)
                verified = sum(n for r, (_, n) in self._pending.items() if r in here)
            ok = dt < 2.0 and num_tokens <= len(req_ids) + verified
            if ok and pol.costs.ready():
                # an idle gap between calls is no step cost
                ok = dt < 10 * pol.costs.predict_verify(num_tokens, drafts, lagged=True) + 0.05
            if ok:
                pol.costs.observe_verify(num_tokens, dt, drafts)
            if self.trace is not None:
                self.trace.verify(num_tokens, drafts, dt, ok)

    def _decide(self, req_ids, P_host, t0, num_tokens, k, drafts) -> list[int]:
        """Learn from what the previous step showed, then choose this step's draft lengths."""
        pol = self.policy
        self._observe_step(req_ids, t0, num_tokens, drafts)
        keys = tuple(req_ids)
        if keys != self._keys:
            self._batch_changed(keys, k)
        if self._pending:  # what the previous step's drafts showed (only requests that drafted are pending)
            row = self._row
            for r, (p0, n) in self._pending.items():
                i = row.get(r)
                if i is not None and P_host[i] > p0:
                    pol.observe(r, n, P_host[i] - p0 - 1)
        caps = self._cap_list
        self.stats.source = pol  # tests and bisecting swap the policy
        probes_before, deferred_before, closed_before = pol.probes, pol.probes_deferred, pol.closed_decisions
        remeasures_before = pol.remeasures
        dec = pol.decide(req_ids, caps, round_len=k if self.stats.compiled else None,
                         remaining=self._remaining_if_closed(req_ids, P_host))
        if self.tp_size > 1:
            # every rank must run the same draft round (its all-reduces are collectives), but each rank times
            # its own steps: rank 0's choice is everyone's
            dec.lengths = compat.tp_broadcast_ints(dec.lengths, len(req_ids), self.device)
        self.stats.decisions[dec.reason] = self.stats.decisions.get(dec.reason, 0) + 1
        self._pending = ({r: (p, n) for r, p, n in zip(req_ids, P_host, dec.lengths) if n}
                         if any(dec.lengths) else {})
        self.counters.probes += pol.probes - probes_before
        self.counters.probes_deferred += pol.probes_deferred - deferred_before
        self.counters.closed_decisions += pol.closed_decisions - closed_before
        self.counters.remeasures += pol.remeasures - remeasures_before
        self._report_costs(dec.lengths, k)
        if self.trace is not None:
            ready = pol.costs.ready()
            self.trace.decide(pol.steps, dec.lengths, dec.reason, pol.closed_decisions > closed_before,
                              self.stats.held_fast - self._traced_held,
                              pol.costs.verify_terms() if ready else None, pol.costs.draft_coef() if ready else None,
                              pol.costs.predict_step(dec.lengths, k if self.stats.compiled else None)
                              if ready else None)
            self._traced_held = self.stats.held_fast
        return dec.lengths

    def _remaining_if_closed(self, req_ids, P_host) -> list[int] | None:
        """Each request's tokens still to come (at most) when the batch is closed, else None (policy.decide).
        Closed: nobody waits for a place (the scheduler says so) and no request joined in the last half of
        the batch's mean age. A batch that started together (an offline batch, a benchmark) is closed from its
        first step; under a steady stream of requests - clients that send the next when one ends, as in an
        online benchmark at concurrency >= 3 - someone joined recently, and every token counts."""
        if self.waiting != 0 or len(req_ids) < 2:
            return None
        now = self.stats.steps
        joined = self._joined
        age = sum(now - joined.get(r, now) for r in req_ids) / len(req_ids)
        if now - self._last_arrival < 0.5 * age:
            return None
        lim = self._limit
        return [max(lim.get(r, p + 2) - p - 2, 0) for r, p in zip(req_ids, P_host)]

    def _report_costs(self, lengths, k) -> None:
        pol = self.policy
        if pol.costs.ready():
            est = pol.costs.predict_step(lengths, k if self.stats.compiled else None)
            self.counters.costs = {"verify": list(pol.costs.verify_terms()), "draft": list(pol.costs.draft_coef()),
                                   "step_estimate": est, "gain_spread": pol.acceptance.gain_spread()}

    def _batch_changed(self, keys: tuple, k: int) -> None:
        """New requests get their caps; requests no longer running are forgotten."""
        seen = set(keys)
        gone = [r for r in self._keys if r not in seen]
        self.policy.forget(gone)
        for r in gone:
            self._pending.pop(r, None)
            self._caps.pop(r, None)
            self._joined.pop(r, None)
            self._limit.pop(r, None)
        mml = int(self.vllm_config.model_config.max_model_len)
        for r in keys:
            if r not in self._joined:
                self._joined[r] = self._last_arrival = self.stats.steps
                self._limit[r] = compat.request_token_limit(self.runner, r, mml)
            if r not in self._caps:
                # seeded requests need no rule here: the sampler draws their tokens by sequence position
                # (sampler.py), so they reproduce under any draft lengths the policy gives them
                self._caps[r] = controls.draft_cap(compat.request_extra_args(self.runner, r), k)
        self._keys = keys
        self._cap_list = [self._caps[r] for r in keys]
        self._row = {r: i for i, r in enumerate(keys)}

    def _ragged(self, drafts, lengths, B, k, rows=None):
        """Per-request drafts: lists (synchronous scheduling: the scheduler verifies exactly these), or a
        [B, k] tensor with -1 past each request's length (async scheduling needs a dense tensor; -1 drafts
        are rejected by the sampler)."""
        if compat.uses_async_scheduling(self.runner):
            out = torch.full((B, k), -1, dtype=torch.int64, device=self.device)
            if drafts is not None:
                sel = torch.arange(B, device=self.device) if rows is None else rows
                keep = torch.arange(drafts.shape[1], device=self.device)[None, :] < torch.tensor(
                    lengths, device=self.device)[sel][:, None]
                out[sel, :drafts.shape[1]] = torch.where(keep, drafts, -1)[:, :k]
            return out
        out = [[] for _ in range(B)]
        if drafts is not None:
            host = drafts.tolist()
            for j, i in enumerate(range(B) if rows is None else rows.tolist()):
                out[i] = host[j][:lengths[i]]
        return out

    def _draft_probabilistic(self, tok, h, q_pos, kv, mask, k, sampling_metadata):
        d = self.drafter
        rope = d.rope_tables(q_pos[:, None], d.pre_projection.weight.dtype)
        toks, probs = [], []
        for _ in range(k):
            y = d.body(d.input_projection(tok, h, self.target_embed)[:, None], rope, kv, mask)[:, 0]
            tok, p = self._sample_from_logits(d.logits(y).float(), sampling_metadata)
            toks.append(tok)
            probs.append(p)
            h = d.post_projection(y)
        if all(p is not None for p in probs):
            self._last_draft_probs = torch.stack(probs, 1).contiguous()  # [B, K, V]
        return torch.stack(toks, 1)
