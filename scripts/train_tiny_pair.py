#!/usr/bin/env python
"""Train the tiny *trained* Gemma 4 target + MTP assistant pair used by the acceptance tests.

    python scripts/train_tiny_pair.py                       # -> tests/assets/trained_pair/
    python scripts/train_tiny_pair.py --out /tmp/pair --threads 2   # idle 2-core machine: faster

Offline, CPU only, seeded. Steps:

1. Corpus = the Python standard library's own source (``sysconfig.get_paths()["stdlib"]``, every ``*.py``
   outside the excluded folders, sorted), minus the HELD_OUT modules kept for evaluation. A byte-level BPE
   tokenizer (ids 0/1/2/3 = <pad>/<eos>/<bos>/<unk>) is trained on the training files.
2. Target = transformers' ``Gemma4ForCausalLM`` (3 sliding + 1 full layer, dense, softcap 30, tied
   embeddings), trained as a causal LM.
3. Assistant = ``Gemma4AssistantForCausalLM`` geometry, trained as our plain-torch ``MTPDrafter`` by
   distillation from the frozen target, then written back under transformers' tensor names and saved with
   ``save_pretrained``. Training data = the target's own greedy continuations (192 tokens) of 64-token
   corpus prompts, i.e. exactly the token stream the plugin drafts on under greedy decoding. One target
   pass per batch gives h_p (post-final-norm hidden), the K/V of its last sliding / full layer
   (``shared_kv_states``) and its next-token distributions; a draft round is then run from *every*
   position p in parallel (``drafter_rounds``) with the plugin's semantics: step 1 embeds the token at
   p+1 with hidden h_p, steps 2..K embed the token at p+k (teacher forcing with the target's greedy
   continuation: a wrong draft ends the round anyway) with the drafter's own post_projection output as
   hidden; query RoPE position p+1 for all steps; keys = positions 0..p (full layer) and (p-W, p]
   (sliding layers). Loss (``drafter_loss``) = sum over steps of the soft cross-entropy to the target's
   distribution at p+k plus the cross-entropy to its argmax (the token greedy verification accepts).
4. Held-out evaluation of greedy K=4 drafting (mean acceptance length, per-position acceptance) on the
   saved weights, and consistency checks against transformers (shared K/V recomputed from the layer
   weights, a recurrent draft round of transformers' assistant vs ``MTPDrafter``, assisted generation)
   and ``load_drafter``.

Writes ``<out>/{target,assistant}/`` (config, generation config, bf16 safetensors, tokenizer),
``<out>/train_log.json``, ``<out>/loss.png`` and ``<out>/README.md``. Given the seed and the same
CPython stdlib / library versions the weights are bitwise reproducible on CPU (checked: identical across
runs and across --threads 1/2); train_log.json differs only in wall times and the thread count.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------------------------------- corpus
# Folders of the stdlib that are not "ordinary library code" (third-party packages, the test suite,
# generated tables, GUI/IDE code, vendored copies) or are huge data blobs.
EXCLUDE_DIRS = {
    "site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "tkinter", "turtledemo",
    "encodings", "pydoc_data", "ensurepip", "distutils", "__phello__", "__pycache__", "lib-dynload",
}
EXCLUDE_FILES = {"_sysconfigdata"}  # prefix; machine-specific
# Held-out modules: never seen by the tokenizer, the target or the drafter.
HELD_OUT = (
    "bisect.py", "colorsys.py", "fractions.py", "graphlib.py", "heapq.py", "shlex.py", "textwrap.py",
    "json/encoder.py",
)

VOCAB = 2048
SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>")
PAD, EOS, BOS = 0, 1, 2


def corpus_files(stdlib: Path) -> tuple[list[Path], list[Path]]:
    files = []
    for f in sorted(stdlib.rglob("*.py")):
        rel = f.relative_to(stdlib)
        if any(part in EXCLUDE_DIRS or part.startswith("config-") for part in rel.parts[:-1]):
            continue
        if any(rel.name.startswith(p) for p in EXCLUDE_FILES):
            continue
        files.append(rel)
    held = [Path(h) for h in HELD_OUT]
    missing = [str(h) for h in held if h not in files]
    if missing:
        raise SystemExit(f"held-out modules missing from this Python's stdlib: {missing}")
    train = [f for f in files if f not in held]
    return train, held


def read_text(p: Path) -> str:
    return p.read_text(encoding="utf-8", errors="replace")


# ---------------------------------------------------------------------------------------------- configs
def make_target_config(a):
    from transformers import Gemma4TextConfig

    cfg = Gemma4TextConfig(
        vocab_size=VOCAB,
        hidden_size=a.t_hidden,
        intermediate_size=a.t_inter,
        num_hidden_layers=4,
        layer_types=["sliding_attention"] * 3 + ["full_attention"],
        num_attention_heads=4,
        head_dim=32,  # sliding layers (vLLM CPU attention: 32, 64, 128, ...)
        global_head_dim=64,  # full layer
        num_key_value_heads=2,
        num_global_key_value_heads=None,
        attention_k_eq_v=False,
        num_kv_shared_layers=0,
        hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=0,
        enable_moe_block=False,
        use_double_wide_mlp=False,
        sliding_window=a.window,
        max_position_embeddings=4096,
        final_logit_softcapping=30.0,
        tie_word_embeddings=True,
        pad_token_id=PAD,
        eos_token_id=EOS,
        bos_token_id=BOS,
    )
    cfg.architectures = ["Gemma4ForCausalLM"]
    return cfg


def make_assistant_config(tcfg, a):
    from vllm_gemma_mtp.fixtures import assistant_config

    return assistant_config(tcfg, centroids=False, hidden_size=a.d_hidden, intermediate_size=a.d_inter,
                            num_attention_heads=4)


# ---------------------------------------------------------------------------------------------- helpers
class Timer:
    def __init__(self):
        self.t = {}

    def __call__(self, name):
        timer = self

        class _C:
            def __enter__(self):
                self.s = time.perf_counter()

            def __exit__(self, *exc):
                timer.t[name] = round(time.perf_counter() - self.s, 2)
                print(f"[{name}] {timer.t[name]:.1f}s", flush=True)

        return _C()


def lr_at(step: int, total: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    x = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * x)))


def make_optimizer(params, lr, wd):
    decay = [p for n, p in params if p.ndim >= 2 and "embed" not in n]
    other = [p for n, p in params if not (p.ndim >= 2 and "embed" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": wd}, {"params": other, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95), eps=1e-8)


def sample_windows(stream: torch.Tensor, n: int, length: int, g: torch.Generator) -> torch.Tensor:
    """n windows of `length` tokens: <bos> + (length-1) consecutive corpus tokens at random offsets."""
    offs = torch.randint(0, stream.numel() - length, (n,), generator=g)
    body = torch.stack([stream[o:o + length - 1] for o in offs.tolist()])
    return torch.cat([torch.full((n, 1), BOS, dtype=torch.long), body], 1)


@torch.no_grad()
def greedy_generate(model, prompts: torch.Tensor, n_new: int) -> torch.Tensor:
    """Plain greedy decoding with transformers' KV cache (eos ignored). prompts [B, P] -> [B, P + n_new]."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    out = model(input_ids=prompts, past_key_values=cache, use_cache=True, logits_to_keep=1)
    toks = [out.logits[:, -1].argmax(-1)]
    for _ in range(n_new - 1):
        out = model(input_ids=toks[-1][:, None], past_key_values=out.past_key_values, use_cache=True)
        toks.append(out.logits[:, -1].argmax(-1))
    return torch.cat([prompts, torch.stack(toks, 1)], 1)


