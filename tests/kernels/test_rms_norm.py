"""rms_norm (Triton, interpreter) vs. its torch ref, and the ref vs. transformers' LlamaRMSNorm.

Tolerances: fp32 1e-5. fp16: one fp16 ulp (atol = rtol = 1e-3), from the kernel's different fp32
summation order. bf16: one bf16 ulp (atol = rtol = 1.6e-2), because the Triton interpreter rounds
fp32 -> bf16 toward zero where torch (and the GPU) round to nearest.
"""

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from paged_triton.kernels.rms_norm import rms_norm, rms_norm_ref

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")

TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=1e-3, rtol=1e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}


@pytest.mark.parametrize(
    "dtype, shape, with_residual",
    [
        (torch.float32, (7, 64), False),
        (torch.float16, (3, 5, 96), True),  # 3-D input, hidden not a power of two
        (torch.bfloat16, (4, 4096), True),
        (torch.float32, (1, 4096), True),
        (torch.float16, (9, 4096), False),
    ],
)
def test_rms_norm_matches_ref(dtype, shape, with_residual):
    x = torch.randn(shape).to(dtype)
    weight = (1 + 0.1 * torch.randn(shape[-1])).to(dtype)
    residual = torch.randn(shape).to(dtype) if with_residual else None
    x_before = x.clone()
    got = rms_norm(x, weight, 1e-6, residual)
    want = rms_norm_ref(x, weight, 1e-6, residual)
    assert torch.equal(x, x_before)  # inputs untouched
    if with_residual:
        torch.testing.assert_close(got[1], want[1], **TOL[dtype])
        got, want = got[0], want[0]
    assert got.shape == x.shape and got.dtype == dtype
    torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rms_norm_ref_matches_transformers(dtype):
    hidden, eps = 256, 1e-5
    norm = LlamaRMSNorm(hidden, eps=eps).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(hidden))
    x = torch.randn(6, hidden).to(dtype)
    residual = torch.randn(6, hidden).to(dtype)
    with torch.no_grad():
        torch.testing.assert_close(rms_norm_ref(x, norm.weight, eps), norm(x), atol=0, rtol=0)
        out, new_residual = rms_norm_ref(x, norm.weight, eps, residual)
        torch.testing.assert_close(new_residual, x + residual, atol=0, rtol=0)
        torch.testing.assert_close(out, norm(x + residual), atol=0, rtol=0)


@pytest.mark.parametrize(
    "dtype, shape, with_residual",
    [(torch.float32, (7, 64), True), (torch.float16, (3, 5, 96), False), (torch.bfloat16, (4, 256), True)],
)
def test_gemma_rms_norm_matches_ref(dtype, shape, with_residual):
    x = torch.randn(shape).to(dtype)
    weight = (0.1 * torch.randn(shape[-1])).to(dtype)  # stored as w - 1
    residual = torch.randn(shape).to(dtype) if with_residual else None
    got = rms_norm(x, weight, 1e-6, residual, unit_offset=True)
    want = rms_norm_ref(x, weight, 1e-6, residual, unit_offset=True)
    if with_residual:
        torch.testing.assert_close(got[1], want[1], **TOL[dtype])
        got, want = got[0], want[0]
    torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemma_rms_norm_ref_matches_transformers(dtype):
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm

    hidden, eps = 256, 1e-6
    norm = Gemma2RMSNorm(hidden, eps=eps).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(0.3 * torch.randn(hidden))
    x = torch.randn(6, hidden).to(dtype)
    residual = torch.randn(6, hidden).to(dtype)
    with torch.no_grad():
        torch.testing.assert_close(rms_norm_ref(x, norm.weight, eps, unit_offset=True), norm(x), atol=0, rtol=0)
        out, _ = rms_norm_ref(x, norm.weight, eps, residual, unit_offset=True)
        torch.testing.assert_close(out, norm(x + residual), atol=0, rtol=0)


def test_rms_norm_rejects_bad_input():
    x = torch.randn(3, 64)
    with pytest.raises(ValueError, match="weight must be"):
        rms_norm(x, torch.ones(32), 1e-6)
    with pytest.raises(ValueError, match="residual shape"):
        rms_norm(x, torch.ones(64), 1e-6, torch.randn(3, 32))
    with pytest.raises(ValueError, match="residual dtype"):
        rms_norm(x, torch.ones(64), 1e-6, torch.randn(3, 64, dtype=torch.float16))
    with pytest.raises(ValueError, match="contiguous last dim"):
        rms_norm(torch.randn(3, 128)[:, ::2], torch.ones(64), 1e-6)
