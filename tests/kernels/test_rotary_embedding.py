"""rotary_embedding (Triton, interpreter) vs. its torch ref; the ref and compute_cos_sin_cache vs.
transformers' LlamaRotaryEmbedding (default, linear and llama3 rope) and apply_rotary_pos_emb, and
Phi-3's LongRoPE with partial rotary.

Tolerances: fp32 1e-5; fp16 one ulp (2e-3 at |x| ~ 4); bf16 one ulp (3e-2: the interpreter
rounds fp32 -> bf16 toward zero, torch to nearest).
"""

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from paged_triton.kernels.rotary_embedding import compute_cos_sin_cache, rotary_embedding, rotary_embedding_ref

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")

TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
}
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def _fused_qkv(num_tokens, num_heads, num_kv_heads, head_dim, dtype):
    """q and k as strided views of one qkv buffer (as the model produces them), and the v part."""
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim).to(dtype)
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    q = qkv[:, :q_size].view(num_tokens, num_heads, head_dim)
    k = qkv[:, q_size : q_size + kv_size].view(num_tokens, num_kv_heads, head_dim)
    return qkv, q, k, qkv[:, q_size + kv_size :]


@pytest.mark.parametrize(
    "dtype, num_heads, num_kv_heads, head_dim, rotary_dim, rope_scaling",
    [
        (torch.float32, 4, 2, 64, 64, None),
        (torch.float16, 8, 1, 128, 128, LLAMA3),
        (torch.bfloat16, 2, 2, 64, 64, None),
        (torch.float32, 4, 2, 128, 64, None),  # partial rotary
        (torch.float32, 6, 2, 80, 80, LLAMA3),  # head_dim not a power of two
    ],
)
def test_rotary_kernel_matches_ref(dtype, num_heads, num_kv_heads, head_dim, rotary_dim, rope_scaling):
    max_position, num_tokens = 20000, 13
    cache = compute_cos_sin_cache(head_dim, max_position, 500000.0, rope_scaling, rotary_dim=rotary_dim)
    positions = torch.randint(0, max_position, (num_tokens,))
    positions[0] = 0
    qkv, q, k, v = _fused_qkv(num_tokens, num_heads, num_kv_heads, head_dim, dtype)
    v_before = v.clone()
    q_ref, k_ref = q.clone(), k.clone()

    assert rotary_embedding(positions, q, k, cache) == (q, k)
    rotary_embedding_ref(positions, q_ref, k_ref, cache)

    torch.testing.assert_close(q, q_ref, **TOL[dtype])
    torch.testing.assert_close(k, k_ref, **TOL[dtype])
    assert torch.equal(v, v_before)  # the neighbouring v columns are untouched


@pytest.mark.parametrize("head_dim, base, rope_scaling", [(64, 10000.0, None), (128, 500000.0, LLAMA3)])
def test_cos_sin_cache_and_ref_match_transformers(head_dim, base, rope_scaling):
    num_heads = 4
    config = LlamaConfig(
        hidden_size=head_dim * num_heads,
        num_attention_heads=num_heads,
        num_key_value_heads=2,
        max_position_embeddings=131072,
        rope_parameters={"rope_type": "default", "rope_theta": base, **(rope_scaling or {})},
    )
    rope = LlamaRotaryEmbedding(config)
    positions = torch.tensor([0, 1, 2, 100, 4095, 8191, 8192, 20000, 131071])
    cos, sin = rope(torch.zeros(1), positions[None])  # [1, T, head_dim] each
    cache = compute_cos_sin_cache(head_dim, 131072, base, config.rope_parameters)
    half = head_dim // 2
    torch.testing.assert_close(cache[positions, :half], cos[0, :, :half], atol=1e-6, rtol=0)
    torch.testing.assert_close(cache[positions, half:], sin[0, :, :half], atol=1e-6, rtol=0)

    q = torch.randn(len(positions), num_heads, head_dim)
    k = torch.randn(len(positions), 2, head_dim)
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos[0], sin[0], unsqueeze_dim=1)
    rotary_embedding_ref(positions, q, k, cache)
    torch.testing.assert_close(q, q_hf, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k, k_hf, atol=1e-5, rtol=1e-5)


