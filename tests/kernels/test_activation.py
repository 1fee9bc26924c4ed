"""silu_and_mul and gelu_tanh_and_mul (Triton, interpreter) vs. their torch refs, and the refs vs.
F.silu(gate) * up and transformers' gelu_pytorch_tanh (Gemma).

Tolerances: fp32 1e-6; fp16 one ulp (1e-3); bf16 one ulp (1.6e-2: the interpreter rounds
fp32 -> bf16 toward zero, torch to nearest).
"""

import pytest
import torch
import torch.nn.functional as F

from paged_triton.kernels.activation import gelu_tanh_and_mul, gelu_tanh_and_mul_ref, silu_and_mul, silu_and_mul_ref

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")

TOL = {
    torch.float32: dict(atol=1e-6, rtol=1e-6),
    torch.float16: dict(atol=1e-3, rtol=1e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}


@pytest.mark.parametrize(
    "dtype, shape",
    [
        (torch.float32, (5, 2 * 48)),
        (torch.float16, (2, 3, 2 * 64)),
        (torch.bfloat16, (4, 2 * 1536)),  # more than one column block per row
        (torch.float32, (1, 2 * 11008)),
    ],
)
def test_silu_and_mul_matches_ref(dtype, shape):
    x = (2 * torch.randn(shape)).to(dtype)
    intermediate = shape[-1] // 2
    out = torch.full((*shape[:-1], intermediate), float("nan"), dtype=dtype)  # poisoned
    assert silu_and_mul(x, out) is out
    want = silu_and_mul_ref(x)
    assert want.shape == out.shape
    torch.testing.assert_close(out, want, **TOL[dtype])
    torch.testing.assert_close(silu_and_mul(x), want, **TOL[dtype])


def test_silu_and_mul_ref_matches_torch():
    x = torch.randn(8, 2 * 100, dtype=torch.float64).float()
    gate, up = x.chunk(2, dim=-1)
    torch.testing.assert_close(silu_and_mul_ref(x), F.silu(gate) * up)


def test_silu_and_mul_rejects_bad_input():
    with pytest.raises(ValueError, match="even last dim"):
        silu_and_mul(torch.randn(3, 7))
    with pytest.raises(ValueError, match="out must be"):
        silu_and_mul(torch.randn(3, 8), torch.empty(3, 8))
    with pytest.raises(ValueError, match="one of"):
        silu_and_mul(torch.randn(3, 8, dtype=torch.float64))


@pytest.mark.parametrize("dtype, shape", [(torch.float32, (5, 2 * 48)), (torch.float16, (2, 3, 2 * 1536))])
def test_gelu_tanh_and_mul_matches_ref(dtype, shape):
    x = (3 * torch.randn(shape)).to(dtype)
    x.view(-1)[:4] = torch.tensor([30.0, -30.0, 0.0, 1e-3])  # saturated tanh and the origin
    out = torch.full((*shape[:-1], shape[-1] // 2), float("nan"), dtype=dtype)
    assert gelu_tanh_and_mul(x, out) is out
    torch.testing.assert_close(out, gelu_tanh_and_mul_ref(x), **TOL[dtype])


def test_gelu_tanh_and_mul_ref_matches_transformers():
    from transformers.activations import ACT2FN

    x = torch.randn(8, 2 * 100)
    gate, up = x.chunk(2, dim=-1)
    torch.testing.assert_close(gelu_tanh_and_mul_ref(x), ACT2FN["gelu_pytorch_tanh"](gate) * up)
