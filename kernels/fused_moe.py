"""Fused mixture-of-experts MLP: every token's top-k experts in two grouped GEMMs (Mixtral, Qwen3-MoE).

    out[t] = sum_j  w[t, j] * down_e( act(gate_e(x[t])) * up_e(x[t]) ),   e = topk_ids[t, j]

Design (vLLM's ``fused_moe`` is the reference for the approach):
- Alignment (:func:`moe_align_block_size`, torch ops on the device): the ``T * k`` (token, expert)
  pairs are sorted by expert and each expert's run is padded to a multiple of ``BLOCK_M`` with the
  sentinel ``T * k``, so every ``BLOCK_M`` rows of the sorted order belong to one expert. It never
  reads a value on the host (no sync) and its shapes depend only on ``T``, so it can be captured
  in a CUDA graph: the row count is the bound ``min(T*k + E*(BLOCK_M - 1), T*k*BLOCK_M)`` and the
  programs past the real padded length (``num_tokens_post_padded``, read on the device) exit.
- One grouped GEMM per projection (:func:`_fused_moe_gemm_kernel`): a program takes ``BLOCK_M``
  sorted pairs (one expert) and ``BLOCK_N`` output features, gathers the pairs' input rows
  (the token's hidden state for gate_up, the pair's activation for down), multiplies by that
  expert's weight tile by tile along K, and scatters the rows back to the pairs' slots. Programs
  are ordered in groups of ``GROUP_M`` row blocks so consecutive programs share weight tiles in L2.
- gate_up -> ``silu_and_mul`` / ``gelu_tanh_and_mul`` -> down, the routing weight applied in the
  down GEMM's epilogue (fp32), then the k rows of each token summed.

Weights are stacked per expert as nn.Linear stores them: ``w13 [E, 2 * I, H]`` (gate rows, then
up rows) and ``w2 [E, H, I]``. Interpreter-tested in fp32/fp16; ``fused_moe_ref`` is the plain-torch
per-expert loop (the CPU path).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import activation as _activation
from ._utils import (
    ATTN_DTYPES,
    check_dim,
    check_dtype,
    check_kernel_tensors,
    dot_precision,
    interpreting,
)

_OP = "fused_moe"
ACTIVATIONS = ("silu", "gelu_tanh")


@triton.jit(do_not_specialize=["num_valid_pairs", "num_m_blocks"])
def _fused_moe_gemm_kernel(
    a_ptr,  # [num_rows, K]: hidden states (row = pair // TOP_K) or activations (row = pair)
    b_ptr,  # [num_experts, N, K]: expert weights, out x in features
    c_ptr,  # [num_pairs, N]: one output row per (token, expert) pair
    topk_weights_ptr,  # [num_pairs] fp32 routing weights (MUL_ROUTED_WEIGHT only)
    sorted_pair_ids_ptr,  # [num_sorted] int32: pairs grouped by expert, runs padded with num_valid_pairs
    block_expert_ptr,  # [num_sorted // BLOCK_M] int32: the expert of each BLOCK_M rows
    num_post_padded_ptr,  # [1] int32: rows of the sorted order in use
    N,
    K,
    num_valid_pairs,
    num_m_blocks,
    stride_am,
    stride_be,
    stride_bn,
    stride_cm,
    TOP_K: tl.constexpr,
    MUL_ROUTED_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    num_n_blocks = tl.cdiv(N, BLOCK_N)
    programs_per_group = GROUP_M * num_n_blocks
    first_m = (pid // programs_per_group) * GROUP_M
    group_rows = tl.minimum(num_m_blocks - first_m, GROUP_M)
    pid_m = first_m + (pid % programs_per_group) % group_rows
    pid_n = (pid % programs_per_group) // group_rows
    if pid_m * BLOCK_M >= tl.load(num_post_padded_ptr):
        return

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_pair_ids_ptr + offs_m).to(tl.int64)
    pair_mask = pairs < num_valid_pairs
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + (pairs // TOP_K)[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + expert * stride_be + offs_n[None, :].to(tl.int64) * stride_bn + offs_k[:, None]

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0
        a = tl.load(a_ptrs, mask=pair_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if MUL_ROUTED_WEIGHT:
        weights = tl.load(topk_weights_ptr + pairs, mask=pair_mask, other=0.0)
        acc = acc * weights[:, None]
    tl.store(
        c_ptr + pairs[:, None] * stride_cm + offs_n[None, :],
        acc.to(c_ptr.dtype.element_ty),
        mask=pair_mask[:, None] & n_mask[None, :],
    )


def tile_config(num_tokens: int, dtype: torch.dtype) -> dict:
    """BLOCK_M/N/K, GROUP_M, warps and stages of the grouped GEMMs (register use checked by
    ``python -m paged_triton.kernels.aot``). Few tokens (decode) give each expert a few rows: a
    short BLOCK_M wastes less on padding."""
    if interpreting():
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=32, GROUP_M=1, num_warps=4, num_stages=1)
    if dtype == torch.float32:  # ieee fp32 dots run on FMA units: small tiles, no spills
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=2)
    if num_tokens <= 32:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, GROUP_M=1, num_warps=4, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)


def moe_align_block_size(topk_ids: torch.Tensor, block_m: int, num_experts: int):
    """Sort the (token, expert) pairs by expert, each expert's run padded to ``block_m``.

    Args:
        topk_ids: ``[num_tokens, top_k]`` expert of each pair (pair id = token * top_k + j).
    Returns:
        ``(sorted_pair_ids [num_sorted] int32, block_expert [num_sorted // block_m] int32,
        num_post_padded [1] int32)``; padding rows hold ``num_tokens * top_k``, rows past
        ``num_post_padded`` are unused (their block's expert is clamped to a valid id).
    """
    device = topk_ids.device
    flat = topk_ids.reshape(-1).to(torch.int64)
    num_pairs = flat.numel()
    num_sorted = min(num_pairs + num_experts * (block_m - 1), num_pairs * block_m)
    num_sorted = -(-num_sorted // block_m) * block_m
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))  # not bincount: that syncs for its size
    padded = (counts + block_m - 1) // block_m * block_m
    padded_ends = padded.cumsum(0)
    padded_starts = padded_ends - padded
    count_starts = counts.cumsum(0) - counts
    order = torch.argsort(flat, stable=True)
    experts_sorted = flat[order]
    rank = torch.arange(num_pairs, device=device) - count_starts[experts_sorted]
    sorted_pair_ids = torch.full((num_sorted,), num_pairs, dtype=torch.int32, device=device)
    sorted_pair_ids[padded_starts[experts_sorted] + rank] = order.to(torch.int32)
    block_starts = torch.arange(0, num_sorted, block_m, device=device)
    block_expert = torch.searchsorted(padded_ends, block_starts, right=True).clamp_(max=num_experts - 1)
    return sorted_pair_ids, block_expert.to(torch.int32), padded_ends[-1:].to(torch.int32)


def _check(x, w13, w2, topk_weights, topk_ids, activation) -> None:
    check_dim(_OP, "x", x, 2, "[num_tokens, hidden]")
    check_dim(_OP, "w13", w13, 3, "[num_experts, 2 * intermediate, hidden]")
    check_dim(_OP, "w2", w2, 3, "[num_experts, hidden, intermediate]")
    check_dim(_OP, "topk_weights", topk_weights, 2, "[num_tokens, top_k]")
    check_dim(_OP, "topk_ids", topk_ids, 2, "[num_tokens, top_k]")
    num_tokens, hidden = x.shape
    num_experts, two_i, _ = w13.shape
    if w13.shape[2] != hidden or two_i % 2 != 0:
        raise ValueError(f"{_OP}: w13 must be [num_experts, 2 * intermediate, {hidden}], got {tuple(w13.shape)}")
    if tuple(w2.shape) != (num_experts, hidden, two_i // 2):
        raise ValueError(f"{_OP}: w2 must be {(num_experts, hidden, two_i // 2)}, got {tuple(w2.shape)}")
    if topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != num_tokens:
        raise ValueError(
            f"{_OP}: topk_ids {tuple(topk_ids.shape)} and topk_weights {tuple(topk_weights.shape)} must both "
            f"be [{num_tokens}, top_k]")
    check_dtype(_OP, "x", x, ATTN_DTYPES)
    if w13.dtype != x.dtype or w2.dtype != x.dtype:
        raise ValueError(f"{_OP}: x, w13, w2 dtypes differ: {x.dtype}, {w13.dtype}, {w2.dtype}")
    check_dtype(_OP, "topk_ids", topk_ids, (torch.int32, torch.int64))
    check_dtype(_OP, "topk_weights", topk_weights, (torch.float32,))
    if activation not in ACTIVATIONS:
        raise ValueError(f"{_OP}: activation must be one of {ACTIVATIONS}, got {activation!r}")


def _grouped_gemm(a, b, c, topk_weights, sorted_pair_ids, block_expert, num_post_padded, top_k: int,
                  mul_routed_weight: bool, cfg: dict) -> None:
    num_pairs, n = c.shape
    k = b.shape[2]
    num_m_blocks = sorted_pair_ids.shape[0] // cfg["BLOCK_M"]
    grid = (num_m_blocks * triton.cdiv(n, cfg["BLOCK_N"]),)
    _fused_moe_gemm_kernel[grid](
        a, b, c, topk_weights, sorted_pair_ids, block_expert, num_post_padded,
        n, k, num_pairs, num_m_blocks,
        a.stride(0), b.stride(0), b.stride(1), c.stride(0),
        TOP_K=top_k,
        MUL_ROUTED_WEIGHT=mul_routed_weight,
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=cfg["BLOCK_K"],
        GROUP_M=cfg["GROUP_M"],
        DOT_PRECISION=dot_precision(a.dtype),
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """The MoE MLP of every token over its routed experts, in two grouped GEMMs.

    Args:
        x: ``[num_tokens, hidden]`` fp16/bf16/fp32, last dim contiguous.
        w13: ``[num_experts, 2 * intermediate, hidden]`` (gate rows, then up rows), x's dtype.
        w2: ``[num_experts, hidden, intermediate]``.
        topk_weights: fp32 ``[num_tokens, top_k]`` routing weights.
        topk_ids: int32/int64 ``[num_tokens, top_k]`` experts, each in ``[0, num_experts)`` (not
            checked on the device: that would need a host sync).
        activation: ``"silu"`` (Mixtral, Qwen3-MoE) or ``"gelu_tanh"``.
    Returns:
        ``[num_tokens, hidden]`` in x's dtype.
    """
    _check(x, w13, w2, topk_weights, topk_ids, activation)
    check_kernel_tensors(_OP, {"x": x, "w13": w13, "w2": w2, "topk_weights": topk_weights, "topk_ids": topk_ids},
                         vectors=())
    if not (w13.is_contiguous() and w2.is_contiguous()):
        raise ValueError(f"{_OP}: w13 and w2 must be contiguous")
    num_tokens, hidden = x.shape
    top_k = topk_ids.shape[1]
    num_experts, two_i, _ = w13.shape
    if num_tokens == 0:
        return torch.empty_like(x)
    cfg = tile_config(num_tokens, x.dtype)
    sorted_pair_ids, block_expert, num_post_padded = moe_align_block_size(topk_ids, cfg["BLOCK_M"], num_experts)
    weights = topk_weights.reshape(-1).contiguous()
    gate_up = torch.empty(num_tokens * top_k, two_i, dtype=x.dtype, device=x.device)
    _grouped_gemm(x, w13, gate_up, weights, sorted_pair_ids, block_expert, num_post_padded, top_k, False, cfg)
    act = (_activation.silu_and_mul if activation == "silu" else _activation.gelu_tanh_and_mul)(gate_up)
    down = torch.empty(num_tokens * top_k, hidden, dtype=x.dtype, device=x.device)
    _grouped_gemm(act, w2, down, weights, sorted_pair_ids, block_expert, num_post_padded, 1, True, cfg)
    return down.view(num_tokens, top_k, hidden).sum(dim=1)


def fused_moe_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """Plain-torch :func:`fused_moe` (same arguments): a loop over the experts that were picked,
    with the kernel's rounding (gate_up and the activation in x's dtype, the weighted down
    projection rounded once per pair, the pairs summed)."""
    _check(x, w13, w2, topk_weights, topk_ids, activation)
    num_tokens, hidden = x.shape
    act_fn = _activation.silu_and_mul_ref if activation == "silu" else _activation.gelu_tanh_and_mul_ref
    per_pair = torch.zeros(num_tokens, topk_ids.shape[1], hidden, dtype=x.dtype, device=x.device)
    for expert in torch.unique(topk_ids).tolist():
        tokens, slots = torch.nonzero(topk_ids == expert, as_tuple=True)
        gate_up = (x[tokens].float() @ w13[expert].float().t()).to(x.dtype)
        down = act_fn(gate_up).float() @ w2[expert].float().t()
        per_pair[tokens, slots] = (down * topk_weights[tokens, slots, None]).to(x.dtype)
    return per_pair.sum(dim=1)
