"""Attention metadata: one context object per forward, so model code keeps `forward(input_ids, positions)`.

The model runner builds an `AttentionMetadata` for each step and makes it current with
`forward_context(...)`; every attention layer reads it with `get_forward_context()` (nano-vllm
`utils/context.py`). The current context is a context variable, so two engines stepping on two
threads never see each other's batch.

Token layout of a step: the sequences with exactly one query token (decodes, or a one-token
prefill chunk) come first, then the multi-token prefill chunks.
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch


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
    # Scratch of this forward, where an op keeps what every layer would rebuild the same way from
    # this batch (the CPU attention's masks); it lives and dies with the metadata.
    op_cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_seqs(self) -> int:
        return self.context_lens.shape[0]

    @property
    def is_decode(self) -> bool:
        """True when every sequence has exactly one query token."""
        return self.num_decode_seqs == self.num_seqs


_current: contextvars.ContextVar[AttentionMetadata | None] = contextvars.ContextVar(
    "paged_engine_forward_context", default=None)


@contextmanager
def forward_context(metadata: AttentionMetadata):
    """Make `metadata` the attention metadata of the forward run inside the `with` block."""
    token = _current.set(metadata)
    try:
        yield metadata
    finally:
        _current.reset(token)


def get_forward_context() -> AttentionMetadata:
    metadata = _current.get()
    if metadata is None:
        raise RuntimeError("attention ran outside forward_context(); the model runner sets it")
    return metadata
