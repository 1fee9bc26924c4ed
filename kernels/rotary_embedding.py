"""Rotary position embedding, GPT-NeoX style (rotate halves), applied in place to q and k.

``cos_sin_cache[pos] = cat(cos(pos * inv_freq), sin(pos * inv_freq))`` of shape
``[max_position, rotary_dim]`` (fp32), built by :func:`compute_cos_sin_cache` with the same
inverse frequencies as Hugging Face's rope init functions (default, linear, llama3, longrope).
``rotary_dim`` may be smaller than ``head_dim`` (partial rotary: the rest passes through).
One program rotates every q and k head of one token.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._utils import ATTN_DTYPES, check_dim, check_dtype, check_kernel_tensors

_OP = "rotary_embedding"


@triton.jit
def _rotate_heads(
    x_ptr,  # [num_tokens, num_heads, head_dim] (this token's row is at x_ptr + token * stride_t)
    token,
    stride_t,
    stride_h,
    cos,  # [1, BLOCK_HALF] fp32
    sin,  # [1, BLOCK_HALF] fp32
    NUM_HEADS: tl.constexpr,
    HALF_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_HALF)
    mask = (offs_h[:, None] < NUM_HEADS) & (offs_d[None, :] < HALF_DIM)
    ptr1 = x_ptr + token * stride_t + offs_h[:, None] * stride_h + offs_d[None, :]
    x1 = tl.load(ptr1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr1 + HALF_DIM, mask=mask, other=0.0).to(tl.float32)
    out1 = x1 * cos - x2 * sin
    out2 = x2 * cos + x1 * sin
    tl.store(ptr1, out1.to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(ptr1 + HALF_DIM, out2.to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_embedding_kernel(
    positions_ptr,  # [num_tokens] int32/int64
    q_ptr,  # [num_tokens, num_q_heads, head_dim], rotated in place
    k_ptr,  # [num_tokens, num_kv_heads, head_dim], rotated in place
    cos_sin_ptr,  # [max_position, rotary_dim]: cos over the first half, sin over the second (fp32 usually)
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_cs,
    NUM_Q_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HALF_DIM: tl.constexpr,  # rotary_dim // 2
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_HALF)
    d_mask = offs_d < HALF_DIM
    cos = tl.load(cos_sin_ptr + pos * stride_cs + offs_d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(cos_sin_ptr + pos * stride_cs + HALF_DIM + offs_d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    _rotate_heads(q_ptr, token, stride_qt, stride_qh, cos, sin, NUM_Q_HEADS, HALF_DIM, BLOCK_HQ, BLOCK_HALF)
    _rotate_heads(k_ptr, token, stride_kt, stride_kh, cos, sin, NUM_KV_HEADS, HALF_DIM, BLOCK_HK, BLOCK_HALF)


def _check(positions, q, k, cos_sin_cache) -> None:
    check_dim(_OP, "positions", positions, 1, "[num_tokens]")
    check_dim(_OP, "q", q, 3, "[num_tokens, num_q_heads, head_dim]")
    check_dim(_OP, "k", k, 3, "[num_tokens, num_kv_heads, head_dim]")
    check_dim(_OP, "cos_sin_cache", cos_sin_cache, 2, "[max_position, rotary_dim]")
    check_dtype(_OP, "positions", positions, (torch.int32, torch.int64))
    check_dtype(_OP, "q", q, ATTN_DTYPES)
    check_dtype(_OP, "cos_sin_cache", cos_sin_cache, ATTN_DTYPES)
    if k.dtype != q.dtype:
        raise ValueError(f"{_OP}: k dtype {k.dtype} != q dtype {q.dtype}")
    if q.shape[0] != positions.shape[0] or k.shape[0] != positions.shape[0]:
        raise ValueError(
            f"{_OP}: positions has {positions.shape[0]} tokens but q has {q.shape[0]} and k has {k.shape[0]}"
        )
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"{_OP}: head_dim of q ({q.shape[2]}) and k ({k.shape[2]}) differ")
    rotary_dim = cos_sin_cache.shape[1]
    if rotary_dim % 2 != 0 or rotary_dim > q.shape[2] or rotary_dim == 0:
        raise ValueError(
            f"{_OP}: cos_sin_cache rotary_dim {rotary_dim} must be even, > 0 and <= head_dim {q.shape[2]}"
        )


def rotary_embedding(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q`` and ``k`` in place (NeoX style) by the angles of ``positions``.

    Args:
        positions: int32/int64 ``[num_tokens]``, each < ``cos_sin_cache.shape[0]``.
        q: ``[num_tokens, num_q_heads, head_dim]``; k: ``[num_tokens, num_kv_heads, head_dim]``;
            strided views are fine (e.g. of a fused qkv output) if the last dim is contiguous.
        cos_sin_cache: ``[max_position, rotary_dim]`` from :func:`compute_cos_sin_cache` (fp32; a
            16-bit copy also works, at 16-bit accuracy).
    Returns:
        ``(q, k)``, the same tensors, rotated.
    """
    _check(positions, q, k, cos_sin_cache)
    check_kernel_tensors(_OP, {"positions": positions, "q": q, "k": k, "cos_sin_cache": cos_sin_cache},
                         vectors=("positions",))
    num_tokens, num_q_heads, _ = q.shape
    num_kv_heads = k.shape[1]
    half_dim = cos_sin_cache.shape[1] // 2
    if num_tokens == 0:
        return q, k
    block_half = triton.next_power_of_2(half_dim)
    _rotary_embedding_kernel[(num_tokens,)](
        positions,
        q,
        k,
        cos_sin_cache,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        cos_sin_cache.stride(0),
        NUM_Q_HEADS=num_q_heads,
        NUM_KV_HEADS=num_kv_heads,
        HALF_DIM=half_dim,
        BLOCK_HQ=triton.next_power_of_2(num_q_heads),
        BLOCK_HK=triton.next_power_of_2(num_kv_heads),
        BLOCK_HALF=block_half,
        num_warps=4 if num_q_heads * block_half >= 1024 else 1,
    )
    return q, k