def test_linear_rope_matches_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(
        hidden_size=256,
        num_attention_heads=4,
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    )
    inv_freq, _ = ROPE_INIT_FUNCTIONS["linear"](config)
    positions = torch.arange(0, 4096, 7)
    cache = compute_cos_sin_cache(64, 4096, 10000.0, {"type": "linear", "factor": 4.0})
    freqs = positions[:, None].float() * inv_freq[None, :]
    torch.testing.assert_close(cache[positions], torch.cat((freqs.cos(), freqs.sin()), -1), atol=1e-6, rtol=0)


@pytest.mark.parametrize("seq_len", [100, 5000])
def test_longrope_partial_rotary_matches_transformers_phi3(seq_len):
    """Phi-3's rotary with LongRoPE and partial rotary (Phi-4-mini style, rotary_dim 3/4 of the
    head): the short factors within the original 4096 positions, the long ones past it, the
    attention factor on cos/sin, and the untouched tail of each head."""
    from transformers import Phi3Config
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding
    from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb as phi3_apply

    head_dim, rotary_dim = 64, 48
    g = torch.Generator().manual_seed(0)
    rope = {
        "rope_type": "longrope",
        "short_factor": (1 + torch.rand(rotary_dim // 2, generator=g)).tolist(),
        "long_factor": (1 + 20 * torch.rand(rotary_dim // 2, generator=g)).tolist(),
        "partial_rotary_factor": rotary_dim / head_dim,
    }
    config = Phi3Config(hidden_size=4 * head_dim, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=32768, original_max_position_embeddings=4096,
                        rope_parameters=dict(rope, rope_theta=10000.0))
    hf = Phi3RotaryEmbedding(config)
    positions = torch.arange(seq_len)
    cos, sin = hf(torch.zeros(1), positions[None])  # long factors iff seq_len > 4096
    scaling = dict(config.rope_parameters)
    cache = compute_cos_sin_cache(head_dim, 32768, 10000.0, scaling, rotary_dim=rotary_dim,
                                  use_long_factor=seq_len > 4096)
    half = rotary_dim // 2
    torch.testing.assert_close(cache[positions, :half], cos[0, :, :half], atol=1e-6, rtol=0)
    torch.testing.assert_close(cache[positions, half:], sin[0, :, :half], atol=1e-6, rtol=0)
    q, k = torch.randn(seq_len, 4, head_dim), torch.randn(seq_len, 2, head_dim)
    q_hf, k_hf = phi3_apply(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    rotary_embedding_ref(positions, q, k, cache)
    torch.testing.assert_close(q, q_hf[0].transpose(0, 1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k, k_hf[0].transpose(0, 1), atol=1e-5, rtol=1e-5)


def test_rotary_rejects_bad_input():
    cache = compute_cos_sin_cache(64, 128, 10000.0)
    q, k = torch.randn(3, 4, 64), torch.randn(3, 2, 64)
    with pytest.raises(ValueError, match="positions has 2 tokens"):
        rotary_embedding(torch.arange(2), q, k, cache)
    with pytest.raises(ValueError, match="k dtype"):
        rotary_embedding(torch.arange(3), q, k.half(), cache)
    with pytest.raises(ValueError, match="rotary_dim 128"):
        rotary_embedding(torch.arange(3), q, k, compute_cos_sin_cache(128, 128, 10000.0))
    with pytest.raises(ValueError, match="cos_sin_cache must be one of"):
        rotary_embedding(torch.arange(3), q, k, cache.double())
    with pytest.raises(ValueError, match="positions must be one of"):
        rotary_embedding(torch.arange(3).float(), q, k, cache)
    with pytest.raises(ValueError, match="positions must be contiguous"):
        rotary_embedding(torch.arange(6)[::2], q, k, cache)
    with pytest.raises(ValueError, match="contiguous last dim"):
        rotary_embedding(torch.arange(3), torch.randn(3, 4, 128)[..., ::2], k, cache)
    with pytest.raises(ValueError, match="unsupported rope_scaling type 'yarn'"):
        compute_cos_sin_cache(64, 128, 10000.0, {"rope_type": "yarn", "factor": 4.0})
