"""fused_moe (Triton, interpreter) vs. its torch ref, the ref vs. transformers' Mixtral experts, and
the expert alignment's invariants.

Tolerances: fp32 (ieee dots) 1e-5; fp16 1e-2 (gate_up rounded to fp16 before the activation, as
on the GPU; the ref rounds at the same points, so only summation order differs).
"""

import pytest
import torch

from paged_triton.kernels.fused_moe import fused_moe, fused_moe_ref, moe_align_block_size

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=1e-2, rtol=1e-2)}


def _moe_inputs(num_tokens, hidden, intermediate, num_experts, top_k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=g).to(dtype)
    w13 = (torch.randn(num_experts, 2 * intermediate, hidden, generator=g) / hidden**0.5).to(dtype)
    w2 = (torch.randn(num_experts, hidden, intermediate, generator=g) / intermediate**0.5).to(dtype)
    probs = torch.randn(num_tokens, num_experts, generator=g).softmax(-1)
    weights, ids = torch.topk(probs, top_k)
    return x, w13, w2, weights, ids


# (dtype, tokens, hidden, intermediate, experts, top_k, activation): one token (decode), experts
# left unpicked, features not multiples of the tiles, more experts than tokens, Qwen3-MoE's top 8.
CASES = [
    (torch.float32, 1, 64, 32, 4, 2, "silu"),
    (torch.float32, 7, 48, 40, 4, 2, "silu"),
    (torch.float32, 40, 64, 48, 8, 3, "silu"),
    (torch.float16, 5, 32, 64, 16, 4, "silu"),
    (torch.float32, 9, 64, 32, 16, 8, "silu"),
    (torch.float16, 12, 96, 80, 6, 1, "gelu_tanh"),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{str(c[0])[6:]}-T{c[1]}-H{c[2]}-I{c[3]}-E{c[4]}-k{c[5]}-{c[6]}"
                                             for c in CASES])
def test_fused_moe_kernel_matches_ref(case):
    dtype, num_tokens, hidden, intermediate, num_experts, top_k, activation = case
    x, w13, w2, weights, ids = _moe_inputs(num_tokens, hidden, intermediate, num_experts, top_k, dtype)
    got = fused_moe(x, w13, w2, weights, ids, activation)
    assert got.shape == x.shape and got.dtype == dtype
    torch.testing.assert_close(got, fused_moe_ref(x, w13, w2, weights, ids, activation), **TOL[dtype])


def test_fused_moe_int32_ids_and_repeated_experts_per_token():
    """int32 ids (what a router may hand over) and two tokens routed to the same expert pair."""
    x, w13, w2, weights, ids = _moe_inputs(4, 32, 32, 3, 2, torch.float32, seed=1)
    ids = torch.tensor([[0, 2], [0, 2], [1, 0], [2, 1]], dtype=torch.int32)
    torch.testing.assert_close(fused_moe(x, w13, w2, weights, ids), fused_moe_ref(x, w13, w2, weights, ids),
                               **TOL[torch.float32])


def test_fused_moe_ref_matches_transformers_mixtral_experts():
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    num_experts, hidden, intermediate, top_k = 4, 32, 48, 2
    config = MixtralConfig(hidden_size=hidden, intermediate_size=intermediate, num_local_experts=num_experts,
                           num_experts_per_tok=top_k)
    experts = MixtralExperts(config)
    x, w13, w2, weights, ids = _moe_inputs(11, hidden, intermediate, num_experts, top_k, torch.float32)
    with torch.no_grad():
        experts.gate_up_proj.copy_(w13)  # transformers 5 stacks experts in the same layout
        experts.down_proj.copy_(w2)
        want = experts(x, ids, weights)
    torch.testing.assert_close(fused_moe_ref(x, w13, w2, weights, ids), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_tokens, top_k, num_experts, block_m", [(1, 2, 8, 16), (13, 2, 4, 4), (50, 8, 16, 16)])
def test_align_block_size_invariants(num_tokens, top_k, num_experts, block_m):
    g = torch.Generator().manual_seed(num_tokens)
    ids = torch.stack([torch.randperm(num_experts, generator=g)[:top_k] for _ in range(num_tokens)])
    sorted_ids, block_expert, num_post = moe_align_block_size(ids, block_m, num_experts)
    num_pairs = num_tokens * top_k
    assert sorted_ids.shape[0] % block_m == 0 and block_expert.shape[0] == sorted_ids.shape[0] // block_m
    used = int(num_post)
    counts = torch.bincount(ids.flatten(), minlength=num_experts)
    assert used == int(((counts + block_m - 1) // block_m * block_m).sum()) <= sorted_ids.shape[0]
    valid = sorted_ids[:used]
    pairs = valid[valid < num_pairs]
    assert sorted(pairs.tolist()) == list(range(num_pairs))  # every pair exactly once
    assert (sorted_ids[used:] == num_pairs).all()
    for b in range(used // block_m):
        rows = valid[b * block_m:(b + 1) * block_m]
        rows = rows[rows < num_pairs].long()
        assert len(rows) > 0  # padding never fills a whole block
        assert (ids.flatten()[rows] == block_expert[b]).all()  # one expert per block


def test_fused_moe_rejects_bad_input():
    x, w13, w2, weights, ids = _moe_inputs(3, 32, 16, 4, 2, torch.float32)
    with pytest.raises(ValueError, match="w2 must be"):
        fused_moe(x, w13, w2[:, :, :8], weights, ids)
    with pytest.raises(ValueError, match="topk_ids"):
        fused_moe(x, w13, w2, weights, ids[:2])
    with pytest.raises(ValueError, match="dtypes differ"):
        fused_moe(x, w13.half(), w2, weights, ids)
    with pytest.raises(ValueError, match="topk_weights must be one of"):
        fused_moe(x, w13, w2, weights.half(), ids)
    with pytest.raises(ValueError, match="activation"):
        fused_moe(x, w13, w2, weights, ids, "relu")
