"""Dense linear layers on CPU with the weight packed once into oneDNN's blocked layout.

``F.linear`` on CPU hands oneDNN a plain [out, in] weight, which it reorders into its blocked
GEMM layout on every call: for the small batches of decode that reorder is a large share of the
matmul (measured on the benchmark machine: 30-40% of an fp32 [32, 576] x [576, 3072] matmul,
10-25% in bf16). Packing at load (``torch.ops.mkldnn._reorder_linear_weight``, what inductor's
CPU freezing pass uses) and calling ``torch.ops.mkldnn._linear_pointwise`` on the packed weight
skips it. The packed copy sits beside the original weight (which the weight loaders, tensor
parallelism and the tests keep reading), so a packed layer holds its weight twice.

Used only where oneDNN is built in and the weight is fp32 or bf16 on CPU; the plain
``F.linear`` is the reference (tests/kernels/test_cpu_linear.py).
"""

from __future__ import annotations

import torch

# Batch rows oneDNN tunes the packed layout for; any row count works, decode batches are these.
_BATCH_HINT = 32


def available(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dim() == 2 and weight.dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def pack_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """The weight [out, in] in oneDNN's layout, or None where this path does not apply."""
    if not available(weight):
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _BATCH_HINT)


def linear_packed(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ W^T + b`` with W from :func:`pack_weight`; x [tokens, in] of W's dtype."""
    if x.shape[0] == 0:
        return x.new_empty(0, packed.shape[0])
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
