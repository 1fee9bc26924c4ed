"""Anything the engine does not run is refused when the model loads, with an error naming it;
the `quantization` engine argument must agree with the checkpoint; online FP8 of a dense model."""

from __future__ import annotations

import math

import pytest
import torch

from paged_engine import LLM, SamplingParams


def _group(config):
    (group,) = config["quantization_config"]["config_groups"].values()
    return group


def _set(**kv):
    def edit(config):
        config["quantization_config"].update(kv)
    return edit


def _weights(**kv):
    def edit(config):
        _group(config)["weights"].update(kv)
    return edit


def _nvfp4(config):
    _group(config)["weights"].update(num_bits=4, type="float", strategy="tensor_group", group_size=16)
    config["quantization_config"]["format"] = "nvfp4-pack-quantized"
    _group(config)["format"] = "nvfp4-pack-quantized"


def _w8a8_int(config):
    _group(config)["input_activations"] = {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True}


def _marlin24(config):
    config["quantization_config"]["format"] = _group(config)["format"] = "marlin-24"


CASES = [
    ("gptq-w4-g64-sym", _set(bits=3), "3-bit GPTQ is not supported"),
    ("gptq-w4-g64-sym", _set(bits=2), "2-bit GPTQ is not supported"),
    ("gptq-w4-g64-sym", _set(lm_head=True), "quantized lm_head"),
    ("gptq-w4-g64-sym", _set(checkpoint_format="marlin"), "checkpoint_format 'marlin'"),
    ("gptq-w4-g64-sym", _set(dynamic={"-:.*down_proj": {}}), "dynamic"),
    ("awq-w4-g64", _set(version="gemv"), "version 'gemv'"),
    ("awq-w4-g64", _set(bits=8), "8-bit AWQ"),
    ("ct-w4a16-g64", _weights(num_bits=2), "2-bit integer weights"),
    ("ct-w4a16-g64", _weights(strategy="tensor"), "strategy 'tensor'"),
    ("ct-w4a16-g64", _w8a8_int, "integer activation quantization"),
    ("ct-w4a16-g64", _nvfp4, "NVFP4"),
    ("ct-w4a16-g64", _set(quantization_status="frozen"), "quantization_status 'frozen'"),
    ("ct-w4a16-g64", _set(kv_cache_scheme={"num_bits": 8, "type": "float"}), "KV cache"),
    ("ct-w4a16-g64", _set(sparsity_config={"format": "sparse-24-bitmask"}), "sparse"),
    ("ct-w4a16-g64", _marlin24, "format 'marlin-24'"),
    ("fp8-block", _set(fmt="e5m2"), "'e5m2'"),
    ("fp8-block", _set(activation_scheme="static"), "static activation scales with block-wise"),
    ("ct-w4a16-g64", _set(quant_method="bitsandbytes"), "'bitsandbytes' is not supported"),
]


@pytest.mark.parametrize("name, edit, message", CASES, ids=[f"{c[0]}-{c[2][:24]}" for c in CASES])
def test_unsupported_checkpoint_is_refused_by_name(quant_checkpoints, copy_checkpoint, name, edit, message):
    ckpt = copy_checkpoint(quant_checkpoints(name), edit)
    with pytest.raises(ValueError, match=message) as info:
        LLM(ckpt, device="cpu", dtype="float32", num_kv_blocks=8)
    assert ckpt in str(info.value)  # names the model


def test_fused_shards_with_different_schemes_are_refused(quant_checkpoints, copy_checkpoint):
    def ignore_v(config):
        config["quantization_config"]["ignore"].append("re:.*v_proj$")

    ckpt = copy_checkpoint(quant_checkpoints("ct-w4a16-g64"), ignore_v)
    with pytest.raises(ValueError, match="quantized differently"):
        LLM(ckpt, device="cpu", dtype="float32", num_kv_blocks=8)


@pytest.mark.parametrize("name, override, message", [
    ("ct-w4a16-g64", "awq", "quantized as 'compressed-tensors'"),
    ("gptq-w4-g64-sym", "bogus", "quantization='bogus' is not supported"),
    (None, "gptq", "not quantized"),
])
def test_quantization_argument_must_match_the_checkpoint(quant_checkpoints, quant_model_dir, name, override, message):
    ckpt = quant_checkpoints(name) if name else quant_model_dir
    with pytest.raises(ValueError, match=message):
        LLM(ckpt, device="cpu", dtype="float32", num_kv_blocks=8, quantization=override)


def test_quantization_argument_naming_the_checkpoints_format_loads_it(quant_checkpoints):
    llm = LLM(quant_checkpoints("gptq-w4-g64-sym"), device="cpu", dtype="float32", num_kv_blocks=8,
              quantization="gptq")
    assert llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2))[0].outputs[0].token_ids


def test_online_fp8_of_a_dense_checkpoint(quant_model_dir, quant_checkpoints, monkeypatch):
    """quantization="fp8" on the dense model computes what llm-compressor's FP8_DYNAMIC checkpoint
    of it does in transformers (the same scheme: FP8 per output channel, activations per token)."""
    from transformers import AutoModelForCausalLM

    from paged_triton.kernels.fp8_gemm import FP8_DTYPE

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 300, (48,), generator=g).tolist()

    def hf_ppl(path):
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0], dim=-1)
        return math.exp(-logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].mean().item())

    monkeypatch.setenv("PAGED_TRITON_CPU_QUANT_WEIGHTS", "packed")
    llm = LLM(quant_model_dir, device="cpu", dtype="float32", num_kv_blocks=16, quantization="fp8")
    (out,) = llm.generate([ids], SamplingParams(max_tokens=1, prompt_logprobs=0))
    ppl = math.exp(-sum(e[t].logprob for e, t in zip(out.prompt_logprobs[1:], ids[1:])) / (len(ids) - 1))
    assert ppl == pytest.approx(hf_ppl(quant_checkpoints("ct-fp8-dynamic")), rel=5e-3)
    assert ppl != pytest.approx(hf_ppl(quant_model_dir), rel=1e-4)  # it did quantize
    qkv = llm.engine.executor.runner.model.model.layers[0].self_attn.qkv_proj
    assert qkv.weight.dtype == FP8_DTYPE and qkv.weight_scale.shape == (qkv.output_size_per_partition,)