@torch.no_grad()
def target_features(target, x: torch.Tensor):
    """One target pass: post-final-norm hidden [B,S,Ht], logits [B,S,V] (soft-capped) and the K/V of the
    last KV-owning sliding / full layer ({type: (K, V)}, [B, kvh, S, d]) - what the plugin reads."""
    out = target(input_ids=x, output_hidden_states=True, return_shared_kv_states=True, use_cache=False)
    return out.hidden_states[-1], out.logits, dict(out.shared_kv_states), out.hidden_states


def draft_masks(S: int, window: int, device=None) -> dict:
    """Keys visible to the drafter query of round start p (row p): full layer 0..p,
    sliding layers (p-W, p] (W keys ending at p). bool [1, 1, S, S], True = attend."""
    from vllm_gemma_mtp.drafter import FULL, SLIDING

    p = torch.arange(S, device=device)[:, None]
    j = torch.arange(S, device=device)[None, :]
    causal = j <= p
    return {FULL: causal[None, None], SLIDING: (causal & (j > p - window))[None, None]}


def drafter_rounds(drafter, target_embed, x, h, kv, masks, K: int, lo: int = 0):
    """Draft rounds starting at every position p in [lo, S-2] of x [B,S] in parallel (teacher-forced
    inputs): step k (1..K) embeds x[p+k] (the token the target emitted at p+k), the hidden is h_p for k=1
    and the drafter's own post_projection output afterwards, the query RoPE position is p+1 for all
    steps, keys per `masks` (rows p). Returns K logits tensors [B, S-1-lo, V]; row r (p = lo+r) of step k
    predicts token p+k+1 (rows with p+k > S-1 are padding)."""
    B, S = x.shape
    Q = S - 1 - lo
    q_pos = (torch.arange(lo, S - 1) + 1)[None].expand(B, Q)
    rope = drafter.rope_tables(q_pos, drafter.pre_projection.weight.dtype)
    m = {t: v[:, :, lo:S - 1].expand(B, 1, Q, S) for t, v in masks.items()}
    hcur = h[:, lo:S - 1]
    outs = []
    for k in range(1, K + 1):
        tok = torch.cat([x[:, lo + k:], torch.full((B, k - 1), PAD, dtype=x.dtype)], 1)  # x[p+k], padded
        z = drafter.input_projection(tok.reshape(-1), hcur.reshape(B * Q, -1), target_embed).view(B, Q, -1)
        y = drafter.body(z, rope, kv, m)
        outs.append(drafter.logits(y.reshape(B * Q, -1)).view(B, Q, -1))
        hcur = drafter.post_projection(y)
    return outs


