"""Token embedding and LM head, with the vocabulary split over tensor-parallel ranks.

Each rank holds a contiguous range of `ceil(vocab / tp)` rows (the last range padded). The
embedding looks up the ids in its range, zeros the others and sums over ranks; the LM head
computes its range's logits and gathers them to rank 0, which samples (the other ranks get None).
With one rank both are a plain lookup and matmul.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from paged_engine.distributed.parallel_state import (
    get_tp_group,
    tensor_model_parallel_all_reduce,
    tensor_model_parallel_gather,
)


class VocabParallelEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.num_embeddings = num_embeddings
        self.tp_group = get_tp_group()
        self.tp_rank, self.tp_size = self.tp_group.rank, self.tp_group.size
        self.num_embeddings_per_partition = -(-num_embeddings // self.tp_size)
        self.vocab_start = self.tp_rank * self.num_embeddings_per_partition
        self.vocab_end = min(self.vocab_start + self.num_embeddings_per_partition, num_embeddings)
        self.weight = nn.Parameter(torch.empty(self.num_embeddings_per_partition, embedding_dim),
                                   requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        if shard_id is not None:
            raise ValueError(f"{type(self).__name__} has no fused shards, got shard {shard_id!r}")
        if loaded.shape[0] != self.num_embeddings or loaded.shape[1:] != param.shape[1:]:
            raise ValueError(
                f"{type(self).__name__}: checkpoint tensor has shape {tuple(loaded.shape)}, "
                f"expected ({self.num_embeddings}, {param.shape[1]})")
        rows = loaded[self.vocab_start:self.vocab_end]
        param.data[: rows.shape[0]].copy_(rows)
        param.data[rows.shape[0]:].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        in_range = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        local = torch.where(in_range, input_ids - self.vocab_start, 0)
        out = F.embedding(local, self.weight) * in_range.unsqueeze(-1).to(self.weight.dtype)
        return tensor_model_parallel_all_reduce(out, self.tp_group)


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection; `compute_logits(hidden)` -> [N, vocab] on rank 0 (the sampling
    rank), None on the other ranks."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bias: bool = False):
        super().__init__(num_embeddings, embedding_dim)
        if bias:
            raise ValueError("an LM head with a bias is not supported")

    def tie_to(self, embedding: VocabParallelEmbedding) -> None:
        """Share the embedding's weight (tie_word_embeddings); both hold the same vocab range."""
        self.weight = embedding.weight

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        logits = F.linear(hidden_states, self.weight)
        if self.tp_size == 1:
            return logits
        logits = tensor_model_parallel_gather(logits, dim=-1, tp=self.tp_group)
        return None if logits is None else logits[..., : self.num_embeddings]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.compute_logits(hidden_states)