def rotary_embedding_ref(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch :func:`rotary_embedding` (in place, fp32 math, returns ``(q, k)``)."""
    _check(positions, q, k, cos_sin_cache)
    rotary_dim = cos_sin_cache.shape[1]
    half = rotary_dim // 2
    cos_sin = cos_sin_cache[positions.long()].float()  # [num_tokens, rotary_dim]
    cos = cos_sin[:, None, :half]
    sin = cos_sin[:, None, half:]
    for x in (q, k):
        x1 = x[..., :half].float()
        x2 = x[..., half:rotary_dim].float()
        rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        x[..., :rotary_dim] = rotated.to(x.dtype)
    return q, k


def _inv_freq(rotary_dim: int, base: float, rope_scaling: dict | None, use_long_factor: bool) -> torch.Tensor:
    # Same expression as transformers' rope init functions, so the fp32 values match bit for bit.
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    inv_freq = 1.0 / (base**exponents)
    rope_type = None
    if rope_scaling:
        rope_type = rope_scaling.get("rope_type", rope_scaling.get("type"))
    if rope_type in (None, "default"):
        return inv_freq
    if rope_type == "longrope":
        factors = rope_scaling["long_factor" if use_long_factor else "short_factor"]
        if len(factors) != rotary_dim // 2:
            raise ValueError(
                f"compute_cos_sin_cache: longrope factors have {len(factors)} entries, rotary_dim {rotary_dim} "
                f"needs {rotary_dim // 2}")
        return 1.0 / (torch.tensor(factors, dtype=torch.float32) * base**exponents)
    if rope_type == "linear":
        return inv_freq / float(rope_scaling["factor"])
    if rope_type == "llama3":
        factor = float(rope_scaling["factor"])
        low_freq_factor = float(rope_scaling["low_freq_factor"])
        high_freq_factor = float(rope_scaling["high_freq_factor"])
        old_context_len = rope_scaling["original_max_position_embeddings"]
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths are stretched by `factor`, short ones kept, the band between interpolated.
        inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * inv_freq_llama / factor + smooth * inv_freq_llama
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium, smoothed, inv_freq_llama)
    raise ValueError(
        f"compute_cos_sin_cache: unsupported rope_scaling type {rope_type!r} (have default, linear, llama3, "
        "longrope)"
    )


def longrope_attention_factor(rope_scaling: dict, max_position: int) -> float:
    """LongRoPE's cos/sin scale: ``attention_factor`` if given, else sqrt(1 + ln(f) / ln(original))
    with f = ``factor``, or max_position / original (transformers' default for Phi-3)."""
    if rope_scaling.get("attention_factor") is not None:
        return float(rope_scaling["attention_factor"])
    original = rope_scaling["original_max_position_embeddings"]
    factor = rope_scaling.get("factor") or max_position / original
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def compute_cos_sin_cache(
    head_dim: int,
    max_position: int,
    base: float,
    rope_scaling: dict | None = None,
    device: torch.device | str | None = None,
    rotary_dim: int | None = None,
    use_long_factor: bool = False,
) -> torch.Tensor:
    """fp32 ``[max_position, rotary_dim]`` table ``cat(cos, sin)`` for :func:`rotary_embedding`.

    Args:
        head_dim: attention head size; ``rotary_dim`` defaults to it.
        max_position: number of positions in the table (also LongRoPE's default scaling factor's
            numerator: the config's ``max_position_embeddings``).
        base: ``rope_theta``.
        rope_scaling: the HF config's ``rope_scaling`` / ``rope_parameters`` dict or None; supports
            ``rope_type`` (or legacy ``type``) ``default``, ``linear``, ``llama3`` and ``longrope``
            (``short_factor``, ``long_factor``, ``original_max_position_embeddings``, optional
            ``factor`` / ``attention_factor``).
        device: where to build the table (default CPU).
        rotary_dim: rotated dims when smaller than head_dim (partial rotary).
        use_long_factor: longrope only: the long factors (else the short ones), for every position.
    """
    rotary_dim = head_dim if rotary_dim is None else rotary_dim
    if rotary_dim % 2 != 0 or not 0 < rotary_dim <= head_dim:
        raise ValueError(f"compute_cos_sin_cache: rotary_dim {rotary_dim} must be even and in (0, {head_dim}]")
    inv_freq = _inv_freq(rotary_dim, base, rope_scaling, use_long_factor).to(device)
    positions = torch.arange(max_position, dtype=torch.int64, device=device).float()
    freqs = positions[:, None] * inv_freq[None, :]
    table = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
    rope_type = (rope_scaling or {}).get("rope_type", (rope_scaling or {}).get("type"))
    if rope_type == "longrope":
        table = table * longrope_attention_factor(rope_scaling, max_position)
    return table.contiguous()
