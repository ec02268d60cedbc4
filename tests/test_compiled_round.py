"""The compiled draft round (torch.compile with a C++ wrapper on CPU) in a real engine.

`VLLM_GEMMA_MTP_COMPILE=auto` compiles whenever the engine is not enforce_eager, i.e. for most users, and
the benchmark runs it; the other engine tests run the eager round. On the trained pair most drafts are
accepted, so a compiled round that drafted differently would show in the acceptance, and a wrong
verification in the output. Two engines: adaptive speculation (the default), whose draft lengths vary, for
the output; fixed K for the acceptance, compared with the record (made with the eager round at fixed K, same
prompts). Under adaptive speculation which drafts are made depends on the step timings, and its probes come
after a request's acceptance dipped, so its first-position acceptance moves with the machine's speed (CI,
2026-12-04: out of the 5 % band with the record, where the same test passed on the development VM)."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
PAIR = ROOT / "tests" / "assets" / "trained_pair"


def test_compiled_round_is_lossless_and_keeps_acceptance(engine_runs):
    from transformers import AutoTokenizer

    from acceptance import RECORD, SETTINGS
    from bench import code_prompts

    tok = AutoTokenizer.from_pretrained(PAIR / "target")
    prompts = tuple(tuple(p) for p in code_prompts(tok, SETTINGS["num_prompts"], tok.bos_token_id or 2))
    kw = dict(prompts=prompts, max_tokens=SETTINGS["max_tokens"])
    base = engine_runs(PAIR / "target", **kw)
    spec = engine_runs(PAIR / "target", PAIR / "assistant", SETTINGS["k"], env={"VLLM_GEMMA_MTP_COMPILE": "1"}, **kw)
    fixed = engine_runs(PAIR / "target", PAIR / "assistant", SETTINGS["k"],
                        env={"VLLM_GEMMA_MTP_COMPILE": "1", "VLLM_GEMMA_MTP_ADAPTIVE": "0"}, **kw)
    for run in (spec, fixed):
        assert run.drafter_class == "GemmaMTPProposer" and run.stats["compiled"], "the draft round was not compiled"
        for i, (a, b) in enumerate(zip(base.outputs, run.outputs)):
            assert a == b, f"prompt {i}: output with the compiled draft round differs from the target alone"
    assert fixed.stats["policy"] is None  # fixed K: no policy
    m = fixed.metrics
    drafts = m["vllm:spec_decode_num_drafts"]
    first = m["vllm:spec_decode_num_accepted_tokens_per_pos"][0] / drafts
    rec = json.loads(RECORD.read_text())  # recorded with the eager round at fixed K, same prompts
    want = rec["per_position_acceptance"][0]
    assert abs(first - want) <= 0.05 * want, (first, rec)
    assert spec.stats["policy"] is not None and spec.stats["decisions"].get("policy", 0) > 0
