"""The FP8 linear's reference path: activation quantization per token / tensor / group / static,
per-row and block-wise weight dequantization, each against an element-wise reading; and the
`torch._scaled_mm` path's dispatch rules (it needs FP8 tensor cores: never taken on CPU)."""

from __future__ import annotations

import pytest
import torch

from paged_triton.kernels import ops
from paged_triton.kernels.fp8_gemm import (
    FP8_DTYPE,
    FP8_MAX,
    dequantize_fp8_weight,
    fp8_gemm,
    fp8_gemm_ref,
    quantize_activation,
    scaled_mm_supported,
)


def _fp8_round(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).float()


@pytest.mark.parametrize("activation, group", [("token", None), ("tensor", None), ("group", 16), ("group", 24)])
def test_dynamic_activation_scales(activation, group):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 40, generator=g) * torch.linspace(0.1, 10, 5).unsqueeze(1)
    q, scale = quantize_activation(x, activation, activation_group=group)
    assert q.dtype == FP8_DTYPE
    for m in range(5):
        for k in range(40):
            if activation == "token":
                s = x[m].abs().max() / FP8_MAX
                got = scale[m, 0]
            elif activation == "tensor":
                s = x.abs().max() / FP8_MAX
                got = scale[0, 0]
            else:  # a partial last group (40 = 24 + 16) has its own scale
                j = k // group
                s = x[m, j * group:(j + 1) * group].abs().max() / FP8_MAX
                got = scale[m, j]
            assert got == pytest.approx(s.item(), rel=1e-6)
            assert q[m, k].float() == _fp8_round(x[m, k] / got)
    if activation == "token":
        assert quantize_activation(torch.zeros(2, 8), "token")[0].float().eq(0).all()  # no NaN for zero rows


def test_static_activation_scale():
    x = torch.tensor([[1.0, -900.0, 3.0]])
    q, scale = quantize_activation(x, "static", input_scale=torch.tensor([0.5]))
    assert scale.item() == 0.5 and q.float().tolist() == [[2.0, -448.0, 6.0]]


@pytest.mark.parametrize("block_k", [None, 16, 24])
def test_weight_dequantization_and_gemm(block_k):
    g = torch.Generator().manual_seed(1)
    N, K = 6, 40
    weight = (torch.randn(N, K, generator=g) * 50).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    cols = 1 if block_k is None else -(-K // block_k)
    scale = torch.rand(N, cols, generator=g) + 0.01
    if block_k is None:
        scale = scale[:, 0]
    w = dequantize_fp8_weight(weight, scale, block_k, torch.float32)
    for n in range(N):
        for k in range(K):
            s = scale[n] if block_k is None else scale[n, k // block_k]
            assert w[n, k] == pytest.approx(weight[n, k].float().item() * s.item(), rel=1e-6)
    x = torch.randn(3, K, generator=g)
    q, xs = quantize_activation(x, "token")
    expected = (q.float() * xs) @ w.t()
    out = fp8_gemm_ref(x, weight, scale, weight_block_k=block_k, activation="token")
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-5)
    weight_only = fp8_gemm_ref(x, weight, scale, weight_block_k=block_k, activation=None)
    assert torch.allclose(weight_only, x @ w.t(), rtol=1e-5, atol=1e-5)


def test_scaled_mm_is_not_taken_on_cpu_and_the_dispatch_falls_back():
    weight = torch.zeros(16, 32, dtype=FP8_DTYPE)
    scale = torch.ones(16)
    x = torch.randn(2, 32, dtype=torch.bfloat16)
    assert not scaled_mm_supported(x, weight, None, "token", False)
    with pytest.raises(ValueError, match="use fp8_gemm_ref"):
        fp8_gemm(x, weight, scale, activation="token")
    out = ops.fp8_gemm(x, weight, scale, weight_block_k=None, activation="token", input_scale=None,
                       activation_group=None, scalar_weight_scale=False)
    assert out.shape == (2, 16) and out.dtype == torch.bfloat16


@pytest.mark.parametrize("change, message", [
    (dict(weight=torch.zeros(16, 32)), "weight must be one of"),
    (dict(weight_scale=torch.ones(15)), r"weight_scale must be \[N=16\]"),
    (dict(weight_block_k=16), "block weight_scale"),
    (dict(activation="row"), "activation must be one of"),
    (dict(activation="static"), "input_scale"),
    (dict(x=torch.zeros(2, 31)), "input features"),
])
def test_bad_arguments(change, message):
    args = dict(x=torch.zeros(2, 32), weight=torch.zeros(16, 32, dtype=FP8_DTYPE), weight_scale=torch.ones(16),
                activation="token")
    args.update(change)
    x, weight, scale = args.pop("x"), args.pop("weight"), args.pop("weight_scale")
    with pytest.raises(ValueError, match=message):
        fp8_gemm_ref(x, weight, scale, **args)
