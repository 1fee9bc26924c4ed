"""The fused layers' weight loaders: MoE experts stacked from per-expert or stacked checkpoint
tensors, and fused qkv / gate_up checkpoint tensors split into shards, with one rank and with
each rank of a simulated tensor-parallel group of 2 (no collectives: the ranks' partial outputs
are summed here, as the all-reduce would).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from paged_engine.distributed.parallel_state import init_tensor_parallel
from paged_engine.model_executor.layers.fused_moe import FusedMoE, expert_checkpoint_target
from paged_engine.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear
from paged_triton.kernels.fused_moe import fused_moe_ref

E, H, I, TOP_K = 4, 16, 12, 2


@pytest.fixture
def as_rank():
    """as_rank(rank, size): build layers as that rank; one rank of one again afterwards."""
    yield lambda rank, size: init_tensor_parallel(rank, size)
    init_tensor_parallel(0, 1)


def _experts(seed=0):
    g = torch.Generator().manual_seed(seed)
    gate = [torch.randn(I, H, generator=g) for _ in range(E)]
    up = [torch.randn(I, H, generator=g) for _ in range(E)]
    down = [torch.randn(H, I, generator=g) for _ in range(E)]
    return gate, up, down


def _load_per_expert(layer: FusedMoE, gate, up, down) -> None:
    for e in range(E):
        layer.weight_loader(layer.w13_weight, gate[e], (e, "w1"))
        layer.weight_loader(layer.w13_weight, up[e], (e, "w3"))
        layer.weight_loader(layer.w2_weight, down[e], (e, "w2"))


def _routing(num_tokens=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, H, generator=g)
    layer = FusedMoE(E, TOP_K, H, I, renormalize=True)
    weights, ids = layer.select_experts(torch.randn(num_tokens, E, generator=g))
    return x, weights, ids


def _dense_moe(x, weights, ids, gate, up, down):
    """Independent reference: each token through its experts, one at a time."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(TOP_K):
            e = int(ids[t, j])
            out[t] += weights[t, j] * (down[e] @ (F.silu(gate[e] @ x[t]) * (up[e] @ x[t])))
    return out


def test_experts_load_per_expert_and_stacked_alike():
    gate, up, down = _experts()
    x, weights, ids = _routing()
    per_expert = FusedMoE(E, TOP_K, H, I, renormalize=True)
    _load_per_expert(per_expert, gate, up, down)
    stacked = FusedMoE(E, TOP_K, H, I, renormalize=True)
    stacked.weight_loader(stacked.w13_weight, torch.stack([torch.cat([g, u]) for g, u in zip(gate, up)]))
    stacked.weight_loader(stacked.w2_weight, torch.stack(down))
    assert torch.equal(per_expert.w13_weight, stacked.w13_weight)
    assert torch.equal(per_expert.w2_weight, stacked.w2_weight)
    want = _dense_moe(x, weights, ids, gate, up, down)
    torch.testing.assert_close(fused_moe_ref(x, per_expert.w13_weight, per_expert.w2_weight, weights, ids), want,
                               atol=1e-4, rtol=1e-4)


def test_experts_split_over_two_ranks_sum_to_the_whole(as_rank):
    gate, up, down = _experts(seed=2)
    x, weights, ids = _routing(seed=3)
    partials = []
    for rank in (0, 1):
        as_rank(rank, 2)
        layer = FusedMoE(E, TOP_K, H, I, renormalize=True)
        assert layer.w13_weight.shape == (E, 2 * (I // 2), H) and layer.w2_weight.shape == (E, H, I // 2)
        _load_per_expert(layer, gate, up, down)
        partials.append(fused_moe_ref(x, layer.w13_weight, layer.w2_weight, weights, ids))
    torch.testing.assert_close(partials[0] + partials[1], _dense_moe(x, weights, ids, gate, up, down),
                               atol=1e-4, rtol=1e-4)


def test_expert_loader_errors():
    layer = FusedMoE(E, TOP_K, H, I, renormalize=False)
    with pytest.raises(ValueError, match=r"expert 1 w1.*shape \(11, 16\)"):
        layer.weight_loader(layer.w13_weight, torch.randn(I - 1, H), (1, "w1"))
    with pytest.raises(ValueError, match="unknown expert shard"):
        layer.weight_loader(layer.w13_weight, torch.randn(H, I), (1, "w2"))  # w2 is not in w13
    with pytest.raises(ValueError, match="stacked expert tensor"):
        layer.weight_loader(layer.w2_weight, torch.randn(E + 1, H, I))
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        FusedMoE(E, E + 1, H, I, renormalize=True)


def test_expert_checkpoint_names():
    names = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
    assert expert_checkpoint_target("model.layers.3.mlp.experts.17.up_proj.weight", names) == (
        "model.layers.3.mlp.experts.w13_weight", (17, "w3"))
    assert expert_checkpoint_target("model.layers.0.mlp.experts.down_proj", names) == (
        "model.layers.0.mlp.experts.w2_weight", None)
    assert expert_checkpoint_target("model.layers.0.mlp.gate.weight", names) is None  # the router
    assert expert_checkpoint_target("model.layers.0.mlp.gate_proj.weight", names) is None  # a dense MLP


@pytest.mark.parametrize("tp", [1, 2])
def test_fused_qkv_and_gate_up_tensors_load_like_separate_ones(as_rank, tp):
    """Phi-3 stores qkv_proj / gate_up_proj fused: loaded without a shard id, each rank gets the
    same weights as from the separate q/k/v (gate/up) tensors."""
    g = torch.Generator().manual_seed(4)
    head_dim, heads, kv_heads = 8, 4, 2
    q, k, v = (torch.randn(n * head_dim, H, generator=g) for n in (heads, kv_heads, kv_heads))
    gate, up = torch.randn(I, H, generator=g), torch.randn(I, H, generator=g)
    for rank in range(tp):
        as_rank(rank, tp)
        fused, separate = (QKVParallelLinear(H, head_dim, heads, kv_heads, bias=False) for _ in range(2))
        fused.weight_loader(fused.weight, torch.cat([q, k, v]))
        for shard, t in zip("qkv", (q, k, v)):
            separate.weight_loader(separate.weight, t, shard)
        assert torch.equal(fused.weight, separate.weight)
        mlp_fused, mlp_separate = (MergedColumnParallelLinear(H, [I, I]) for _ in range(2))
        mlp_fused.weight_loader(mlp_fused.weight, torch.cat([gate, up]))
        mlp_separate.weight_loader(mlp_separate.weight, gate, 0)
        mlp_separate.weight_loader(mlp_separate.weight, up, 1)
        assert torch.equal(mlp_fused.weight, mlp_separate.weight)
        with pytest.raises(ValueError, match="fused checkpoint tensor has shape"):
            fused.weight_loader(fused.weight, torch.cat([q, k]))
