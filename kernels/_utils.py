"""Checks and device facts shared by the kernel launchers.

Every launcher validates its inputs on the host before launching, so a wrong shape, stride,
dtype or device is a ``ValueError`` naming the argument rather than a silent out-of-bounds
access on the GPU. None of these checks read tensor values (that would be a host sync and
would break CUDA-graph capture).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

ATTN_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.4426950408889634


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@dataclass(frozen=True)
class CaptureTarget:
    arch: int  # compute capability x10, e.g. 90
    num_sms: int


# Set by `kernels.aot` while it records launches on CPU tensors to compile them for a CUDA target:
# the launchers then accept CPU tensors and see the target's capability and SM count.
_capture: CaptureTarget | None = None


def check_kernel_device(op: str, tensors: dict[str, torch.Tensor]) -> torch.device:
    """All tensors on one device, and that device can run Triton kernels."""
    devices = {name: t.device for name, t in tensors.items()}
    first_name, device = next(iter(devices.items()))
    for name, dev in devices.items():
        if dev != device:
            raise ValueError(
                f"{op}: all tensors must be on one device; {first_name} is on {device} but {name} is on {dev}"
            )
    if device.type != "cuda" and not interpreting() and _capture is None:
        raise ValueError(
            f"{op}: the Triton kernel needs CUDA tensors (got {device}); on CPU call {op}_ref, "
            "or set TRITON_INTERPRET=1 before importing triton to run the kernel in the interpreter"
        )
    return device


def check_kernel_tensors(op: str, tensors: dict[str, torch.Tensor], vectors: tuple[str, ...]) -> torch.device:
    """The layout every launcher needs: all tensors on one device that runs Triton kernels, the
    ones named in `vectors` (1-D index tensors) contiguous, every other one with a contiguous
    last dim. Returns the device."""
    device = check_kernel_device(op, tensors)
    for name, t in tensors.items():
        if name not in vectors:
            check_last_dim_contiguous(op, name, t)
        elif t.numel() > 0 and t.stride(0) != 1:
            raise ValueError(f"{op}: {name} must be contiguous")
    return device


def check_dim(op: str, name: str, t: torch.Tensor, ndim: int, layout: str) -> None:
    if t.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D {layout}, got shape {tuple(t.shape)}")


def check_last_dim_contiguous(op: str, name: str, t: torch.Tensor) -> None:
    if t.numel() > 0 and t.stride(-1) != 1:
        raise ValueError(f"{op}: {name} must have a contiguous last dim (stride 1), got strides {t.stride()}")


def check_dtype(op: str, name: str, t: torch.Tensor, dtypes: tuple[torch.dtype, ...]) -> None:
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{op}: {name} must be one of ({allowed}), got {str(t.dtype).replace('torch.', '')}")


def check_paged_attention(
    op: str, q: torch.Tensor, q_layout: str, k_cache: torch.Tensor, v_cache: torch.Tensor,
    block_tables: torch.Tensor, context_lens: torch.Tensor, out: torch.Tensor | None,
) -> None:
    """The checks both paged attention launchers share: q against the cache, the block tables and
    lengths, dtypes and ``out``. The caller checks what is its own (rows per sequence)."""
    check_dim(op, "q", q, 3, q_layout)
    check_dim(op, "k_cache", k_cache, 4, "[num_blocks, block_size, num_kv_heads, head_dim]")
    check_dim(op, "v_cache", v_cache, 4, "[num_blocks, block_size, num_kv_heads, head_dim]")
    check_dim(op, "block_tables", block_tables, 2, "[num_seqs, max_blocks_per_seq]")
    check_dim(op, "context_lens", context_lens, 1, "[num_seqs]")
    _, num_heads, head_dim = q.shape
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"{op}: v_cache shape {tuple(v_cache.shape)} != k_cache shape {tuple(k_cache.shape)}")
    num_kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"{op}: q head_dim {head_dim} != k_cache head_dim {k_cache.shape[3]}")
    if num_kv_heads == 0 or num_heads % num_kv_heads != 0:
        raise ValueError(f"{op}: num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    num_seqs = context_lens.shape[0]
    if block_tables.shape[0] != num_seqs:
        raise ValueError(f"{op}: block_tables has {block_tables.shape[0]} rows for {num_seqs} sequences")
    check_dtype(op, "q", q, ATTN_DTYPES)
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"{op}: q, k_cache, v_cache dtypes differ: {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    check_dtype(op, "block_tables", block_tables, (torch.int32,))
    check_dtype(op, "context_lens", context_lens, (torch.int32,))
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype):
        raise ValueError(f"{op}: out must be {tuple(q.shape)} {q.dtype}, got {tuple(out.shape)} {out.dtype}")


# -- shared by the attention kernels --------------------------------------------------------------


@triton.jit
def tanh(x):
    """tanh through exp2 (saturates to +-1 for large |x|; abs error ~1e-7 near 0)."""
    return 1.0 - 2.0 / (tl.exp2(tl.minimum(x * 2.8853900817779268, 126.0)) + 1.0)  # 2 * log2(e)


def score_scales(scale: float, softcap: float | None) -> tuple[float, float]:
    """(qk_scale, cap_log2) for the attention kernels: scores in the log2 domain are
    ``qk * qk_scale`` without soft-capping and ``tanh(qk * qk_scale) * cap_log2`` with it."""
    if softcap is None:
        return scale * LOG2E, 0.0
    return scale / softcap, softcap * LOG2E


def check_window_softcap(op: str, sliding_window: int | None, softcap: float | None) -> None:
    """A sliding window is a positive int (keys per query, its own included); a soft cap is > 0."""
    if sliding_window is not None and (not isinstance(sliding_window, int) or isinstance(sliding_window, bool)
                                       or sliding_window < 1):
        raise ValueError(f"{op}: sliding_window must be a positive integer or None, got {sliding_window!r}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"{op}: softcap must be > 0 or None, got {softcap!r}")


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` for ``tl.dot``: exact fp32 products for fp32 inputs (so the interpreter and
    the tests compare closely); for 16-bit inputs the argument is ignored and tensor cores are used."""
    return "ieee" if dtype == torch.float32 else "tf32"


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; on CPU the capture target's, or a small stand-in
    (interpreter)."""
    if device.type == "cuda":
        return _cuda_properties(device).multi_processor_count
    return _capture.num_sms if _capture is not None else 4


def capability(device: torch.device) -> int:
    """Compute capability x10 of ``device`` (90 = H100); on CPU the capture target's, else 0."""
    if device.type == "cuda":
        props = _cuda_properties(device)
        return props.major * 10 + props.minor
    return _capture.arch if _capture is not None else 0


@functools.lru_cache(maxsize=None)
def _cuda_properties(device: torch.device):
    return torch.cuda.get_device_properties(device)


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
