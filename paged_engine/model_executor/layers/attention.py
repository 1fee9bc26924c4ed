"""PagedAttention: store this step's K/V into the paged cache, then attend over the cache.

Decodes (one query token) go to the decode op, the rest of the batch to the prefill op; the
runner lays decodes out first (see `AttentionMetadata`). The ops pick their implementation from
the tensors (`kernels.ops`), so this layer runs unchanged on CPU and GPU.
"""

from __future__ import annotations

import torch
from torch import nn

from paged_engine.model_executor.forward_context import get_forward_context
from paged_triton.kernels import ops


def layer_sliding_window(hf_config, layer_idx: int) -> int | None:
    """The sliding window of layer `layer_idx` as transformers applies it: `sliding_window` on the
    layers `layer_types` marks "sliding_attention" (Gemma 2/3, Qwen2/3 with use_sliding_window),
    on every layer when the config has no `layer_types` (Mistral, Mixtral, Phi-3); None: full.
    A window as long as the model's context (Phi-3-mini-128k's 262144) changes nothing: None."""
    window = getattr(hf_config, "sliding_window", None)
    max_position = getattr(hf_config, "max_position_embeddings", None)
    if window and max_position and window >= max_position:
        window = None
    layer_types = getattr(hf_config, "layer_types", None)
    if layer_types:
        kind = layer_types[layer_idx]
        if kind not in ("full_attention", "sliding_attention"):
            raise ValueError(f"layer {layer_idx}: unsupported attention layer type {kind!r} "
                             "(supported: full_attention, sliding_attention)")
        return int(window) if window and kind == "sliding_attention" else None
    return int(window) if window else None


class PagedAttention(nn.Module):
    """Attention over the paged KV cache of this layer.

    The model runner assigns `k_cache` / `v_cache` ([num_blocks, block_size, num_kv_heads,
    head_dim] each) after allocating the KV cache.

    Args:
        sliding_window: each query sees only the last `sliding_window` keys (its own included),
            transformers' `sliding_window`; None: the whole causal context.
        softcap: soft-cap the scaled scores (`cap * tanh(s / cap)`, Gemma 2's
            `attn_logit_softcapping`); None: off.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None, softcap: float | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.sliding_window = None if sliding_window is None else int(sliding_window)
        self.softcap = None if softcap is None else float(softcap)
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, num_heads, head_dim], k/v [T, num_kv_heads, head_dim] -> [T, num_heads, head_dim]."""
        md = get_forward_context()
        k_cache, v_cache = self.k_cache, self.v_cache
        if k_cache is None or v_cache is None:
            raise RuntimeError("PagedAttention has no KV cache; the model runner allocates it")
        ops.store_kvcache(k, v, k_cache, v_cache, md.slot_mapping)
        num_decode = md.num_decode_seqs  # == number of decode query tokens
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        if num_decode > 0:
            ops.paged_decode_attention(
                q[:num_decode], k_cache, v_cache, md.block_tables[:num_decode],
                md.context_lens[:num_decode], self.scale, out[:num_decode],
                sliding_window=self.sliding_window, softcap=self.softcap, cache=md.op_cache)
        if num_decode < md.num_seqs:
            ops.paged_prefill_attention(
                q[num_decode:], k_cache, v_cache, md.block_tables[num_decode:],
                md.prefill_cu_seqlens_q, md.context_lens[num_decode:], self.scale,
                out[num_decode:], md.max_seqlen_q, sliding_window=self.sliding_window, softcap=self.softcap,
                cache=md.op_cache)
        return out
