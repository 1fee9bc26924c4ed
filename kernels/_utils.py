"""Checks and device facts shared by the kernel launchers.

Every launcher validates its inputs on the host before launching, so a wrong shape, stride,
dtype or device is a ``ValueError`` naming the argument rather than a silent out-of-bounds
access on the GPU. None of these checks read tensor values (that would be a host sync and
would break CUDA-graph capture).
"""

from __future__ import annotations

import functools
import os

import torch

ATTN_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def check_kernel_device(op: str, tensors: dict[str, torch.Tensor]) -> torch.device:
    """All tensors on one device, and that device can run Triton kernels."""
    devices = {name: t.device for name, t in tensors.items()}
    first_name, device = next(iter(devices.items()))
    for name, dev in devices.items():
        if dev != device:
            raise ValueError(
                f"{op}: all tensors must be on one device; {first_name} is on {device} but {name} is on {dev}"
            )
    if device.type != "cuda" and not interpreting():
        raise ValueError(
            f"{op}: the Triton kernel needs CUDA tensors (got {device}); on CPU call {op}_ref, "
            "or set TRITON_INTERPRET=1 before importing triton to run the kernel in the interpreter"
        )
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


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` for ``tl.dot``: exact fp32 products for fp32 inputs (so the interpreter and
    the tests compare closely); for 16-bit inputs the argument is ignored and tensor cores are used."""
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.lru_cache(maxsize=None)
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; a small stand-in on CPU (interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
