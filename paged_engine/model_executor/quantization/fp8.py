"""FP8 (e4m3) linears: `quant_method: fp8` checkpoints, online FP8, and the layout every FP8 format loads into.

`quant_method: fp8` is written two ways:
- transformers' fine-grained FP8 (DeepSeek-V3, Qwen3-FP8): `weight_block_size: [128, 128]`,
  per module `weight` e4m3 `[out, in]` and `weight_scale_inv` `[ceil(out / 128), ceil(in / 128)]`
  (despite the name, the factor that dequantizes: `w = weight * weight_scale_inv`), activations
  quantized dynamically per token and 128 input features;
- AutoFP8 / vLLM's per-tensor FP8: `weight` and a scalar `weight_scale` per module, plus a scalar
  `input_scale` with `activation_scheme: static` (else activations are quantized per token).
`modules_to_not_convert` / `ignored_layers` name modules left unquantized.

`Fp8Config.online()` (the `quantization="fp8"` engine argument on an unquantized checkpoint)
loads the dense weights and quantizes each output channel to FP8 while loading.

After loading, every FP8 method holds `weight` e4m3 `[N, K]` and an fp32 scale per output row
(`[N]`; fused per-tensor shards are expanded to their rows, exactly) or per row and block of K
(`[N, ceil(K / block_k)]`), and computes with `ops.fp8_gemm`. On CPU the weight is dequantized
once at load (`base.dense_on_this_device`); activations are still rounded through FP8 there so
that CPU and GPU compute the same thing.
"""

from __future__ import annotations

import torch

from paged_engine.model_executor.quantization.base import (
    LinearMethodBase,
    QuantizationConfig,
    dense_on_this_device,
    same_for_all_shards,
)
from paged_triton.kernels import ops
from paged_triton.kernels.fp8_gemm import FP8_DTYPE, FP8_MAX, dequantize_fp8_weight, fake_quant_linear

