"""Integer weight-only linears (W4A16, W8A16): what every integer format becomes after loading.

A format's method (compressed_tensors.py, awq.py, gptq.py) creates its checkpoint's tensors on the
layer and, once they are loaded, says what they mean: `unpack(layer)` returns the unsigned values
`[K, N]`, scales `[num_groups, N]`, zero points and act-order group indices. This base class then
packs them into the Triton dequant-GEMM's layout (kernels/wna16_gemm.py), checks them, and drops
the checkpoint's tensors, so all formats compute alike:

- On a GPU the weight stays packed (0.5 byte per 4-bit value plus scales) and `apply` calls
  `ops.wna16_gemm`.
- On CPU the weight is dequantized once at load into a dense matrix in the model dtype, or kept
  packed and dequantized per call (`base.dense_on_this_device`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from paged_engine.model_executor.quantization.base import LinearMethodBase, dense_on_this_device
from paged_triton.kernels import ops
from paged_triton.kernels.wna16_gemm import SUPPORTED_BITS, dequantize_wna16, pack_wna16


@dataclass(frozen=True)
class WNA16Scheme:
    """How a checkpoint quantized its weights.

    group_size: input features per scale; None is one scale per output channel.
    symmetric: no zero points stored (the zero is 2**(bits - 1)).
    act_order: each input feature's group is given (`g_idx`), groups are not contiguous.
    """

    bits: int
    group_size: int | None
    symmetric: bool
    act_order: bool = False

    def check(self, fmt: str) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"{fmt}: {self.bits}-bit weights are not supported (supported: "
                             f"{', '.join(map(str, SUPPORTED_BITS))} bits)")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"{fmt}: group_size must be positive or per-channel, got {self.group_size}")


class WNA16LinearMethod(LinearMethodBase):
    """Base of the integer formats' methods; subclasses implement `create_weights` and `unpack`."""

    format_name = "wna16"

    def __init__(self, scheme: WNA16Scheme):
        scheme.check(self.format_name)
        self.scheme = scheme
        self.bits = scheme.bits

    # -- what a subclass provides ------------------------------------------------------------

    def unpack(self, layer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(unsigned values int32 [K, N], scales [num_groups, N], zero points [num_groups, N] or
        None, group index int [K] or None) of this rank's weight, from the loaded tensors."""
        raise NotImplementedError

    # -- shared helpers for create_weights ---------------------------------------------------

    def group_size(self, layer) -> int:
        """Input features per group on this rank (the whole input for per-channel scales)."""
        return self.scheme.group_size or layer.input_size_per_partition

    def num_groups(self, layer) -> int:
        """Groups of this rank's scales; with act-order on a row-parallel layer the rank keeps
        every group, since its input features may belong to any of them."""
        size = self.scheme.group_size
        if size is None:
            return 1
        if self.scheme.act_order:
            return -(-layer.input_size // size)
        k = layer.input_size_per_partition
        if layer.tp_size > 1 and layer.input_size_per_partition != layer.input_size and k % size:
            raise ValueError(f"{self.format_name}: {k} input features per rank are not a multiple of the "
                             f"group size {size} (tensor parallelism {layer.tp_size})")
        return -(-k // size)

    def scales_split_input(self, layer) -> bool:
        """Whether the scales are split along the input axis over ranks (not with act-order)."""
        return self.scheme.group_size is not None and not self.scheme.act_order

    # -- loading -----------------------------------------------------------------------------

    def process_weights_after_loading(self, layer) -> None:
        values, scales, zeros, g_idx = self.unpack(layer)
        K, N = layer.input_size_per_partition, layer.output_size_per_partition
        where = type(layer).__name__
        if tuple(values.shape) != (K, N):
            raise ValueError(f"{self.format_name} {where}: unpacked weight {tuple(values.shape)}, expected {(K, N)}")
        num_groups = scales.shape[0]
        if g_idx is not None:
            g_idx = g_idx.to(torch.int32).contiguous()
            if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= num_groups):
                raise ValueError(f"{self.format_name} {where}: g_idx has entries outside [0, {num_groups})")
            if self.scheme.group_size is not None and not self.scheme.act_order and torch.equal(
                    g_idx.long(), torch.arange(K, device=g_idx.device) // self.scheme.group_size):
                g_idx = None  # the trivial order (GPTQ without desc_act stores it anyway)
        if zeros is not None:
            if zeros.numel() and (int(zeros.min()) < 0 or int(zeros.max()) > 255):
                raise ValueError(f"{self.format_name} {where}: zero points outside [0, 255]")
            if bool((zeros == 1 << (self.bits - 1)).all()):
                zeros = None  # symmetric after all: the kernel's implicit zero
            else:
                zeros = zeros.to(torch.uint8).contiguous()
        dtype = layer.params_dtype
        scales = scales.to(dtype).contiguous()
        for name in list(layer._quant_params):
            delattr(layer, name)
        layer._quant_params = []
        group_size = self.group_size(layer)
        if dense_on_this_device(values):
            self.dense = True
            qweight = pack_wna16(values, self.bits)
            weight = dequantize_wna16(qweight, scales, zeros, g_idx, self.bits, group_size, dtype)
            layer.weight = torch.nn.Parameter(weight.t().contiguous(), requires_grad=False)
            return
        self.dense = False
        self.group_size_k = group_size
        layer.qweight = torch.nn.Parameter(pack_wna16(values, self.bits), requires_grad=False)
        layer.scales = torch.nn.Parameter(scales, requires_grad=False)
        layer.zeros = None if zeros is None else torch.nn.Parameter(zeros, requires_grad=False)
        layer.g_idx = None if g_idx is None else torch.nn.Parameter(g_idx, requires_grad=False)

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.dense:
            return F.linear(x, layer.weight, bias)
        out = ops.wna16_gemm(x, layer.qweight, layer.scales, layer.zeros, layer.g_idx, self.bits,
                             self.group_size_k)
        return out if bias is None else out + bias


def unpack_int32_rows(packed: torch.Tensor, bits: int, order: list[int] | None = None) -> torch.Tensor:
    """Unpack int32 words along their last axis: ``[..., W] -> [..., W * 32 / bits]`` unsigned values.

    Value ``j`` of a word is at bits ``pos(j) * bits`` where ``pos`` is the identity, or, with
    ``order``, value ``j`` is in slot ``order[j]`` (AWQ's interleaved nibbles).
    """
    pack = 32 // bits
    shifts = torch.arange(pack, device=packed.device, dtype=torch.int32) * bits
    slots = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [..., W, pack] by slot
    if order is not None:
        slots = slots[..., order]  # slot order[j] holds value j
    return slots.reshape(*packed.shape[:-1], packed.shape[-1] * pack)


def one_g_idx(g_idx: torch.Tensor, fmt: str) -> torch.Tensor:
    """The act-order of a layer from its loaded `g_idx` (``[K]``, or ``[shards, K]`` for a fused
    layer, whose shards share their input and so must share their order)."""
    if g_idx.dim() == 2:
        if any(not torch.equal(g_idx[0], row) for row in g_idx[1:]):
            raise ValueError(f"{fmt}: the fused shards of a layer have different act-order g_idx; "
                             "one matmul needs one order")
        g_idx = g_idx[0]
    return g_idx
