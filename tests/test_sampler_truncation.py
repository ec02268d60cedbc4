"""The sampler's top-k/top-p pre-pass against a direct per-row computation."""

import pytest
import torch

from vllm_gemma_mtp.sampler import truncate_top_k_top_p


def reference_row(logits, t, k, p):
    if t < 1e-5:
        return logits.clone()
    x = logits / t
    keep = torch.ones_like(x, dtype=torch.bool)
    order = torch.argsort(x, descending=True, stable=True)
    if k is not None and 0 < k < x.numel():
        keep[order[k:]] = False
    if p is not None:
        probs = torch.softmax(x.masked_fill(~keep, float("-inf")), -1)
        mass = 0.0
        for i in order.tolist():
            if not keep[i]:
                continue
            if mass >= p:
                keep[i] = False
            mass += float(probs[i])
    return x.masked_fill(~keep, float("-inf"))


@pytest.mark.parametrize("use_k,use_p", [(True, False), (False, True), (True, True)])
def test_truncation_matches_reference(use_k, use_p):
    g = torch.Generator().manual_seed(0)
    nd = [3, 0, 2, 4]
    B, V = len(nd), 50
    logits = torch.randn(sum(nd), V, generator=g) * 2
    temperature = torch.tensor([0.7, 1.0, 0.0, 1.3])
    top_k = torch.tensor([5, 50, 3, 12]) if use_k else None
    top_p = torch.tensor([0.9, 0.5, 0.3, 0.6]) if use_p else None
    out, t_out = truncate_top_k_top_p(logits, temperature, top_k, top_p, nd)
    assert t_out.tolist() == [1.0, 1.0, 0.0, 1.0]
    row = 0
    for b, n in enumerate(nd):
        for _ in range(n):
            ref = reference_row(logits[row], float(temperature[b]), int(top_k[b]) if use_k else None,
                                float(top_p[b]) if use_p else None)
            assert torch.equal(torch.isinf(out[row]), torch.isinf(ref)), (b, row)
            fin = torch.isfinite(ref)
            assert torch.allclose(out[row][fin], ref[fin], atol=1e-6)
            row += 1
