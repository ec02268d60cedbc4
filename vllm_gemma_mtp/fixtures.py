"""Tiny Gemma 4 target + MTP assistant pairs, built offline and deterministically.

Used by the tests, the demo and the benchmarks. Each flavor mirrors one released size's *structure*
at toy scale (head_dim >= 32 so vLLM's CPU attention takes it):

  e2b        per-layer embeddings (PLE), KV-shared target layers, double-wide MLP, centroid drafter head
  e2b-dense  the same target with a dense drafter head
  26b        MoE target, K=V global layers, dense drafter head
  31b        dense target, K=V global layers, dense drafter head
  allaccept  31b with both final norms zeroed: every logit ties, target and drafter both emit token 0,
             so every draft is accepted (use ignore_eos)
  zeroaccept the all-accept target (emits token 0) with a drafter that can never propose token 0 (its row of
             the tied draft head is zero while the other logits are random): every draft is rejected

A pair is written once per (flavor, seed, dtype, format version) under a cache folder and reused.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

FLAVORS = ("e2b", "e2b-dense", "26b", "31b", "allaccept", "zeroaccept")
VOCAB = 512  # divisible by NUM_CENTROIDS
NUM_CENTROIDS = 32
CENTROID_TOP_K = 4
SLIDING_WINDOW = 16  # real: 512 / 1024; small so short tests run past the window
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]  # ids 0..3 as in Gemma
_FORMAT = 3  # bump when the construction below changes

TOKENIZER_CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 4,
    "Speculative decoding with a Gemma 4 multi-token-prediction drafter. " * 4,
    "def f(x):\n    return x * 2\n" * 4,
    "0123456789 hello world, HELLO WORLD! " * 4,
]


def default_cache_root() -> Path:
    return Path(os.environ.get("VLLM_GEMMA_MTP_FIXTURES", Path.home() / ".cache" / "vllm-gemma-mtp"))


def build_tokenizer(vocab_size: int, corpus=None):
    """Byte-level BPE trained with `tokenizers`, padded with <unusedN> so len == model vocab."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus or TOKENIZER_CORPUS, trainer=trainer)
    n = tok.get_vocab_size()
    if n < vocab_size:
        tok.add_tokens([f"<unused{i}>" for i in range(vocab_size - n)])
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(f"tokenizer has {tok.get_vocab_size()} tokens, wanted {vocab_size}")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.chat_template = (
        "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}model: {% endif %}"
    )
    return fast


def target_config(flavor: str, **overrides):
    from transformers import Gemma4TextConfig

    base = flavor.split("-")[0]
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        num_attention_heads=4,
        head_dim=32,
        global_head_dim=64,
        max_position_embeddings=4096,
        sliding_window=SLIDING_WINDOW,
        final_logit_softcapping=30.0,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    if base == "e2b":
        kw = dict(
            intermediate_size=128,
            num_hidden_layers=10,
            layer_types=(["sliding_attention"] * 4 + ["full_attention"]) * 2,
            num_key_value_heads=1,
            num_global_key_value_heads=None,
            attention_k_eq_v=False,
            num_kv_shared_layers=4,  # layers 6..9 reuse layer 5 (sliding) / 4 (full)
            use_double_wide_mlp=True,
            hidden_size_per_layer_input=16,
            vocab_size_per_layer_input=VOCAB,
        )
    elif base in ("31b", "allaccept", "zeroaccept", "26b"):
        # dense target with K=V global layers and fewer global kv heads; 26b adds the MoE block
        kw = dict(
            intermediate_size=128,
            num_hidden_layers=6,
            layer_types=["sliding_attention"] * 5 + ["full_attention"],
            num_key_value_heads=2,
            num_global_key_value_heads=1,
            attention_k_eq_v=True,
            num_kv_shared_layers=0,
            hidden_size_per_layer_input=0,
            vocab_size_per_layer_input=0,
        )
        if base == "26b":
            kw.update(intermediate_size=96, enable_moe_block=True, num_experts=8, top_k_experts=2,
                      moe_intermediate_size=32)
    else:
        raise ValueError(f"unknown fixture flavor {flavor!r}; choose from {FLAVORS}")
    common.update(kw)
    common.update(overrides)
    cfg = Gemma4TextConfig(**common)
    cfg.architectures = ["Gemma4ForCausalLM"]
    return cfg


