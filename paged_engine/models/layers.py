"""Small layers shared by the model files: RMSNorm, rotary embedding, SiLU-and-mul.

Each layer calls the Triton launcher from `kernels/` when its input lives on CUDA and the
plain-torch `*_ref` beside it otherwise, so the same model runs in CPU tests and on a GPU.
"""

from __future__ import annotations

import torch
from torch import nn

from paged_engine import attention as _attention

from kernels import (
    compute_cos_sin_cache,
    rms_norm,
    rms_norm_ref,
    rotary_embedding,
    rotary_embedding_ref,
    silu_and_mul,
    silu_and_mul_ref,
)


class RMSNorm(nn.Module):
    """RMSNorm with an optional fused residual add (vLLM style).

    forward(x) -> norm(x); forward(x, residual) -> (norm(x + residual), x + residual).
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        op = rms_norm if _attention.use_triton(x) else rms_norm_ref
        return op(x, self.weight, self.eps, residual=residual)


class SiluAndMul(nn.Module):
    """x [T, 2*I] (gate | up) -> silu(gate) * up [T, I]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        op = silu_and_mul if _attention.use_triton(x) else silu_and_mul_ref
        return op(x)


SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_parameters(hf_config) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling or None) from a transformers 4.x or 5.x config.

    transformers 5 folds `rope_theta` and `rope_scaling` into `rope_parameters`; checkpoints on disk
    written by 4.x still carry the old keys, and the old "type" key predates "rope_type".
    """
    params = getattr(hf_config, "rope_parameters", None)
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        raise ValueError("per-layer-type rope_parameters are not supported")
    scaling = dict(params) if isinstance(params, dict) else None
    old_scaling = getattr(hf_config, "rope_scaling", None)
    if scaling is None and isinstance(old_scaling, dict):
        scaling = dict(old_scaling)
    theta = (scaling or {}).get("rope_theta")
    if theta is None:
        theta = getattr(hf_config, "rope_theta", None) or 10000.0
    if scaling is None:
        return float(theta), None
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"unsupported rope scaling type {rope_type!r}; supported: {list(SUPPORTED_ROPE_TYPES)}"
        )
    if scaling.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial_rotary_factor != 1.0 is not supported")
    if rope_type == "default":
        return float(theta), None
    scaling.pop("rope_theta", None)
    scaling.pop("type", None)
    scaling["rope_type"] = rope_type
    return float(theta), scaling


class RotaryEmbedding(nn.Module):
    """Neox-style rotary embedding applied in place to q [T, Hq, D] and k [T, Hk, D].

    The cos/sin table is built by `build_cache` once the model sits on its device (the model is
    constructed on the meta device, where no values exist). It is computed in float32 on the CPU,
    as transformers does, then moved.
    """

    def __init__(self, head_dim: int, max_position: int, base: float, rope_scaling: dict | None):
        super().__init__()
        self.head_dim = head_dim
        self.max_position = max_position
        self.base = base
        self.rope_scaling = rope_scaling
        self.cos_sin_cache: torch.Tensor | None = None  # [max_position, head_dim] float32

    def build_cache(self, device: torch.device) -> None:
        with torch.device("cpu"):
            cache = compute_cos_sin_cache(
                self.head_dim, self.max_position, self.base, rope_scaling=self.rope_scaling
            )
        self.cos_sin_cache = cache.to(device=device, dtype=torch.float32)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        op = rotary_embedding if _attention.use_triton(q) else rotary_embedding_ref
        result = op(positions, q, k, self.cos_sin_cache)
        if result is not None:  # in place by contract; accept an op that also returns (q, k)
            q, k = result
        return q, k
