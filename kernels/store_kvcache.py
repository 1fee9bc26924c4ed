"""Write a step's new keys and values into the paged KV cache.

Each token ``t`` goes to slot ``slot_mapping[t] = block * block_size + offset`` of the cache
``[num_blocks, block_size, num_kv_heads, head_dim]``; a negative slot means "skip" (padding
tokens of a CUDA-graph batch). One program writes all heads of one token, so the grid is the
token count and nothing else depends on the batch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import (
    ATTN_DTYPES,
    check_dim,
    check_dtype,
    check_kernel_tensors,
    next_power_of_2,
)

_OP = "store_kvcache"


@triton.jit
def _store_kvcache_kernel(
    k_ptr,  # [num_tokens, num_kv_heads, head_dim]
    v_ptr,  # [num_tokens, num_kv_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping_ptr,  # [num_tokens] int32/int64, block * block_size + offset, < 0 = skip
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_kcb,
    stride_kct,
    stride_kch,
    stride_vcb,
    stride_vct,
    stride_vch,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # tokens per KV-cache block
    BLOCK_H: tl.constexpr,  # next power of 2 >= NUM_KV_HEADS
    BLOCK_D: tl.constexpr,  # next power of 2 >= HEAD_DIM
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < NUM_KV_HEADS) & (offs_d[None, :] < HEAD_DIM)
    token64 = token.to(tl.int64)
    k = tl.load(k_ptr + token64 * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(v_ptr + token64 * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    k_dst = k_cache_ptr + block * stride_kcb + offset * stride_kct + offs_h[:, None] * stride_kch + offs_d[None, :]
    v_dst = v_cache_ptr + block * stride_vcb + offset * stride_vct + offs_h[:, None] * stride_vch + offs_d[None, :]
    tl.store(k_dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def _check(k, v, k_cache, v_cache, slot_mapping) -> None:
    check_dim(_OP, "k", k, 3, "[num_tokens, num_kv_heads, head_dim]")
    check_dim(_OP, "v", v, 3, "[num_tokens, num_kv_heads, head_dim]")
    check_dim(_OP, "k_cache", k_cache, 4, "[num_blocks, block_size, num_kv_heads, head_dim]")
    check_dim(_OP, "v_cache", v_cache, 4, "[num_blocks, block_size, num_kv_heads, head_dim]")
    check_dim(_OP, "slot_mapping", slot_mapping, 1, "[num_tokens]")
    if v.shape != k.shape:
        raise ValueError(f"{_OP}: v shape {tuple(v.shape)} != k shape {tuple(k.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"{_OP}: v_cache shape {tuple(v_cache.shape)} != k_cache shape {tuple(k_cache.shape)}")
    if k.shape[1:] != k_cache.shape[2:]:
        raise ValueError(
            f"{_OP}: k is [num_tokens, num_kv_heads, head_dim] = {tuple(k.shape)} but k_cache "
            f"{tuple(k_cache.shape)} has (num_kv_heads, head_dim) = {tuple(k_cache.shape[2:])}"
        )
    if slot_mapping.shape[0] != k.shape[0]:
        raise ValueError(f"{_OP}: slot_mapping has {slot_mapping.shape[0]} entries for {k.shape[0]} tokens")
    check_dtype(_OP, "slot_mapping", slot_mapping, (torch.int32, torch.int64))
    check_dtype(_OP, "k_cache", k_cache, ATTN_DTYPES)
    if v_cache.dtype != k_cache.dtype:
        raise ValueError(f"{_OP}: v_cache dtype {v_cache.dtype} != k_cache dtype {k_cache.dtype}")
    check_dtype(_OP, "k", k, ATTN_DTYPES)
    check_dtype(_OP, "v", v, ATTN_DTYPES)


def store_kvcache(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write ``k``/``v`` into ``k_cache``/``v_cache`` in place at ``slot_mapping``.

    Args:
        k, v: ``[num_tokens, num_kv_heads, head_dim]``; may be strided views (e.g. slices of a fused
            qkv projection) as long as the last dim is contiguous.
        k_cache, v_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]``, last dim contiguous.
        slot_mapping: int32/int64 ``[num_tokens]``; ``block * block_size + offset``; negative skips.
    """
    _check(k, v, k_cache, v_cache, slot_mapping)
    check_kernel_tensors(_OP, {"k": k, "v": v, "k_cache": k_cache, "v_cache": v_cache, "slot_mapping": slot_mapping},
                         vectors=("slot_mapping",))
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    _store_kvcache_kernel[(num_tokens,)](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=k_cache.shape[1],
        BLOCK_H=next_power_of_2(num_kv_heads),
        BLOCK_D=next_power_of_2(head_dim),
        num_warps=4 if num_kv_heads * head_dim >= 1024 else 1,
    )


def store_kvcache_ref(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Plain-torch :func:`store_kvcache` (same arguments, same in-place effect)."""
    _check(k, v, k_cache, v_cache, slot_mapping)
    block_size = k_cache.shape[1]
    slots = slot_mapping.long()
    keep = slots >= 0
    if not bool(keep.all()):
        slots, k, v = slots[keep], k[keep], v[keep]
    if slots.numel() == 0:
        return
    blocks, offsets = slots // block_size, slots % block_size
    # Advanced indexing on the two leading dims works for any cache strides (no flatten/view needed).
    k_cache[blocks, offsets] = k.to(k_cache.dtype)
    v_cache[blocks, offsets] = v.to(v_cache.dtype)
