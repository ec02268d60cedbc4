"""The Gemma 4 MTP drafter ("-assistant" checkpoints) as a plain torch module.

One draft step (see ../shared/research/gemma4-mtp-arch.md §2.3):
    z = pre_projection([target_embed(tok) * sqrt(H_t) ; h])          # [N, 2H_t] -> [N, H_d]
    4 x (Q-only attention over the target's K/V, sandwich-norm MLP, layer_scalar)
    y = norm(z);  logits = head(y);  h_next = post_projection(y)     # h_next feeds step k+1

The module owns no K/V: callers hand it the target's K/V for each layer type. Queries are batched as
[B, Q, H] so the same code serves inference (Q = 1 per request, K/V gathered from vLLM's paged cache)
and training (Q = every position of a sequence, with a causal/sliding mask).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from vllm_gemma_mtp.kernels import input_proj as _input_proj

SLIDING, FULL = "sliding_attention", "full_attention"


class DrafterConfigError(ValueError):
    """The assistant checkpoint does not fit the target (or is not a Gemma 4 assistant)."""


@dataclass(frozen=True)
class LayerGeometry:
    head_dim: int
    num_kv_heads: int


@dataclass(frozen=True)
class RopeSpec:
    theta: float
    partial: float
    proportional: bool

    def inv_freq(self, head_dim: int) -> torch.Tensor:
        # Gemma 4 "proportional" RoPE rotates only the first partial*head_dim/2 frequency pairs
        if self.proportional:
            n_rot = int(self.partial * head_dim // 2)
            inv = 1.0 / self.theta ** (torch.arange(0, 2 * n_rot, 2, dtype=torch.float64) / head_dim)
            return torch.cat([inv, torch.zeros(head_dim // 2 - n_rot, dtype=torch.float64)]).float()
        return (1.0 / self.theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)).float()


@dataclass(frozen=True)
class DrafterSpec:
    hidden: int
    backbone: int
    vocab: int
    intermediate: int
    num_heads: int
    layer_types: tuple[str, ...]
    geometry: tuple[LayerGeometry, ...]
    rope: dict
    sliding_window: int
    eps: float
    centroids: bool
    num_centroids: int
    centroid_top_k: int


def _text(cfg):
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def layer_geometry(text_cfg, i: int) -> LayerGeometry:
    """Per-layer head_dim / kv heads: transformers >= 5.1x keeps them in per_layer_config."""
    plc = getattr(text_cfg, "per_layer_config", None)
    if plc is not None:
        try:
            lc = plc[i]
            return LayerGeometry(int(lc.head_dim), int(lc.num_key_value_heads))
        except (KeyError, IndexError, TypeError, AttributeError):
            pass
    full = text_cfg.layer_types[i] == FULL
    d = text_cfg.__dict__
    hd = d.get("global_head_dim") if full and d.get("global_head_dim") else d.get("head_dim")
    kvh = d.get("num_key_value_heads")
    if full and d.get("attention_k_eq_v") and d.get("num_global_key_value_heads"):
        kvh = d.get("num_global_key_value_heads")
    return LayerGeometry(int(hd), int(kvh))


def _rope_spec(text_cfg, layer_type: str) -> RopeSpec:
    rp = getattr(text_cfg, "rope_parameters", None) or {}
    p = rp.get(layer_type, rp) if isinstance(rp, dict) else {}
    theta = p.get("rope_theta", 1e6 if layer_type == FULL else 1e4)
    return RopeSpec(float(theta), float(p.get("partial_rotary_factor", 1.0)), p.get("rope_type") == "proportional")


def target_store_layers(target_cfg) -> dict[str, int]:
    """Index of the target layer whose K/V each drafter layer type reads: the last layer of that type
    that owns its KV (KV-shared layers at the end of E2B/E4B reuse an earlier layer's cache)."""
    t = _text(target_cfg)
    types = list(t.layer_types)
    n_own = len(types) - int(getattr(t, "num_kv_shared_layers", 0) or 0)
    out = {}
    for lt in (SLIDING, FULL):
        idx = [i for i in range(n_own) if types[i] == lt]
        if idx:
            out[lt] = idx[-1]
    return out


def spec_from_configs(assistant_cfg, target_cfg) -> DrafterSpec:
    """Read the drafter geometry and check it against the target; raise DrafterConfigError naming the
    first mismatch."""
    mt = getattr(assistant_cfg, "model_type", None)
    if mt not in ("gemma4_assistant", "gemma4_unified_assistant", "gemma4_mtp"):
        raise DrafterConfigError(f"draft model_type is {mt!r}, expected a Gemma 4 assistant ('gemma4_assistant')")
    tmt = getattr(target_cfg, "model_type", None)
    if tmt not in ("gemma4", "gemma4_text", "gemma4_unified"):
        raise DrafterConfigError(
            f"target model_type is {tmt!r}: Gemma 4 MTP drafters need a Gemma 4 target (gemma4 / gemma4_text)")
    a, t = _text(assistant_cfg), _text(target_cfg)
    backbone = int(getattr(assistant_cfg, "backbone_hidden_size", 0) or 0)
    if backbone != int(t.hidden_size):
        raise DrafterConfigError(
            f"assistant backbone_hidden_size={backbone} does not match the target hidden_size={t.hidden_size}: "
            "this drafter was trained for a different Gemma 4 size")
    if int(a.vocab_size) != int(t.vocab_size):
        raise DrafterConfigError(f"assistant vocab_size={a.vocab_size} does not match the target vocab_size={t.vocab_size}")
    stores = target_store_layers(t)
    geos = []
    for i, lt in enumerate(a.layer_types):
        if lt not in stores:
            raise DrafterConfigError(f"drafter layer {i} is {lt} but the target has no KV-owning {lt} layer")
        g, tg = layer_geometry(a, i), layer_geometry(t, stores[lt])
        if g != tg:
            raise DrafterConfigError(
                f"drafter layer {i} ({lt}) K/V geometry {g} differs from target layer {stores[lt]} {tg}")
        if int(a.num_attention_heads) % g.num_kv_heads:
            raise DrafterConfigError(f"drafter heads {a.num_attention_heads} not a multiple of kv heads {g.num_kv_heads}")
        geos.append(g)
    if int(a.sliding_window or 0) != int(t.sliding_window or 0):
        raise DrafterConfigError(f"drafter sliding_window={a.sliding_window} != target sliding_window={t.sliding_window}")
    centroids = bool(getattr(assistant_cfg, "use_ordered_embeddings", False))
    nc = int(getattr(assistant_cfg, "num_centroids", 2048))
    if centroids and int(a.vocab_size) % nc:
        raise DrafterConfigError(f"vocab_size={a.vocab_size} is not divisible by num_centroids={nc}")
    return DrafterSpec(
        hidden=int(a.hidden_size), backbone=backbone, vocab=int(a.vocab_size),
        intermediate=int(a.intermediate_size), num_heads=int(a.num_attention_heads),
        layer_types=tuple(a.layer_types), geometry=tuple(geos),
        rope={lt: _rope_spec(a, lt) for lt in set(a.layer_types)},
        sliding_window=int(a.sliding_window), eps=float(getattr(a, "rms_norm_eps", 1e-6)),
        centroids=centroids, num_centroids=nc,
        centroid_top_k=int(getattr(assistant_cfg, "centroid_intermediate_top_k", 32)),
    )


class _Layer(nn.Module):
    def __init__(self, s: DrafterSpec, i: int):
        super().__init__()
        g = s.geometry[i]
        self.layer_type = s.layer_types[i]
        self.head_dim, self.num_kv_heads = g.head_dim, g.num_kv_heads
        H, nh = s.hidden, s.num_heads
        self.num_heads = nh  # the query heads this rank computes (all of them unless sharded for TP)
        self.q_proj = nn.Linear(H, nh * g.head_dim, bias=False)
        self.o_proj = nn.Linear(nh * g.head_dim, H, bias=False)
        self.q_norm = nn.Parameter(torch.ones(g.head_dim))
        self.gate_up = nn.Linear(H, 2 * s.intermediate, bias=False)  # gate and up merged: one matmul
        self.down_proj = nn.Linear(s.intermediate, H, bias=False)
        self.norms = nn.Parameter(torch.ones(4, H))  # input, post_attn, pre_ffw, post_ffw
        self.layer_scalar = nn.Parameter(torch.ones(1))
        self.eps = s.eps


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    # Gemma 4: plain weight (not 1 + weight), computed in fp32
    return F.rms_norm(x.float(), (x.shape[-1],), w.float(), eps).to(x.dtype)


def rope_cos_sin(inv_freq: torch.Tensor, pos: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    f = pos.float()[..., None] * inv_freq.to(pos.device)  # [B, Q, d/2]
    emb = torch.cat([f, f], -1)[..., None, :]  # [B, Q, 1, d]: broadcast over heads
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], -1)  # NeoX rotate-half layout
    return x * cos + rot * sin


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Single-query-block attention with Gemma 4's scale of 1.0. Written out (not SDPA) so the compiled
    drafter traces it with a symbolic batch size; mask [B, 1, Q, S] bool, True = attend."""
    s = torch.matmul(q, k.transpose(-1, -2)).float()  # [B, kvh, gQ, S]
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(s, -1).to(v.dtype), v)


@dataclass
class TPShard:
    """What a tensor-parallel rank needs: its reduction and its shard of the target's embedding."""
    rank: int
    size: int
    all_reduce: object  # callable: sum of a tensor over the TP group (the same result on every rank)
    vocab_start: int  # first token id of this rank's embedding shard
    vocab_size_local: int  # real (unpadded) rows of the shard


