"""The test checkpoints are what their formats say, checked with compressed-tensors' own converters,
and the engine's loaded weights equal what those converters and unpackers read.

- AWQ (written by build_checkpoints.py from the published GEMM layout): compressed-tensors'
  AutoAWQConverter turns it back into exactly the pack-quantized tensors it came from.
- transformers-FP8 blocks: compressed-tensors' FP8BlockDequantizer gives the dense weights, which
  the engine's loaded (dequantized-on-CPU) fused layers must equal, shard by shard.
- GPTQ (packed by AutoGPTQ): the stored zero points are the zero points minus one (v1) or as
  they are (v2), read bit by bit here from the layout, not with the engine's unpacker.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from paged_engine import LLM


def _tensors(ckpt: str) -> dict[str, torch.Tensor]:
    return load_file(str(Path(ckpt) / "model.safetensors"))


def _engine_linears(ckpt: str) -> dict[str, torch.Tensor]:
    """The engine's dense weight of every linear layer after loading on CPU (dequantized once)."""
    from paged_engine.model_executor.layers.linear import LinearBase

    llm = LLM(ckpt, device="cpu", dtype="float32", num_kv_blocks=8)
    model = llm.engine.executor.runner.model
    return {name: m.weight.detach().clone() for name, m in model.named_modules() if isinstance(m, LinearBase)}


def _fused_rows(name: str, weights: dict, q=128, kv=64, inter=256) -> dict[str, torch.Tensor]:
    """Split the engine's fused qkv / gate_up weights back into the checkpoint's modules."""
    out = {}
    for fused, w in weights.items():
        if fused.endswith("qkv_proj"):
            base = fused[: -len("qkv_proj")]
            out[base + "q_proj"], out[base + "k_proj"], out[base + "v_proj"] = w.split([q, kv, kv])
        elif fused.endswith("gate_up_proj"):
            base = fused[: -len("gate_up_proj")]
            out[base + "gate_proj"], out[base + "up_proj"] = w.split([inter, inter])
        else:
            out[fused] = w
    return out


def test_awq_checkpoint_converts_back_to_its_source(quant_checkpoints):
    from compressed_tensors.entrypoints.convert.converters.autoawq import AutoAWQConverter

    awq, source = quant_checkpoints("awq-w4-g64"), quant_checkpoints("ct-w4a16-g64-asym")
    config = json.loads((Path(awq) / "config.json").read_text())["quantization_config"]
    converted = AutoAWQConverter.from_autoawq_config(config).process(_tensors(awq))
    expected = _tensors(source)
    assert set(converted) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(converted[name].to(tensor.dtype), tensor), name


def test_awq_and_gptq_load_to_the_same_weights_as_their_source(quant_checkpoints):
    source = _engine_linears(quant_checkpoints("ct-w4a16-g64-asym"))
    for derived in ("awq-w4-g64", "gptq-w4-g64-asym", "gptq-w4-g64-asym-v2"):
        weights = _engine_linears(quant_checkpoints(derived))
        assert set(weights) == set(source)
        for name in source:
            assert torch.equal(weights[name], source[name]), (derived, name)


def test_fp8_block_weights_equal_compressed_tensors_dequantizer(quant_checkpoints):
    from compressed_tensors.entrypoints.convert.converters.fp8block_dequantizer import FP8BlockDequantizer

    ckpt = quant_checkpoints("fp8-block")
    dense = FP8BlockDequantizer.from_pretrained(ckpt, dtype=torch.float32).process(_tensors(ckpt))
    engine = _fused_rows("fp8-block", _engine_linears(ckpt))
    for module, weight in engine.items():
        assert torch.equal(weight, dense[f"{module}.weight"]), module


def _nibbles_along_rows(word_matrix: torch.Tensor, bits: int) -> torch.Tensor:
    """[rows, cols] int32 -> [rows, cols * 32 / bits], value j of a word from bits j*bits (plain loop)."""
    rows, cols = word_matrix.shape
    pack = 32 // bits
    out = torch.empty(rows, cols * pack, dtype=torch.int64)
    words = word_matrix.to(torch.int64) & 0xFFFFFFFF
    for j in range(pack):
        out[:, j::pack] = (words >> (bits * j)) & ((1 << bits) - 1)
    return out


@pytest.mark.parametrize("name, minus_one", [("gptq-w4-g64-asym", True), ("gptq-w4-g64-asym-v2", False)])
def test_gptq_zero_points_follow_the_checkpoint_format(quant_checkpoints, name, minus_one):
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    gptq, source = _tensors(quant_checkpoints(name)), _tensors(quant_checkpoints("ct-w4a16-g64-asym"))
    module = "model.layers.0.mlp.down_proj"
    scale = source[f"{module}.weight_scale"]  # [N, G]
    zp = unpack_from_int32(source[f"{module}.weight_zero_point"], 4, torch.Size(scale.shape), packed_dim=0)
    stored = _nibbles_along_rows(gptq[f"{module}.qzeros"], 4)  # [G, N]
    assert torch.equal(stored + int(minus_one), (zp.to(torch.int64) + 8).t())
    assert torch.equal(gptq[f"{module}.scales"], scale.t())
