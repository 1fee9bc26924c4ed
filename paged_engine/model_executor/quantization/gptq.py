"""AutoGPTQ / GPTQModel checkpoints: `quant_method: gptq`.

Per module: `qweight` int32 `[in * bits / 32, out]` (packed along the input axis, lowest bits
first: input row `k` is bits `(k % (32 / bits)) * bits` of word `k // (32 / bits)`), `qzeros` int32
`[groups, out * bits / 32]` (packed along the output axis), `scales` `[groups, out]`, `g_idx`
int32 `[in]` (each input row's group; act-order checkpoints, `desc_act: true`, need it). The
zero points are stored minus one (`checkpoint_format: gptq`, AutoGPTQ's historical layout) or as
they are (`gptq_v2`). `w = (q - zero) * scale`. Bits 4 and 8; `group_size: -1` is per channel.
A quantized `lm_head` and GPTQModel's per-module `dynamic` overrides are refused.
"""

from __future__ import annotations

import torch

from paged_engine.model_executor.quantization.base import LinearMethodBase, QuantizationConfig
from paged_engine.model_executor.quantization.wna16 import (
    WNA16LinearMethod,
    WNA16Scheme,
    one_g_idx,
    unpack_int32_rows,
)

_FMT = "gptq"


class GPTQConfig(QuantizationConfig):
    name = _FMT

    def __init__(self, scheme: WNA16Scheme, zeros_minus_one: bool):
        self.scheme = scheme
        self.zeros_minus_one = zeros_minus_one

    @classmethod
    def from_config(cls, quant_config: dict) -> "GPTQConfig":
        bits = int(quant_config.get("bits", 4))
        if bits not in (4, 8):
            raise ValueError(f"{_FMT}: {bits}-bit GPTQ is not supported (4 and 8 bits are)")
        fmt = str(quant_config.get("checkpoint_format", "gptq")).lower()
        if fmt not in ("gptq", "gptq_v2"):
            raise ValueError(f"{_FMT}: checkpoint_format {fmt!r} is not supported (gptq, gptq_v2 are)")
        if quant_config.get("lm_head"):
            raise ValueError(f"{_FMT}: a quantized lm_head is not supported")
        if quant_config.get("dynamic"):
            raise ValueError(f"{_FMT}: per-module 'dynamic' overrides are not supported")
        group_size = int(quant_config.get("group_size", 128))
        scheme = WNA16Scheme(bits=bits, group_size=None if group_size == -1 else group_size,
                             symmetric=False,  # zero points are always stored
                             act_order=bool(quant_config.get("desc_act", False)) and group_size != -1)
        scheme.check(_FMT)
        return cls(scheme, zeros_minus_one=fmt == "gptq")

    def get_quant_method(self, layer, prefix: str) -> LinearMethodBase | None:
        return GPTQLinearMethod(self.scheme, self.zeros_minus_one)


class GPTQLinearMethod(WNA16LinearMethod):
    format_name = _FMT

    def __init__(self, scheme: WNA16Scheme, zeros_minus_one: bool):
        super().__init__(scheme)
        self.zeros_minus_one = zeros_minus_one

    def create_weights(self, layer) -> None:
        K, N = layer.input_size_per_partition, layer.output_size_per_partition
        pack = 32 // self.bits
        if K % pack or N % pack:
            raise ValueError(f"{_FMT}: {K} inputs x {N} outputs per rank are not multiples of {pack}")
        split_input = 0 if self.scales_split_input(layer) else None
        groups = self.num_groups(layer)
        layer.register_weight("qweight", torch.empty(K // pack, N, dtype=torch.int32),
                              input_dim=0, output_dim=1, packed_dim=0, packed_factor=pack)
        layer.register_weight("qzeros", torch.empty(groups, N // pack, dtype=torch.int32),
                              input_dim=split_input, output_dim=1, packed_dim=1, packed_factor=pack)
        layer.register_weight("scales", torch.empty(groups, N, dtype=torch.float32),
                              input_dim=split_input, output_dim=1)
        # Stored by AutoGPTQ even without act-order (then the trivial k // group_size).
        if layer.shard_ids:
            layer.register_weight("g_idx", torch.empty(len(layer.output_partition_sizes), K, dtype=torch.int32),
                                  shard_indexed=True, optional=not self.scheme.act_order)
        else:
            layer.register_weight("g_idx", torch.empty(K, dtype=torch.int32), input_dim=0,
                                  optional=not self.scheme.act_order)

    def unpack(self, layer):
        values = unpack_int32_rows(layer.qweight.data.t().contiguous(), self.bits).t()  # [K, N]
        zeros = unpack_int32_rows(layer.qzeros.data, self.bits)
        if self.zeros_minus_one:
            zeros = zeros + 1
        g_idx = None
        if getattr(layer.g_idx, "loaded_from_checkpoint", True):
            g_idx = one_g_idx(layer.g_idx.data, _FMT)
        if g_idx is not None and not self.scheme.act_order and self.scheme.group_size is None:
            g_idx = None  # per channel: one group whatever it says
        return values, layer.scales.data, zeros, g_idx
