"""Quantized weights split over tensor-parallel ranks like dense ones.

Each rank of a simulated tensor-parallel group of 2 loads the checkpoint (packed along the input
or the output axis, group scales, zero points, act-order g_idx, per-shard FP8 scales); its layers'
dequantized weights must be that rank's slice of the single-rank weights (which
test_quantized_models.py checks against transformers): q/k/v heads and gate/up rows of the
column-parallel layers, input columns of the row-parallel ones.
"""

from __future__ import annotations

import pytest
import torch

from paged_engine.distributed.parallel_state import init_tensor_parallel
from paged_engine.model_executor.layers.linear import LinearBase
from paged_engine.model_executor.loader import load_model
from paged_engine.model_executor.quantization import get_quantization_config

TP = 2


def _dense_linears(ckpt: str, rank: int, size: int) -> dict[str, torch.Tensor]:
    from transformers import AutoConfig

    init_tensor_parallel(rank, size)
    try:
        hf_config = AutoConfig.from_pretrained(ckpt)
        model = load_model(ckpt, hf_config, torch.float32, "cpu",
                           quant_config=get_quantization_config(hf_config, ckpt))
    finally:
        init_tensor_parallel(0, 1)
    return {n: m.weight.detach() for n, m in model.named_modules() if isinstance(m, LinearBase)}


def _rank_slice(name: str, w: torch.Tensor, rank: int) -> torch.Tensor:
    q, kv, inter = 128, 64, 256  # the tiny model's q, k/v and intermediate widths
    if name.endswith("qkv_proj"):
        qs, ks, vs = w.split([q, kv, kv])
        part = lambda t: t.chunk(TP)[rank]  # noqa: E731
        return torch.cat([part(qs), part(ks), part(vs)])
    if name.endswith("gate_up_proj"):
        gate, up = w.split([inter, inter])
        return torch.cat([gate.chunk(TP)[rank], up.chunk(TP)[rank]])
    return w.chunk(TP, dim=1)[rank]  # o_proj, down_proj: row-parallel


@pytest.mark.parametrize("name", ["ct-w4a16-g64", "ct-w4a16-g64-asym", "ct-w4a16-g64-gidx", "gptq-w4-g64-actorder",
                                  "gptq-w8-channel", "awq-w4-g64", "ct-fp8-dynamic", "fp8-tensor-static"])
def test_each_rank_loads_its_slice(quant_checkpoints, name):
    ckpt = quant_checkpoints(name)
    whole = _dense_linears(ckpt, 0, 1)
    for rank in range(TP):
        part = _dense_linears(ckpt, rank, TP)
        assert set(part) == set(whole)
        for layer, w in part.items():
            assert torch.equal(w, _rank_slice(layer, whole[layer], rank)), (name, rank, layer)


def test_fp8_blocks_that_straddle_ranks_are_refused(quant_checkpoints):
    # q's 128 rows split over 2 ranks leave 64 per rank: half a 128-row block each.
    with pytest.raises(ValueError, match="whole"):
        _dense_linears(quant_checkpoints("fp8-block"), 0, TP)


@pytest.mark.parametrize("name", ["gptq-w4-g64-actorder", "fp8-tensor-static"])
def test_two_ranks_generate_what_one_rank_does(quant_checkpoints, name):
    """The same checkpoint served by a real two-rank engine (gloo, a worker process): greedy tokens
    of one rank (act-order g_idx split with the row-parallel inputs; per-shard FP8 scales)."""
    from paged_engine import LLM, SamplingParams

    ckpt = quant_checkpoints(name)
    args = dict(device="cpu", dtype="float32", num_kv_blocks=64, max_model_len=128, enforce_eager=True)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prompts = ["hello world", "the quick brown fox"]
    one = LLM(ckpt, **args)
    want = [o.outputs[0].token_ids for o in one.generate(prompts, params)]
    one.shutdown()
    two = LLM(ckpt, tensor_parallel_size=TP, **args)
    try:
        assert [o.outputs[0].token_ids for o in two.generate(prompts, params)] == want
    finally:
        two.shutdown()