_FMT = "fp8"


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class Fp8LinearMethod(LinearMethodBase):
    """FP8 weights with a per-tensor, per-channel or block-wise scale.

    Args:
        strategy: "tensor", "channel" or "block" (of the weight scale).
        block: (rows, cols) of a weight block, for "block".
        activation: fp8_gemm's activation quantization ("token", "tensor", "static", "group" or None).
        activation_group: input features per activation scale, for "group".
        scale_name: the checkpoint's name of the weight scale.
        online: the checkpoint is dense; quantize per channel while loading.
    """

    format_name = _FMT

    def __init__(self, strategy: str, block=None, activation: str | None = "token",
                 activation_group: int | None = None, scale_name: str = "weight_scale", online: bool = False):
        self.strategy = strategy
        self.block = tuple(int(b) for b in block) if block is not None else None
        self.activation = activation
        self.activation_group = activation_group
        self.scale_name = scale_name
        self.online = online

    def create_weights(self, layer) -> None:
        K, N = layer.input_size_per_partition, layer.output_size_per_partition
        sizes = layer.output_partition_sizes
        if self.online:
            layer.register_weight("weight", torch.empty(N, K, dtype=layer.params_dtype), output_dim=0, input_dim=1)
            return
        layer.register_weight("weight", torch.empty(N, K, dtype=FP8_DTYPE), output_dim=0, input_dim=1)
        if self.strategy == "tensor":
            layer.register_weight(self.scale_name, torch.empty(len(sizes), dtype=torch.float32),
                                  shard_indexed=True)
        elif self.strategy == "channel":
            layer.register_weight(self.scale_name, torch.empty(N, 1, dtype=torch.float32), output_dim=0)
        elif self.strategy == "block":
            block_n, block_k = self.block
            if layer.tp_size > 1 and (any(s % block_n for s in sizes) or K % block_k):
                raise ValueError(f"{self.format_name}: with tensor parallelism {layer.tp_size}, each rank's "
                                 f"output shards {sizes} and {K} inputs must be whole {self.block} blocks")
            rows = sum(_cdiv(s, block_n) for s in sizes)
            layer.register_weight(self.scale_name, torch.empty(rows, _cdiv(K, block_k), dtype=torch.float32),
                                  output_dim=0, input_dim=1, block_dim=0, block_size=block_n)
        else:
            raise ValueError(f"{self.format_name}: weight scale strategy {self.strategy!r} is not supported")
        if self.activation == "static":
            layer.register_weight("input_scale", torch.empty(len(sizes), dtype=torch.float32), shard_indexed=True)

    def _row_scales(self, layer) -> tuple[torch.Tensor, int | None]:
        """The loaded weight scale as one fp32 row per output feature, and the block of K (or None)."""
        sizes = layer.output_partition_sizes
        scale = getattr(layer, self.scale_name).data.float()
        if self.strategy == "tensor":
            return torch.cat([scale[i].expand(s) for i, s in enumerate(sizes)]), None
        if self.strategy == "channel":
            return scale.reshape(-1), None
        block_n, block_k = self.block
        rows, first = [], 0
        for s in sizes:
            blocks = _cdiv(s, block_n)
            rows.append(scale[first:first + blocks].repeat_interleave(block_n, dim=0)[:s])
            first += blocks
        return torch.cat(rows), block_k

    def process_weights_after_loading(self, layer) -> None:
        if self.online:
            w = layer.weight.data.float()
            row_scale = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=1e-12)
            weight = (w / row_scale.unsqueeze(1)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
            block_k = None
        else:
            weight = layer.weight.data
            row_scale, block_k = self._row_scales(layer)
        input_scale = None
        if self.activation == "static":
            # One matmul for the fused shards: the largest of their scales (vLLM does the same).
            input_scale = layer.input_scale.data.float().max().reshape(1)
        if not torch.isfinite(row_scale).all():
            raise ValueError(f"{self.format_name} {type(layer).__name__}: weight scales are not finite")
        for name in list(layer._quant_params):
            delattr(layer, name)
        layer._quant_params = []
        self.weight_block_k = block_k
        self.scalar_weight_scale = bool((row_scale == row_scale[0]).all()) if row_scale.numel() else True
        layer.input_scale = None if input_scale is None else torch.nn.Parameter(input_scale, requires_grad=False)
        self.dense = dense_on_this_device(weight)
        if self.dense:
            dense = dequantize_fp8_weight(weight, row_scale, block_k, layer.params_dtype)
            layer.weight = torch.nn.Parameter(dense, requires_grad=False)
            return
        layer.weight = torch.nn.Parameter(weight.contiguous(), requires_grad=False)
        layer.weight_scale = torch.nn.Parameter(row_scale.contiguous(), requires_grad=False)

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.dense:
            out = fake_quant_linear(x, layer.weight, self.activation, layer.input_scale, self.activation_group)
        else:
            out = ops.fp8_gemm(x, layer.weight, layer.weight_scale, weight_block_k=self.weight_block_k,
                               activation=self.activation, input_scale=layer.input_scale,
                               activation_group=self.activation_group,
                               scalar_weight_scale=self.scalar_weight_scale)
        return out if bias is None else out + bias


class Fp8Config(QuantizationConfig):
    """`quant_method: fp8` (see the module docstring), or online FP8 of a dense checkpoint."""

    name = _FMT

    def __init__(self, block: tuple[int, int] | None, static_activations: bool, ignored: list[str],
                 online: bool = False):
        self.block = block
        self.static_activations = static_activations
        self.ignored = ignored
        self.online = online

    @classmethod
    def online(cls) -> "Fp8Config":
        return cls(None, False, [], online=True)

    @classmethod
    def from_config(cls, quant_config: dict) -> "Fp8Config":
        fmt = str(quant_config.get("fmt", "e4m3")).lower()
        if fmt != "e4m3":
            raise ValueError(f"{_FMT}: FP8 format {fmt!r} is not supported (e4m3 is)")
        scheme = str(quant_config.get("activation_scheme", "dynamic")).lower()
        if scheme not in ("dynamic", "static"):
            raise ValueError(f"{_FMT}: activation_scheme {scheme!r} is not supported (dynamic, static)")
        block = quant_config.get("weight_block_size")
        if block is not None:
            if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(int(b) > 0 for b in block)):
                raise ValueError(f"{_FMT}: weight_block_size must be [rows, cols], got {block!r}")
            if scheme == "static":
                raise ValueError(f"{_FMT}: static activation scales with block-wise weights are not supported")
            block = (int(block[0]), int(block[1]))
        ignored = list(quant_config.get("modules_to_not_convert") or []) + list(
            quant_config.get("ignored_layers") or [])
        return cls(block, scheme == "static", ignored)

    def _skipped(self, name: str) -> bool:
        return any(name == m or name.startswith(m + ".") or name.endswith("." + m) or f".{m}." in f".{name}."
                   for m in self.ignored)

    def get_quant_method(self, layer, prefix: str) -> LinearMethodBase | None:
        if self.online:
            return Fp8LinearMethod("channel", activation="token", online=True)
        if same_for_all_shards(layer, prefix, self._skipped, _FMT):
            return None
        if self.block is not None:
            return Fp8LinearMethod("block", self.block, activation="group", activation_group=self.block[1],
                                   scale_name="weight_scale_inv")
        return Fp8LinearMethod("tensor", activation="static" if self.static_activations else "token")

