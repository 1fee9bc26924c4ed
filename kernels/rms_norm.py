"""RMSNorm with an optional fused residual add (Llama ``input_layernorm`` / ``post_attention_layernorm``).

Rounding follows Hugging Face's LlamaRMSNorm so the GPU path matches the reference model:
the residual sum is rounded to the model dtype (as ``residual + hidden`` is in the model), the
norm is computed in fp32, rounded to the model dtype, then multiplied by the weight.
One program normalises one row; the whole row is held in registers (hidden sizes up to 16k).

``unit_offset=True`` is Gemma's RMSNorm instead: the weight is stored as ``w - 1`` (applied as
``1 + w``) and nothing is rounded between the fp32 norm and the multiply (Gemma's reference rounds
once, at the end).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import ATTN_DTYPES, check_dtype, check_kernel_device, check_last_dim_contiguous

_OP = "rms_norm"


@triton.jit
def _rms_norm_kernel(
    x_ptr,  # [num_tokens, hidden]
    weight_ptr,  # [hidden]
    residual_ptr,  # [num_tokens, hidden] (read when HAS_RESIDUAL)
    out_ptr,  # [num_tokens, hidden]
    new_residual_ptr,  # [num_tokens, hidden] x + residual (written when HAS_RESIDUAL)
    hidden,
    eps,
    stride_xt,
    stride_rt,
    stride_ot,
    stride_nt,
    HAS_RESIDUAL: tl.constexpr,
    UNIT_OFFSET: tl.constexpr,  # Gemma: (1 + weight), no rounding before the multiply
    BLOCK: tl.constexpr,  # next power of 2 >= hidden
):
    token = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden
    x = tl.load(x_ptr + token * stride_xt + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + token * stride_rt + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(new_residual_ptr + token * stride_nt + offs, x, mask=mask)
    xf = x.to(tl.float32)
    variance = tl.sum(xf * xf, axis=0) / hidden
    w = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if UNIT_OFFSET:
        out = xf * tl.rsqrt(variance + eps) * (1.0 + w)
    else:
        normed = (xf * tl.rsqrt(variance + eps)).to(x_ptr.dtype.element_ty)
        out = normed.to(tl.float32) * w
    tl.store(out_ptr + token * stride_ot + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def _check(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None) -> None:
    if x.dim() < 1:
        raise ValueError(f"{_OP}: x must be [..., hidden], got a scalar")
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"{_OP}: weight must be [hidden={x.shape[-1]}], got {tuple(weight.shape)}")
    check_dtype(_OP, "x", x, ATTN_DTYPES)
    check_dtype(_OP, "weight", weight, ATTN_DTYPES)
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"{_OP}: residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
        if residual.dtype != x.dtype:
            raise ValueError(f"{_OP}: residual dtype {residual.dtype} != x dtype {x.dtype}")


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
    unit_offset: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim, optionally after adding ``residual``.

    Args:
        x: ``[..., hidden]`` fp16/bf16/fp32, last dim contiguous.
        weight: ``[hidden]``.
        eps: added to the mean square.
        residual: optional, like ``x``.
        unit_offset: Gemma's norm, ``norm(x) * (1 + weight)`` rounded once.
    Returns:
        ``out`` (x's dtype and shape) when ``residual`` is None, else ``(out, new_residual)`` with
        ``new_residual = x + residual`` and ``out = rms_norm(new_residual)``. Inputs are not modified.
    """
    _check(x, weight, residual)
    tensors = {"x": x, "weight": weight}
    if residual is not None:
        tensors["residual"] = residual
    check_kernel_device(_OP, tensors)
    check_last_dim_contiguous(_OP, "x", x)
    check_last_dim_contiguous(_OP, "weight", weight)
    hidden = x.shape[-1]
    x2 = x.reshape(-1, hidden)
    out = torch.empty_like(x2)
    if residual is not None:
        check_last_dim_contiguous(_OP, "residual", residual)
        r2 = residual.reshape(-1, hidden)
        new_residual = torch.empty_like(x2)
    else:
        r2 = new_residual = x2  # unused by the kernel (HAS_RESIDUAL=False)
    num_tokens = x2.shape[0]
    if num_tokens > 0 and hidden > 0:
        block = triton.next_power_of_2(hidden)
        _rms_norm_kernel[(num_tokens,)](
            x2,
            weight,
            r2,
            out,
            new_residual,
            hidden,
            eps,
            x2.stride(0),
            r2.stride(0),
            out.stride(0),
            new_residual.stride(0),
            HAS_RESIDUAL=residual is not None,
            UNIT_OFFSET=bool(unit_offset),
            BLOCK=block,
            num_warps=min(max(block // 256, 1), 16),
        )
    out = out.view(x.shape)
    if residual is None:
        return out
    return out, new_residual.view(x.shape)


def rms_norm_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
    unit_offset: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch :func:`rms_norm` (same arguments, results and rounding)."""
    _check(x, weight, residual)
    if residual is not None:
        x = (x.float() + residual.float()).to(x.dtype)
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if unit_offset:
        out = (normed * (1.0 + weight.float())).to(x.dtype)
    else:
        out = (normed.to(x.dtype).float() * weight.float()).to(x.dtype)
    return out if residual is None else (out, x)
