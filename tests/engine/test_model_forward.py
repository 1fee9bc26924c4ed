"""Our model's logits equal transformers' logits (fp32) through the paged KV cache.

Covers Llama (GQA), Qwen2 (qkv bias), Qwen3 (q/k norm), Mistral, tied embeddings, sharded
safetensors, llama3 rope scaling, a prompt processed in one chunk vs several chunks mixed with
decodes, and block sizes 1, 3 and 16 over scrambled physical blocks.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from _runner_helpers import BlockAllocator, batch, chunk, runner_config
from paged_engine.executor.model_runner import ModelRunner

ATOL = 2e-4

LLAMA3_ROPE = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}


@pytest.fixture(scope="module")
def llama3_rope_model(tmp_path_factory) -> str:
    """Tiny Llama with llama3 rope scaling whose original context (16) the prompts exceed."""
    from paged_engine.deploy.tiny_model import make_tiny_model

    d = tmp_path_factory.mktemp("llama3-rope")
    return make_tiny_model(d, arch="llama", rope_scaling=dict(LLAMA3_ROPE), rope_theta=500000.0)


def _prompts(vocab_size: int, lengths=(1, 7, 23, 40), seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab_size, (n,), generator=g).tolist() for n in lengths]


def _hf_logits(model_dir: str, prompts, dtype=torch.float32) -> list[torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    with torch.no_grad():
        return [model(torch.tensor([p])).logits[0].float() for p in prompts]


def _assert_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    err = (got - want).abs().max().item()
    assert err < ATOL * max(1.0, want.abs().max().item()), f"{what}: max abs diff {err}"


def _check_one_step(model_dir: str, block_size: int = 16, **runner_kw) -> None:
    """All prompts prefilled in one step, each with its own scrambled block table."""
    runner = ModelRunner(runner_config(model_dir, block_size=block_size, num_kv_blocks=256, **runner_kw))
    prompts = _prompts(runner.vocab_size)
    alloc = BlockAllocator(runner.num_kv_blocks)
    chunks = [chunk(i, p, 0, alloc.take(-(-len(p) // block_size))) for i, p in enumerate(prompts)]
    got = runner.compute_logits(batch(chunks))
    for i, (g, w) in enumerate(zip(got, _hf_logits(model_dir, prompts))):
        _assert_close(g, w, f"prompt {i}")


@pytest.mark.parametrize(
    "arch,kw",
    [
        ("llama", {}),  # GQA: 4 query heads, 2 KV heads
        ("qwen2", {}),
        ("qwen3", {"head_dim": 32}),
        ("mistral", {"num_kv_heads": 1}),
    ],
)
def test_logits_match_transformers(make_model, arch, kw):
    _check_one_step(make_model(arch, **kw))


def test_tied_embeddings(make_model):
    model_dir = make_model("llama", tie_word_embeddings=True)
    from safetensors import safe_open

    with safe_open(str(Path(model_dir) / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()
    _check_one_step(model_dir)


def test_llama3_rope_scaling(llama3_rope_model):
    model_dir = llama3_rope_model
    config = json.loads((Path(model_dir) / "config.json").read_text())
    rope = config.get("rope_parameters") or config.get("rope_scaling")
    assert rope["rope_type"] == "llama3"
    _check_one_step(model_dir)


def test_linear_rope_scaling(tmp_path):
    from paged_engine.deploy.tiny_model import make_tiny_model

    model_dir = make_tiny_model(tmp_path / "linear", arch="llama",
                                rope_scaling={"rope_type": "linear", "factor": 4.0})
    _check_one_step(model_dir)


def test_unsupported_rope_scaling_is_an_error():
    from types import SimpleNamespace

    from paged_engine.model_executor.layers.rotary_embedding import rope_parameters

    config = SimpleNamespace(rope_theta=1e4, rope_scaling={"type": "yarn", "factor": 4.0})
    with pytest.raises(ValueError, match="yarn"):
        rope_parameters(config)


def test_llama3_rope_scaling_legacy_config_keys(llama3_rope_model, tmp_path):
    """A transformers-4 style config.json (rope_theta + rope_scaling with "type") loads the same."""
    import shutil

    src = llama3_rope_model
    dst = tmp_path / "legacy"
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    params = config.pop("rope_parameters")
    config["rope_theta"] = params.pop("rope_theta")
    params["type"] = params.pop("rope_type")
    config["rope_scaling"] = params
    (dst / "config.json").write_text(json.dumps(config))
    from types import SimpleNamespace

    from paged_engine.model_executor.layers.rotary_embedding import rope_parameters

    theta, scaling = rope_parameters(SimpleNamespace(**config))
    assert theta == 500000.0 and scaling["rope_type"] == "llama3" and scaling["factor"] == 8.0
    _check_one_step(str(dst))


def test_sharded_safetensors(make_model, tmp_path):
    from transformers import AutoModelForCausalLM

    src = make_model("qwen2")
    dst = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).save_pretrained(
        dst, max_shard_size="100KB"
    )
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    _check_one_step(str(dst))


@pytest.mark.parametrize("block_size", [1, 3, 16])
def test_chunked_prefill_and_decode_through_paged_cache(make_model, block_size):
    """Prompt A in uneven chunks across steps, sharing steps with prompt B's prefill and decodes;
    every chunk's logits equal transformers' logits of the whole sequence at those positions."""
    model_dir = make_model("qwen3", head_dim=32)
    runner = ModelRunner(runner_config(model_dir, block_size=block_size, num_kv_blocks=400))
    seq_a, seq_b = _prompts(runner.vocab_size, lengths=(41, 19), seed=1)
    want_a, want_b = _hf_logits(model_dir, [seq_a, seq_b])
    alloc = BlockAllocator(runner.num_kv_blocks, seed=block_size)
    table_a = alloc.take(-(-len(seq_a) // block_size))
    table_b = alloc.take(-(-len(seq_b) // block_size))

    # (A chunk bounds, B chunk bounds) per step; B's later steps are one-token "decodes".
    steps = [((0, 5), (0, 16)), ((5, 6), (16, 17)), ((6, 22), (17, 18)), ((22, 41), (18, 19))]
    for (a0, a1), (b0, b1) in steps:
        chunks = [
            chunk(1, seq_b[b0:b1], b0, table_b, prompt_token_ids=seq_b),
            chunk(0, seq_a[a0:a1], a0, table_a, prompt_token_ids=seq_a, do_sample=a1 == len(seq_a)),
        ]
        got_b, got_a = runner.compute_logits(batch(chunks))
        _assert_close(got_a, want_a[a0:a1], f"A[{a0}:{a1}] block_size={block_size}")
        _assert_close(got_b, want_b[b0:b1], f"B[{b0}:{b1}] block_size={block_size}")


def test_one_chunk_equals_many_chunks(tiny_model_dir):
    runner = ModelRunner(runner_config(tiny_model_dir, block_size=3, num_kv_blocks=64))
    (prompt,) = _prompts(runner.vocab_size, lengths=(30,), seed=2)
    (whole,) = runner.compute_logits(batch([chunk(0, prompt, 0, list(range(10)))]))
    table = list(range(10, 20))
    pieces = []
    for start, end in [(0, 4), (4, 5), (5, 17), (17, 30)]:
        (logits,) = runner.compute_logits(batch([chunk(1, prompt[start:end], start, table)]))
        pieces.append(logits)
    _assert_close(torch.cat(pieces), whole, "chunked vs whole")


def test_unsupported_architecture_names_supported(tiny_model_dir, tmp_path):
    import shutil

    from paged_engine.model_executor.models import get_model_class

    dst = tmp_path / "gpt2ish"
    shutil.copytree(tiny_model_dir, dst)
    config = json.loads((dst / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (dst / "config.json").write_text(json.dumps(config))
    from types import SimpleNamespace

    with pytest.raises(ValueError) as err:
        get_model_class(SimpleNamespace(**config))
    message = str(err.value)
    assert "GPT2LMHeadModel" in message
    for arch in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        assert arch in message


def test_missing_weight_is_an_error(tiny_model_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from paged_engine.model_executor.loader import load_model
    from transformers import AutoConfig

    dst = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, str(dst / "model.safetensors"))
    with pytest.raises(ValueError, match="k_proj|qkv_proj"):
        load_model(str(dst), AutoConfig.from_pretrained(dst), torch.float32, "cpu")


def test_dummy_load_format_has_checkpoint_shapes(tiny_model_dir):
    from transformers import AutoConfig

    from paged_engine.model_executor.loader import load_model

    hf_config = AutoConfig.from_pretrained(tiny_model_dir)
    real = load_model(tiny_model_dir, hf_config, torch.float32, "cpu")
    dummy = load_model(None, hf_config, torch.float32, "cpu", load_format="dummy")
    real_params = dict(real.named_parameters())
    for name, p in dummy.named_parameters():
        assert p.shape == real_params[name].shape, name
        assert torch.isfinite(p).all(), name
        assert not torch.equal(p, real_params[name]), name


def test_triton_kernel_path_in_interpreter(make_model):
    """The exact launcher calls made on CUDA (strided q/k views, out= slices, decode/prefill split,
    max_seqlen_q), run by Triton's CPU interpreter: same logits as the *_ref path."""
    import os

    from paged_triton.kernels.ops import triton_on_cpu

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 (set by tests/conftest.py)")
    model_dir = make_model("qwen3", head_dim=32)
    runner = ModelRunner(runner_config(model_dir, block_size=4, num_kv_blocks=32))
    a, b, c = _prompts(runner.vocab_size, lengths=(9, 6, 3), seed=3)

    def step():
        return runner.compute_logits(batch([
            chunk(0, a[4:], 4, [7, 2, 9]),  # a later prefill chunk (prefix already cached)
            chunk(1, b[-1:], 5, [4, 11]),  # a decode
            chunk(2, c, 0, [5]),  # a whole short prompt
        ]))

    runner.compute_logits(batch([chunk(0, a[:4], 0, [7, 2, 9]), chunk(1, b[:5], 0, [4, 11])]))
    want = step()
    with triton_on_cpu():
        got = step()
    for g, w in zip(got, want):
        _assert_close(g, w, "triton vs ref")