def drafter_loss(logits_steps, t_logits, lo: int, hard_weight: float):
    """Sum over steps k of the cross-entropy to the target's next-token distribution at position p+k
    (soft: distillation) plus `hard_weight` x the cross-entropy to the target's argmax there (what greedy
    verification accepts). logits_steps from drafter_rounds(..., lo)."""
    B, S, V = t_logits.shape
    total, per_step = 0.0, []
    for k, lg in enumerate(logits_steps, 1):
        n = S - k - lo  # rows p = lo .. S-1-k have a label
        q = F.log_softmax(lg[:, :n].float(), -1)
        tl = t_logits[:, lo + k:].float()
        soft = -(F.softmax(tl, -1) * q).sum(-1).mean()
        hard = F.nll_loss(q.reshape(-1, V), tl.argmax(-1).reshape(-1))
        total = total + soft + hard_weight * hard
        per_step.append(hard.item())
    return total, per_step


def simulate_acceptance(drafts: torch.Tensor, seq: torch.Tensor, start: int, K: int):
    """Walk greedy speculative decoding over one sequence. drafts [S, K] = drafter output for a round that
    starts at position P (target hidden/KV up to P, bonus token seq[P+1]); seq = the target's greedy
    sequence. A round accepts the longest prefix with drafts[P, i] == seq[P+2+i] and emits n+1 tokens;
    the next round starts at P + n + 1. Returns (accepted drafts per round, per-position accept counts)."""
    S = seq.numel()
    P = start - 1  # last prompt position: its bonus token seq[start] is the first generated token
    acc_rounds, pos_acc = [], [0] * K
    while P + 1 + K < S:  # need all K verification tokens inside the sequence
        n = 0
        while n < K and int(drafts[P, n]) == int(seq[P + 2 + n]):
            pos_acc[n] += 1
            n += 1
        acc_rounds.append(n)
        P += n + 1
    return acc_rounds, pos_acc


# ---------------------------------------------------------------------------------------------- stages
def build_corpus(a, log, timer):
    from vllm_gemma_mtp.fixtures import build_tokenizer

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    train_files, held_files = corpus_files(stdlib)
    with timer("tokenizer"):
        texts = [read_text(stdlib / f) for f in train_files]
        tok = build_tokenizer(VOCAB, corpus=texts)
        assert [tok.convert_tokens_to_ids(s) for s in SPECIALS] == [0, 1, 2, 3]
        ids = tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
        stream = []
        for e in ids:
            stream.extend(e.ids)
            stream.append(EOS)
        stream = torch.tensor(stream, dtype=torch.long)
        held = {str(f): torch.tensor(tok.backend_tokenizer.encode(read_text(stdlib / f),
                                                                  add_special_tokens=False).ids)
                for f in held_files}
    h = hashlib.sha256()
    for f, t in zip(train_files, texts):
        h.update(str(f).encode())
        h.update(t.encode())
    log["corpus"] = {
        "stdlib": str(stdlib),
        "python": platform.python_version(),
        "rule": f"every *.py under stdlib, sorted, excluding folders {sorted(EXCLUDE_DIRS)} and "
                f"files starting with {sorted(EXCLUDE_FILES)}",
        "train_files": [str(f) for f in train_files],
        "held_out_files": [str(f) for f in held_files],
        "train_bytes": sum(len(t.encode()) for t in texts),
        "train_tokens": int(stream.numel()),
        "held_out_tokens": {k: int(v.numel()) for k, v in held.items()},
        "sha256": h.hexdigest(),
        "bytes_per_token": round(sum(len(t.encode()) for t in texts) / stream.numel(), 3),
    }
    print(f"corpus: {len(train_files)} train files, {stream.numel()} tokens "
          f"({log['corpus']['bytes_per_token']} bytes/token); held out {list(held)}", flush=True)
    return tok, stream, held


