"""The plugin's Gemma 4 MTP proposer (V1 model runner).

It subclasses vLLM's `Gemma4Proposer` only to pass the runner's isinstance gates and to receive the
per-KV-group block tables; the drafting itself is ours:

- no draft `Attention` modules are created, so the drafter registers no KV cache of its own; it reads the
  target's paged K/V directly (the last KV-owning sliding / full target layer, each through the block
  table of its own KV-cache group);
- a round needs the target hidden state of only the last accepted token per request (vLLM's built-in path
  re-runs the drafter over every scheduled token first); K/V, mask and query position are gathered once
  and reused for all draft steps, since the drafter writes no KV and its position is constant;
- no CUDA graphs are captured, so the E2B/E4B centroid head works on a CPU-only vLLM.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from vllm_gemma_mtp import __version__, compat
from vllm_gemma_mtp.drafter import FULL, SLIDING, draft_greedy, load_drafter, target_store_layers
from vllm_gemma_mtp.plugin import current_options

logger = logging.getLogger("vllm.gemma_mtp")

_Base = compat.builtin_proposer_class()


@dataclass
class ProposerStats:
    rounds: int = 0
    drafted_tokens: int = 0
    propose_seconds: float = 0.0
    # (req_ids, q_pos, first_tokens, drafts) of the most recent rounds, for tests that replay them offline
    recent: list = field(default_factory=list)
    keep_recent: int = 0

    def as_dict(self) -> dict:
        return {"rounds": self.rounds, "drafted_tokens": self.drafted_tokens,
                "propose_seconds": self.propose_seconds, "recent": list(self.recent)}


class GemmaMTPProposer(_Base):
    plugin_name = "vllm-gemma-mtp"

    def __init__(self, vllm_config, device, runner=None):
        super().__init__(vllm_config, device, runner)
        self.runner = runner
        self.options = current_options()
        self.stats = ProposerStats()
        text = vllm_config.model_config.hf_config.get_text_config()
        self._store_index = target_store_layers(text)  # layer type -> target layer index
        self._store_name: dict[str, str] = {}
        self._store_gid: dict[str, int] = {}
        self._kv_views: dict[str, tuple] = {}
        self.draft_attn_groups = []  # nothing for the runner to bind: we own no KV
        self.sliding_window = int(text.sliding_window or 0)

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
        self.target_embed = compat.embed_weight(target_model)
        self.drafter = load_drafter(self.speculative_config.draft_model_config.model,
                                    self.vllm_config.model_config.hf_config,
                                    dtype=self.dtype, device=self.device)
        self.drafter.kernel_impl = "torch" if self.options.kernels == "torch" else (
            "triton" if self.options.kernels == "triton" else "auto")
        self.model = self.drafter  # the runner looks for `drafter.model` (LoRA/EPLB introspection)
        logger.info("vllm-gemma-mtp %s: drafter loaded (%s head, H=%d); reads target KV of %s; options: %s",
                    __version__, "centroid" if self.drafter.spec.centroids else "dense",
                    self.drafter.spec.hidden, self._store_name, self.options.describe())

    def initialize_attn_backend(self, kv_cache_config, kernel_block_sizes=None) -> None:
        for gid, group in enumerate(kv_cache_config.kv_cache_groups):
            for lt, name in self._store_name.items():
                if name in group.layer_names:
                    self._store_gid[lt] = gid
        missing = set(self._store_name) - set(self._store_gid)
        if missing:
            raise RuntimeError(f"vllm-gemma-mtp: no KV-cache group holds the target layers for {missing}")
        self.draft_attn_groups = []
        self.kv_cache_gid = self._store_gid.get(FULL, next(iter(self._store_gid.values())))
        self._kv_views = {}

    def initialize_cudagraph_keys(self, cudagraph_mode) -> None:
        pass  # the drafter runs eagerly

    def dummy_run(self, num_tokens, use_cudagraphs=True, is_graph_capturing=False, slot_mappings=None):
        pass  # nothing to capture or warm; no collectives (TP=1 drafter)

    # ---- drafting -------------------------------------------------------------------------------------
    def _kv(self, lt: str):
        # Views are rebuilt when the runner rebinds the cache tensor (e.g. after a KV re-init).
        layer = compat.forward_context_layer(self.vllm_config, self._store_name[lt])
        cache = layer.kv_cache
        cached = self._kv_views.get(lt)
        if cached is None or cached[0] is not cache:
            k, v = compat.split_kv_cache(cache, layer)
            cached = (cache, k, v)
            self._kv_views[lt] = cached
        return cached[1], cached[2]

    def gather_kv(self, lt: str, kv_len: torch.Tensor, max_len: int):
        """K/V [B, kvh, S, d] of keys (P-W, P] (sliding) or [0, P] (full) per request, and the mask
        [B, 1, 1, S] of real keys. kv_len [B] = P + 1."""
        k_cache, v_cache = self._kv(lt)
        bs = k_cache.shape[1]
        B = kv_len.shape[0]
        table = self._per_group_block_tables[self._store_gid[lt]][:B]
        if lt == SLIDING and self.sliding_window:
            S = min(self.sliding_window, max_len)
            pos = kv_len[:, None] - S + torch.arange(S, device=kv_len.device)
        else:
            S = max_len
            pos = torch.arange(S, device=kv_len.device).expand(B, S)
        valid = (pos >= 0) & (pos < kv_len[:, None])
        pos = torch.minimum(pos.clamp(min=0), (kv_len - 1)[:, None])
        blk = table.gather(1, torch.div(pos, bs, rounding_mode="floor")).long()
        off = pos % bs
        K = k_cache[blk, off].transpose(1, 2)  # [B, S, kvh, d] -> [B, kvh, S, d]
        V = v_cache[blk, off].transpose(1, 2)
        return (K, V), valid[:, None, None, :]

    def propose(self, num_speculative_tokens, target_token_ids, target_positions, target_hidden_states,
                next_token_ids, token_indices_to_sample, common_attn_metadata, sampling_metadata,
                mm_embed_inputs=None, num_rejected_tokens_gpu=None, slot_mappings=None):
        t0 = time.perf_counter()
        k = int(num_speculative_tokens)
        self.num_speculative_tokens = k
        self._last_draft_probs = None
        cad = common_attn_metadata
        B = cad.batch_size()
        if token_indices_to_sample is None:
            token_indices_to_sample = cad.query_start_loc[1:] - 1
        idx = token_indices_to_sample[:B].long()
        if k == 0:
            return torch.empty(B, 0, dtype=torch.int64, device=self.device)
        hidden = target_hidden_states[idx]  # [B, H_t], post-norm, at the last accepted position P
        P = target_positions[idx].long()  # [B]
        kv_len = P + 1
        max_len = int(cad.max_seq_len)
        kv, mask = {}, {}
        for lt in self._store_name:
            kv[lt], mask[lt] = self.gather_kv(lt, kv_len, max_len)
        q_pos = P + self.options.query_offset
        first = next_token_ids[:B].long()
        probabilistic = self._enable_probabilistic_draft_probs and not sampling_metadata.all_greedy
        with torch.inference_mode():
            if probabilistic:
                drafts = self._draft_probabilistic(first, hidden, q_pos, kv, mask, k, sampling_metadata)
            else:
                drafts = draft_greedy(self.drafter, self.target_embed, first, hidden, q_pos, kv, mask, k)
        st = self.stats
        st.rounds += 1
        st.drafted_tokens += B * k
        if st.keep_recent:
            req_ids = list(self.runner.input_batch.req_ids[:B]) if self.runner is not None else [None] * B
            st.recent.append((req_ids, q_pos.tolist(), first.tolist(), drafts.tolist()))
            del st.recent[:-st.keep_recent]
        st.propose_seconds += time.perf_counter() - t0
        return drafts

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
