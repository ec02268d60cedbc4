"""Bad input fails at startup, in the front-end process, with an error that names the problem."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

PROGRAM = textwrap.dedent("""
    import sys
    from vllm import LLM
    if __name__ == "__main__":
        try:
            LLM(model=sys.argv[1], dtype="float32", max_model_len=128, enforce_eager=True,
                kv_cache_memory_bytes=16 << 20,
                speculative_config={"method": "mtp", "model": sys.argv[2], "num_speculative_tokens": 2})
        except Exception as e:
            print("RAISED", type(e).__name__, str(e).replace("\\n", " "))
            sys.exit(3)
        print("STARTED")
""")


def start(target, assistant, env=None, timeout=240):
    e = dict(os.environ)
    e.update(env or {})
    r = subprocess.run([sys.executable, "-c", PROGRAM, str(target), str(assistant)], env=e, capture_output=True,
                       text=True, timeout=timeout)
    return r.returncode, r.stdout + r.stderr


def edited(src, dst, edit=None, drop=None, corrupt=None):
    shutil.copytree(src, dst)
    if edit:
        cfg = json.loads((dst / "config.json").read_text())
        edit(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    if drop:
        (dst / drop).unlink()
    if corrupt:
        data = (dst / corrupt).read_bytes()
        (dst / corrupt).write_bytes(data[: len(data) // 2])  # truncated download
    return dst


def _backbone(c):
    c["backbone_hidden_size"] = 96


def _vocab(c):
    c["text_config"]["vocab_size"] = 1024


@pytest.mark.parametrize("case,kw,match", [
    ("backbone", dict(edit=_backbone), "backbone_hidden_size=96 does not match the target hidden_size=64"),
    ("vocab", dict(edit=_vocab), "vocab_size=1024 does not match the target vocab_size=512"),
    ("missing", dict(drop="model.safetensors"), "no \\*.safetensors weights in assistant folder"),
    ("corrupt", dict(corrupt="model.safetensors"), "is corrupt or unreadable"),
])
def test_bad_assistant(pair, tmp_path, case, kw, match):
    import re

    p = pair("31b")
    bad = edited(p / "assistant", tmp_path / case, **kw)
    code, out = start(p / "target", bad)
    assert code == 3, out[-3000:]
    assert re.search(match, out), out[-3000:]
    assert "DrafterConfigError" in out


def test_non_gemma4_target(pair, tmp_path):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    p = pair("31b")
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, head_dim=32,
                                         max_position_embeddings=256))
    d = tmp_path / "llama"
    llama.save_pretrained(d)
    AutoTokenizer.from_pretrained(p / "target").save_pretrained(d)
    code, out = start(d, p / "assistant")
    assert code == 3, out[-3000:]
    assert "Gemma 4 MTP drafters need a Gemma 4 target" in out, out[-3000:]


def test_invalid_plugin_option(pair):
    p = pair("31b")
    code, out = start(p / "target", p / "assistant", env={"VLLM_GEMMA_MTP_QUERY_POSITION": "p+5"})
    assert code != 0
    assert "VLLM_GEMMA_MTP_QUERY_POSITION='p+5' is invalid; accepted values: p+1, p" in out, out[-3000:]