def train_target(a, stream, held, log, timer):
    from tqdm import tqdm
    from transformers import Gemma4ForCausalLM

    tcfg = make_target_config(a)
    torch.manual_seed(a.seed)
    target = Gemma4ForCausalLM(tcfg).float().train()
    n_params = sum(p.numel() for p in target.parameters())
    g = torch.Generator().manual_seed(a.seed + 1)
    opt = make_optimizer(list(target.named_parameters()), a.t_lr, 0.1)
    losses = []
    with timer("train_target"):
        bar = tqdm(range(a.t_steps), desc="target", dynamic_ncols=True, mininterval=2)
        for step in bar:
            for grp in opt.param_groups:
                grp["lr"] = lr_at(step, a.t_steps, a.t_lr, a.t_warmup)
            x = sample_windows(stream, a.t_batch, a.seq, g)
            loss = target(input_ids=x, labels=x, use_cache=False).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(target.parameters(), 1.0)
            opt.step()
            losses.append(round(loss.item(), 4))
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    target.eval().requires_grad_(False)
    # held-out LM loss (windows of the held-out modules)
    hl = []
    with torch.no_grad():
        for name, ids in held.items():
            for o in range(0, max(1, ids.numel() - a.seq + 1), a.seq - 1):
                x = torch.cat([torch.tensor([BOS]), ids[o:o + a.seq - 1]])[None]
                hl.append((float(target(input_ids=x, labels=x, use_cache=False).loss), x.numel() - 1))
    held_loss = sum(l * n for l, n in hl) / sum(n for _, n in hl)
    log["target"] = {
        "params": n_params,
        "loss_curve": losses,
        "final_train_loss_avg50": round(sum(losses[-50:]) / len(losses[-50:]), 4),
        "held_out_loss": round(held_loss, 4),
        "tokens_seen": a.t_steps * a.t_batch * a.seq,
    }
    print(f"target: {n_params/1e6:.2f}M params, train loss {log['target']['final_train_loss_avg50']}, "
          f"held-out loss {held_loss:.3f}", flush=True)
    return target, tcfg


def check_shared_kv(target, x):
    """shared_kv_states must be exactly the K/V the target's store layers attended with."""
    from transformers.models.gemma4.modeling_gemma4 import apply_rotary_pos_emb

    from vllm_gemma_mtp.drafter import target_store_layers

    _, _, kv, hs = target_features(target, x)
    store = target_store_layers(target.config)
    pos = torch.arange(x.shape[1])[None]
    worst = 0.0
    for lt, i in store.items():
        layer = target.model.layers[i]
        attn = layer.self_attn
        a = layer.input_layernorm(hs[i])  # hidden_states[i] = input of layer i (i < L-1)
        shp = (*a.shape[:-1], -1, attn.head_dim)
        cos, sin = target.model.rotary_emb(a, pos, lt)
        k = apply_rotary_pos_emb(attn.k_norm(attn.k_proj(a).view(shp)), cos, sin, unsqueeze_dim=2).transpose(1, 2)
        v = attn.v_norm(attn.v_proj(a).view(shp)).transpose(1, 2)
        worst = max(worst, float((k - kv[lt][0]).abs().max()), float((v - kv[lt][1]).abs().max()))
    return store, worst


def make_drafter_data(a, target, stream, log, timer):
    from tqdm import tqdm

    g = torch.Generator().manual_seed(a.seed + 2)
    n = a.d_seqs
    seqs = []
    with timer("generate_drafter_data"):
        for i in tqdm(range(0, n, a.gen_batch), desc="greedy data", dynamic_ncols=True, mininterval=2):
            prompts = sample_windows(stream, min(a.gen_batch, n - i), a.d_prompt, g)
            seqs.append(greedy_generate(target, prompts, a.seq - a.d_prompt))
    return torch.cat(seqs)


