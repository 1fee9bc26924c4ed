"""What a quantization method is: it creates a linear layer's parameters and computes with them.

A `QuantizationConfig` is read from a checkpoint's `quantization_config`; the loader asks it for
the method of every linear layer (`get_quant_method(layer, prefix)`; None keeps the layer
unquantized, e.g. an `ignore`d `lm_head`) and installs it with `layer.set_quant_method(...)`
before any weight is loaded. The method registers its parameters through
`layer.register_weight`, which attaches the layer's `weight_loader`, so fused (qkv, gate_up) and
tensor-parallel slicing work for packed weights too: the parameter's `output_dim`, `input_dim`
and `packed_dim` / `packed_factor` tell the loader which axis is which.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from paged_triton.kernels import cpu_linear as _cpu_linear
from paged_triton.kernels import ops

if TYPE_CHECKING:
    from paged_engine.model_executor.layers.linear import LinearBase


CPU_WEIGHTS_ENV = "PAGED_TRITON_CPU_QUANT_WEIGHTS"


def cpu_keeps_packed() -> bool:
    """Whether CPU layers keep quantized weights packed (dequantized on every call) rather than
    dequantized once at load (the default: a dense matmul was measured faster than dequantizing
    per call, benchmarks/quant.py and RESULTS.md). `PAGED_TRITON_CPU_QUANT_WEIGHTS=packed` keeps
    them packed, for memory."""
    value = os.environ.get(CPU_WEIGHTS_ENV, "dense").strip().lower()
    if value not in ("dense", "packed"):
        raise ValueError(f"{CPU_WEIGHTS_ENV} must be 'dense' or 'packed', got {value!r}")
    return value == "packed"


def dense_on_this_device(tensor: torch.Tensor) -> bool:
    """Whether a layer holding `tensor` dequantizes at load: on CPU outside the Triton interpreter
    (`ops.use_triton`), unless `cpu_keeps_packed()`. GPU layers always keep their weights packed."""
    return tensor.device.type == "cpu" and not ops.use_triton(tensor) and not cpu_keeps_packed()


class LinearMethodBase:
    """Creates, post-processes and applies the weights of one linear layer."""

    def create_weights(self, layer: "LinearBase") -> None:
        raise NotImplementedError

    def process_weights_after_loading(self, layer: "LinearBase") -> None:
        """Repack or convert the loaded weights once (e.g. for a kernel's layout)."""

    def apply(self, layer: "LinearBase", x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError


class UnquantizedLinearMethod(LinearMethodBase):
    """A dense weight [out, in] in the model dtype."""

    def create_weights(self, layer: "LinearBase") -> None:
        weight = torch.empty(sum(layer.output_partition_sizes), layer.input_size_per_partition)
        layer.register_weight("weight", weight, output_dim=0, input_dim=1)

    def process_weights_after_loading(self, layer) -> None:
        # CPU: the weight packed once into oneDNN's layout (kernels/cpu_linear.py); None elsewhere.
        layer.cpu_packed_weight = _cpu_linear.pack_weight(layer.weight) if not ops.use_triton(layer.weight) else None

    def apply(self, layer, x, bias):
        packed = getattr(layer, "cpu_packed_weight", None)
        if packed is not None and x.dim() == 2 and x.dtype == packed.dtype and x.device.type == "cpu":
            return _cpu_linear.linear_packed(x, packed, bias)
        return F.linear(x, layer.weight, bias)


def checkpoint_names(layer: "LinearBase", prefix: str) -> list[str]:
    """The checkpoint module names a layer loads (its fused shards'), set by the loader."""
    return list(getattr(layer, "checkpoint_names", None) or [prefix])


def same_for_all_shards(layer: "LinearBase", prefix: str, pick, fmt: str):
    """`pick(checkpoint_name)` for every checkpoint module of a (fused) layer, which must agree:
    one fused matmul cannot mix schemes (e.g. q_proj quantized, v_proj not)."""
    names = checkpoint_names(layer, prefix)
    values = [pick(name) for name in names]
    if any(v != values[0] for v in values[1:]):
        detail = ", ".join(f"{n}: {v}" for n, v in zip(names, values))
        raise ValueError(f"{fmt}: the modules fused into {prefix} are quantized differently ({detail}); "
                         "this engine runs them as one matmul and needs one scheme")
    return values[0]


class QuantizationConfig:
    """A checkpoint's quantization scheme (subclasses: one per format)."""

    name: str = ""

    @classmethod
    def from_config(cls, quant_config: dict) -> "QuantizationConfig":
        raise NotImplementedError

    def get_quant_method(self, layer: "LinearBase", prefix: str) -> LinearMethodBase | None:
        """The method for the linear layer named `prefix`, or None to leave it unquantized."""
        raise NotImplementedError
