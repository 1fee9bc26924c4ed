"""The parallel layers on two gloo ranks against the same layers on one rank (run by
test_parallel_layers.py in two spawned processes; each check's failure is reported by name)."""

from __future__ import annotations

import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

from paged_engine.distributed.parallel_state import tensor_parallel
from paged_engine.model_executor.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from paged_engine.model_executor.layers.vocab_embedding import ParallelLMHead, VocabParallelEmbedding

TP = 2


def _load(layer, tensors: dict, shards: dict | None = None):
    """Load `tensors` (param name -> full checkpoint tensor, or {shard_id: tensor})."""
    for name, value in tensors.items():
        param = getattr(layer, name)
        if isinstance(value, dict):
            for shard_id, t in value.items():
                param.weight_loader(param, t, shard_id)
        else:
            param.weight_loader(param, value)
    return layer


def _pair(make, tensors, rank):
    whole = _load(make(), tensors)
    with tensor_parallel(rank, TP):
        part = _load(make(), tensors)
    return whole, part


def check_column(rank, g):
    w, b, x = torch.randn(12, 16, generator=g), torch.randn(12, generator=g), torch.randn(5, 16, generator=g)
    whole, part = _pair(lambda: ColumnParallelLinear(16, 12, bias=True), {"weight": w, "bias": b}, rank)
    torch.testing.assert_close(part(x), whole(x)[:, rank * 6:(rank + 1) * 6])


def check_merged_column(rank, g):
    gate, up = torch.randn(10, 16, generator=g), torch.randn(6, 16, generator=g)
    x = torch.randn(5, 16, generator=g)
    whole, part = _pair(lambda: MergedColumnParallelLinear(16, [10, 6]), {"weight": {0: gate, 1: up}}, rank)
    full = whole(x)
    want = torch.cat([full[:, :10][:, rank * 5:(rank + 1) * 5], full[:, 10:][:, rank * 3:(rank + 1) * 3]], 1)
    torch.testing.assert_close(part(x), want)


def _check_qkv(rank, g, kv_heads):
    heads, d, hidden = 4, 4, 16
    q = torch.randn(heads * d, hidden, generator=g)
    k, v = (torch.randn(kv_heads * d, hidden, generator=g) for _ in range(2))
    qb, kb, vb = torch.randn(heads * d, generator=g), torch.randn(kv_heads * d, generator=g), torch.randn(kv_heads * d, generator=g)
    x = torch.randn(3, hidden, generator=g)
    tensors = {"weight": {"q": q, "k": k, "v": v}, "bias": {"q": qb, "k": kb, "v": vb}}
    whole, part = _pair(lambda: QKVParallelLinear(hidden, d, heads, kv_heads, bias=True), tensors, rank)
    fq, fk, fv = whole(x).split([heads * d, kv_heads * d, kv_heads * d], dim=1)
    kv_rank = rank if kv_heads >= TP else rank * kv_heads // TP  # replicated when kv_heads < tp
    per_kv = max(1, kv_heads // TP) * d
    want = torch.cat([fq[:, rank * 8:(rank + 1) * 8], fk[:, kv_rank * per_kv:(kv_rank + 1) * per_kv],
                      fv[:, kv_rank * per_kv:(kv_rank + 1) * per_kv]], 1)
    assert (part.num_heads, part.num_kv_heads) == (heads // TP, max(1, kv_heads // TP))
    torch.testing.assert_close(part(x), want)


def check_qkv_split_kv_heads(rank, g):
    _check_qkv(rank, g, kv_heads=2)


def check_qkv_replicated_kv_head(rank, g):
    _check_qkv(rank, g, kv_heads=1)


def check_row_all_reduce(rank, g):
    w, b, x = torch.randn(16, 12, generator=g), torch.randn(16, generator=g), torch.randn(5, 12, generator=g)
    whole, part = _pair(lambda: RowParallelLinear(12, 16, bias=True), {"weight": w, "bias": b}, rank)
    # Summed over the ranks, then the bias once.
    torch.testing.assert_close(part(x[:, rank * 6:(rank + 1) * 6].contiguous()), whole(x), atol=1e-5, rtol=1e-5)


def check_vocab_embedding(rank, g):
    w = torch.randn(11, 8, generator=g)  # 11 rows: rank 1 holds 5 and a padding row
    ids = torch.tensor([0, 5, 6, 10, 3, 10])
    whole, part = _pair(lambda: VocabParallelEmbedding(11, 8), {"weight": w}, rank)
    torch.testing.assert_close(part(ids), whole(ids))


def check_lm_head_gathers_to_rank0(rank, g):
    w, h = torch.randn(11, 8, generator=g), torch.randn(4, 8, generator=g)
    whole, part = _pair(lambda: ParallelLMHead(11, 8), {"weight": w}, rank)
    got = part.compute_logits(h)
    if rank == 0:
        torch.testing.assert_close(got, whole.compute_logits(h))
    else:
        assert got is None, "only the sampling rank gets logits"


CHECKS = [check_column, check_merged_column, check_qkv_split_kv_heads, check_qkv_replicated_kv_head,
          check_row_all_reduce, check_vocab_embedding, check_lm_head_gathers_to_rank0]


def run(rank: int, port: int, results) -> None:
    store = dist.TCPStore("127.0.0.1", port, TP, is_master=rank == 0, timeout=timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=TP, timeout=timedelta(seconds=60))
    try:
        for i, check in enumerate(CHECKS):
            g = torch.Generator().manual_seed(i)  # the same tensors on both ranks
            try:
                with torch.inference_mode():
                    check(rank, g)
                results.put((rank, check.__name__, None))
            except Exception:  # noqa: BLE001 - reported to the test by name
                results.put((rank, check.__name__, traceback.format_exc()))
    finally:
        dist.destroy_process_group()