def train_drafter(a, target, tcfg, data, log, timer):
    from tqdm import tqdm
    from transformers import Gemma4AssistantForCausalLM

    from vllm_gemma_mtp.drafter import MTPDrafter, spec_from_configs

    acfg = make_assistant_config(tcfg, a)
    spec = spec_from_configs(acfg, tcfg)
    torch.manual_seed(a.seed + 3)
    hf_init = Gemma4AssistantForCausalLM(acfg)  # transformers' own init (normal(0, 0.02), norms = 1)
    drafter = MTPDrafter(spec)
    drafter.load_checkpoint_tensors(hf_init.state_dict())
    drafter.kernel_impl = "torch"
    del hf_init
    if spec.hidden == tcfg.hidden_size:  # same width: start the draft head from the target's embedding
        with torch.no_grad():
            drafter.lm_head.copy_(target.model.embed_tokens.weight)
    for L in drafter.layers:
        L.layer_scalar.requires_grad_(False)  # a buffer in transformers (stays 1), as in the target
    drafter.train()
    n_params = sum(p.numel() for p in drafter.parameters())
    params = [(n, p) for n, p in drafter.named_parameters() if p.requires_grad]
    opt = make_optimizer([(("embed" if n == "lm_head" else n), p) for n, p in params], a.d_lr, 0.01)
    E = target.model.embed_tokens.weight
    masks = draft_masks(a.seq, tcfg.sliding_window)
    g = torch.Generator().manual_seed(a.seed + 4)
    losses, step_ce = [], []
    lo = max(0, a.d_prompt - 1 - a.d_context)  # first round start that gets a loss
    with timer("train_drafter"):
        bar = tqdm(range(a.d_steps), desc="drafter", dynamic_ncols=True, mininterval=2)
        perm = torch.randperm(data.shape[0], generator=g)
        cur = 0
        for step in bar:
            for grp in opt.param_groups:
                grp["lr"] = lr_at(step, a.d_steps, a.d_lr, a.d_warmup)
            if cur + a.d_batch > perm.numel():
                perm, cur = torch.randperm(data.shape[0], generator=g), 0
            x = data[perm[cur:cur + a.d_batch]]
            cur += a.d_batch
            h, t_logits, kv, _ = target_features(target, x)
            outs = drafter_rounds(drafter, E, x, h, kv, masks, a.K, lo)
            loss, per = drafter_loss(outs, t_logits, lo, a.hard_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for _, p in params], 1.0)
            opt.step()
            losses.append(round(loss.item(), 4))
            step_ce.append([round(v, 4) for v in per])
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    drafter.eval().requires_grad_(False)
    log["drafter"] = {
        "params": n_params,
        "loss_curve": losses,
        "per_step_hard_ce_curve": step_ce,
        "final_loss_avg50": round(sum(losses[-50:]) / len(losses[-50:]), 4),
        "final_per_step_hard_ce_avg50": [round(sum(s[k] for s in step_ce[-50:]) / len(step_ce[-50:]), 4)
                                         for k in range(a.K)],
    }
    print(f"drafter: {n_params/1e6:.2f}M params, loss {log['drafter']['final_loss_avg50']}", flush=True)
    return drafter, acfg


def drafter_state_dict(drafter, hf_template) -> dict:
    """MTPDrafter parameters under transformers' Gemma4AssistantForCausalLM names."""
    sd = {}
    sd["pre_projection.weight"] = drafter.pre_projection.weight
    sd["post_projection.weight"] = drafter.post_projection.weight
    sd["model.embed_tokens.weight"] = drafter.lm_head
    sd["lm_head.weight"] = drafter.lm_head
    sd["model.norm.weight"] = drafter.norm
    I = drafter.spec.intermediate
    for i, L in enumerate(drafter.layers):
        p = f"model.layers.{i}."
        sd[p + "self_attn.q_proj.weight"] = L.q_proj.weight
        sd[p + "self_attn.o_proj.weight"] = L.o_proj.weight
        sd[p + "self_attn.q_norm.weight"] = L.q_norm
        sd[p + "mlp.gate_proj.weight"] = L.gate_up.weight[:I]
        sd[p + "mlp.up_proj.weight"] = L.gate_up.weight[I:]
        sd[p + "mlp.down_proj.weight"] = L.down_proj.weight
        for j, n in enumerate(("input_layernorm", "post_attention_layernorm",
                               "pre_feedforward_layernorm", "post_feedforward_layernorm")):
            sd[p + n + ".weight"] = L.norms[j]
        sd[p + "layer_scalar"] = L.layer_scalar
    want = set(hf_template.state_dict())
    if set(sd) != want:
        raise RuntimeError(f"name mismatch: extra {sorted(set(sd) - want)}, missing {sorted(want - set(sd))}")
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


