"""Tensor-parallel state: the group a layer is built in, and the collective ops the layers use.

Layers read their shard when they are built (`get_tp_group()`: rank, size and the
torch.distributed process group) and keep that group, so a model file never mentions
parallelism and a model built in one group keeps talking to that group whatever is built after
it in the same process (the engine's rank 0 lives in the engine process beside tp=1 models:
a draft model, tests' references). Outside `tensor_parallel(...)` / `init_tensor_parallel` a
layer is rank 0 of 1 and the collectives are no-ops.

The tensor-parallel executor (executor/multiproc_executor.py) initialises `torch.distributed`
(NCCL on GPUs, gloo on CPU) in every rank and builds each rank's model runner inside
`tensor_parallel(rank, size, group)`.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TensorParallelGroup:
    rank: int = 0
    size: int = 1
    group: object = None  # a torch.distributed ProcessGroup when size > 1 (None: the default group)


_SINGLE = TensorParallelGroup()
_group = _SINGLE


def init_tensor_parallel(rank: int, size: int, group=None) -> None:
    """Set the group that layers built from now on belong to (call before building the model)."""
    global _group
    if not 0 <= rank < size:
        raise ValueError(f"tensor-parallel rank {rank} is outside [0, {size})")
    _group = TensorParallelGroup(rank, size, group)


@contextmanager
def tensor_parallel(rank: int, size: int, group=None):
    """Build layers as `rank` of `size` inside the block; the previous group afterwards."""
    global _group
    previous = _group
    init_tensor_parallel(rank, size, group)
    try:
        yield _group
    finally:
        _group = previous


def get_tp_group() -> TensorParallelGroup:
    return _group


def get_tp_rank() -> int:
    return _group.rank


def get_tp_size() -> int:
    return _group.size


def tensor_model_parallel_all_reduce(x: torch.Tensor, tp: TensorParallelGroup | None = None) -> torch.Tensor:
    """Sum `x` over the group `tp` (default: the current one), in place; the identity with one rank."""
    tp = tp or _group
    if tp.size == 1:
        return x
    import torch.distributed as dist

    dist.all_reduce(x, group=tp.group)
    return x


def tensor_model_parallel_all_gather(x: torch.Tensor, dim: int = -1,
                                     tp: TensorParallelGroup | None = None) -> torch.Tensor:
    """Concatenate every rank's `x` along `dim` (the identity with one rank)."""
    tp = tp or _group
    if tp.size == 1:
        return x
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(tp.size)]
    dist.all_gather(parts, x.contiguous(), group=tp.group)
    return torch.cat(parts, dim=dim)


def tensor_model_parallel_gather(x: torch.Tensor, dim: int = -1,
                                 tp: TensorParallelGroup | None = None) -> torch.Tensor | None:
    """Every rank's `x` concatenated along `dim` on rank 0 (the sampling rank); None elsewhere.

    Half the traffic of an all-gather: only rank 0 needs the full logits.
    """
    tp = tp or _group
    if tp.size == 1:
        return x
    import torch.distributed as dist

    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(tp.size)] if tp.rank == 0 else None
    dst = 0 if tp.group is None else dist.get_global_rank(tp.group, 0)
    dist.gather(x, parts, dst=dst, group=tp.group)
    return torch.cat(parts, dim=dim) if tp.rank == 0 else None


def tensor_model_parallel_min(value: int, device, tp: TensorParallelGroup | None = None) -> int:
    """The smallest `value` over the group (each rank's KV-cache blocks: all must hold the same)."""
    tp = tp or _group
    if tp.size == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=tp.group)
    return int(t.item())
