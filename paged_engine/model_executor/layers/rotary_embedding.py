"""Rotary position embedding (NeoX style) and the rope settings of a transformers config.

LongRoPE (Phi-3/3.5/4-mini): transformers picks the short factors while a sequence fits in
`original_max_position_embeddings` and, once it grows past it, recomputes the whole sequence with
the long factors. Here the choice is made once per engine, as vLLM does: the long factors for every
position and every sequence when the engine's `max_model_len` exceeds
`original_max_position_embeddings`, the short factors otherwise. No sequence ever changes factors,
so its cached keys are always rotated by the same table, and prefix caching, chunked prefill and
CUDA graphs are unaffected. The cost: with a long `max_model_len`, a short sequence is rotated with
the long factors (transformers would use the short ones); serve with
`max_model_len <= original_max_position_embeddings` to get the short ones.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from paged_triton.kernels import ops
from paged_triton.kernels.rotary_embedding import compute_cos_sin_cache

logger = logging.getLogger(__name__)

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "longrope")


def _raw_rope_parameters(hf_config, layer_type: str | None) -> dict | None:
    params = getattr(hf_config, "rope_parameters", None)
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        if layer_type is None:
            raise ValueError("per-layer-type rope_parameters are not supported")
        if layer_type not in params:
            raise ValueError(f"rope_parameters has no entry for layer type {layer_type!r} (has {sorted(params)})")
        return dict(params[layer_type])
    return dict(params) if isinstance(params, dict) else None


def rope_parameters(hf_config, layer_type: str | None = None,
                    allow_partial_rotary: bool = False) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling or None) from a transformers 4.x or 5.x config.

    transformers 5 folds `rope_theta` and `rope_scaling` into `rope_parameters`; checkpoints on disk
    written by 4.x still carry the old keys, and the old "type" key predates "rope_type". Models
    with per-layer-type rope (Gemma 3: local and global layers) pass the `layer_type`. Partial
    rotary is an error unless the model applies it (`allow_partial_rotary`, see
    `partial_rotary_factor`).
    """
    scaling = _raw_rope_parameters(hf_config, layer_type)
    old_scaling = getattr(hf_config, "rope_scaling", None)
    if scaling is None and isinstance(old_scaling, dict):
        scaling = dict(old_scaling)
    theta = (scaling or {}).get("rope_theta")
    if theta is None:
        theta = getattr(hf_config, "rope_theta", None) or 10000.0
    if scaling is None:
        return float(theta), None
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) or "default"
    if rope_type == "su":  # Phi-3's early name for longrope
        rope_type = "longrope"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"unsupported rope scaling type {rope_type!r}; supported: {list(SUPPORTED_ROPE_TYPES)}"
        )
    if not allow_partial_rotary and scaling.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial_rotary_factor != 1.0 is not supported for this architecture")
    if rope_type == "default":
        return float(theta), None
    for key in ("rope_theta", "type", "partial_rotary_factor"):
        scaling.pop(key, None)
    scaling["rope_type"] = rope_type
    if rope_type == "longrope":
        # transformers 4 configs (Phi-3) keep the pretraining length at the top level.
        original = getattr(hf_config, "original_max_position_embeddings", None)
        if original is not None:
            scaling["original_max_position_embeddings"] = original
        for key in ("short_factor", "long_factor", "original_max_position_embeddings"):
            if scaling.get(key) is None:
                raise ValueError(f"longrope rope scaling needs {key!r}")
    return float(theta), scaling


def partial_rotary_factor(hf_config, layer_type: str | None = None) -> float:
    """Fraction of each head's dims that is rotated (Phi-4-mini: 0.75), 1.0 by default."""
    params = _raw_rope_parameters(hf_config, layer_type) or {}
    factor = params.get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", None))
    return 1.0 if factor is None else float(factor)


class RotaryEmbedding(nn.Module):
    """Neox-style rotary embedding applied in place to q [T, Hq, D] and k [T, Hk, D].

    The first `rotary_dim` dims of each head are rotated (all by default; fewer with partial
    rotary), the rest pass through. The cos/sin table is built by `build_cache` once the model
    sits on its device (the model is constructed on the meta device, where no values exist). It is
    computed in float32 on the CPU, as transformers does, then moved.
    """

    def __init__(self, head_dim: int, max_position: int, base: float, rope_scaling: dict | None,
                 rotary_dim: int | None = None):
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = head_dim if rotary_dim is None else rotary_dim
        self.max_position = max_position
        self.base = base
        self.rope_scaling = rope_scaling
        self.cos_sin_cache: torch.Tensor | None = None  # [max_position, rotary_dim] float32

    @property
    def is_longrope(self) -> bool:
        return bool(self.rope_scaling) and self.rope_scaling.get("rope_type") == "longrope"

    def uses_long_factors(self, max_model_len: int | None) -> bool:
        """LongRoPE: the long factors when the engine's longest sequence exceeds the original
        context (see the module docstring)."""
        if not self.is_longrope:
            return False
        return (max_model_len or self.max_position) > self.rope_scaling["original_max_position_embeddings"]

    def build_cache(self, device: torch.device, max_model_len: int | None = None) -> None:
        long = self.uses_long_factors(max_model_len)
        if self.is_longrope:
            logger.info("longrope: %s factors for every position (max_model_len %s, original context %d)",
                        "long" if long else "short", max_model_len or self.max_position,
                        self.rope_scaling["original_max_position_embeddings"])
        with torch.device("cpu"):
            cache = compute_cos_sin_cache(
                self.head_dim, self.max_position, self.base, rope_scaling=self.rope_scaling,
                rotary_dim=self.rotary_dim, use_long_factor=long,
            )
        self.cos_sin_cache = cache.to(device=device, dtype=torch.float32)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        ops.rotary_embedding(positions, q, k, self.cos_sin_cache)  # in place
        return q, k