@torch.no_grad()
def evaluate(a, target, drafter, tok, held, log_key, log, q_offset: int = 1, kv_transform=None):
    """Greedy K-step drafting on held-out prompts, simulating the plugin's rounds: for each prompt, the
    target's greedy continuation is generated, the target is run once over prompt+continuation, and a
    round starting at position P uses h_P, the K/V of positions <= P (sliding: (P-W, P]), bonus token
    seq[P+1] and q position P+q_offset (vllm_gemma_mtp.drafter.draft_greedy, batched over all P).
    q_offset=1 is the convention the drafter is trained with (transformers'); 0 is vLLM's built-in one.
    kv_transform(K or V) -> what the drafter reads instead (e.g. an fp8 round trip)."""
    from vllm_gemma_mtp.drafter import FULL, SLIDING, draft_greedy

    g = torch.Generator().manual_seed(a.seed + 5)
    prompts = []
    for name, ids in held.items():
        offs = torch.randint(0, ids.numel() - a.e_prompt, (a.e_per_file,), generator=g)
        prompts += [torch.cat([torch.tensor([BOS]), ids[o:o + a.e_prompt - 1]]) for o in offs.tolist()]
    prompts = torch.stack(prompts)
    seqs = greedy_generate(target, prompts, a.e_new)
    E = target.model.embed_tokens.weight
    W = target.config.sliding_window
    rounds, pos_acc = [], [0] * a.K
    for s in seqs:
        x = s[None]
        h, _, kv, _ = target_features(target, x)
        if kv_transform is not None:
            kv = {t: (kv_transform(k), kv_transform(v)) for t, (k, v) in kv.items()}
        S = x.shape[1]
        starts = torch.arange(a.e_prompt - 1, S - 1)  # every possible round start P
        n = starts.numel()
        j = torch.arange(S)[None]
        full = (j <= starts[:, None])
        swa = full & (j > starts[:, None] - W)
        kvb = {t: (k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for t, (k, v) in kv.items()}
        mask = {FULL: full[:, None, None], SLIDING: swa[:, None, None]}
        d = draft_greedy(drafter, E, s[starts + 1], h[0, starts], starts + q_offset, kvb, mask, a.K)  # [n, K]
        drafts = torch.zeros(S, a.K, dtype=torch.long)
        drafts[starts] = d
        r, pa = simulate_acceptance(drafts, s, a.e_prompt, a.K)
        rounds += r
        pos_acc = [u + v for u, v in zip(pos_acc, pa)]
    nr = len(rounds)
    res = {
        "prompts": int(prompts.shape[0]),
        "prompt_tokens": a.e_prompt,
        "new_tokens": a.e_new,
        "K": a.K,
        "q_position": f"P+{q_offset}" if q_offset else "P",
        "rounds": nr,
        "mean_acceptance_length": round(1 + sum(rounds) / nr, 4),
        "per_position_acceptance": [round(c / nr, 4) for c in pos_acc],
        "accept_hist": [rounds.count(i) for i in range(a.K + 1)],
        "sample": tok.decode(seqs[0, a.e_prompt:a.e_prompt + 48].tolist()),
    }
    log[log_key] = res
    print(f"[{log_key}] mean acceptance length {res['mean_acceptance_length']:.3f}, "
          f"per position {res['per_position_acceptance']}", flush=True)
    return res


def save_outputs(a, out: Path, tok, target, drafter, acfg, log):
    """Write target/ and assistant/ (normal transformers checkpoints, weights in a.dtype) into a fresh
    folder next to `out`, then swap it in."""
    from transformers import Gemma4AssistantForCausalLM

    from vllm_gemma_mtp.fixtures import save_pair

    dtype = getattr(torch, a.dtype)
    torch.manual_seed(0)
    assistant = Gemma4AssistantForCausalLM(acfg)
    missing, unexpected = assistant.load_state_dict(drafter_state_dict(drafter, assistant), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"assistant state dict: missing {missing}, unexpected {unexpected}")
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        save_pair(tmp, target.to(dtype), assistant.to(dtype).eval(), tok)
        target.float()
        for f in tmp.rglob("*"):
            f.chmod(0o755 if f.is_dir() else 0o644)
        for sub in ("target", "assistant"):
            if (out / sub).exists():
                shutil.rmtree(out / sub)
            (tmp / sub).rename(out / sub)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log["files"] = {str(f.relative_to(out)): f.stat().st_size
                    for sub in ("target", "assistant") for f in sorted((out / sub).iterdir())}


@torch.no_grad()
def verify_saved(a, out: Path, stream, log):
    """Reload with transformers and with our load_drafter; check the saved assistant against transformers'
    own Gemma4AssistantForCausalLM on a recurrent draft round, and run transformers assisted generation."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from vllm_gemma_mtp.drafter import FULL, SLIDING, draft_greedy, load_drafter

    tok = AutoTokenizer.from_pretrained(out / "target")
    target = AutoModelForCausalLM.from_pretrained(out / "target", dtype=torch.float32).eval()
    hf_asst = AutoModelForCausalLM.from_pretrained(out / "assistant", dtype=torch.float32).eval()
    tcfg = AutoConfig.from_pretrained(out / "target")
    drafter = load_drafter(str(out / "assistant"), tcfg)
    drafter.kernel_impl = "torch"
    checks = {"reloaded": [type(target).__name__, type(hf_asst).__name__, type(tok).__name__, len(tok)]}

    # (1) one recurrent round, transformers vs MTPDrafter, at a round start P < sliding_window (transformers
    # keeps the last W+1 sliding keys, the plugin W; both see all P+1 keys here). q position P+1 (HF's).
    x = sample_windows(stream, 1, 48, torch.Generator().manual_seed(a.seed + 6))
    P = x.shape[1] - 1
    assert P < tcfg.sliding_window
    o = target(input_ids=x, output_hidden_states=True, return_shared_kv_states=True, use_cache=False)
    kv = dict(o.shared_kv_states)
    bonus = o.logits[0, -1].argmax()[None]
    h = o.hidden_states[-1][0, -1][None]
    emb = target.get_input_embeddings()
    ours = draft_greedy(drafter, emb.weight, bonus, h, torch.tensor([P + 1]), kv,
                        {FULL: None, SLIDING: None}, a.K)[0].tolist()
    tk, hh, theirs, dl = bonus[None], h[None], [], 0.0
    rope = drafter.rope_tables(torch.tensor([[P + 1]]), torch.float32)
    t_in, h_in = bonus, h
    for _ in range(a.K):
        r = hf_asst(inputs_embeds=torch.cat([emb(tk), hh], -1), attention_mask=torch.ones(1, P + 2, dtype=torch.long),
                    position_ids=torch.tensor([[P + 1]]), shared_kv_states=kv, use_cache=False)
        y = drafter.body(drafter.input_projection(t_in, h_in, emb.weight)[:, None], rope, kv,
                         {FULL: None, SLIDING: None})[:, 0]
        dl = max(dl, float((drafter.logits(y)[0] - r.logits[0, 0]).abs().max()))
        tk = r.logits.argmax(-1)
        hh = r.last_hidden_state
        theirs.append(int(tk))
        t_in, h_in = tk[0], hh[0]
    checks["hf_vs_mtpdrafter_round"] = {"P": P, "hf": theirs, "ours": ours, "max_abs_logit_diff": dl}
    if theirs != ours or dl > 1e-3:
        raise RuntimeError(f"saved assistant: transformers and MTPDrafter disagree: {checks}")

    # (2) transformers assisted generation (5.18/5.19 need the shim from the arch note, 4.3b)
    if transformers.__version__.startswith(("5.18.", "5.19.")):
        import transformers.generation.utils as _gu
        from transformers.generation.candidate_generator import SinglePositionMultiTokenCandidateGenerator as _S

        class _Fixed(_S):
            def __init__(self, assistant_model, target_model_input_embeddings, generation_config, **kw):
                super().__init__(None, assistant_model, target_model_input_embeddings, generation_config, {}, **kw)

        _gu.SinglePositionMultiTokenCandidateGenerator = _Fixed
    ids = x[:, :33]
    calls = [0]
    fwd = target.forward

    def counting(*args, **kw):
        calls[0] += 1
        return fwd(*args, **kw)

    plain = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=48, do_sample=False)
    target.forward = counting
    assisted = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=48, do_sample=False,
                               assistant_model=hf_asst)
    target.forward = fwd
    checks["hf_assisted_generation"] = {"greedy_identical": bool(torch.equal(plain, assisted)),
                                        "new_tokens": 48, "target_forwards": calls[0]}
    if not torch.equal(plain, assisted):
        raise RuntimeError("transformers assisted generation is not greedy-identical")
    log.setdefault("checks", {}).update(checks)
    print(f"checks: {json.dumps(checks)}", flush=True)
    return target, drafter, tok


def plot(log, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def smooth(c, w):
        w = max(1, min(w, len(c)))
        return range(w - 1, len(c)), [sum(c[i - w + 1:i + 1]) / w for i in range(w - 1, len(c))]

    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    tl = log["target"]["loss_curve"]
    ax[0].plot(tl, lw=0.4, alpha=0.35, label="per step")
    ax[0].plot(*smooth(tl, 50), label="mean of 50")
    ax[0].axhline(log["target"]["held_out_loss"], color="k", ls="--", lw=0.8, label="held-out (end)")
    ax[0].set(title="target: causal LM loss (nats/token)", xlabel="step", ylim=(0, 8))
    ax[0].legend()
    dl = log["drafter"]["loss_curve"]
    ax[1].plot(dl, lw=0.4, alpha=0.35, label="per step")
    ax[1].plot(*smooth(dl, 20), label="mean of 20")
    ax[1].set(title=f"drafter: distillation loss (sum over {len(log['drafter']['per_step_hard_ce_curve'][0])} "
                    "draft steps)", xlabel="step", ylim=(0, None))
    ax[1].legend()
    dc = log["drafter"]["per_step_hard_ce_curve"]
    for k in range(len(dc[0])):
        ax[2].plot(*smooth([s[k] for s in dc], 20), label=f"draft step {k + 1}")
    ax[2].set(title="drafter: CE vs the target's greedy token (mean of 20)", xlabel="step", ylim=(0, None))
    ax[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)


README = """# Trained tiny Gemma 4 pair (target + MTP assistant)

Built by `scripts/train_tiny_pair.py` (offline, CPU, seeded); rebuild with

    python scripts/train_tiny_pair.py            # --out tests/assets/trained_pair --seed 0 --threads 1

* `target/`: transformers `Gemma4ForCausalLM` (model_type gemma4_text), 4 layers (3 sliding, window {window},
  + 1 full), hidden {t_hidden}, head_dim 32 / global 64, tied embeddings, final_logit_softcapping 30,
  trained on the CPython {python} standard library source; byte-level BPE tokenizer, vocab {vocab}.
* `assistant/`: transformers `Gemma4AssistantForCausalLM` (model_type gemma4_assistant), dense head, hidden
  {d_hidden}, distilled from the frozen target with the plugin's draft-round semantics (query position P+1,
  K={K}).