def tp_head_ranges(num_heads: int, num_kv_heads: int, rank: int, size: int) -> tuple[int, int, int]:
    """(first query head, query heads, KV heads) of a TP rank, following vLLM's KV sharding: KV heads are
    split across ranks, or, with more ranks than KV heads, each rank holds one KV head (replicated), and the
    query heads of a KV head are split among its replicas."""
    g = num_heads // num_kv_heads
    if size <= num_kv_heads:
        if num_kv_heads % size:
            raise DrafterConfigError(f"{num_kv_heads} KV heads cannot be split over tensor_parallel_size={size}")
        n_kv = num_kv_heads // size
        return rank * n_kv * g, n_kv * g, n_kv
    if size % num_kv_heads:
        raise DrafterConfigError(f"tensor_parallel_size={size} is not a multiple of the {num_kv_heads} KV heads")
    replicas = size // num_kv_heads
    if g % replicas:
        raise DrafterConfigError(
            f"the drafter's {g} query heads per KV head cannot be split over {replicas} ranks sharing that "
            f"KV head (tensor_parallel_size={size})")
    kv = rank // replicas
    return kv * g + (rank % replicas) * (g // replicas), g // replicas, 1


class MTPDrafter(nn.Module):
    """Gemma 4 MTP drafter. Weight names differ from the checkpoint only where merged for speed."""

    def __init__(self, spec: DrafterSpec):
        super().__init__()
        self.spec = spec
        s = spec
        self.pre_projection = nn.Linear(2 * s.backbone, s.hidden, bias=False)
        self.post_projection = nn.Linear(s.hidden, s.backbone, bias=False)
        self.layers = nn.ModuleList(_Layer(s, i) for i in range(len(s.layer_types)))
        self.norm = nn.Parameter(torch.ones(s.hidden))
        self.lm_head = nn.Parameter(torch.zeros(s.vocab, s.hidden))  # tied draft-width embedding
        if s.centroids:
            self.centroids = nn.Parameter(torch.zeros(s.num_centroids, s.hidden))
            self.register_buffer("token_ordering", torch.arange(s.vocab), persistent=False)
        self.inv_freq = {lt: r.inv_freq(self._head_dim(lt)) for lt, r in s.rope.items()}
        self.embed_scale = math.sqrt(s.backbone)
        self.kernel_impl = "auto"
        self.tp: TPShard | None = None  # set by shard_for_tp under tensor parallelism

    def _head_dim(self, lt: str) -> int:
        return self.spec.geometry[self.spec.layer_types.index(lt)].head_dim

    # ---- loading -------------------------------------------------------------------------------
    def load_checkpoint_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy checkpoint tensors in (names as saved by transformers); every tensor must be present
        with the expected shape and nothing unknown may remain."""
        t = dict(tensors)

        def take(name, shape):
            if name not in t:
                raise DrafterConfigError(f"assistant checkpoint is missing tensor {name!r}")
            v = t.pop(name)
            if tuple(v.shape) != tuple(shape):
                raise DrafterConfigError(f"assistant tensor {name!r} has shape {tuple(v.shape)}, expected {tuple(shape)}")
            return v

        s = self.spec
        with torch.no_grad():
            self.pre_projection.weight.copy_(take("pre_projection.weight", self.pre_projection.weight.shape))
            self.post_projection.weight.copy_(take("post_projection.weight", self.post_projection.weight.shape))
            self.lm_head.copy_(take("model.embed_tokens.weight", self.lm_head.shape))
            t.pop("lm_head.weight", None)  # tied; some writers store it anyway
            self.norm.copy_(take("model.norm.weight", self.norm.shape))
            for i, L in enumerate(self.layers):
                p = f"model.layers.{i}."
                L.q_proj.weight.copy_(take(p + "self_attn.q_proj.weight", L.q_proj.weight.shape))
                L.o_proj.weight.copy_(take(p + "self_attn.o_proj.weight", L.o_proj.weight.shape))
                L.q_norm.copy_(take(p + "self_attn.q_norm.weight", L.q_norm.shape))
                gate = take(p + "mlp.gate_proj.weight", (s.intermediate, s.hidden))
                up = take(p + "mlp.up_proj.weight", (s.intermediate, s.hidden))
                L.gate_up.weight.copy_(torch.cat([gate, up], 0))
                L.down_proj.weight.copy_(take(p + "mlp.down_proj.weight", L.down_proj.weight.shape))
                for j, n in enumerate(("input_layernorm", "post_attention_layernorm",
                                       "pre_feedforward_layernorm", "post_feedforward_layernorm")):
                    L.norms[j].copy_(take(p + n + ".weight", (s.hidden,)))
                L.layer_scalar.copy_(take(p + "layer_scalar", (1,)))
            if s.centroids:
                self.centroids.copy_(take("masked_embedding.centroids.weight", self.centroids.shape))
                order = take("masked_embedding.token_ordering", (s.vocab,)).long()
                if not order.is_meta and not torch.equal(torch.sort(order).values, torch.arange(s.vocab)):
                    raise DrafterConfigError("masked_embedding.token_ordering is not a permutation of the vocabulary")
                self.token_ordering.copy_(order)
        if t:
            raise DrafterConfigError(f"assistant checkpoint has unexpected tensors: {sorted(t)[:5]}")

    def shard_for_tp(self, tp: TPShard) -> None:
        """Keep this rank's query heads (those of its KV heads) in each layer: q_proj rows and o_proj columns;
        the rest (projections, MLP, norms, head) stays whole on every rank, so the drafted tokens are the
        same on every rank. One all-reduce per layer (after o_proj) and one per step (the embedding)."""
        self.tp = tp if tp.size > 1 else None
        if tp.size == 1:
            return
        with torch.no_grad():
            for L in self.layers:
                q0, nq, nkv = tp_head_ranges(self.spec.num_heads, L.num_kv_heads, tp.rank, tp.size)
                d = L.head_dim
                rows = slice(q0 * d, (q0 + nq) * d)
                q_w, o_w = L.q_proj.weight[rows].clone(), L.o_proj.weight[:, rows].clone()
                L.q_proj = nn.Linear(q_w.shape[1], q_w.shape[0], bias=False, device=q_w.device, dtype=q_w.dtype)
                L.o_proj = nn.Linear(o_w.shape[1], o_w.shape[0], bias=False, device=o_w.device, dtype=o_w.dtype)
                L.q_proj.weight.copy_(q_w)
                L.o_proj.weight.copy_(o_w)
                L.q_proj.requires_grad_(False)
                L.o_proj.requires_grad_(False)
                L.num_heads, L.num_kv_heads = nq, nkv

    # ---- one step --------------------------------------------------------------------------------
    def input_projection(self, token_ids: torch.Tensor, hidden: torch.Tensor, target_embed: torch.Tensor) -> torch.Tensor:
        # token_ids [N], hidden [N, H_t], target_embed [V, H_t] (under TP: this rank's vocab shard) -> [N, H_d]
        if self.tp is not None:
            # vocab-parallel lookup: each rank has the rows of its shard, zeros elsewhere; the sum over ranks
            # is the full row. The kernel then "looks up" row i for token i.
            local = token_ids.long() - self.tp.vocab_start
            ok = (local >= 0) & (local < self.tp.vocab_size_local)
            rows = target_embed[local.clamp(0, self.tp.vocab_size_local - 1)] * ok[:, None].to(target_embed.dtype)
            target_embed = self.tp.all_reduce(rows)
            token_ids = torch.arange(token_ids.shape[0], device=token_ids.device)
        return _input_proj.drafter_input_proj(
            token_ids, target_embed, self.embed_scale, hidden.to(target_embed.dtype),
            self.pre_projection.weight, impl=self.kernel_impl)

    def rope_tables(self, q_pos: torch.Tensor, dtype) -> dict:
        # q_pos [B, Q] -> per layer type (cos, sin) [B, Q, 1, d]; constant within a draft round
        return {lt: rope_cos_sin(inv, q_pos, dtype) for lt, inv in self.inv_freq.items()}

    def body(self, z: torch.Tensor, rope: dict, kv: dict, mask: dict) -> torch.Tensor:
        """z [B, Q, H_d]; kv[type] = (K, V) each [B, kvh, S, d] with mask[type] bool [B, 1, Q, S] (True = attend),
        or a kv_reader.PagedKV (Q = 1: the keys stay in the target's cache; its mask entry is unused).
        Returns the post-norm drafter state y [B, Q, H_d]."""
        B, Q, _ = z.shape
        for L in self.layers:
            nh, d, kvh = L.num_heads, L.head_dim, L.num_kv_heads
            g = nh // kvh
            a = rms_norm(z, L.norms[0], L.eps)
            q = rms_norm(L.q_proj(a).view(B, Q, nh, d), L.q_norm, L.eps)
            cos, sin = rope[L.layer_type]
            q = apply_rope(q, cos, sin)
            # query head h uses kv head h // g: fold the g query heads of a kv head into the query axis
            q = q.view(B, Q, kvh, g, d).permute(0, 2, 3, 1, 4).reshape(B, kvh, g * Q, d)
            entry = kv[L.layer_type]
            if hasattr(entry, "attend"):  # kv_reader.PagedKV: the target's cache read in place
                o = entry.attend(q, impl=self.kernel_impl)
            else:
                K, V = entry
                m = mask[L.layer_type]
                if Q > 1 and m is not None and g > 1:
                    m = m.unsqueeze(2).expand(B, 1, g, Q, m.shape[-1]).reshape(B, 1, g * Q, m.shape[-1])
                o = attend(q, K.to(q.dtype), V.to(q.dtype), m)
            o = o.view(B, kvh, g, Q, d).permute(0, 3, 1, 2, 4).reshape(B, Q, nh * d)
            o = L.o_proj(o)
            if self.tp is not None:  # this rank's heads' share of o_proj: sum over ranks, as the target does
                o = self.tp.all_reduce(o)
            z = z + rms_norm(o, L.norms[1], L.eps)
            gate, up = L.gate_up(rms_norm(z, L.norms[2], L.eps)).chunk(2, -1)
            m_out = L.down_proj(F.gelu(gate, approximate="tanh") * up)
            z = (z + rms_norm(m_out, L.norms[3], L.eps)) * L.layer_scalar
        return rms_norm(z, self.norm, self.spec.eps)

    # ---- heads -----------------------------------------------------------------------------------
    def argmax_tokens(self, y: torch.Tensor) -> torch.Tensor:
        # y [N, H_d] -> [N] int64 (greedy drafting)
        if self.spec.centroids:
            from vllm_gemma_mtp.kernels import centroid_head as _centroid

            return _centroid.centroid_argmax(y, self.centroids, self.token_ordering, self.lm_head,
                                             self.spec.centroid_top_k, impl=self.kernel_impl)
        return F.linear(y, self.lm_head).argmax(-1)

    def logits(self, y: torch.Tensor) -> torch.Tensor:
        # y [N, H_d] -> [N, V]; the centroid head leaves non-candidates at -inf (no probability mass)
        if not self.spec.centroids:
            return F.linear(y, self.lm_head)  # no final-logit softcap in the drafter
        s = self.spec
        top = F.linear(y, self.centroids).topk(s.centroid_top_k, -1).indices  # [N, k]
        ids = self.token_ordering.view(s.num_centroids, -1)[top].flatten(1)  # [N, k*V/C]
        cand = torch.einsum("nd,nsd->ns", y, self.lm_head[ids])
        out = torch.full((y.shape[0], s.vocab), float("-inf"), dtype=y.dtype, device=y.device)
        return out.scatter_(1, ids, cand)


def draft_greedy(drafter: MTPDrafter, target_embed: torch.Tensor, first_tokens: torch.Tensor,
                 hidden: torch.Tensor, q_pos: torch.Tensor, kv: dict, mask: dict, k: int,
                 kv_scales: dict | None = None) -> torch.Tensor:
    """The whole draft round, greedy: first_tokens [B] (bonus/recovered), hidden [B, H_t] (target post-norm
    hidden at the last accepted position), q_pos [B]. Same K/V, mask and query position for all k steps;
    K/V in the cache's storage dtype, with kv_scales[type] = (k_scale, v_scale) for a quantized cache.
    Returns [B, k] int64."""
    from vllm_gemma_mtp.kv_reader import dequantize

    dt = drafter.pre_projection.weight.dtype
    kv = dequantize(kv, kv_scales, dt)  # once per round, not per step
    rope = drafter.rope_tables(q_pos[:, None], dt)
    tok, h, out = first_tokens, hidden, []
    for _ in range(k):
        z = drafter.input_projection(tok, h, target_embed)  # [B, H_d]
        y = drafter.body(z[:, None], rope, kv, mask)[:, 0]
        tok = drafter.argmax_tokens(y)
        out.append(tok)
        h = drafter.post_projection(y)  # the drafter feeds back its own projected state
    return torch.stack(out, 1)


def resolve_checkpoint_dir(model: str) -> Path:
    p = Path(model)
    if p.is_dir():
        return p
    if p.exists():
        raise DrafterConfigError(f"assistant path {model!r} is a file, expected a checkpoint folder")
    try:  # a hub id that vLLM has already fetched into the local cache
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors"], local_files_only=True))
    except Exception as e:  # noqa: BLE001 - reported with the cause
        raise DrafterConfigError(f"assistant checkpoint {model!r} not found locally: {e}") from e


def read_checkpoint(folder: Path, device="cpu") -> dict[str, torch.Tensor]:
    """All tensors of the assistant's safetensors files; a missing or unreadable file is a clear error."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(f.name for f in folder.glob("*.safetensors"))
    if not files:
        raise DrafterConfigError(f"no *.safetensors weights in assistant folder {folder}")
    out = {}
    for f in files:
        path = folder / f
        if not path.exists():
            raise DrafterConfigError(f"assistant weight file {path} listed in the index is missing")
        try:
            out.update(load_file(os.fspath(path), device=str(device)))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise DrafterConfigError(f"assistant weight file {path} is corrupt or unreadable: {e}") from e
    return out


def load_assistant_config(folder: Path):
    from transformers import AutoConfig

    cfg_file = folder / "config.json"
    if not cfg_file.exists():
        raise DrafterConfigError(f"assistant folder {folder} has no config.json")
    try:
        return AutoConfig.from_pretrained(os.fspath(folder))
    except Exception as e:  # noqa: BLE001
        raise DrafterConfigError(f"assistant config {cfg_file} could not be read: {e}") from e


DUMMY_LOAD_FORMATS = ("dummy",)


def init_dummy_weights(drafter: MTPDrafter, seed: int = 0) -> None:
    """Random weights as vLLM's load_format="dummy" gives the target (uniform in [-1e-3, 1e-3]), and a
    random permutation for the centroid head's token ordering: real shapes, no checkpoint (speed tests)."""
    g = torch.Generator(device=drafter.norm.device).manual_seed(seed)
    with torch.no_grad():
        for p in drafter.parameters():
            p.uniform_(-1e-3, 1e-3, generator=g)
        if drafter.spec.centroids:
            drafter.token_ordering.copy_(torch.randperm(drafter.spec.vocab, generator=g, device=g.device))


def load_drafter(model: str, target_cfg, dtype=torch.float32, device="cpu", load_format: str = "auto") -> MTPDrafter:
    """The drafter of assistant folder `model`, checked against the target's config. load_format "dummy"
    (vLLM's, for the whole engine) reads only config.json and fills the weights at random on `device`."""
    folder = resolve_checkpoint_dir(model)
    spec = spec_from_configs(load_assistant_config(folder), target_cfg)
    if str(load_format) in DUMMY_LOAD_FORMATS:
        with torch.device(device):  # real-shape drafters (~470 M parameters) are built where they run
            drafter = MTPDrafter(spec)
        init_dummy_weights(drafter)
    else:
        drafter = MTPDrafter(spec)
        drafter.load_checkpoint_tensors(read_checkpoint(folder))
    drafter = drafter.to(device=device, dtype=dtype).eval().requires_grad_(False)
    # RoPE frequencies stay fp32 (not module buffers, so .to(dtype) leaves them alone); move them once so a
    # draft round on CUDA does not copy them host-to-device every time
    drafter.inv_freq = {lt: inv.to(device) for lt, inv in drafter.inv_freq.items()}
    return drafter


def check_pair(model: str, target_cfg, load_format: str = "auto") -> DrafterSpec:
    """Validate an assistant checkpoint against the target without reading its weights: configs, file
    presence, and every tensor's name and shape from the safetensors headers (configs only for a dummy load)."""
    from safetensors import SafetensorError, safe_open

    folder = resolve_checkpoint_dir(model)
    spec = spec_from_configs(load_assistant_config(folder), target_cfg)
    if str(load_format) in DUMMY_LOAD_FORMATS:
        return spec
    files = sorted(folder.glob("*.safetensors"))
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = [folder / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if not files:
        raise DrafterConfigError(f"no *.safetensors weights in assistant folder {folder}")
    metas = {}
    for f in files:
        if not f.exists():
            raise DrafterConfigError(f"assistant weight file {f} listed in the index is missing")
        try:
            with safe_open(os.fspath(f), "pt") as sf:
                for k in sf.keys():
                    sl = sf.get_slice(k)
                    metas[k] = torch.empty(sl.get_shape(), device="meta")
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise DrafterConfigError(f"assistant weight file {f} is corrupt or unreadable: {e}") from e
    with torch.device("meta"):
        probe = MTPDrafter(spec)
    probe.load_checkpoint_tensors(metas)
    return spec