@pytest.mark.parametrize("dtype, atol", [("float32", ATOL), ("float16", 2e-2)])
def test_triton_kernel_path_with_strided_qkv_views(tiny_model_dir, dtype, atol):
    """Llama has no q/k norm, so rotary and store_kvcache get the strided q/k/v views of the
    fused qkv output, as on CUDA. fp16 runs the 16-bit casts of every kernel (the interpreter's
    bf16 dots are unreliable, fp16 stands in for the GPU's bf16)."""
    import os

    from paged_triton.kernels.ops import triton_on_cpu

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 (set by tests/conftest.py)")
    runner = ModelRunner(runner_config(tiny_model_dir, dtype=dtype, block_size=4, num_kv_blocks=32))
    a, b = _prompts(runner.vocab_size, lengths=(9, 6), seed=4)

    def steps():
        for layer in runner.attention_layers:
            layer.k_cache.zero_()
            layer.v_cache.zero_()
        first = runner.compute_logits(batch([chunk(0, a[:5], 0, [7, 2, 9]), chunk(1, b[:5], 0, [4, 11])]))
        second = runner.compute_logits(batch([chunk(0, a[5:], 5, [7, 2, 9]), chunk(1, b[5:], 5, [4, 11])]))
        return first + second

    want = steps()
    with triton_on_cpu():
        got = steps()
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=atol, rtol=atol)


