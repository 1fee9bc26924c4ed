"""store_kvcache (Triton, interpreter) vs. its torch ref and a token-by-token loop.

A copy, so results must be bit-identical. The cache is poisoned with NaN: slots not written stay
NaN, so a write to a wrong slot, or a write for a negative (skipped) slot, shows.
"""

import random

import pytest
import torch

from paged_triton.kernels.store_kvcache import store_kvcache, store_kvcache_ref

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")


def _inputs(num_tokens, num_heads, num_kv_heads, head_dim, block_size, dtype, slot_dtype):
    num_blocks = -(-num_tokens // block_size) + 2
    # k and v as strided views of a fused qkv projection output, as the model produces them.
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim).to(dtype)
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    k = qkv[:, q_size : q_size + kv_size].view(num_tokens, num_kv_heads, head_dim)
    v = qkv[:, q_size + kv_size :].view(num_tokens, num_kv_heads, head_dim)
    slots = torch.randperm(num_blocks * block_size)[:num_tokens]
    skipped = random.sample(range(num_tokens), k=num_tokens // 5)
    slots[skipped] = -1
    cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype)
    return k, v, slots.to(slot_dtype), cache


@pytest.mark.parametrize(
    "dtype, num_kv_heads, head_dim, block_size, slot_dtype",
    [
        (torch.float32, 1, 64, 16, torch.int64),
        (torch.float16, 2, 128, 16, torch.int32),
        (torch.bfloat16, 8, 64, 8, torch.int64),
        (torch.float32, 3, 80, 32, torch.int32),
    ],
)
def test_store_kvcache_matches_ref_and_loop(dtype, num_kv_heads, head_dim, block_size, slot_dtype):
    num_tokens = 37
    k, v, slots, cache = _inputs(num_tokens, 4, num_kv_heads, head_dim, block_size, dtype, slot_dtype)
    k_cache, v_cache = cache.clone(), cache.clone()
    store_kvcache(k, v, k_cache, v_cache, slots)

    k_ref, v_ref = cache.clone(), cache.clone()
    store_kvcache_ref(k, v, k_ref, v_ref, slots)
    assert torch.equal(k_cache.nan_to_num(), k_ref.nan_to_num()) and torch.equal(k_cache.isnan(), k_ref.isnan())
    assert torch.equal(v_cache.nan_to_num(), v_ref.nan_to_num()) and torch.equal(v_cache.isnan(), v_ref.isnan())

    written = 0
    for t, slot in enumerate(slots.tolist()):
        if slot < 0:
            continue
        written += 1
        assert torch.equal(k_cache[slot // block_size, slot % block_size], k[t])
        assert torch.equal(v_cache[slot // block_size, slot % block_size], v[t])
    rows_written = (~k_cache.isnan().all(-1).all(-1)).sum().item()
    assert rows_written == written  # nothing else touched


def test_store_kvcache_all_skipped_and_empty():
    k, v, slots, cache = _inputs(5, 2, 2, 64, 16, torch.float32, torch.int64)
    k_cache, v_cache = cache.clone(), cache.clone()
    store_kvcache(k, v, k_cache, v_cache, torch.full_like(slots, -1))
    store_kvcache(k[:0], v[:0], k_cache, v_cache, slots[:0])
    assert k_cache.isnan().all() and v_cache.isnan().all()


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(slot_mapping=torch.zeros(4, dtype=torch.int64)), "slot_mapping has 4 entries"),
        (dict(slot_mapping=torch.zeros(5)), "slot_mapping must be one of"),
        (dict(k=torch.randn(5, 2, 32), v=torch.randn(5, 2, 32)), "k_cache"),
        (dict(v_cache=torch.randn(4, 16, 2, 64, dtype=torch.float16)), "v_cache"),
        (dict(k=torch.randn(5, 2, 128)[..., ::2]), "contiguous last dim"),
        (dict(slot_mapping=torch.arange(10)[::2]), "slot_mapping must be contiguous"),
    ],
)
def test_store_kvcache_rejects_bad_input(change, message):
    args = dict(
        k=torch.randn(5, 2, 64),
        v=torch.randn(5, 2, 64),
        k_cache=torch.zeros(4, 16, 2, 64),
        v_cache=torch.zeros(4, 16, 2, 64),
        slot_mapping=torch.arange(5),
    )
    args.update(change)
    with pytest.raises(ValueError, match=message):
        store_kvcache(**args)
