"""Gated activations of the MLP: ``silu(gate) * up`` (Llama, Qwen, Mixtral, Phi-3) and
``gelu_tanh(gate) * up`` (Gemma's ``gelu_pytorch_tanh``).

The input is the fused gate_up projection ``[..., 2 * intermediate]`` (gate first); the output is
``[..., intermediate]``. Computed in fp32 and rounded once to the input dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import ATTN_DTYPES, check_dtype, check_kernel_device, check_last_dim_contiguous

_OP = "silu_and_mul"


@triton.jit
def _silu_and_mul_kernel(
    x_ptr,  # [num_tokens, 2 * intermediate]
    out_ptr,  # [num_tokens, intermediate]
    intermediate,
    stride_xt,
    stride_ot,
    BLOCK: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < intermediate
    gate = tl.load(x_ptr + token * stride_xt + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + token * stride_xt + intermediate + offs, mask=mask, other=0.0).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + token * stride_ot + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_tanh_and_mul_kernel(
    x_ptr,  # [num_tokens, 2 * intermediate]
    out_ptr,  # [num_tokens, intermediate]
    intermediate,
    stride_xt,
    stride_ot,
    BLOCK: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < intermediate
    gate = tl.load(x_ptr + token * stride_xt + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + token * stride_xt + intermediate + offs, mask=mask, other=0.0).to(tl.float32)
    inner = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)  # sqrt(2 / pi) * (...)
    # 0.5 * (1 + tanh(u)) = sigmoid(2u): no cancellation in the negative tail; the exponent is
    # capped so the far tail gives 0 rather than going through inf
    out = gate / (1.0 + tl.exp2(tl.minimum(-2.8853900817779268 * inner, 126.0))) * up
    tl.store(out_ptr + token * stride_ot + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def _check(x: torch.Tensor, op: str = _OP) -> None:
    if x.dim() < 1 or x.shape[-1] % 2 != 0:
        raise ValueError(f"{op}: x must be [..., 2 * intermediate] with an even last dim, got {tuple(x.shape)}")
    check_dtype(op, "x", x, ATTN_DTYPES)


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(x[..., :I]) * x[..., I:]`` for ``x`` of shape ``[..., 2 * I]``.

    Args:
        x: ``[..., 2 * intermediate]`` fp16/bf16/fp32, last dim contiguous.
        out: optional contiguous ``[..., intermediate]`` of x's dtype.
    Returns:
        ``out`` ``[..., intermediate]``.
    """
    return _launch(_silu_and_mul_kernel, _OP, x, out)


def gelu_tanh_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``gelu(x[..., :I], approximate="tanh") * x[..., I:]`` (Gemma's MLP); arguments as
    :func:`silu_and_mul`."""
    return _launch(_gelu_tanh_and_mul_kernel, "gelu_tanh_and_mul", x, out)


def _launch(kernel, op: str, x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    _check(x, op)
    check_kernel_device(op, {"x": x} if out is None else {"x": x, "out": out})
    intermediate = x.shape[-1] // 2
    if out is None:
        out = torch.empty(*x.shape[:-1], intermediate, dtype=x.dtype, device=x.device)
    elif out.shape != (*x.shape[:-1], intermediate) or out.dtype != x.dtype:
        raise ValueError(
            f"{op}: out must be {(*x.shape[:-1], intermediate)} {x.dtype}, got {tuple(out.shape)} {out.dtype}"
        )
    check_last_dim_contiguous(op, "x", x)
    if not out.is_contiguous():
        raise ValueError(f"{op}: out must be contiguous, got strides {out.stride()}")
    x2 = x.reshape(-1, x.shape[-1])  # a view for the usual [num_tokens, 2 * I] input
    out2 = out.view(-1, intermediate)
    num_tokens = x2.shape[0]
    if num_tokens == 0 or intermediate == 0:
        return out
    block = min(triton.next_power_of_2(intermediate), 1024)
    grid = (num_tokens, triton.cdiv(intermediate, block))
    kernel[grid](
        x2, out2, intermediate, x2.stride(0), out2.stride(0), BLOCK=block, num_warps=4 if block >= 512 else 1
    )
    return out


def silu_and_mul_ref(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Plain-torch :func:`silu_and_mul` (fp32 math, rounded once)."""
    _check(x)
    intermediate = x.shape[-1] // 2
    xf = x.float()
    result = (torch.nn.functional.silu(xf[..., :intermediate]) * xf[..., intermediate:]).to(x.dtype)
    if out is None:
        return result
    out.copy_(result)
    return out


def gelu_tanh_and_mul_ref(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Plain-torch :func:`gelu_tanh_and_mul` (fp32 math, rounded once)."""
    _check(x, "gelu_tanh_and_mul")
    intermediate = x.shape[-1] // 2
    xf = x.float()
    gate = xf[..., :intermediate]
    result = (torch.nn.functional.gelu(gate, approximate="tanh") * xf[..., intermediate:]).to(x.dtype)
    if out is None:
        return result
    out.copy_(result)
    return out
