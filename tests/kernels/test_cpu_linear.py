"""The packed CPU linear (kernels/cpu_linear.py) vs F.linear, and the unquantized layer using it."""

import pytest
import torch
import torch.nn.functional as F

from paged_triton.kernels import cpu_linear

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 32, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_matches_f_linear(dtype, rows, bias):
    if not cpu_linear.available(torch.empty(1, 1)):
        pytest.skip("torch built without oneDNN")
    gen = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 80, generator=gen).to(dtype)
    x = torch.randn(rows, 80, generator=gen).to(dtype)
    b = torch.randn(96, generator=gen).to(dtype) if bias else None
    out = cpu_linear.linear_packed(x, cpu_linear.pack_weight(w), b)
    assert out.dtype == dtype and out.shape == (rows, 96)
    torch.testing.assert_close(out.float(), F.linear(x.float(), w.float(), None if b is None else b.float()),
                               **TOL[dtype])


def test_empty_batch_and_unsupported_dtype():
    w = torch.randn(8, 4)
    assert cpu_linear.linear_packed(torch.empty(0, 4), cpu_linear.pack_weight(w), None).shape == (0, 8)
    assert cpu_linear.pack_weight(w.half()) is None  # fp16: F.linear stays
