"""FP8 (e4m3) linear: ``out = quant(x) @ (weight * weight_scale)^T`` for FP8 checkpoints.

No Triton kernel here: on GPUs with FP8 tensor cores (compute capability 8.9+) the GEMM is
cuBLASLt's through ``torch._scaled_mm``, which takes per-tensor or row-wise (per-token x
per-channel) scales; every other case (block-wise weight scales, weight-only FP8, older GPUs,
CPU) dequantizes the weight and runs a dense matmul (``fp8_gemm_ref``).

The weight is ``float8_e4m3fn [N, K]``; its scale is fp32 ``[N]`` (one per output row:
per-tensor and per-channel checkpoints, fused shards expanded to their rows) or ``[N, K / block_k]``
(block-wise checkpoints, one per row and block of K). Activations are quantized as the checkpoint
was calibrated (``activation``):

- ``"token"``: dynamic, one scale per row of x (``amax / 448``);
- ``"tensor"``: dynamic, one scale for the whole x;
- ``"static"``: the checkpoint's ``input_scale``;
- ``"group"``: dynamic, one scale per row and ``activation_group`` columns (block-wise checkpoints);
- None: weight-only FP8 (W8A16), x stays in its dtype.
"""

from __future__ import annotations

import torch

from ._utils import ATTN_DTYPES, capability, check_dim, check_dtype

_OP = "fp8_gemm"
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
# Floor of a dynamic scale, so that an all-zero row quantizes to zeros instead of NaN.
_MIN_SCALE = 1.0 / (FP8_MAX * 512.0)
ACTIVATIONS = (None, "token", "tensor", "static", "group")


