"""Qwen3-MoE (`Qwen3MoeForCausalLM`): Qwen3's attention (q/k norm) with a sparse MoE MLP.

Each MoE layer's `mlp` routes a token to its top `num_experts_per_tok` of `num_experts` experts
(softmax in fp32, the top-k probabilities renormalised only when `norm_topk_prob`), each expert a
SwiGLU MLP of `moe_intermediate_size`, through the fused MoE kernel. Layers listed in
`mlp_only_layers`, or off the `decoder_sparse_step` grid, keep a dense MLP of `intermediate_size`.
Checkpoint tensors `mlp.experts.{i}.gate_proj/up_proj/down_proj` are stacked at load.
"""

from __future__ import annotations

from torch import nn

from paged_engine.model_executor.layers.fused_moe import expert_checkpoint_target
from paged_engine.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP
from paged_engine.model_executor.models.mixtral import MixtralSparseMoeBlock

QWEN_EXPERT_NAMES = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


def is_moe_layer(config, layer_idx: int) -> bool:
    """transformers' rule for which Qwen3-MoE layers are sparse."""
    num_experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", 0)
    step = getattr(config, "decoder_sparse_step", 1) or 1
    return (layer_idx not in (getattr(config, "mlp_only_layers", None) or [])
            and num_experts > 0 and (layer_idx + 1) % step == 0)


class Qwen3MoeDecoderLayer(LlamaDecoderLayer):
    def make_mlp(self, config, layer_idx: int) -> nn.Module:
        if not is_moe_layer(config, layer_idx):
            return LlamaMLP(config)
        return MixtralSparseMoeBlock(config, renormalize=bool(getattr(config, "norm_topk_prob", False)),
                                     intermediate_size=config.moe_intermediate_size)


class Qwen3MoeForCausalLM(LlamaForCausalLM):
    qk_norm = True
    layer_cls = Qwen3MoeDecoderLayer
    expert_names = QWEN_EXPERT_NAMES

    def checkpoint_target(self, name: str):
        """(parameter, shard id) of an expert tensor; None leaves the name to packed_modules_mapping."""
        return expert_checkpoint_target(name, self.expert_names)
