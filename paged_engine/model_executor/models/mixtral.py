"""Mixtral (`MixtralForCausalLM`): Mistral's attention with a sparse mixture-of-experts MLP.

Each layer's `block_sparse_moe` routes every token to its top `num_experts_per_tok` of
`num_local_experts` experts (softmax over the router logits, the top-k probabilities renormalised
to sum to 1) and runs them through the fused MoE kernel (layers/fused_moe.py). The checkpoint's
`experts.{i}.w1/w3/w2` (gate/up/down) tensors are stacked into the layer's per-expert weights by
its weight loader; `checkpoint_target` tells the loader where each goes.
"""

from __future__ import annotations

import torch
from torch import nn

from paged_engine.model_executor.layers.fused_moe import FusedMoE, expert_checkpoint_target
from paged_engine.model_executor.layers.linear import ReplicatedLinear
from paged_engine.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM

MIXTRAL_EXPERT_NAMES = {"w1": "w1", "w3": "w3", "w2": "w2"}


class MixtralSparseMoeBlock(nn.Module):
    """Router (`gate`, no bias) + experts; forward(x [T, H]) -> [T, H]."""

    def __init__(self, config, renormalize: bool = True, intermediate_size: int | None = None):
        super().__init__()
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported hidden_act {act!r} for the experts; only 'silu' is supported")
        num_experts = getattr(config, "num_local_experts", None) or config.num_experts
        self.gate = ReplicatedLinear(config.hidden_size, num_experts, bias=False)
        self.experts = FusedMoE(num_experts, config.num_experts_per_tok, config.hidden_size,
                                intermediate_size or config.intermediate_size, renormalize=renormalize)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.experts(hidden_states, self.gate(hidden_states))


class MixtralDecoderLayer(LlamaDecoderLayer):
    mlp_name = "block_sparse_moe"

    def make_mlp(self, config, layer_idx: int) -> nn.Module:
        return MixtralSparseMoeBlock(config)


class MixtralForCausalLM(LlamaForCausalLM):
    layer_cls = MixtralDecoderLayer
    expert_names = MIXTRAL_EXPERT_NAMES

    def checkpoint_target(self, name: str):
        """(parameter, shard id) of an expert tensor; None leaves the name to packed_modules_mapping."""
        return expert_checkpoint_target(name, self.expert_names)
