"""W4A16 / W8A16 dequant-GEMM: ``out = x @ dequant(qweight)`` with 4- or 8-bit integer weights.

Every integer checkpoint format (compressed-tensors pack-quantized, AWQ, GPTQ) is repacked at load
into the one layout this kernel reads, GPTQ's ("packed along K"):

- ``qweight`` int32 ``[K / pack, N]``, ``pack = 32 // bits``: input row ``k`` of output column
  ``n`` is bits ``(k % pack) * bits ...`` of ``qweight[k // pack, n]``, an unsigned value in
  ``[0, 2**bits)``. Consecutive K rows share a word, so a tile of K rows reads ``BLOCK_K / pack``
  words per column and the N axis is contiguous (coalesced loads).
- ``scales`` ``[num_groups, N]`` (fp16/bf16/fp32), ``zeros`` uint8 ``[num_groups, N]`` or None
  (symmetric: the zero point is ``2**(bits - 1)``); ``w[k, n] = (q - zero) * scale`` of group
  ``g(k)``.
- ``g(k) = k // group_size``, or ``g_idx[k]`` (int32 ``[K]``) for act-order checkpoints, whose
  groups are not contiguous in K. Per-channel quantization is one group (``group_size = K``).

One program computes a ``BLOCK_M x BLOCK_N`` tile of the output over a range of K. For small
batches (decode) the output has too few tiles to occupy the GPU, so K is split over
``num_splits`` programs per tile (split-K) whose fp32 partial sums are added afterwards; the
weights are read once either way, which is what a decode step is bound by. The integer weights
are dequantized in registers to the activation dtype and fed to ``tl.dot`` (tensor cores for
fp16/bf16), accumulating in fp32. When no tile of K straddles a group (contiguous groups that are
a multiple of ``BLOCK_K``), each tile reads one row of scales and zeros; otherwise (act-order,
small groups) the scales are gathered per row of K.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import ATTN_DTYPES, cdiv, check_dim, check_dtype, check_kernel_tensors, dot_precision, num_sms

_OP = "wna16_gemm"
SUPPORTED_BITS = (4, 8)
_MAX_SPLITS = 16


@triton.jit(do_not_specialize=["M", "stride_xm", "stride_os", "blocks_per_split"])
def _wna16_gemm_kernel(
    x_ptr,  # [M, K] activations, last dim contiguous
    qweight_ptr,  # int32 [K // PACK, N] packed along K
    scales_ptr,  # [num_groups, N]
    zeros_ptr,  # uint8 [num_groups, N] (read when HAS_ZEROS)
    g_idx_ptr,  # int32 [K] group of each input row (read when HAS_G_IDX)
    out_ptr,  # [num_splits, M, N]: fp32 partial sums, or x's dtype when num_splits == 1
    M,
    N,
    K,
    group_size,
    blocks_per_split,  # BLOCK_K tiles of K per split
    stride_xm,
    stride_qk,
    stride_sg,
    stride_zg,
    stride_os,
    stride_om,
    BITS: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    HAS_G_IDX: tl.constexpr,
    SCALE_PER_BLOCK: tl.constexpr,  # every K tile lies in one group: one row of scales per tile
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    PACK: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    pid_mn = tl.program_id(0)
    split = tl.program_id(1)
    num_n_tiles = tl.cdiv(N, BLOCK_N)
    pid_m = pid_mn // num_n_tiles
    pid_n = pid_mn % num_n_tiles

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    k_begin = split * blocks_per_split * BLOCK_K
    k_end = tl.minimum(k_begin + blocks_per_split * BLOCK_K, K)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w_mask = k_mask[:, None] & n_mask[None, :]
        # Each packed word is loaded by the PACK rows it holds (the extra loads hit the cache).
        packed = tl.load(qweight_ptr + (offs_k // PACK)[:, None] * stride_qk + offs_n[None, :],
                         mask=w_mask, other=0)
        q = (packed >> ((offs_k % PACK) * BITS)[:, None]) & MASK  # [BLOCK_K, BLOCK_N]
        if SCALE_PER_BLOCK:
            g = k0 // group_size
            s = tl.load(scales_ptr + g * stride_sg + offs_n, mask=n_mask, other=0.0)[None, :]
            if HAS_ZEROS:
                z = tl.load(zeros_ptr + g * stride_zg + offs_n, mask=n_mask, other=0)[None, :].to(tl.int32)
            else:
                z = 1 << (BITS - 1)
        else:
            if HAS_G_IDX:
                g = tl.load(g_idx_ptr + offs_k, mask=k_mask, other=0)
            else:
                g = offs_k // group_size
            s = tl.load(scales_ptr + g[:, None] * stride_sg + offs_n[None, :], mask=w_mask, other=0.0)
            if HAS_ZEROS:
                z = tl.load(zeros_ptr + g[:, None] * stride_zg + offs_n[None, :], mask=w_mask, other=0).to(tl.int32)
            else:
                z = 1 << (BITS - 1)
        w = ((q - z).to(tl.float32) * s.to(tl.float32)).to(x_ptr.dtype.element_ty)
        acc += tl.dot(x, w, input_precision=DOT_PRECISION)

    out = out_ptr + split.to(tl.int64) * stride_os + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def tile_config(M: int, N: int, K: int, group_size: int, has_g_idx: bool, sms: int,
                itemsize: int = 2) -> dict:
    """Tile sizes, warps and split-K for one call; a function of the M bucket and the layer's shape
    only, so the compiled variants do not grow with the batch size.

    Buckets: M <= 16 (decode: one 16-row MMA tile, split-K fills the GPU), M <= 64, M > 64
    (prefill: large tiles, 8 warps, no split). fp32 activations (``itemsize`` 4, no tensor cores)
    take smaller tiles, which hold in registers without spilling (kernels/aot.py).
    """
    if M <= 16:
        block_m, block_n, block_k, warps = 16, 64, 128, 4
    elif M <= 64:
        block_m, block_n, block_k, warps = 64, 64, 64, 4
    else:
        block_m, block_n, block_k, warps = 64, 128, 64, 8
    if itemsize >= 4:
        block_m, block_n, block_k, warps = min(block_m, 32), min(block_n, 64), block_k // 2, 8
    # A tile of K inside one group reads one row of scales; groups of 32/64 shrink the tile.
    if not has_g_idx and 16 <= group_size < block_k and group_size & (group_size - 1) == 0:
        block_k = group_size
    scale_per_block = not has_g_idx and group_size % block_k == 0
    k_blocks = cdiv(K, block_k)
    tiles = cdiv(M, block_m) * cdiv(N, block_n)
    splits = 1
    if M <= 64 and tiles < sms:
        splits = max(1, min(sms // tiles, k_blocks, _MAX_SPLITS))
    blocks_per_split = cdiv(k_blocks, splits)
    splits = cdiv(k_blocks, blocks_per_split)  # no empty splits
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SCALE_PER_BLOCK=scale_per_block,
                num_warps=warps, num_splits=splits, blocks_per_split=blocks_per_split)


def _check(x, qweight, scales, zeros, g_idx, bits, group_size):
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"{_OP}: bits must be one of {SUPPORTED_BITS}, got {bits}")
    pack = 32 // bits
    if x.dim() < 1:
        raise ValueError(f"{_OP}: x must be [..., K], got a scalar")
    check_dim(_OP, "qweight", qweight, 2, "[K // (32 // bits), N]")
    check_dim(_OP, "scales", scales, 2, "[num_groups, N]")
    check_dtype(_OP, "x", x, ATTN_DTYPES)
    check_dtype(_OP, "qweight", qweight, (torch.int32,))
    check_dtype(_OP, "scales", scales, ATTN_DTYPES)
    K = x.shape[-1]
    N = qweight.shape[1]
    if K % pack != 0 or qweight.shape[0] != K // pack:
        raise ValueError(f"{_OP}: x has K={K} input features, qweight {tuple(qweight.shape)} holds "
                         f"{qweight.shape[0] * pack} ({bits}-bit, {pack} per int32)")
    if group_size < 1:
        raise ValueError(f"{_OP}: group_size must be >= 1, got {group_size}")
    num_groups = scales.shape[0]
    if scales.shape[1] != N:
        raise ValueError(f"{_OP}: scales {tuple(scales.shape)} do not match N={N}")
    if g_idx is None and num_groups != cdiv(K, group_size):
        raise ValueError(f"{_OP}: {num_groups} groups of scales for K={K} in groups of {group_size}")
    if zeros is not None:
        check_dtype(_OP, "zeros", zeros, (torch.uint8,))
        if tuple(zeros.shape) != tuple(scales.shape):
            raise ValueError(f"{_OP}: zeros {tuple(zeros.shape)} != scales {tuple(scales.shape)}")
    if g_idx is not None:
        check_dtype(_OP, "g_idx", g_idx, (torch.int32,))
        if tuple(g_idx.shape) != (K,):
            raise ValueError(f"{_OP}: g_idx must be [K={K}], got {tuple(g_idx.shape)}")


def wna16_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
               g_idx: torch.Tensor | None, bits: int, group_size: int, *,
               num_splits: int | None = None) -> torch.Tensor:
    """``x @ W`` for the packed integer weight ``W [K, N]`` (layout in the module docstring).

    Args:
        x: ``[..., K]`` fp16/bf16/fp32, last dim contiguous.
        qweight, scales, zeros, g_idx: the packed weight; ``scales`` in any float dtype (read as fp32).
        bits: 4 or 8. group_size: K rows per group (ignored with ``g_idx``, which names each row's).
        num_splits: force the split-K factor (tests); None picks it from the shape.
    Returns:
        ``[..., N]`` in x's dtype. No value is read on the host (CUDA-graph safe); an out-of-range
        ``g_idx`` entry is the caller's contract (the loader checks it once).
    """
    _check(x, qweight, scales, zeros, g_idx, bits, group_size)
    tensors = {"x": x, "qweight": qweight, "scales": scales}
    if zeros is not None:
        tensors["zeros"] = zeros
    if g_idx is not None:
        tensors["g_idx"] = g_idx
    device = check_kernel_tensors(_OP, tensors, vectors=("g_idx",))
    if qweight.stride(-1) != 1 or scales.stride(-1) != 1:
        raise ValueError(f"{_OP}: qweight and scales must have a contiguous last dim")
    K, N = x.shape[-1], qweight.shape[1]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out.view(*x.shape[:-1], N)
    if K == 0:
        return out.zero_().view(*x.shape[:-1], N)
    cfg = tile_config(M, N, K, group_size, g_idx is not None, num_sms(device), x.element_size())
    if num_splits is not None:
        k_blocks = cdiv(K, cfg["BLOCK_K"])
        cfg["blocks_per_split"] = cdiv(k_blocks, max(1, min(num_splits, k_blocks)))
        cfg["num_splits"] = cdiv(k_blocks, cfg["blocks_per_split"])
    splits = cfg.pop("num_splits")
    target = out if splits == 1 else torch.empty(splits, M, N, dtype=torch.float32, device=x.device)
    grid = (cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"]), splits)
    _wna16_gemm_kernel[grid](
        x2, qweight, scales,
        zeros if zeros is not None else scales,  # unused when HAS_ZEROS is False
        g_idx if g_idx is not None else qweight,  # unused when HAS_G_IDX is False
        target,
        M, N, K, group_size, cfg.pop("blocks_per_split"),
        x2.stride(0), qweight.stride(0), scales.stride(0),
        zeros.stride(0) if zeros is not None else 0,
        target.stride(0) if splits > 1 else 0, N,
        BITS=bits, HAS_ZEROS=zeros is not None, HAS_G_IDX=g_idx is not None,
        DOT_PRECISION=dot_precision(x.dtype),
        num_stages=2 if cfg["BLOCK_M"] <= 16 else 3,
        **cfg,
    )
    if splits > 1:
        out.copy_(target.sum(0))
    return out.view(*x.shape[:-1], N)


# -- layout helpers (plain torch: the loader's conversions and the reference) ----------------------

def pack_wna16(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned ``[K, N]`` integers (``0 <= v < 2**bits``) into the kernel's ``[K / pack, N]`` int32."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"{_OP}: bits must be one of {SUPPORTED_BITS}, got {bits}")
    pack = 32 // bits
    K, N = values.shape
    if K % pack != 0:
        raise ValueError(f"{_OP}: K={K} is not a multiple of {pack} ({bits}-bit values per int32)")
    v = values.to(torch.int64).reshape(K // pack, pack, N)
    shifts = (torch.arange(pack, device=values.device, dtype=torch.int64) * bits).view(1, pack, 1)
    words = (v << shifts).sum(1)  # disjoint bit fields: the sum is their OR
    return (words - ((words >> 31) << 32)).to(torch.int32)  # the uint32 bit pattern as int32


def unpack_wna16(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """The unsigned ``[K, N]`` int32 values of a packed ``qweight``."""
    pack = 32 // bits
    shifts = (torch.arange(pack, device=qweight.device, dtype=torch.int32) * bits).view(1, pack, 1)
    values = (qweight.unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    return values.reshape(qweight.shape[0] * pack, qweight.shape[1])


def dequantize_wna16(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                     g_idx: torch.Tensor | None, bits: int, group_size: int,
                     dtype: torch.dtype) -> torch.Tensor:
    """The dense ``[K, N]`` weight in ``dtype``, rounded as the kernel rounds it (fp32 product, then ``dtype``)."""
    q = unpack_wna16(qweight, bits)
    K = q.shape[0]
    groups = g_idx.long() if g_idx is not None else torch.arange(K, device=q.device) // group_size
    z = zeros[groups].to(torch.int32) if zeros is not None else 1 << (bits - 1)
    return ((q - z).to(torch.float32) * scales[groups].to(torch.float32)).to(dtype)


def wna16_gemm_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                   g_idx: torch.Tensor | None, bits: int, group_size: int, *,
                   num_splits: int | None = None) -> torch.Tensor:
    """Plain-torch :func:`wna16_gemm`: dequantize, then an fp32-accumulated matmul (same arguments)."""
    _check(x, qweight, scales, zeros, g_idx, bits, group_size)
    w = dequantize_wna16(qweight, scales, zeros, g_idx, bits, group_size, x.dtype)
    return (x.float() @ w.float()).to(x.dtype)
