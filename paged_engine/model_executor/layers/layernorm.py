"""RMSNorm with an optional fused residual add (vLLM style), and Gemma's (1 + w) variant."""

from __future__ import annotations

import torch
from torch import nn

from paged_triton.kernels import ops


class RMSNorm(nn.Module):
    """forward(x) -> norm(x); forward(x, residual) -> (norm(x + residual), x + residual)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return ops.rms_norm(x, self.weight, self.eps, residual=residual)


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm: the checkpoint stores w - 1, applied as norm(x) * (1 + w) in fp32."""

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return ops.rms_norm(x, self.weight, self.eps, residual=residual, unit_offset=True)
