"""AutoAWQ checkpoints: `quant_method: awq`, `version: gemm`.

Per module: `qweight` int32 `[in, out / 8]` (4-bit values packed along the output axis),
`qzeros` int32 `[in / group_size, out / 8]` (packed the same way), `scales` `[in / group_size, out]`;
`w = (q - zero) * scale`. Within a word the eight output columns are interleaved: column
`[0, 2, 4, 6, 1, 3, 5, 7][i]` is in bits `4 i`. `modules_to_not_convert` names modules left dense.
Only the GEMM layout is read (GEMV, exllama and Marlin packings are refused); AWQ is 4-bit.
"""

from __future__ import annotations

import torch

from paged_engine.model_executor.quantization.base import LinearMethodBase, QuantizationConfig, same_for_all_shards
from paged_engine.model_executor.quantization.wna16 import WNA16LinearMethod, WNA16Scheme, unpack_int32_rows

_FMT = "awq"
# The slot of each of a word's eight output columns (AWQ packs column ORDER[i] into slot i).
_AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_AWQ_SLOT_OF_COLUMN = [_AWQ_ORDER.index(c) for c in range(8)]


class AWQConfig(QuantizationConfig):
    name = _FMT

    def __init__(self, scheme: WNA16Scheme, not_converted: list[str]):
        self.scheme = scheme
        self.not_converted = not_converted

    @classmethod
    def from_config(cls, quant_config: dict) -> "AWQConfig":
        version = str(quant_config.get("version", "gemm")).lower()
        if version != "gemm":
            raise ValueError(f"{_FMT}: version {version!r} is not supported (the GEMM packing is)")
        bits = int(quant_config.get("bits", quant_config.get("w_bit", 4)))
        if bits != 4:
            raise ValueError(f"{_FMT}: {bits}-bit AWQ is not supported (4-bit is)")
        group_size = int(quant_config.get("group_size", quant_config.get("q_group_size", 128)))
        zero_point = bool(quant_config.get("zero_point", True))
        scheme = WNA16Scheme(bits=bits, group_size=None if group_size == -1 else group_size,
                             symmetric=not zero_point)
        scheme.check(_FMT)
        return cls(scheme, list(quant_config.get("modules_to_not_convert") or []))

    def _skipped(self, name: str) -> bool:
        # AutoAWQ / transformers: a module is left dense when any listed name occurs in its name.
        return any(m in name for m in self.not_converted)

    def get_quant_method(self, layer, prefix: str) -> LinearMethodBase | None:
        if same_for_all_shards(layer, prefix, self._skipped, _FMT):
            return None
        return AWQLinearMethod(self.scheme)


class AWQLinearMethod(WNA16LinearMethod):
    format_name = _FMT

    def create_weights(self, layer) -> None:
        K, N = layer.input_size_per_partition, layer.output_size_per_partition
        split_input = 0 if self.scales_split_input(layer) else None
        groups = self.num_groups(layer)
        layer.register_weight("qweight", torch.empty(K, N // 8, dtype=torch.int32),
                              input_dim=0, output_dim=1, packed_dim=1, packed_factor=8)
        layer.register_weight("scales", torch.empty(groups, N, dtype=torch.float32),
                              input_dim=split_input, output_dim=1)
        if not self.scheme.symmetric:
            layer.register_weight("qzeros", torch.empty(groups, N // 8, dtype=torch.int32),
                                  input_dim=split_input, output_dim=1, packed_dim=1, packed_factor=8)

    def unpack(self, layer):
        values = unpack_int32_rows(layer.qweight.data, 4, _AWQ_SLOT_OF_COLUMN)
        zeros = None
        if not self.scheme.symmetric:
            zeros = unpack_int32_rows(layer.qzeros.data, 4, _AWQ_SLOT_OF_COLUMN)
        return values, layer.scales.data, zeros, None
