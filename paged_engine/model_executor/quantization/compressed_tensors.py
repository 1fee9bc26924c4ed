"""compressed-tensors checkpoints (llm-compressor): `quant_method: compressed-tensors`.

config.json's `quantization_config` holds `config_groups` (each: `targets`, `weights`,
`input_activations`, optionally its own `format`), an `ignore` list and a `format`. A module's
scheme is the first group whose targets name it ("Linear", an exact module name, or `re:` and a
regular expression) unless `ignore` names it. Two formats run here:

- `pack-quantized`, integer weight-only (W4A16, W8A16), `group` or `channel` strategy, symmetric or
  with zero points, act-order: per module `weight_packed` int32 `[out, in / (32 / bits)]` (values
  stored as the signed integer + 2**(bits - 1), lowest bits first), `weight_scale`
  `[out, groups]`, `weight_zero_point` int32 `[out / (32 / bits), groups]` (packed along the
  output axis, asymmetric only), `weight_g_idx` `[in]` (act-order), `weight_shape` `[2]`.
- `float-quantized` FP8 (W8A8 with dynamic per-token, dynamic per-tensor, static per-tensor or
  per-group activation scales, or weight-only): `weight` e4m3 `[out, in]`, `weight_scale`
  (`tensor`: one value, `channel`: `[out, 1]`, `block`: `[ceil(out / b0), ceil(in / b1)]`),
  `input_scale` (static activations).

Anything else (other bit widths, int8 activations, NVFP4/MXFP4, sparsity, a quantized KV cache,
checkpoints not in the compressed state) is refused by name when the config is read.
"""

from __future__ import annotations

import re

import torch

from paged_engine.model_executor.quantization.base import (
    LinearMethodBase,
    QuantizationConfig,
    same_for_all_shards,
)
from paged_engine.model_executor.quantization.fp8 import Fp8LinearMethod
from paged_engine.model_executor.quantization.wna16 import (
    WNA16LinearMethod,
    WNA16Scheme,
    one_g_idx,
    unpack_int32_rows,
)

_FMT = "compressed-tensors"
_INT_FORMATS = ("pack-quantized",)
_FLOAT_FORMATS = ("float-quantized", "naive-quantized")


def _match(name: str, pattern: str, class_name: str = "Linear") -> bool:
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return pattern == name or pattern == class_name


class CompressedTensorsConfig(QuantizationConfig):
    name = _FMT

    def __init__(self, groups: list[tuple[list[str], dict, dict | None, str]], ignore: list[str]):
        self.groups = groups  # (targets, weights args, input activation args, format)
        self.ignore = ignore

    @classmethod
    def from_config(cls, quant_config: dict) -> "CompressedTensorsConfig":
        status = quant_config.get("quantization_status", "compressed")
        if status != "compressed":
            raise ValueError(f"{_FMT}: quantization_status {status!r} is not supported: only checkpoints "
                             "saved compressed (quantization_status 'compressed') run here")
        if quant_config.get("kv_cache_scheme"):
            raise ValueError(f"{_FMT}: a quantized KV cache (kv_cache_scheme) is not supported")
        sparsity = quant_config.get("sparsity_config") or {}
        if sparsity and sparsity.get("format", "dense") != "dense":
            raise ValueError(f"{_FMT}: sparse checkpoints (sparsity format {sparsity.get('format')!r}) "
                             "are not supported")
        if quant_config.get("transform_config"):
            raise ValueError(f"{_FMT}: transformed checkpoints (transform_config, e.g. QuIP/SpinQuant "
                             "rotations) are not supported")
        default_format = quant_config.get("format")
        groups = []
        for group_name, group in (quant_config.get("config_groups") or {}).items():
            fmt = group.get("format") or default_format
            weights, acts = group.get("weights"), group.get("input_activations")
            if group.get("output_activations"):
                raise ValueError(f"{_FMT}: {group_name}: output activation quantization is not supported")
            if weights is None:
                raise ValueError(f"{_FMT}: {group_name}: activation-only quantization is not supported")
            _scheme_kind(group_name, weights, acts, fmt)  # refuse what cannot run, now
            targets = group.get("targets") or []
            groups.append((list(targets), weights, acts, fmt))
        if not groups:
            raise ValueError(f"{_FMT}: quantization_config has no config_groups")
        return cls(groups, list(quant_config.get("ignore") or []))

    def _scheme_of(self, name: str):
        if any(_match(name, pattern) for pattern in self.ignore):
            return None
        for index, (targets, weights, acts, fmt) in enumerate(self.groups):
            if any(_match(name, target) for target in targets):
                return index
        return None

    def get_quant_method(self, layer, prefix: str) -> LinearMethodBase | None:
        index = same_for_all_shards(layer, prefix, self._scheme_of, _FMT)
        if index is None:
            return None
        targets, weights, acts, fmt = self.groups[index]
        kind = _scheme_kind(f"config group {index}", weights, acts, fmt)
        if kind == "wna16":
            return CompressedTensorsWNA16Method(_wna16_scheme(weights))
        strategy = weights.get("strategy")
        block = weights.get("block_structure") if strategy == "block" else None
        return CompressedTensorsFp8Method(strategy, block, *_fp8_activation(acts))


