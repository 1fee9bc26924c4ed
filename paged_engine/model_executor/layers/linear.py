"""Linear layers that know how to load their own weights (nano-vllm `layers/linear.py`, vLLM `linear.py`).

Every parameter carries `weight_loader(param, loaded_tensor, shard_id=None)`, set by the layer
that owns it: the loader walks the checkpoint and calls it, with no name rules of its own.

- `ReplicatedLinear`: the whole weight on every rank.
- `ColumnParallelLinear`: output features split over tensor-parallel ranks.
- `MergedColumnParallelLinear`: several column-parallel outputs in one matmul (gate_up:
  shard ids 0, 1, ...), each checkpoint tensor loaded into its slice.
- `QKVParallelLinear`: q, k, v in one matmul (shard ids "q", "k", "v"); query heads split over
  ranks, KV heads split too, or replicated when there are fewer KV heads than ranks.
  Both also take a checkpoint that stores the fused tensor itself (Phi-3's `qkv_proj`,
  `gate_up_proj`): loaded without a shard id, it is split into its shards, each loaded as above.
- `RowParallelLinear`: input features split over ranks, partial outputs summed (all-reduce).

Which tensors a layer holds is its quantization method's business (`quantization/base.py`): a
dense `weight` by default, packed integers with scales for a quantized checkpoint. The method
registers each parameter with `register_weight`, saying which axis is the output (`output_dim`),
the input (`input_dim`) and, for packed integers, which axis is packed and by how much, so the
slicing below applies to every format alike.
"""

from __future__ import annotations

import torch
from torch import nn

from paged_engine.distributed.parallel_state import (
    get_tp_group,
    get_tp_size,
    tensor_model_parallel_all_reduce,
)
from paged_engine.model_executor.quantization.base import LinearMethodBase, UnquantizedLinearMethod


def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator != 0:
        raise ValueError(f"{what} ({numerator}) is not divisible by the tensor-parallel size ({denominator})")
    return numerator // denominator


