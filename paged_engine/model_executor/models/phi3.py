"""Phi-3 / Phi-3.5 / Phi-4-mini (`Phi3ForCausalLM`): the Llama decoder with three differences.

- The checkpoint stores the fused `qkv_proj` and `gate_up_proj` tensors themselves; they load
  through the fused layers' weight loaders without a shard id (the layers split them), so the
  model needs no `packed_modules_mapping`.
- Partial rotary: the first `partial_rotary_factor * head_dim` dims of each head are rotated.
- LongRoPE (`rope_scaling` type "longrope" with short/long factors): the factors are chosen once
  per engine from `max_model_len` (see layers/rotary_embedding.py for the policy).
`sliding_window`, when set (Phi-3-mini-4k: 2047), applies to every layer.
"""

from __future__ import annotations

from paged_engine.model_executor.models.llama import LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    partial_rotary = True
    packed_modules_mapping: dict = {}  # qkv_proj and gate_up_proj are fused in the checkpoint