def _scheme_kind(where: str, weights: dict, acts: dict | None, fmt: str | None) -> str:
    """"wna16" or "fp8" for a scheme this engine runs; ValueError naming the problem otherwise."""
    wtype, bits, strategy = weights.get("type", "int"), weights.get("num_bits"), weights.get("strategy")
    if wtype == "int":
        if acts is not None:
            raise ValueError(f"{_FMT}: {where}: integer activation quantization (W{bits}A{acts.get('num_bits')} "
                             "int) is not supported; weight-only integer schemes (W4A16, W8A16) are")
        if fmt not in _INT_FORMATS:
            raise ValueError(f"{_FMT}: {where}: integer weights in format {fmt!r} are not supported "
                             f"(supported: {', '.join(_INT_FORMATS)})")
        if bits not in (4, 8):
            raise ValueError(f"{_FMT}: {where}: {bits}-bit integer weights are not supported (4 and 8 are)")
        if strategy not in ("group", "channel"):
            raise ValueError(f"{_FMT}: {where}: integer weight strategy {strategy!r} is not supported "
                             "(group and channel are)")
        if weights.get("dynamic"):
            raise ValueError(f"{_FMT}: {where}: dynamic weight quantization is not supported")
        return "wna16"
    if wtype == "float":
        if bits != 8 or fmt not in _FLOAT_FORMATS:
            raise ValueError(f"{_FMT}: {where}: float weights of {bits} bits in format {fmt!r} are not "
                             "supported (FP8 e4m3 in float-quantized is; NVFP4/MXFP4 are not)")
        if strategy not in ("tensor", "channel", "block"):
            raise ValueError(f"{_FMT}: {where}: FP8 weight strategy {strategy!r} is not supported "
                             "(tensor, channel and block are)")
        if strategy == "block":
            block = weights.get("block_structure")
            if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(int(b) > 0 for b in block)):
                raise ValueError(f"{_FMT}: {where}: block strategy needs block_structure [rows, cols], got {block!r}")
        _fp8_activation(acts, where)
        return "fp8"
    raise ValueError(f"{_FMT}: {where}: weight type {wtype!r} is not supported")


def _wna16_scheme(weights: dict) -> WNA16Scheme:
    strategy = weights.get("strategy")
    group_size = int(weights["group_size"]) if strategy == "group" else None
    actorder = weights.get("actorder")
    return WNA16Scheme(bits=int(weights["num_bits"]), group_size=group_size,
                       symmetric=bool(weights.get("symmetric", True)),
                       act_order=strategy == "group" and actorder == "group")


