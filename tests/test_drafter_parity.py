"""Our drafter against transformers' Gemma4AssistantForCausalLM on the same weights and target K/V."""

import pytest
import torch

from vllm_gemma_mtp.drafter import FULL, SLIDING, DrafterConfigError, check_pair, load_drafter

TOL = 1e-5  # fp32; observed max |diff| ~1e-6 (logits and recurrent hidden) over 3 recurrent steps


@pytest.mark.parametrize("flavor", ["31b", "26b", "e2b"])  # dense head (31b, 26b), centroid head (e2b)
def test_draft_round_matches_transformers(pair, flavor):
    from transformers import AutoModelForCausalLM

    p = pair(flavor)
    target = AutoModelForCausalLM.from_pretrained(p / "target", dtype=torch.float32).eval()
    asst = AutoModelForCausalLM.from_pretrained(p / "assistant", dtype=torch.float32).eval()
    ours = load_drafter(str(p / "assistant"), target.config)
    ids = torch.tensor([[2] + list(range(40, 70))])  # 31 tokens: longer than the sliding window (16)
    with torch.no_grad():
        out = target(ids, output_hidden_states=True, return_shared_kv_states=True, use_cache=True)
    P = ids.shape[1] - 1
    W = target.config.sliding_window
    kv_hf = out.shared_kv_states
    # transformers' drafter sees the last W+1 sliding keys; hand ours the same keys for an exact comparison
    kv = {SLIDING: tuple(t[:, :, -(W + 1):] for t in kv_hf[SLIDING]), FULL: kv_hf[FULL]}
    mask = {SLIDING: None, FULL: None}
    rope = ours.rope_tables(torch.tensor([[P + 1]]), torch.float32)
    tok = out.logits[:, -1:].argmax(-1)  # [1, 1] bonus token
    h = out.hidden_states[-1][:, -1:]  # [1, 1, H_t] post-norm
    emb = target.get_input_embeddings()
    for step in range(3):
        with torch.no_grad():
            ref = asst(inputs_embeds=torch.cat([emb(tok), h], -1), attention_mask=torch.ones(1, P + 2, dtype=torch.long),
                       position_ids=torch.tensor([[P + 1]]), shared_kv_states=kv_hf, use_cache=False)
            z = ours.input_projection(tok[0], h[0], target.model.embed_tokens.weight)
            y = ours.body(z[:, None], rope, kv, mask)[:, 0]
            logits = ours.logits(y)[0]
            h_next = ours.post_projection(y)
        ref_logits = ref.logits[0, 0]
        if ours.spec.centroids:
            cand = torch.isfinite(logits)
            assert int(cand.sum()) == ours.spec.centroid_top_k * ours.spec.vocab // ours.spec.num_centroids
            # transformers fills non-candidates with min(candidates) - 1: same candidates, same order
            assert torch.equal(cand, ref_logits > ref_logits.min())
            assert (logits[cand] - ref_logits[cand]).abs().max() < TOL
        else:
            assert (logits - ref_logits).abs().max() < TOL
        assert (h_next[0] - ref.last_hidden_state[0, 0]).abs().max() < TOL
        assert int(ours.argmax_tokens(y)[0]) == int(ref_logits.argmax())
        tok, h = ref.logits.argmax(-1), ref.last_hidden_state


def test_check_pair_accepts_good_and_rejects_mismatch(pair, tmp_path):
    import json
    import shutil

    from transformers import AutoConfig

    p = pair("31b")
    tcfg = AutoConfig.from_pretrained(p / "target")
    spec = check_pair(str(p / "assistant"), tcfg)
    assert spec.backbone == tcfg.hidden_size
    bad = tmp_path / "asst"
    shutil.copytree(p / "assistant", bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["backbone_hidden_size"] = 96
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DrafterConfigError, match="backbone_hidden_size=96"):
        check_pair(str(bad), tcfg)
