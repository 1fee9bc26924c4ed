"""Phi-3, Gemma 2, Gemma 3, Mixtral, Qwen3-MoE (and Mistral with its sliding window) against
transformers on tiny random models, fp32 on CPU.

Each family's distinguishing features are switched on and made to matter: windows of 6 keys under
prompts of 40 (and block sizes that put the window's edge inside blocks), soft caps low enough to
bite, partial rotary, LongRoPE across its original length, q/k norms, local/global rope with linear
scaling, experts that tokens actually split over, dense layers among the MoE ones. Checked:
  - logits of a one-step prefill over scrambled blocks equal transformers' forward;
  - logits of chunked prefills mixed with decodes (block sizes 1, 3, 16) equal them too;
  - greedy generation equals transformers' `generate` with a small KV block size, a token budget
    that splits prompts into chunks beside decodes, and prefix-cache hits;
  - the Triton kernels (sliding window, soft cap, fused MoE) in the interpreter equal the torch path;
  - LongRoPE's policy (long factors everywhere when max_model_len > the original context);
  - checkpoint variants (stacked experts) and the errors for broken ones.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from _runner_helpers import BlockAllocator, batch, chunk, runner_config
from paged_engine import LLM, SamplingParams
from paged_engine.executor.model_runner import ModelRunner

ATOL = 2e-4
MAX_NEW = 10

WINDOW = 6
# name -> (tiny_model arch, config overrides)
FAMILIES = {
    # fused qkv_proj / gate_up_proj checkpoint, partial rotary, sliding window on every layer
    "phi3": ("phi3", dict(partial_rotary_factor=0.5, sliding_window=WINDOW)),
    # head_dim 32 on hidden 64 / 4 heads, query_pre_attn_scalar, windows on alternate layers,
    # attention and final soft caps. Untied: with Gemma's sqrt(hidden) embedding scale, a tiny
    # random model with a tied head greedily repeats its input token (gemma2_tied checks tying).
    "gemma2": ("gemma2", dict(head_dim=32, query_pre_attn_scalar=24, sliding_window=WINDOW,
                              attn_logit_softcapping=2.0, final_logit_softcapping=8.0,
                              tie_word_embeddings=False)),
    "gemma2_tied": ("gemma2", dict(head_dim=32, query_pre_attn_scalar=24, sliding_window=WINDOW,
                                   attn_logit_softcapping=2.0, final_logit_softcapping=8.0)),
    # q/k norms, local (theta 10k) and global (theta 1M, linear x8) rope, 2 of 3 layers sliding
    "gemma3": ("gemma3", dict(head_dim=32, query_pre_attn_scalar=24, sliding_window=WINDOW, num_layers=3,
                              tie_word_embeddings=False,
                              layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                              rope_parameters={
                                  "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                  "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                              })),
    # 4 experts, top 2 renormalised, one KV head
    "mixtral": ("mixtral", dict(num_kv_heads=1)),
    # top 2 of 4 renormalised (norm_topk_prob), layer 1 dense
    "qwen3_moe": ("qwen3_moe", dict(norm_topk_prob=True, mlp_only_layers=[1])),
    # top 3 of 8, not renormalised
    "qwen3_moe_topk3": ("qwen3_moe", dict(norm_topk_prob=False, num_experts=8, num_experts_per_tok=3)),
    # Mistral v0.1's sliding window, now applied
    "mistral_window": ("mistral", dict(sliding_window=WINDOW)),
}
_dirs: dict[str, str] = {}
_hf: dict[str, object] = {}


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    from paged_engine.deploy.tiny_model import make_tiny_model

    def get(name: str) -> str:
        if name not in _dirs:
            arch, overrides = FAMILIES[name]
            _dirs[name] = make_tiny_model(tmp_path_factory.mktemp(name), arch=arch, **overrides)
        return _dirs[name]

    return get


def _hf_model(model_dir: str):
    from transformers import AutoModelForCausalLM

    if model_dir not in _hf:
        _hf[model_dir] = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return _hf[model_dir]


def _hf_logits(model_dir: str, prompts) -> list[torch.Tensor]:
    model = _hf_model(model_dir)
    with torch.no_grad():
        return [model(torch.tensor([p])).logits[0].float() for p in prompts]


def _hf_greedy(model_dir: str, prompt, max_new_tokens=MAX_NEW) -> list[int]:
    model = _hf_model(model_dir)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _prompts(vocab_size: int, lengths, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab_size) for _ in range(n)] for n in lengths]


def _assert_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    err = (got - want).abs().max().item()
    assert err < ATOL * max(1.0, want.abs().max().item()), f"{what}: max abs diff {err}"


@pytest.mark.parametrize("name", list(FAMILIES))
def test_logits_match_transformers(family_dir, name):
    model_dir = family_dir(name)
    runner = ModelRunner(runner_config(model_dir, block_size=16, num_kv_blocks=64))
    prompts = _prompts(runner.vocab_size, (1, 7, 23, 40))
    alloc = BlockAllocator(runner.num_kv_blocks)
    got = runner.compute_logits(batch(chunk(i, p, 0, alloc.take(-(-len(p) // 16))) for i, p in enumerate(prompts)))
    for i, (g, w) in enumerate(zip(got, _hf_logits(model_dir, prompts))):
        _assert_close(g, w, f"{name} prompt {i}")


@pytest.mark.parametrize("name, block_size",
                         [(n, 3) for n in FAMILIES if n != "gemma2_tied"] + [("gemma2", 1), ("phi3", 16)])
def test_chunked_prefill_and_decodes_match_transformers(family_dir, name, block_size):
    """Prompt A in uneven chunks beside prompt B's prefill and one-token decodes; every chunk's
    logits equal transformers' logits of the whole sequence (the window's edge falls inside
    chunks and blocks, and chunks start inside earlier chunks' windows)."""
    model_dir = family_dir(name)
    runner = ModelRunner(runner_config(model_dir, block_size=block_size, num_kv_blocks=200))
    seq_a, seq_b = _prompts(runner.vocab_size, (41, 19), seed=1)
    want_a, want_b = _hf_logits(model_dir, [seq_a, seq_b])
    alloc = BlockAllocator(runner.num_kv_blocks, seed=block_size)
    table_a, table_b = alloc.take(-(-41 // block_size)), alloc.take(-(-19 // block_size))
    for (a0, a1), (b0, b1) in [((0, 5), (0, 16)), ((5, 6), (16, 17)), ((6, 22), (17, 18)), ((22, 41), (18, 19))]:
        got_b, got_a = runner.compute_logits(batch([
            chunk(1, seq_b[b0:b1], b0, table_b, prompt_token_ids=seq_b),
            chunk(0, seq_a[a0:a1], a0, table_a, prompt_token_ids=seq_a, do_sample=a1 == len(seq_a)),
        ]))
        _assert_close(got_a, want_a[a0:a1], f"{name} A[{a0}:{a1}] block_size={block_size}")
        _assert_close(got_b, want_b[b0:b1], f"{name} B[{b0}:{b1}] block_size={block_size}")


@pytest.mark.parametrize("name", ["phi3", "gemma2", "gemma3", "mixtral", "qwen3_moe"])
def test_greedy_matches_transformers_chunked_and_prefix_cached(family_dir, name):
    """Block size 4, a 7-token budget (prompts prefilled in chunks beside decodes), then prompts
    sharing a prefix served partly from the prefix cache: every token equals transformers'."""
    model_dir = family_dir(name)
    llm = LLM(model_dir, device="cpu", dtype="float32", block_size=4, num_kv_blocks=96, max_num_batched_tokens=7)
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)
    vocab = llm.engine.vocab_size
    prompts = _prompts(vocab, (1, 6, 17, 26), seed=2)
    prefix = _prompts(vocab, (18,), seed=3)[0]
    shared = [prefix + tail for tail in _prompts(vocab, (2, 5), seed=4)]
    first = llm.generate(prompts + shared[:1], params)
    second = llm.generate(shared[1:], params)
    for prompt, out in zip(prompts + shared, first + second):
        assert out.token_ids == _hf_greedy(model_dir, prompt), f"{name}: prompt of {len(prompt)} tokens"
    assert second[0].num_cached_tokens == 16  # four full blocks of the shared prefix
    assert llm.stats()["kv_blocks_free"] == 96


@pytest.mark.parametrize("name", ["gemma2", "mixtral"])
def test_triton_kernels_in_interpreter_match_torch_path(family_dir, name):
    """The launches made on CUDA (windowed, soft-capped attention for Gemma 2; the fused MoE
    kernel for Mixtral), run by Triton's CPU interpreter: the same logits as the torch refs."""
    import os

    from paged_triton.kernels.ops import triton_on_cpu

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 (set by tests/conftest.py)")
    runner = ModelRunner(runner_config(family_dir(name), block_size=4, num_kv_blocks=32))
    a, b = _prompts(runner.vocab_size, (14, 9), seed=5)
    runner.compute_logits(batch([chunk(0, a[:8], 0, [7, 2, 9, 12]), chunk(1, b[:8], 0, [4, 11])]))

    def step():
        return runner.compute_logits(batch([
            chunk(0, a[8:], 8, [7, 2, 9, 12], prompt_token_ids=a),  # a later chunk past the window
            chunk(1, b[8:9], 8, [4, 11, 5], prompt_token_ids=b),  # a decode
        ]))

    want = step()
    with triton_on_cpu():
        got = step()
    for g, w in zip(got, want):
        _assert_close(g, w, f"{name}: triton vs ref")


# -- LongRoPE ----------------------------------------------------------------------------------

LONGROPE_ORIGINAL = 16


@pytest.fixture(scope="module")
def longrope_dir(tmp_path_factory):
    """Phi-3 with LongRoPE whose original context (16) the long prompts exceed, and whose long
    factors differ enough from the short ones to change every logit."""
    from paged_engine.deploy.tiny_model import make_tiny_model

    rng = random.Random(0)
    half = 16 // 2  # head_dim 16 (hidden 64, 4 heads), full rotary
    rope = {"rope_type": "longrope", "rope_theta": 10000.0,
            "short_factor": [1.0 + 0.1 * rng.random() for _ in range(half)],
            "long_factor": [1.0 + 8.0 * rng.random() for _ in range(half)]}
    d = make_tiny_model(tmp_path_factory.mktemp("phi3-longrope"), arch="phi3", max_position_embeddings=64,
                        original_max_position_embeddings=LONGROPE_ORIGINAL, rope_parameters=rope)
    return d


def _runner_logits(model_dir, prompts, max_model_len):
    runner = ModelRunner(runner_config(model_dir, block_size=4, num_kv_blocks=64, max_model_len=max_model_len))
    alloc = BlockAllocator(64)
    return runner.compute_logits(batch(chunk(i, p, 0, alloc.take(-(-len(p) // 4))) for i, p in enumerate(prompts)))


def test_longrope_short_engine_uses_short_factors_like_transformers(longrope_dir):
    prompts = _prompts(384, (5, 16))
    for g, w in zip(_runner_logits(longrope_dir, prompts, max_model_len=LONGROPE_ORIGINAL),
                    _hf_logits(longrope_dir, prompts)):
        _assert_close(g, w, "short engine")


def test_longrope_long_engine_long_sequences_match_transformers(longrope_dir):
    """max_model_len > original: prompts past the original length match transformers' forward
    (which uses the long factors for them), and so does greedy generation from one."""
    prompts = _prompts(384, (17, 40))
    for g, w in zip(_runner_logits(longrope_dir, prompts, max_model_len=64), _hf_logits(longrope_dir, prompts)):
        _assert_close(g, w, "long engine, long prompt")
    llm = LLM(longrope_dir, device="cpu", dtype="float32", block_size=4, num_kv_blocks=64, max_model_len=64)
    out = llm.generate(prompts[:1], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))[0]
    assert out.token_ids == _hf_greedy(longrope_dir, prompts[0], 8)


def test_longrope_long_engine_rotates_short_prompts_with_long_factors(longrope_dir, tmp_path):
    """The documented difference from transformers: with max_model_len > original, a short prompt
    is rotated with the long factors too. Reference: transformers on a copy of the model whose
    short factors are the long ones."""
    prompts = _prompts(384, (9,), seed=7)
    got = _runner_logits(longrope_dir, prompts, max_model_len=64)
    hf_short = _hf_logits(longrope_dir, prompts)
    assert (got[0] - hf_short[0]).abs().max() > 1e-2  # the factors really differ
    dst = tmp_path / "long-only"
    shutil.copytree(longrope_dir, dst)
    config = json.loads((dst / "config.json").read_text())
    rope = config.get("rope_parameters") or config["rope_scaling"]
    rope["short_factor"] = list(rope["long_factor"])
    (dst / "config.json").write_text(json.dumps(config))
    _assert_close(got[0], _hf_logits(str(dst), prompts)[0], "long factors for a short prompt")


# -- checkpoint variants and errors -----------------------------------------------------------

def test_stacked_expert_checkpoint_loads(family_dir, tmp_path):
    """A checkpoint holding each layer's experts stacked (transformers 5's in-memory layout:
    experts.gate_up_proj [E, 2I, H], experts.down_proj [E, H, I]) loads to the same logits."""
    from safetensors.torch import load_file, save_file

    src = family_dir("qwen3_moe")
    dst = tmp_path / "stacked"
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    config = json.loads((dst / "config.json").read_text())
    num_experts = config.get("num_experts") or config["num_local_experts"]
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}.mlp.experts"
        if f"{prefix}.0.gate_proj.weight" not in tensors:
            continue  # a dense layer
        gate_up = [torch.cat([tensors.pop(f"{prefix}.{e}.gate_proj.weight"), tensors.pop(f"{prefix}.{e}.up_proj.weight")])
                   for e in range(num_experts)]
        down = [tensors.pop(f"{prefix}.{e}.down_proj.weight") for e in range(num_experts)]
        tensors[f"{prefix}.gate_up_proj"] = torch.stack(gate_up)
        tensors[f"{prefix}.down_proj"] = torch.stack(down)
    save_file(tensors, str(dst / "model.safetensors"))
    prompts = _prompts(384, (1, 12))
    for g, w in zip(_runner_logits(str(dst), prompts, max_model_len=64), _hf_logits(src, prompts)):
        _assert_close(g, w, "stacked experts")


def _broken_copy(src: str, dst: Path, edit) -> str:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    return str(dst)


def test_missing_expert_is_an_error(family_dir, tmp_path):
    from transformers import AutoConfig

    from paged_engine.model_executor.loader import load_model

    dst = _broken_copy(family_dir("mixtral"), tmp_path / "no-expert",
                       lambda t: t.pop("model.layers.1.block_sparse_moe.experts.2.w3.weight"))
    with pytest.raises(ValueError, match=r"lacks weights.*layers\.1\.block_sparse_moe\.experts\.w13_weight\[\(2, 'w3'\)\]"):
        load_model(dst, AutoConfig.from_pretrained(dst), torch.float32, "cpu")


def test_fused_qkv_of_the_wrong_size_is_an_error(family_dir, tmp_path):
    from transformers import AutoConfig

    from paged_engine.model_executor.loader import load_model

    name = "model.layers.0.self_attn.qkv_proj.weight"
    dst = _broken_copy(family_dir("phi3"), tmp_path / "bad-qkv", lambda t: t.update({name: t[name][:-8]}))
    with pytest.raises(ValueError, match=r"qkv_proj\.weight.*fused checkpoint tensor has shape \(120, 64\)"):
        load_model(dst, AutoConfig.from_pretrained(dst), torch.float32, "cpu")


def test_registry_lists_every_family():
    from types import SimpleNamespace

    from paged_engine.model_executor.models import get_model_class

    with pytest.raises(ValueError) as err:
        get_model_class(SimpleNamespace(architectures=["Gemma3ForConditionalGeneration"]))
    for arch in ("Phi3ForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "MixtralForCausalLM",
                 "Qwen3MoeForCausalLM", "LlamaForCausalLM"):
        assert arch in str(err.value)


def _gpu_ready() -> bool:
    import os

    return torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"


@pytest.mark.skipif(not _gpu_ready(), reason="needs CUDA and TRITON_INTERPRET=0")
@pytest.mark.parametrize("name", ["gemma2", "gemma3", "mixtral", "qwen3_moe", "phi3"])
def test_bfloat16_families_on_gpu_match_float32_reference(family_dir, name):
    """On a GPU, bf16 through the compiled kernels (windowed / soft-capped attention, fused MoE):
    a prefill chunk then one-token decodes over scrambled blocks; the logits are no further from
    the float32 CPU model's than transformers' own bf16 forward is."""
    from transformers import AutoModelForCausalLM

    model_dir = family_dir(name)
    (prompt,) = _prompts(384, (20,), seed=9)
    cpu = ModelRunner(runner_config(model_dir, block_size=4, num_kv_blocks=32))
    (want,) = cpu.compute_logits(batch([chunk(0, prompt, 0, list(range(5)))]))
    gpu = ModelRunner(runner_config(model_dir, device="cuda", dtype="bfloat16", block_size=4, num_kv_blocks=32))
    table = [7, 2, 9, 4, 11]
    pieces = gpu.compute_logits(batch([chunk(0, prompt[:12], 0, table)]))
    for pos in range(12, len(prompt)):
        pieces += gpu.compute_logits(batch([chunk(0, prompt[pos:pos + 1], pos, table, prompt_token_ids=prompt)]))
    got = torch.cat(pieces).cpu()
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        hf_bf16 = hf(torch.tensor([prompt])).logits[0].float()
    ours_err, hf_err = (got - want).abs().max().item(), (hf_bf16 - want).abs().max().item()
    assert ours_err <= 2 * hf_err + 1e-2, (ours_err, hf_err)
    gpu.shutdown()
