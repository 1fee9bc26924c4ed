"""The W4A16/W8A16 dequant-GEMM in Triton's interpreter against its plain-torch reference, and the
reference's layout against a bit-by-bit reading of it.

Shapes sweep the cases that break such kernels: a single row (decode), rows around the 16/64
tile buckets, N not a multiple of the tile, K ending mid-tile, groups of 32/64/128 and per
channel, act-order (scattered groups), zero points, 4 and 8 bits, forced split-K, fp16 and fp32.
"""

from __future__ import annotations

import random

import pytest
import torch

from paged_triton.kernels.wna16_gemm import (
    dequantize_wna16,
    pack_wna16,
    tile_config,
    unpack_wna16,
    wna16_gemm,
    wna16_gemm_ref,
)


def _case(M, N, K, group, bits, zeros, g_idx, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    values = torch.randint(0, 2**bits, (K, N), generator=g, dtype=torch.int32)
    qweight = pack_wna16(values, bits)
    group = group or K
    num_groups = -(-K // group)
    scales = (torch.rand(num_groups, N, generator=g) * 0.02 + 1e-3).to(dtype)
    z = torch.randint(0, 2**bits, (num_groups, N), generator=g, dtype=torch.int32).to(torch.uint8) if zeros else None
    gi = None
    if g_idx:
        # act-order: group by a permuted position, as GPTQ's desc_act assigns them
        gi = (torch.argsort(torch.randperm(K, generator=g)) // group).to(torch.int32)
    x = torch.randn(M, K, generator=g).to(dtype)
    return x, qweight, scales, z, gi, group, values


def _loop_dequant(values, scales, zeros, g_idx, bits, group):
    """w[k, n] = (q - zero) * scale of row k's group, one element at a time (independent of the ref)."""
    K, N = values.shape
    w = torch.empty(K, N, dtype=torch.float64)
    for k in range(K):
        grp = int(g_idx[k]) if g_idx is not None else k // group
        for n in range(N):
            zero = int(zeros[grp, n]) if zeros is not None else 2 ** (bits - 1)
            w[k, n] = (int(values[k, n]) - zero) * float(scales[grp, n])
    return w


@pytest.mark.parametrize("bits", [4, 8])
def test_layout_is_read_bit_by_bit(bits):
    g = torch.Generator().manual_seed(bits)
    K, N = 32, 5
    values = torch.randint(0, 2**bits, (K, N), generator=g, dtype=torch.int32)
    qweight = pack_wna16(values, bits)
    pack = 32 // bits
    assert qweight.shape == (K // pack, N) and qweight.dtype == torch.int32
    for k in range(K):
        for n in range(N):
            word = int(qweight[k // pack, n]) & 0xFFFFFFFF
            assert (word >> ((k % pack) * bits)) & (2**bits - 1) == int(values[k, n])
    assert torch.equal(unpack_wna16(qweight, bits), values)


@pytest.mark.parametrize("zeros, g_idx", [(False, False), (True, False), (True, True)])
def test_reference_dequantizes_as_the_layout_says(zeros, g_idx):
    x, qweight, scales, z, gi, group, values = _case(1, 6, 64, 16, 4, zeros, g_idx, torch.float32, seed=3)
    ref = dequantize_wna16(qweight, scales, z, gi, 4, group, torch.float64)
    assert torch.allclose(ref, _loop_dequant(values, scales, z, gi, 4, group), rtol=1e-6, atol=1e-7)


CASES = [
    # M, N, K, group (None: per channel), bits, zeros, g_idx, dtype, num_splits
    (1, 64, 256, 64, 4, False, False, torch.float32, None),
    (1, 96, 256, 128, 4, True, False, torch.float16, None),
    (1, 64, 256, 32, 4, True, True, torch.float32, None),
    (3, 130, 192, 64, 4, True, False, torch.float32, 2),
    (5, 64, 256, None, 8, False, False, torch.float32, None),
    (16, 64, 128, 32, 8, True, False, torch.float16, 3),
    (17, 80, 128, 64, 4, False, True, torch.float16, None),
    (33, 64, 192, 64, 4, True, True, torch.float32, 1),
    (64, 48, 128, None, 4, True, False, torch.float32, None),
    (70, 130, 128, 64, 8, False, False, torch.float16, None),
    (7, 64, 200, 40, 4, False, False, torch.float32, None),  # K ends mid-tile, a group that is not a power of 2
]


@pytest.mark.parametrize("M, N, K, group, bits, zeros, g_idx, dtype, splits", CASES)
def test_kernel_matches_reference(M, N, K, group, bits, zeros, g_idx, dtype, splits):
    seed = random.randrange(2**31)
    x, qweight, scales, z, gi, group, _ = _case(M, N, K, group, bits, zeros, g_idx, dtype, seed)
    out = wna16_gemm(x, qweight, scales, z, gi, bits, group, num_splits=splits)
    ref = wna16_gemm_ref(x, qweight, scales, z, gi, bits, group)
    assert out.shape == (M, N) and out.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    scale = ref.float().abs().max().item() + 1.0
    assert (out.float() - ref.float()).abs().max().item() <= tol * scale, f"seed={seed}"


def test_leading_dims_and_empty_batch():
    x, qweight, scales, z, gi, group, _ = _case(6, 64, 128, 64, 4, True, False, torch.float32, seed=1)
    out = wna16_gemm(x.view(2, 3, 128), qweight, scales, z, gi, 4, group)
    assert out.shape == (2, 3, 64)
    assert torch.allclose(out.view(6, 64), wna16_gemm_ref(x, qweight, scales, z, gi, 4, group), atol=1e-4)
    assert wna16_gemm(x[:0], qweight, scales, z, gi, 4, group).shape == (0, 64)


def test_tile_config_depends_on_the_batch_bucket_only():
    for shape in ((4096, 4096), (14336, 4096), (4096, 14336), (1024, 3072)):
        N, K = shape
        for lo, hi in ((1, 16), (17, 64), (65, 4096)):
            configs = {tuple(sorted(tile_config(m, N, K, 128, False, 132).items())) for m in range(lo, hi + 1, 7)}
            assert len(configs) == 1, (shape, lo, hi)
        for m in (1, 16, 64, 300):
            cfg = tile_config(m, N, K, 128, False, 132)
            k_blocks = -(-K // cfg["BLOCK_K"])
            assert 1 <= cfg["num_splits"] and (cfg["num_splits"] - 1) * cfg["blocks_per_split"] < k_blocks
    assert tile_config(1, 4096, 4096, 128, False, 132)["num_splits"] > 1  # decode splits K
    assert tile_config(1, 4096, 4096, 32, False, 132)["BLOCK_K"] == 32  # a tile stays in one group
    assert not tile_config(1, 4096, 4096, 128, True, 132)["SCALE_PER_BLOCK"]  # act-order gathers scales


@pytest.mark.parametrize("change, message", [
    (dict(bits=3), "bits must be one of"),
    (dict(qweight=torch.zeros(8, 64, dtype=torch.int64)), "qweight must be one of"),
    (dict(qweight=torch.zeros(15, 64, dtype=torch.int32)), "holds"),
    (dict(scales=torch.zeros(3, 64)), "groups of scales"),
    (dict(scales=torch.zeros(2, 63)), "do not match N"),
    (dict(zeros=torch.zeros(2, 64, dtype=torch.int32)), "zeros must be one of"),
    (dict(g_idx=torch.zeros(127, dtype=torch.int32)), "g_idx must be"),
    (dict(x=torch.zeros(2, 128, dtype=torch.int32)), "x must be one of"),
])
def test_launcher_rejects_bad_arguments(change, message):
    args = dict(x=torch.zeros(2, 128), qweight=torch.zeros(16, 64, dtype=torch.int32), scales=torch.zeros(2, 64),
                zeros=None, g_idx=None, bits=4, group_size=64)
    args.update(change)
    with pytest.raises(ValueError, match=message):
        wna16_gemm(**args)