def assistant_config(t, centroids: bool, hidden_size: int = 32, intermediate_size: int = 64,
                     num_attention_heads: int = 4, num_centroids: int = NUM_CENTROIDS,
                     top_k: int = CENTROID_TOP_K):
    """Drafter config whose K/V geometry equals the target's (it attends the target's K/V)."""
    from transformers import Gemma4AssistantConfig, Gemma4TextConfig

    full_idx = t.layer_types.index("full_attention")
    swa_idx = t.layer_types.index("sliding_attention")
    full = t.per_layer_config[full_idx]
    swa = t.per_layer_config[swa_idx]
    text = Gemma4TextConfig(
        vocab_size=t.vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=4,
        layer_types=["sliding_attention"] * 3 + ["full_attention"],
        num_attention_heads=num_attention_heads,
        num_key_value_heads=swa.num_key_value_heads,
        head_dim=swa.head_dim,
        global_head_dim=full.head_dim,
        attention_k_eq_v=t.attention_k_eq_v,
        num_global_key_value_heads=full.num_key_value_heads if t.attention_k_eq_v else None,
        sliding_window=t.sliding_window,
        max_position_embeddings=t.max_position_embeddings,
        rope_parameters=t.rope_parameters,
        num_kv_shared_layers=4,
        hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=0,
        enable_moe_block=False,
        use_double_wide_mlp=False,
        final_logit_softcapping=None,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    cfg = Gemma4AssistantConfig(
        text_config=text,
        backbone_hidden_size=t.hidden_size,
        use_ordered_embeddings=centroids,
        num_centroids=num_centroids,
        centroid_intermediate_top_k=top_k,
        tie_word_embeddings=True,
    )
    cfg.architectures = ["Gemma4AssistantForCausalLM"]
    return cfg


def save_pair(out: Path, target, assistant, tokenizer) -> None:
    from transformers import GenerationConfig

    for sub, model in (("target", target), ("assistant", assistant)):
        d = out / sub
        d.mkdir(parents=True, exist_ok=True)
        model.generation_config = GenerationConfig(bos_token_id=2, eos_token_id=1, pad_token_id=0, do_sample=False)
        if sub == "assistant":
            model.generation_config.num_assistant_tokens = 4
            model.generation_config.num_assistant_tokens_schedule = "constant"
        model.save_pretrained(d)
        tokenizer.save_pretrained(d)


def _build(out: Path, flavor: str, seed: int, dtype: str) -> None:
    import torch
    from transformers import Gemma4AssistantForCausalLM, Gemma4ForCausalLM

    torch.manual_seed(seed)
    tok = build_tokenizer(VOCAB)
    tcfg = target_config(flavor)
    target = Gemma4ForCausalLM(tcfg).to(getattr(torch, dtype)).eval()
    acfg = assistant_config(tcfg, centroids=(flavor == "e2b"))
    assistant = Gemma4AssistantForCausalLM(acfg).to(getattr(torch, dtype)).eval()
    if acfg.use_ordered_embeddings:
        # transformers zero-fills token_ordering at init (every cluster -> token 0): give it a permutation
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            assistant.masked_embedding.token_ordering.copy_(torch.randperm(VOCAB, generator=g))
    if flavor == "allaccept":
        with torch.no_grad():
            target.model.norm.weight.zero_()
            assistant.model.norm.weight.zero_()
    if flavor == "zeroaccept":
        with torch.no_grad():
            target.model.norm.weight.zero_()
            assistant.model.embed_tokens.weight[0].zero_()
    save_pair(out, target, assistant, tok)
    (out / "fixture.json").write_text(json.dumps({"flavor": flavor, "seed": seed, "dtype": dtype}))


def ensure_pair(flavor: str, seed: int = 0, dtype: str = "float32", root: str | os.PathLike | None = None) -> Path:
    """Return the folder of a tiny pair (``<dir>/target``, ``<dir>/assistant``), building it if missing."""
    if flavor not in FLAVORS:
        raise ValueError(f"unknown fixture flavor {flavor!r}; choose from {FLAVORS}")
    root = Path(root) if root else default_cache_root()
    key = hashlib.sha1(f"{flavor}|{seed}|{dtype}|{_FORMAT}".encode()).hexdigest()[:10]
    out = root / f"tiny-gemma4-{flavor}-{key}"
    if (out / "fixture.json").exists():
        return out
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=root))
    try:
        _build(tmp, flavor, seed, dtype)
        try:
            tmp.rename(out)  # atomic: concurrent builders of the same pair both end with a complete folder
        except OSError:
            if not (out / "fixture.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("flavors", nargs="*", default=list(FLAVORS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--root", default=None)
    args = ap.parse_args()
    for f in args.flavors:
        print(f, ensure_pair(f, args.seed, args.dtype, args.root))


if __name__ == "__main__":
    main()
