"""The engine's ops, one dispatch each: the Triton launcher for CUDA tensors, plain torch elsewhere.

On CPU, attention and the KV store take the batched SDPA path of :mod:`kernels.cpu_attention`
(the ``*_ref`` functions stay the independent references the kernel tests compare against);
soft-capped attention, which SDPA cannot express, keeps the reference.

Layers call these and never branch on the device themselves; a new kernel (a dequant GEMM, a
fused MoE) adds one function here. The choice is made from the tensor the op gets, so a model
moved to another device needs no switch flipped.

Tests run the Triton launchers on CPU tensors in Triton's interpreter (``TRITON_INTERPRET=1``)
inside ``with triton_on_cpu():``, which exercises the exact launches the engine makes on a GPU.
That override is a context variable: it holds for the code run inside the ``with`` block on that
thread only, so it cannot leak into other tests or threads.
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager

import torch

from . import activation as _activation
from . import cpu_attention as _cpu_attention
from . import fp8_gemm as _fp8
from . import fused_moe as _fused_moe
from . import paged_decode_attention as _decode
from . import paged_prefill_attention as _prefill
from . import rms_norm as _rms_norm
from . import rotary_embedding as _rotary
from . import store_kvcache as _store
from . import wna16_gemm as _wna16

_triton_on_cpu = contextvars.ContextVar("paged_triton_kernels_on_cpu", default=False)


@contextmanager
def triton_on_cpu():
    """Inside the block, CPU tensors go to the Triton launchers too (needs ``TRITON_INTERPRET=1``)."""
    token = _triton_on_cpu.set(True)
    try:
        yield
    finally:
        _triton_on_cpu.reset(token)


def use_triton(t: torch.Tensor) -> bool:
    """Whether an op on ``t`` runs the Triton launcher (CUDA, or inside :func:`triton_on_cpu`)."""
    return t.is_cuda or _triton_on_cpu.get()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             unit_offset: bool = False):
    """See :func:`kernels.rms_norm.rms_norm` (``unit_offset``: Gemma's ``1 + weight``)."""
    impl = _rms_norm.rms_norm if use_triton(x) else _rms_norm.rms_norm_ref
    return impl(x, weight, eps, residual=residual, unit_offset=unit_offset)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """See :func:`kernels.activation.silu_and_mul`."""
    impl = _activation.silu_and_mul if use_triton(x) else _activation.silu_and_mul_ref
    return impl(x)


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """See :func:`kernels.activation.gelu_tanh_and_mul`."""
    impl = _activation.gelu_tanh_and_mul if use_triton(x) else _activation.gelu_tanh_and_mul_ref
    return impl(x)


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """See :func:`kernels.fused_moe.fused_moe` (the CPU path is the per-expert loop of its ref)."""
    impl = _fused_moe.fused_moe if use_triton(x) else _fused_moe.fused_moe_ref
    return impl(x, w13, w2, topk_weights, topk_ids, activation)


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                     cos_sin_cache: torch.Tensor) -> None:
    """Rotate q and k in place; see :func:`kernels.rotary_embedding.rotary_embedding`."""
    impl = _rotary.rotary_embedding if use_triton(q) else _rotary.rotary_embedding_ref
    impl(positions, q, k, cos_sin_cache)


def store_kvcache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor) -> None:
    """See :func:`kernels.store_kvcache.store_kvcache`."""
    if use_triton(k):
        _store.store_kvcache(k, v, k_cache, v_cache, slot_mapping)
    elif k.device.type == "cpu" and k_cache.is_contiguous() and v_cache.is_contiguous():
        _cpu_attention.store_kvcache_cpu(k, v, k_cache, v_cache, slot_mapping)
    else:
        _store.store_kvcache_ref(k, v, k_cache, v_cache, slot_mapping)


def paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale: float,
                           out: torch.Tensor, sliding_window: int | None = None,
                           softcap: float | None = None, cache: dict | None = None) -> None:
    """One query token per sequence, written into ``out``; see
    :func:`kernels.paged_decode_attention.paged_decode_attention`. ``cache``: the forward's
    scratch dict (``AttentionMetadata.op_cache``), where the CPU path keeps its masks."""
    if use_triton(q):
        _decode.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, out=out,
                                       sliding_window=sliding_window, softcap=softcap)
    elif q.device.type == "cpu" and softcap is None:
        _cpu_attention.paged_decode_attention_cpu(q, k_cache, v_cache, block_tables, context_lens, scale,
                                                  out, sliding_window=sliding_window, cache=cache)
    else:
        out.copy_(_decode.paged_decode_attention_ref(q, k_cache, v_cache, block_tables, context_lens, scale,
                                                     sliding_window=sliding_window, softcap=softcap))


def paged_prefill_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens,
                            scale: float, out: torch.Tensor, max_seqlen_q: int,
                            sliding_window: int | None = None, softcap: float | None = None,
                            cache: dict | None = None) -> None:
    """Causal attention of query chunks, written into ``out``; see
    :func:`kernels.paged_prefill_attention.paged_prefill_attention`. ``max_seqlen_q`` is known on
    the host, so the launcher needs no device read."""
    if use_triton(q):
        _prefill.paged_prefill_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens,
                                         scale, out=out, max_seqlen_q=max_seqlen_q,
                                         sliding_window=sliding_window, softcap=softcap)
    elif q.device.type == "cpu" and softcap is None:
        _cpu_attention.paged_prefill_attention_cpu(q, k_cache, v_cache, block_tables, cu_seqlens_q,
                                                   context_lens, scale, out, max_seqlen_q,
                                                   sliding_window=sliding_window, cache=cache)
    else:
        out.copy_(_prefill.paged_prefill_attention_ref(q, k_cache, v_cache, block_tables, cu_seqlens_q,
                                                       context_lens, scale, sliding_window=sliding_window,
                                                       softcap=softcap))


def wna16_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
               g_idx: torch.Tensor | None, bits: int, group_size: int) -> torch.Tensor:
    """``x @ W`` for a 4/8-bit packed weight; see :func:`kernels.wna16_gemm.wna16_gemm` (elsewhere:
    dequantize, then matmul)."""
    impl = _wna16.wna16_gemm if use_triton(x) else _wna16.wna16_gemm_ref
    return impl(x, qweight, scales, zeros, g_idx, bits, group_size)


def fp8_gemm(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, *,
             weight_block_k: int | None, activation: str | None, input_scale: torch.Tensor | None,
             activation_group: int | None, scalar_weight_scale: bool) -> torch.Tensor:
    """FP8 linear; see :mod:`kernels.fp8_gemm`: ``torch._scaled_mm`` where the GPU and operands
    allow it, else the weight dequantized per call (block-wise scales, weight-only FP8, CPU)."""
    kwargs = dict(weight_block_k=weight_block_k, activation=activation, input_scale=input_scale,
                  activation_group=activation_group, scalar_weight_scale=scalar_weight_scale)
    if _fp8.scaled_mm_supported(x, weight, weight_block_k, activation, scalar_weight_scale):
        return _fp8.fp8_gemm(x, weight, weight_scale, **kwargs)
    return _fp8.fp8_gemm_ref(x, weight, weight_scale, **kwargs)