def _fp8_activation(acts: dict | None, where: str = "") -> tuple[str | None, int | None]:
    """(activation quantization of fp8_gemm, its group size) of an `input_activations` entry."""
    if acts is None:
        return None, None
    if acts.get("type", "float") != "float" or acts.get("num_bits") != 8:
        raise ValueError(f"{_FMT}: {where}: FP8 weights with {acts.get('num_bits')}-bit "
                         f"{acts.get('type')} activations are not supported")
    strategy, dynamic = acts.get("strategy"), acts.get("dynamic")
    if dynamic and strategy == "token":
        return "token", None
    if dynamic and strategy == "tensor":
        return "tensor", None
    if dynamic and strategy == "group":
        return "group", int(acts["group_size"])
    if not dynamic and strategy == "tensor":
        return "static", None
    raise ValueError(f"{_FMT}: {where}: FP8 activation quantization {strategy!r} "
                     f"({'dynamic' if dynamic else 'static'}) is not supported")


class CompressedTensorsWNA16Method(WNA16LinearMethod):
    """pack-quantized integer weights (see the module docstring for the tensors)."""

    format_name = f"{_FMT} pack-quantized"

    def create_weights(self, layer) -> None:
        K, N = layer.input_size_per_partition, layer.output_size_per_partition
        pack = 32 // self.bits
        if K % pack:
            raise ValueError(f"{self.format_name}: {K} input features are not a multiple of {pack}")
        split_input = 1 if self.scales_split_input(layer) else None
        groups = self.num_groups(layer)
        num_shards = len(layer.output_partition_sizes)
        layer.register_weight("weight_packed", torch.empty(N, K // pack, dtype=torch.int32),
                              output_dim=0, input_dim=1, packed_dim=1, packed_factor=pack)
        layer.register_weight("weight_scale", torch.empty(N, groups, dtype=torch.float32),
                              output_dim=0, input_dim=split_input)
        if not self.scheme.symmetric:
            layer.register_weight("weight_zero_point", torch.empty(N // pack, groups, dtype=torch.int32),
                                  output_dim=0, input_dim=split_input, packed_dim=0, packed_factor=pack)
        if self.scheme.act_order:
            if layer.shard_ids:  # column-parallel: the input is whole on every rank
                layer.register_weight("weight_g_idx", torch.empty(num_shards, K, dtype=torch.int32),
                                      shard_indexed=True)
            else:
                layer.register_weight("weight_g_idx", torch.empty(K, dtype=torch.int32), input_dim=0)
        layer.register_weight("weight_shape", torch.empty(num_shards, 2, dtype=torch.int64),
                              shard_indexed=True, optional=True)

    def unpack(self, layer):
        _check_weight_shapes(layer, self.format_name)
        values = unpack_int32_rows(layer.weight_packed.data, self.bits).t()  # [K, N]
        scales = layer.weight_scale.data.t()
        zeros = None
        if not self.scheme.symmetric:
            zeros = unpack_int32_rows(layer.weight_zero_point.data.t().contiguous(), self.bits)  # [groups, N]
        g_idx = None
        if self.scheme.act_order:
            g_idx = one_g_idx(layer.weight_g_idx.data, self.format_name)
        return values, scales, zeros, g_idx


def _check_weight_shapes(layer, fmt: str) -> None:
    """`weight_shape` of each shard (when the checkpoint has it) is the layer's shard, unsplit."""
    param = getattr(layer, "weight_shape", None)
    if param is None or not getattr(param, "loaded_from_checkpoint", True):
        return
    tp = layer.tp_size
    for index, rows in enumerate(layer.output_partition_sizes):
        rows_total = rows if layer.tp_size == 1 else None
        in_total = layer.input_size
        got = tuple(int(v) for v in param.data[index])
        if got[1] != in_total or (rows_total is not None and got[0] != rows_total):
            raise ValueError(f"{fmt}: weight_shape {got} of shard {index} does not match the layer "
                             f"({rows} output features x {layer.input_size_per_partition} inputs per rank, "
                             f"tensor parallelism {tp})")


class CompressedTensorsFp8Method(Fp8LinearMethod):
    """float-quantized FP8 weights: `weight`, `weight_scale`, `input_scale` (static)."""

    format_name = f"{_FMT} float-quantized"