def test_bfloat16_model_from_float32_checkpoint(tiny_model_dir):
    """dtype=bfloat16 (the CUDA default for "auto") from a float32 checkpoint: weights rounded
    once to bf16, the rotary table kept in float32, and logits no further from the float32
    model's than transformers' own bf16 forward is (bf16 rounding alone moves them ~0.2 here)."""
    from safetensors.torch import load_file

    bf16 = ModelRunner(runner_config(tiny_model_dir, dtype="bfloat16", block_size=4, num_kv_blocks=32))
    fp32 = ModelRunner(runner_config(tiny_model_dir, dtype="float32", block_size=4, num_kv_blocks=32))
    ckpt = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    params = dict(bf16.model.named_parameters())
    assert all(p.dtype == torch.bfloat16 for p in params.values())
    assert torch.equal(params["model.embed_tokens.weight"], ckpt["model.embed_tokens.weight"].to(torch.bfloat16))
    assert bf16.model.model.rotary_emb.cos_sin_cache.dtype == torch.float32
    assert bf16.k_caches[0].dtype == torch.bfloat16
    (prompt,) = _prompts(bf16.vocab_size, lengths=(11,), seed=5)
    (got,) = bf16.compute_logits(batch([chunk(0, prompt, 0, [3, 1, 0])]))
    (want,) = fp32.compute_logits(batch([chunk(0, prompt, 0, [3, 1, 0])]))
    assert got.dtype == torch.float32
    (hf_bf16,) = _hf_logits(tiny_model_dir, [prompt], dtype=torch.bfloat16)
    ours_err, hf_err = (got - want).abs().max().item(), (hf_bf16 - want).abs().max().item()
    assert ours_err <= 1.5 * hf_err + 1e-3, (ours_err, hf_err)


def _gpu_ready() -> bool:
    import os

    return torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"


@pytest.mark.skipif(not _gpu_ready(), reason="needs CUDA and TRITON_INTERPRET=0")
def test_bfloat16_kernels_on_gpu_match_float32_reference(tiny_model_dir):
    """On a GPU, bf16 through the compiled kernels (the interpreter's bf16 dots are unreliable, so
    only here): a prefill chunk, then one-token decodes, over scrambled blocks; the logits are no
    further from the float32 CPU model's than transformers' own bf16 forward is."""
    (prompt,) = _prompts(512, lengths=(20,), seed=9)
    cpu = ModelRunner(runner_config(tiny_model_dir, block_size=4, num_kv_blocks=32))
    prompt = [t % cpu.vocab_size for t in prompt]
    (want,) = cpu.compute_logits(batch([chunk(0, prompt, 0, list(range(5)))]))
    gpu = ModelRunner(runner_config(tiny_model_dir, device="cuda", dtype="bfloat16", block_size=4,
                                    num_kv_blocks=32))
    table = [7, 2, 9, 4, 11]
    pieces = gpu.compute_logits(batch([chunk(0, prompt[:12], 0, table)]))  # prefill kernel
    for pos in range(12, len(prompt)):  # decode kernel
        pieces += gpu.compute_logits(batch([chunk(0, prompt[pos:pos + 1], pos, table)]))
    got = torch.cat(pieces).cpu()
    (hf_bf16,) = _hf_logits(tiny_model_dir, [prompt], dtype=torch.bfloat16)
    ours_err, hf_err = (got - want).abs().max().item(), (hf_bf16 - want).abs().max().item()
    assert ours_err <= 2 * hf_err + 1e-2, (ours_err, hf_err)
    gpu.shutdown()
