"""Attention metadata (one context object per forward) and the paged attention layer.

The model runner builds an `AttentionMetadata` for each step and makes it current with
`forward_context(...)`; every `PagedAttention` layer reads it from there, so model code keeps the
signature `forward(input_ids, positions)` (nano-vllm `utils/context.py`).

Token layout of a step: the sequences with exactly one query token (decodes, or a one-token
prefill chunk) come first, then the multi-token prefill chunks. Each layer stores the new K/V into
the paged cache, then runs decode attention over the first `num_decode_seqs` sequences and prefill
attention over the rest. On CUDA these are the Triton kernels of `kernels/`; elsewhere their
plain-torch `*_ref`.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from kernels import (
    paged_decode_attention,
    paged_decode_attention_ref,
    paged_prefill_attention,
    paged_prefill_attention_ref,
    store_kvcache,
    store_kvcache_ref,
)


@dataclass
class AttentionMetadata:
    """Everything attention needs to know about the batch of one forward.

    Sequences are ordered decodes first (one query token each), then prefill chunks.
    """

    slot_mapping: torch.Tensor  # int64 [num_tokens]: cache slot of each token (block*block_size+offset), -1 = skip
    block_tables: torch.Tensor  # int32 [num_seqs, max_blocks_per_seq]: physical block ids
    context_lens: torch.Tensor  # int32 [num_seqs]: tokens in cache once this step's K/V is stored
    cu_seqlens_q: torch.Tensor  # int32 [num_seqs + 1]: query token offsets, all sequences
    num_decode_seqs: int  # the first num_decode_seqs sequences have one query token each
    max_seqlen_q: int
    # cu_seqlens_q of the prefill part alone (starts at 0): int32 [num_prefill_seqs + 1], or None
    prefill_cu_seqlens_q: torch.Tensor | None = None

    @property
    def num_seqs(self) -> int:
        return self.context_lens.shape[0]

    @property
    def is_decode(self) -> bool:
        """True when every sequence has exactly one query token."""
        return self.num_decode_seqs == self.num_seqs


_current: AttentionMetadata | None = None

# Tests set this (with TRITON_INTERPRET=1) to run the Triton launchers on CPU tensors, so the exact
# calls the engine makes on CUDA are exercised without a GPU.
TRITON_ON_CPU = False


def use_triton(t: torch.Tensor) -> bool:
    """Whether ops on `t` go to the Triton launchers (CUDA) or to their plain-torch `*_ref`."""
    return t.is_cuda or TRITON_ON_CPU


@contextmanager
def forward_context(metadata: AttentionMetadata):
    """Make `metadata` the attention metadata of the forward run inside the `with` block."""
    global _current
    previous, _current = _current, metadata
    try:
        yield metadata
    finally:
        _current = previous


def get_forward_context() -> AttentionMetadata:
    if _current is None:
        raise RuntimeError("attention ran outside forward_context(); the model runner sets it")
    return _current


class PagedAttention(nn.Module):
    """Store K/V of this step into the paged cache, then attend over the cache.

    The model runner assigns `k_cache` / `v_cache` ([num_blocks, block_size, num_kv_heads,
    head_dim] each) after allocating the KV cache.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, num_heads, head_dim], k/v [T, num_kv_heads, head_dim] -> [T, num_heads, head_dim]."""
        md = get_forward_context()
        if self.k_cache is None or self.v_cache is None:
            raise RuntimeError("PagedAttention has no KV cache; the model runner allocates it")
        k_cache, v_cache = self.k_cache, self.v_cache
        kernels_on = use_triton(q)  # Triton launchers (CUDA) or the plain-torch *_ref
        if kernels_on:
            store_kvcache(k, v, k_cache, v_cache, md.slot_mapping)
        else:
            store_kvcache_ref(k, v, k_cache, v_cache, md.slot_mapping)

        num_decode = md.num_decode_seqs  # == number of decode query tokens
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        if num_decode > 0:
            q_dec = q[:num_decode]
            tables, lens = md.block_tables[:num_decode], md.context_lens[:num_decode]
            if kernels_on:
                paged_decode_attention(
                    q_dec, k_cache, v_cache, tables, lens, self.scale,
                    out=out[:num_decode],
                )
            else:
                out[:num_decode] = paged_decode_attention_ref(
                    q_dec, k_cache, v_cache, tables, lens, self.scale
                )
        if num_decode < md.num_seqs:
            q_pre = q[num_decode:]
            tables, lens = md.block_tables[num_decode:], md.context_lens[num_decode:]
            if kernels_on:
                paged_prefill_attention(
                    q_pre, k_cache, v_cache, tables, md.prefill_cu_seqlens_q, lens, self.scale,
                    out=out[num_decode:], max_seqlen_q=md.max_seqlen_q,  # host-known: no device read
                )
            else:
                out[num_decode:] = paged_prefill_attention_ref(
                    q_pre, k_cache, v_cache, tables, md.prefill_cu_seqlens_q, lens, self.scale
                )
        return out