def _scaled(size: int, param: nn.Parameter, dim: int | None) -> int:
    """A size along `dim` in the parameter's own units: packed integers hold `packed_factor` values
    per element, a block-wise scale one value per `block_size` features (a partial last block too)."""
    if dim is not None and getattr(param, "packed_dim", None) == dim:
        factor = param.packed_factor
        if size % factor != 0:
            raise ValueError(f"slice of {size} elements is not a multiple of the packing factor {factor}")
        return size // factor
    if dim is not None and getattr(param, "block_dim", None) == dim:
        return -(-size // param.block_size)
    return size


def _load_shard_indexed(param: nn.Parameter, loaded: torch.Tensor, index: int, what: str) -> None:
    """A parameter whose first axis counts the fused shards (a per-tensor scale of each of q, k, v):
    the checkpoint's tensor of shard `index` (a scalar is a one-element tensor) fills that row."""
    dst = param.data[index]
    if loaded.numel() != dst.numel():
        raise ValueError(f"{what}: checkpoint tensor has shape {tuple(loaded.shape)}, the layer expects "
                         f"{tuple(dst.shape)} per shard")
    dst.copy_(loaded.reshape(dst.shape))


def _copy(param: nn.Parameter, dst: torch.Tensor, loaded: torch.Tensor, what: str) -> None:
    if tuple(dst.shape) != tuple(loaded.shape):
        raise ValueError(
            f"{what}: checkpoint tensor has shape {tuple(loaded.shape)}, the layer expects {tuple(dst.shape)}")
    dst.copy_(loaded)


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
    """Copy a whole tensor (norm weights, embeddings on one rank, ...)."""
    if shard_id is not None:
        raise ValueError(f"a parameter without a sharded layer got shard {shard_id!r}")
    _copy(param, param.data, loaded, "parameter")


class LinearBase(nn.Module):
    """y = x W^T + b, with W's storage and matmul owned by `quant_method`.

    Attributes read by quantization methods:
        input_size_per_partition: input features this rank holds.
        output_partition_sizes: output features of each fused part on this rank.
        shard_ids: the checkpoint shard ids of the fused parts (None for an unfused layer).
        checkpoint_names: the checkpoint's module name of each fused part (set by the loader
            before it asks the quantization config for the layer's method).
        params_dtype: the model dtype.
    """

    shard_ids: tuple | None = None
    splits_outputs = False  # column-parallel: the bias is split over ranks like the outputs

    def __init__(self, input_size: int, output_size: int, bias: bool,
                 input_size_per_partition: int, output_partition_sizes: list[int]):
        super().__init__()
        self.input_size = input_size
        self.output_size = output_size
        self.tp_group = get_tp_group()  # kept: the all-reduce goes to the group the layer was built in
        self.tp_rank, self.tp_size = self.tp_group.rank, self.tp_group.size
        self.input_size_per_partition = input_size_per_partition
        self.output_partition_sizes = list(output_partition_sizes)
        self.output_size_per_partition = sum(self.output_partition_sizes)
        # The model dtype (the loader builds under it as the default dtype); quantization methods
        # create integer tensors beside it and convert scales to it.
        self.params_dtype = torch.get_default_dtype()
        self._quant_params: list[str] = []
        self.quant_method: LinearMethodBase = UnquantizedLinearMethod()
        self.quant_method.create_weights(self)
        if bias:
            self.bias = nn.Parameter(torch.empty(self.output_size_per_partition), requires_grad=False)
            self._set_attrs(self.bias, output_dim=0 if self.splits_outputs else None)
        else:
            self.register_parameter("bias", None)

    # -- parameters ---------------------------------------------------------------------------

    def _set_attrs(self, param: nn.Parameter, **attrs) -> None:
        param.weight_loader = self.weight_loader
        param.shard_ids = self.shard_ids
        for key, value in attrs.items():
            setattr(param, key, value)

    def register_weight(self, name: str, tensor: torch.Tensor, *, output_dim: int | None = None,
                        input_dim: int | None = None, packed_dim: int | None = None,
                        packed_factor: int = 1, **attrs) -> nn.Parameter:
        """Register a parameter of the quantization method, loadable through this layer.

        Args:
            output_dim / input_dim: the tensor's axis along output / input features (None: the
                tensor is not split along that kind of axis, e.g. a per-tensor scale).
            packed_dim, packed_factor: the axis holding `packed_factor` values per element.
            attrs: more loading attributes: `block_dim` and `block_size` (the axis holds one
                value per `block_size` features, e.g. FP8 block scales), `shard_indexed=True`
                (axis 0 counts the fused shards, one checkpoint tensor per shard: per-tensor
                scales of q, k and v), `optional=True` (the checkpoint may omit it).
        """
        param = nn.Parameter(tensor, requires_grad=False)
        self._set_attrs(param, output_dim=output_dim, input_dim=input_dim, packed_dim=packed_dim,
                        packed_factor=packed_factor, **attrs)
        self.register_parameter(name, param)
        self._quant_params.append(name)
        return param

    def set_quant_method(self, method: LinearMethodBase) -> None:
        """Replace the weights with those of `method` (done by the loader, before loading)."""
        for name in self._quant_params:
            delattr(self, name)
        self._quant_params = []
        self.quant_method = method
        method.create_weights(self)

    # -- loading ------------------------------------------------------------------------------

    def _rank_slice(self, param: nn.Parameter, loaded: torch.Tensor, dim: int | None,
                    size: int, rank: int) -> torch.Tensor:
        """This rank's `size` rows (param units) of a checkpoint tensor along `dim`."""
        if dim is None or self.tp_size == 1:
            return loaded
        return loaded.narrow(dim, rank * size, size)

    def _load_fused(self, param: nn.Parameter, loaded: torch.Tensor, total_sizes: list[int]) -> None:
        """A fused checkpoint tensor (all shards, every rank's rows): split along the output axis
        into the shards' full sizes and load each shard through `weight_loader`."""
        dim = getattr(param, "output_dim", None)
        if dim is None:  # a per-tensor quantity: the same for every shard
            return _copy(param, param.data, loaded, f"{type(self).__name__} (fused)")
        sizes = [_scaled(s, param, dim) for s in total_sizes]
        if loaded.dim() <= dim or loaded.shape[dim] != sum(sizes):
            raise ValueError(
                f"{type(self).__name__}: fused checkpoint tensor has shape {tuple(loaded.shape)}, expected "
                f"{sum(sizes)} rows along dim {dim} (shards {dict(zip(self.shard_ids, sizes))})")
        for shard_id, piece in zip(self.shard_ids, loaded.split(sizes, dim=dim)):
            self.weight_loader(param, piece, shard_id)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        """Unfused layers: split the output axis over ranks (column) or copy (replicated)."""
        if shard_id is not None:
            raise ValueError(f"{type(self).__name__} has no fused shards, got shard {shard_id!r}")
        if getattr(param, "shard_indexed", False):
            return _load_shard_indexed(param, loaded, 0, type(self).__name__)
        dim = getattr(param, "output_dim", None)
        if dim is not None:
            loaded = self._rank_slice(param, loaded, dim, param.shape[dim], self.tp_rank)
        _copy(param, param.data, loaded, type(self).__name__)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x, self.bias)


class ReplicatedLinear(LinearBase):
    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        super().__init__(input_size, output_size, bias, input_size, [output_size])

    def weight_loader(self, param, loaded, shard_id=None):
        if shard_id is not None:
            raise ValueError(f"ReplicatedLinear has no fused shards, got shard {shard_id!r}")
        if getattr(param, "shard_indexed", False):
            return _load_shard_indexed(param, loaded, 0, "ReplicatedLinear")
        _copy(param, param.data, loaded, "ReplicatedLinear")


