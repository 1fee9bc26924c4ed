"""Gated activations of the MLP."""

from __future__ import annotations

import torch
from torch import nn

from paged_triton.kernels import ops


class SiluAndMul(nn.Module):
    """x [T, 2*I] (gate | up) -> silu(gate) * up [T, I]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.silu_and_mul(x)


class GeluTanhAndMul(nn.Module):
    """x [T, 2*I] (gate | up) -> gelu_tanh(gate) * up [T, I] (Gemma's gelu_pytorch_tanh)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.gelu_tanh_and_mul(x)


# transformers `hidden_act` / `hidden_activation` name -> gated activation module
GATED_ACTIVATIONS = {"silu": SiluAndMul, "gelu_pytorch_tanh": GeluTanhAndMul}


def gated_activation(name: str) -> nn.Module:
    if name not in GATED_ACTIVATIONS:
        raise ValueError(f"unsupported hidden activation {name!r}; supported: {sorted(GATED_ACTIVATIONS)}")
    return GATED_ACTIVATIONS[name]()
