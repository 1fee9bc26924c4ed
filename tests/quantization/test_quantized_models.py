"""The engine on quantized checkpoints against transformers on the same quantized weights.

Each checkpoint (tests/quantization/build_checkpoints.py: llm-compressor, AutoGPTQ's packer, the
AWQ and FP8 layouts) is compared with transformers loading the compressed-tensors checkpoint that
holds the same quantized values (compressed-tensors decompresses it), or the dense model of
those values where transformers cannot load the compressed one. Greedy tokens must be equal and
the perplexity of a fixed text through `prompt_logprobs` within 0.5% of transformers'. The
layer's three ways of computing are all run: dense after loading (the CPU default), packed and
dequantized per call (`PAGED_TRITON_CPU_QUANT_WEIGHTS=packed`), and the Triton kernels in the
interpreter (what a GPU runs).
"""

from __future__ import annotations

import math

import pytest
import torch

from paged_engine import LLM, SamplingParams

TEXT = ("The quick brown fox jumps over the lazy dog. Paged attention stores keys and values in blocks. "
        "Continuous batching schedules many requests at once; prefix caching reuses shared prompts.")
PROMPTS = ["Hello world! Hello, world.", "Numbers: 0 1 2 3", "日本語のテキスト"]

# checkpoint -> the checkpoint transformers loads as its reference
CASES = {
    "ct-w4a16-g64": "ct-w4a16-g64",  # RTN, symmetric, groups of 64
    "ct-w4a16-g64-asym": "dense-w4a16-g64-asym",  # zero points
    "ct-gptq-w4a16-g64": "ct-gptq-w4a16-g64",  # GPTQ, act-order (contiguous groups)
    "ct-w4a16-g64-gidx": "dense-w4a16-g64-gidx",  # act-order with weight_g_idx
    "ct-w8a16-channel": "ct-w8a16-channel",  # int8 per channel
    "ct-fp8-dynamic": "ct-fp8-dynamic",  # FP8 per channel, dynamic per-token activations
    "ct-fp8-static": "ct-fp8-static",  # FP8 per tensor, static activation scales
    "ct-fp8-block": "ct-fp8-block",  # FP8 128x128 blocks, per-group activations
    "gptq-w4-g64-sym": "ct-w4a16-g64",
    "gptq-w4-g64-asym": "dense-w4a16-g64-asym",
    "gptq-w4-g64-asym-v2": "dense-w4a16-g64-asym",
    "gptq-w4-g64-gptq": "ct-gptq-w4a16-g64",
    "gptq-w4-g64-actorder": "dense-w4a16-g64-gidx",  # desc_act with g_idx
    "gptq-w8-channel": "ct-w8a16-channel",
    "awq-w4-g64": "dense-w4a16-g64-asym",
    "fp8-block": "ct-fp8-block",  # transformers' fine-grained FP8 layout
    "fp8-tensor-static": "ct-fp8-static",  # AutoFP8's per-tensor layout
}
MAX_TOKENS = 12

_reference_cache: dict = {}


def _token_ids(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return tok(TEXT).input_ids, [tok(p).input_ids for p in PROMPTS]


def _reference(ref_dir, max_tokens=MAX_TOKENS):
    """(greedy continuations, perplexity of TEXT) from transformers."""
    key = (ref_dir, max_tokens)
    if key not in _reference_cache:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32).eval()
        text_ids, prompt_ids = _token_ids(ref_dir)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([text_ids])).logits[0].float(), dim=-1)
            nll = -logp[torch.arange(len(text_ids) - 1), torch.tensor(text_ids[1:])].mean().item()
            greedy = []
            for ids in prompt_ids:
                out = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False,
                                     min_new_tokens=max_tokens, pad_token_id=0)
                greedy.append(out[0, len(ids):].tolist())
        _reference_cache[key] = (greedy, math.exp(nll))
    return _reference_cache[key]


def _engine(model_dir, max_tokens=MAX_TOKENS):
    llm = LLM(model_dir, device="cpu", dtype="float32", num_kv_blocks=64, block_size=16)
    text_ids, prompt_ids = _token_ids(model_dir)
    outs = llm.generate(prompt_ids, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    greedy = [o.outputs[0].token_ids for o in outs]
    (out,) = llm.generate([text_ids], SamplingParams(max_tokens=1, prompt_logprobs=0))
    nll = -sum(e[t].logprob for e, t in zip(out.prompt_logprobs[1:], text_ids[1:])) / (len(text_ids) - 1)
    return llm, greedy, math.exp(nll)


def _compare(quant_checkpoints, name, max_tokens=MAX_TOKENS):
    ref_greedy, ref_ppl = _reference(quant_checkpoints(CASES[name]), max_tokens)
    llm, greedy, ppl = _engine(quant_checkpoints(name), max_tokens)
    assert greedy == ref_greedy, name
    assert ppl == pytest.approx(ref_ppl, rel=5e-3), name
    return llm


@pytest.mark.parametrize("name", list(CASES))
def test_matches_transformers(quant_checkpoints, name):
    _compare(quant_checkpoints, name)


def _linear_bytes(llm) -> tuple[int, int]:
    """(bytes of the linear layers' tensors, bytes of the same weights dense in fp32)."""
    from paged_engine.model_executor.layers.linear import LinearBase

    model = llm.engine.executor.runner.model
    held = dense = 0
    for module in model.modules():
        if isinstance(module, LinearBase):
            held += sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))
            dense += module.input_size_per_partition * module.output_size_per_partition * 4
    return held, dense


@pytest.mark.parametrize("name, max_ratio", [
    ("ct-w4a16-g64-asym", 0.2), ("gptq-w4-g64-actorder", 0.2), ("awq-w4-g64", 0.2),
    ("gptq-w8-channel", 0.3), ("ct-fp8-dynamic", 0.3), ("fp8-block", 0.3),
])
def test_packed_per_call_on_cpu(quant_checkpoints, monkeypatch, name, max_ratio):
    monkeypatch.setenv("PAGED_TRITON_CPU_QUANT_WEIGHTS", "packed")
    llm = _compare(quant_checkpoints, name)
    held, dense = _linear_bytes(llm)
    assert held <= max_ratio * dense, (held, dense)


@pytest.mark.parametrize("name", ["ct-w4a16-g64", "ct-w4a16-g64-asym", "gptq-w4-g64-actorder", "gptq-w8-channel"])
def test_triton_dequant_gemm_in_the_interpreter(quant_checkpoints, triton_kernels_on_cpu, name):
    llm = _compare(quant_checkpoints, name, max_tokens=4)
    held, dense = _linear_bytes(llm)
    assert held <= 0.3 * dense  # packed: the kernel reads the integers