class ColumnParallelLinear(LinearBase):
    """Output features split over ranks; each rank's output is its slice (no communication)."""

    splits_outputs = True

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 output_sizes: list[int] | None = None):
        tp = get_tp_size()
        sizes = output_sizes or [output_size]
        super().__init__(input_size, output_size, bias, input_size,
                         [divide(s, tp, "output features") for s in sizes])


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs in one weight (gate_up_proj: shards 0, 1)."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False):
        self.shard_ids = tuple(range(len(output_sizes)))
        self.total_output_sizes = list(output_sizes)
        super().__init__(input_size, sum(output_sizes), bias, output_sizes=output_sizes)

    def weight_loader(self, param, loaded, shard_id=None):
        if shard_id is None:
            return self._load_fused(param, loaded, self.total_output_sizes)
        if getattr(param, "shard_indexed", False):
            return _load_shard_indexed(param, loaded, self.shard_ids.index(shard_id),
                                       f"{type(self).__name__} shard {shard_id}")
        dim = getattr(param, "output_dim", None)
        if dim is None:  # not split along outputs (a per-tensor quantity): the same for every shard
            return _copy(param, param.data, loaded, f"{type(self).__name__} shard {shard_id}")
        index = self.shard_ids.index(shard_id)
        sizes = [_scaled(s, param, dim) for s in self.output_partition_sizes]
        offset, size = sum(sizes[:index]), sizes[index]
        loaded = self._rank_slice(param, loaded, dim, size, self.tp_rank)
        _copy(param, param.data.narrow(dim, offset, size), loaded, f"{type(self).__name__} shard {shard_id}")


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one weight (shards "q", "k", "v").

    Attributes (this rank's): num_heads, num_kv_heads, head_dim, q_size, kv_size.
    """

    shard_ids = ("q", "k", "v")

    def __init__(self, hidden_size: int, head_dim: int, total_num_heads: int,
                 total_num_kv_heads: int, bias: bool = False):
        tp = get_tp_size()
        self.head_dim = head_dim
        self.total_num_heads, self.total_num_kv_heads = total_num_heads, total_num_kv_heads
        self.num_heads = divide(total_num_heads, tp, "attention heads")
        if tp >= total_num_kv_heads:
            # Fewer KV heads than ranks: each rank holds one KV head, shared by tp / kv ranks.
            divide(tp, total_num_kv_heads, "tensor-parallel size vs KV heads")
            self.num_kv_heads, self.num_kv_head_replicas = 1, tp // total_num_kv_heads
        else:
            self.num_kv_heads = divide(total_num_kv_heads, tp, "KV heads")
            self.num_kv_head_replicas = 1
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim
        output_size = (total_num_heads + 2 * total_num_kv_heads) * head_dim
        LinearBase.__init__(self, hidden_size, output_size, bias, hidden_size,
                            [self.q_size, self.kv_size, self.kv_size])

    def weight_loader(self, param, loaded, shard_id=None):
        if shard_id is None:
            kv = self.total_num_kv_heads * self.head_dim
            return self._load_fused(param, loaded, [self.total_num_heads * self.head_dim, kv, kv])
        if shard_id not in self.shard_ids:
            raise ValueError(f"QKVParallelLinear loads shards 'q', 'k', 'v', got {shard_id!r}")
        if getattr(param, "shard_indexed", False):
            return _load_shard_indexed(param, loaded, self.shard_ids.index(shard_id),
                                       f"QKVParallelLinear shard {shard_id}")
        dim = getattr(param, "output_dim", None)
        if dim is None:
            return _copy(param, param.data, loaded, f"QKVParallelLinear shard {shard_id}")
        index = self.shard_ids.index(shard_id)
        sizes = [_scaled(s, param, dim) for s in self.output_partition_sizes]
        offset, size = sum(sizes[:index]), sizes[index]
        rank = self.tp_rank if shard_id == "q" else self.tp_rank // self.num_kv_head_replicas
        loaded = self._rank_slice(param, loaded, dim, size, rank)
        _copy(param, param.data.narrow(dim, offset, size), loaded, f"QKVParallelLinear shard {shard_id}")


class RowParallelLinear(LinearBase):
    """Input features split over ranks; the partial products are summed over ranks, then the bias added."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        tp = get_tp_size()
        super().__init__(input_size, output_size, bias, divide(input_size, tp, "input features"),
                         [output_size])

    def weight_loader(self, param, loaded, shard_id=None):
        if shard_id is not None:
            raise ValueError(f"RowParallelLinear has no fused shards, got shard {shard_id!r}")
        if getattr(param, "shard_indexed", False):
            return _load_shard_indexed(param, loaded, 0, "RowParallelLinear")
        dim = getattr(param, "input_dim", None)
        if dim is not None:
            loaded = self._rank_slice(param, loaded, dim, param.shape[dim], self.tp_rank)
        _copy(param, param.data, loaded, "RowParallelLinear")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return self.quant_method.apply(self, x, self.bias)
        out = tensor_model_parallel_all_reduce(self.quant_method.apply(self, x, None), self.tp_group)
        return out if self.bias is None else out + self.bias