def _check(x, weight, weight_scale, weight_block_k, activation, input_scale, activation_group):
    check_dtype(_OP, "x", x, ATTN_DTYPES)
    check_dim(_OP, "weight", weight, 2, "[N, K]")
    check_dtype(_OP, "weight", weight, (FP8_DTYPE,))
    check_dtype(_OP, "weight_scale", weight_scale, (torch.float32,))
    N, K = weight.shape
    if x.shape[-1] != K:
        raise ValueError(f"{_OP}: x has {x.shape[-1]} input features, weight {tuple(weight.shape)}")
    if weight_block_k is None:
        if tuple(weight_scale.shape) != (N,):
            raise ValueError(f"{_OP}: per-row weight_scale must be [N={N}], got {tuple(weight_scale.shape)}")
    elif tuple(weight_scale.shape) != (N, -(-K // weight_block_k)):
        raise ValueError(f"{_OP}: block weight_scale must be [N, ceil(K / {weight_block_k})], "
                         f"got {tuple(weight_scale.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{_OP}: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if activation == "static" and (input_scale is None or input_scale.numel() != 1):
        raise ValueError(f"{_OP}: static activation quantization needs a scalar input_scale")
    if activation == "group" and (activation_group is None or activation_group < 1):
        raise ValueError(f"{_OP}: group activation quantization needs a positive activation_group")


def quantize_activation(x: torch.Tensor, activation: str, input_scale: torch.Tensor | None = None,
                        activation_group: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x in FP8, fp32 scale) with ``x ~= x_fp8 * scale``; the scale is ``[M, 1]`` (token),
    ``[M, ceil(K / group)]`` (group) or ``[1, 1]`` (tensor, static). x is ``[M, K]``."""
    xf = x.float()
    if activation == "static":
        scale = input_scale.float().reshape(1, 1)
    elif activation == "tensor":
        scale = (xf.abs().amax() / FP8_MAX).clamp(min=_MIN_SCALE).reshape(1, 1)
    elif activation == "token":
        scale = (xf.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=_MIN_SCALE)
    elif activation == "group":
        K = xf.shape[1]
        pad = -K % activation_group  # a partial last group has its own scale
        g = torch.nn.functional.pad(xf, (0, pad)).view(xf.shape[0], -1, activation_group)
        scale = (g.abs().amax(dim=-1) / FP8_MAX).clamp(min=_MIN_SCALE)
        q = (g / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        return q.view(xf.shape[0], -1)[:, :K], scale
    else:
        raise ValueError(f"{_OP}: cannot quantize activations as {activation!r}")
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def dequantize_fp8_weight(weight: torch.Tensor, weight_scale: torch.Tensor, weight_block_k: int | None,
                          dtype: torch.dtype) -> torch.Tensor:
    """The dense ``[N, K]`` weight in ``dtype`` (fp32 product, then ``dtype``)."""
    w = weight.float()
    if weight_block_k is None:
        w = w * weight_scale.unsqueeze(1)
    else:
        w = w * weight_scale.repeat_interleave(weight_block_k, dim=1)[:, : w.shape[1]]
    return w.to(dtype)


def fake_quant_linear(x: torch.Tensor, weight: torch.Tensor, activation: str | None,
                      input_scale: torch.Tensor | None = None, activation_group: int | None = None) -> torch.Tensor:
    """``quant(x) @ weight^T`` in fp32 with a dense (already dequantized) ``weight [N, K]``: x goes
    through its FP8 quantization and back, as the FP8 GEMM would see it."""
    K = weight.shape[1]
    x2 = x.reshape(-1, K)
    if activation is None:
        xq = x2.float()
    else:
        q, scale = quantize_activation(x2, activation, input_scale, activation_group)
        if activation == "group":
            xq = q.float() * scale.repeat_interleave(activation_group, dim=1)[:, :K]
        else:
            xq = q.float() * scale
    out = (xq @ weight.float().t()).to(x.dtype)
    return out.view(*x.shape[:-1], weight.shape[0])


def fp8_gemm_ref(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, *,
                 weight_block_k: int | None = None, activation: str | None = "token",
                 input_scale: torch.Tensor | None = None, activation_group: int | None = None,
                 scalar_weight_scale: bool = False) -> torch.Tensor:
    """Plain torch: x through its FP8 quantization and back, times the dequantized weight, in fp32
    (same arguments as :func:`fp8_gemm`, any case)."""
    _check(x, weight, weight_scale, weight_block_k, activation, input_scale, activation_group)
    w = dequantize_fp8_weight(weight, weight_scale, weight_block_k, torch.float32)
    return fake_quant_linear(x, w, activation, input_scale, activation_group)


def scaled_mm_supported(x: torch.Tensor, weight: torch.Tensor, weight_block_k: int | None,
                        activation: str | None, scalar_weight_scale: bool) -> bool:
    """Whether :func:`fp8_gemm` runs ``torch._scaled_mm`` for these operands (else the dequant path)."""
    if not x.is_cuda or capability(x.device) < 89 or not hasattr(torch, "_scaled_mm"):
        return False
    if weight_block_k is not None or activation not in ("token", "tensor", "static"):
        return False
    N, K = weight.shape
    if K % 16 or N % 16:
        return False
    rowwise = activation == "token" or not scalar_weight_scale
    # cuBLASLt's row-wise scaling writes bf16 only.
    return not rowwise or x.dtype == torch.bfloat16


def fp8_gemm(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, *,
             weight_block_k: int | None = None, activation: str | None = "token",
             input_scale: torch.Tensor | None = None, activation_group: int | None = None,
             scalar_weight_scale: bool = False) -> torch.Tensor:
    """FP8 GEMM on FP8 tensor cores (``torch._scaled_mm``); see the module docstring.

    Args:
        x: ``[..., K]``; weight: FP8 ``[N, K]``; weight_scale: fp32 ``[N]``.
        activation: "token", "tensor" or "static" (with ``input_scale``).
        scalar_weight_scale: every entry of ``weight_scale`` is the same (a per-tensor checkpoint),
            so the per-tensor GEMM (any output dtype) applies.
    Raises:
        ValueError when :func:`scaled_mm_supported` is false for these operands.
    """
    _check(x, weight, weight_scale, weight_block_k, activation, input_scale, activation_group)
    if not scaled_mm_supported(x, weight, weight_block_k, activation, scalar_weight_scale):
        raise ValueError(f"{_OP}: torch._scaled_mm does not take these operands "
                         f"({x.device}, {x.dtype}, weight {tuple(weight.shape)}, activation {activation!r}); "
                         "use fp8_gemm_ref")
    K = weight.shape[1]
    x2 = x.reshape(-1, K)
    q, scale_a = quantize_activation(x2, activation, input_scale, activation_group)
    if activation == "token" or not scalar_weight_scale:
        scale_a = scale_a.expand(q.shape[0], 1).contiguous()
        scale_b = weight_scale.view(1, -1)
    else:
        scale_a = scale_a.reshape(())
        scale_b = weight_scale[:1].reshape(())
    out = torch._scaled_mm(q, weight.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=x.dtype)
    return out.view(*x.shape[:-1], weight.shape[0])