* Weights stored as {dtype}. `train_log.json` has the corpus file lists (held-out modules included),
  hyper-parameters, loss curves, wall times, checks and the held-out acceptance; `loss.png` the curves.

Held-out greedy drafting (K={K}, q position P+1): mean acceptance length {mal}, per-position acceptance
{ppa}.
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "tests" / "assets" / "trained_pair"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads. The weights do not depend on it. 2 is ~1.5x faster on an idle 2-core "
                         "machine but becomes 6-25x slower when another process is busy on one of the cores")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--t-hidden", type=int, default=128)
    ap.add_argument("--t-inter", type=int, default=512)
    ap.add_argument("--t-steps", type=int, default=2000)
    ap.add_argument("--t-batch", type=int, default=4)
    ap.add_argument("--t-lr", type=float, default=1e-2)
    ap.add_argument("--t-warmup", type=int, default=50)
    ap.add_argument("--d-hidden", type=int, default=128)
    ap.add_argument("--d-inter", type=int, default=512)
    ap.add_argument("--d-steps", type=int, default=300)
    ap.add_argument("--d-batch", type=int, default=4)
    ap.add_argument("--d-lr", type=float, default=2e-3)
    ap.add_argument("--d-warmup", type=int, default=20)
    ap.add_argument("--d-seqs", type=int, default=640, help="greedy sequences generated for distillation")
    ap.add_argument("--d-prompt", type=int, default=64, help="data-prompt length of those sequences")
    ap.add_argument("--d-context", type=int, default=16,
                    help="round starts trained inside the data prompt (before its last token)")
    ap.add_argument("--hard-weight", type=float, default=1.0)
    ap.add_argument("--gen-batch", type=int, default=64)
    ap.add_argument("--K", type=int, default=4)
    ap.add_argument("--e-prompt", type=int, default=64)
    ap.add_argument("--e-new", type=int, default=128)
    ap.add_argument("--e-per-file", type=int, default=4)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="saved weights")
    a = ap.parse_args()

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    log = {"seed": a.seed, "hyper_parameters": vars(a).copy(), "threads": a.threads,
           "versions": {"torch": torch.__version__, "python": platform.python_version()}}
    import tokenizers
    import transformers

    log["versions"].update(transformers=transformers.__version__, tokenizers=tokenizers.__version__)
    timer = Timer()
    t0 = time.perf_counter()

    tok, stream, held = build_corpus(a, log, timer)
    target, tcfg = train_target(a, stream, held, log, timer)
    store, kv_err = check_shared_kv(target, sample_windows(stream, 2, a.seq, torch.Generator().manual_seed(9)))
    log["checks"] = {"target_store_layers": store, "shared_kv_max_abs_err": kv_err}
    data = make_drafter_data(a, target, stream, log, timer)
    drafter, acfg = train_drafter(a, target, tcfg, data, log, timer)
    out = Path(a.out)
    with timer("save_and_verify"):
        save_outputs(a, out, tok, target, drafter, acfg, log)
        target, drafter, tok = verify_saved(a, out, stream, log)
    with timer("eval"):  # on the saved weights, reloaded (upcast to fp32)
        evaluate(a, target, drafter, tok, held, "eval", log)
        # for reference: the same drafter driven with vLLM's built-in query position (P instead of P+1)
        evaluate(a, target, drafter, tok, held, "eval_qpos_P", log, q_offset=0)
    log["wall_s"] = dict(timer.t)
    log["wall_s"]["total"] = round(time.perf_counter() - t0, 1)
    plot(log, out / "loss.png")
    (out / "README.md").write_text(README.format(
        window=a.window, t_hidden=a.t_hidden, python=platform.python_version(), vocab=VOCAB, d_hidden=a.d_hidden,
        K=a.K, dtype=a.dtype, mal=log["eval"]["mean_acceptance_length"], ppa=log["eval"]["per_position_acceptance"]))
    (out / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")
    print(f"wrote {out} in {log['wall_s']['total']:.0f}s", flush=True)


if __name__ == "__main__":
    main()
