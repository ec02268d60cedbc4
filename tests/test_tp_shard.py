"""The drafter sharded for tensor parallelism, without an engine: each "rank" keeps its query heads, reads only
its KV heads and its shard of the target embedding, and sums over ranks where the target does; ranks run
in threads with an all-reduce over a barrier. Every rank must draft what the unsharded drafter drafts."""

import threading
from pathlib import Path

import pytest
import torch

from vllm_gemma_mtp.drafter import (FULL, SLIDING, DrafterConfigError, TPShard, draft_greedy, load_drafter,
                                    tp_head_ranges)


@pytest.mark.parametrize("nh,kvh,size,expect", [
    (4, 2, 1, [(0, 4, 2)]),
    (4, 2, 2, [(0, 2, 1), (2, 2, 1)]),
    (8, 2, 4, [(0, 2, 1), (2, 2, 1), (4, 2, 1), (6, 2, 1)]),  # 2 ranks share each KV head
    (32, 16, 8, [(4 * r, 4, 2) for r in range(8)]),  # 31B-like sliding layers at TP=8
    (32, 4, 8, [(4 * r, 4, 1) for r in range(8)]),  # 31B-like full layers: 4 KV heads over 8 ranks
])
def test_head_ranges_follow_vllm_kv_sharding(nh, kvh, size, expect):
    assert [tp_head_ranges(nh, kvh, r, size) for r in range(size)] == expect


def test_head_ranges_refuse_what_cannot_be_split():
    with pytest.raises(DrafterConfigError, match="cannot be split"):
        tp_head_ranges(6, 3, 0, 2)
    with pytest.raises(DrafterConfigError, match="not a multiple"):
        tp_head_ranges(8, 2, 0, 3)
    with pytest.raises(DrafterConfigError, match="query heads per KV head"):
        tp_head_ranges(4, 2, 0, 8)  # 2 query heads per KV head over 4 replicas


class _ThreadGroup:
    def __init__(self, n):
        self.n, self.barrier, self.slots = n, threading.Barrier(n), [None] * n

    def all_reduce_for(self, rank):
        def all_reduce(x):
            self.slots[rank] = x
            self.barrier.wait()
            out = sum(self.slots[i] for i in range(self.n))  # same order on every rank: identical results
            self.barrier.wait()
            return out
        return all_reduce


@pytest.mark.parametrize("size", [2])
def test_sharded_ranks_draft_what_the_whole_drafter_drafts(size):
    from transformers import AutoConfig

    pair = Path(__file__).parent / "assets" / "trained_pair"
    tcfg = AutoConfig.from_pretrained(pair / "target")
    full = load_drafter(str(pair / "assistant"), tcfg)
    full.kernel_impl = "torch"
    g = torch.Generator().manual_seed(0)
    B, S, V, H = 4, 40, tcfg.vocab_size, tcfg.hidden_size
    kv, mask = {}, {}
    for lt in (SLIDING, FULL):
        geo = full.spec.geometry[full.spec.layer_types.index(lt)]
        kv[lt] = tuple(torch.randn(B, geo.num_kv_heads, S, geo.head_dim, generator=g) for _ in range(2))
        mask[lt] = torch.rand(B, 1, 1, S, generator=g) > 0.2
    E = torch.randn(V, H, generator=g) * 0.05
    tok = torch.tensor([3, V // 2 - 1, V // 2, V - 1])  # tokens on both sides of the vocab split
    h = torch.randn(B, H, generator=g)
    q = torch.full((B,), S)
    want = draft_greedy(full, E, tok, h, q, kv, mask, 4)

    group, out, errs = _ThreadGroup(size), [None] * size, []

    def rank_main(r):
        try:
            d = load_drafter(str(pair / "assistant"), tcfg)
            d.kernel_impl = "torch"
            n = V // size
            d.shard_for_tp(TPShard(r, size, group.all_reduce_for(r), r * n, n))
            local_kv = {}
            for lt, (K, Vv) in kv.items():
                L = d.layers[d.spec.layer_types.index(lt)]
                kvh = K.shape[1]
                lo = r * kvh // size if size <= kvh else r // (size // kvh)
                local_kv[lt] = (K[:, lo:lo + L.num_kv_heads], Vv[:, lo:lo + L.num_kv_heads])
            out[r] = draft_greedy(d, E[r * n:(r + 1) * n], tok, h, q, local_kv, mask, 4)
        except BaseException as e:  # noqa: BLE001 - reported below
            errs.append(e)
            group.barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errs, errs
    for r in range(size):
        assert torch.equal(out[r], out[0]), "ranks drafted different tokens"
    assert torch.equal(out[0], want)
