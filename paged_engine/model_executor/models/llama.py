"""Llama-family decoder: Llama 2/3/3.1, Mistral, Qwen2 and Qwen3, in one readable file.

The four architectures differ only in a few switches, kept as class attributes:
  - Qwen2: bias on the q/k/v projections;
  - Qwen3: RMSNorm over each q and k head before the rotary embedding;
  - Llama: `attention_bias` / `mlp_bias` from the config, llama3 rope scaling.
Sliding-window attention applies where the config sets it (Mistral v0.1's `sliding_window`, the
`sliding_attention` layers of `layer_types`). Other families reuse these classes: Phi-3 (phi3.py),
and the MoE models (mixtral.py, qwen3_moe.py) whose decoder layers swap the MLP (`make_mlp`).
q/k/v are one fused `qkv_proj` and gate/up one `gate_up_proj`; the loader hands each separate
checkpoint tensor to the fused layer's weight loader with its shard id
(`packed_modules_mapping`). Attention metadata comes from the forward context
(model_executor/forward_context.py), so `forward(input_ids, positions)` is all a caller passes.
Quantization and tensor parallelism are the layers' business (model_executor/layers/linear.py):
nothing here changes for them.
"""

from __future__ import annotations

import torch
from torch import nn

from paged_engine.model_executor.layers.activation import SiluAndMul
from paged_engine.model_executor.layers.attention import PagedAttention, layer_sliding_window
from paged_engine.model_executor.layers.layernorm import RMSNorm
from paged_engine.model_executor.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from paged_engine.model_executor.layers.rotary_embedding import (
    RotaryEmbedding,
    partial_rotary_factor,
    rope_parameters,
)
from paged_engine.model_executor.layers.vocab_embedding import ParallelLMHead, VocabParallelEmbedding


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class LlamaAttention(nn.Module):
    def __init__(self, config, rotary_emb: RotaryEmbedding, qkv_bias: bool, qk_norm: bool, layer_idx: int = 0):
        super().__init__()
        num_heads = config.num_attention_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
        self.head_dim = _head_dim(config)
        o_bias = bool(getattr(config, "attention_bias", False))
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size, self.head_dim, num_heads, num_kv_heads, bias=qkv_bias or o_bias
        )
        # This rank's share of the heads (all of them without tensor parallelism).
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        self.o_proj = RowParallelLinear(num_heads * self.head_dim, config.hidden_size, bias=o_bias)
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.rotary_emb = rotary_emb  # shared by all layers: one cos/sin table
        self.attn = PagedAttention(
            self.num_heads, self.num_kv_heads, self.head_dim, scale=self.head_dim**-0.5,
            sliding_window=layer_sliding_window(config, layer_idx),
        )

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        num_tokens = hidden_states.shape[0]
        qkv = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(num_tokens, self.num_heads, self.head_dim)
        k = k.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q.reshape(-1, self.head_dim)).view_as(q)
            k = self.k_norm(k.reshape(-1, self.head_dim)).view_as(k)
        # Rotary works in place on these strided views of the qkv output (last dim contiguous).
        q, k = self.rotary_emb(positions, q, k)
        out = self.attn(q, k, v)
        return self.o_proj(out.reshape(num_tokens, self.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported hidden_act {act!r}; only 'silu' is supported")
        bias = bool(getattr(config, "mlp_bias", False))
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size, [config.intermediate_size] * 2, bias=bias)
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, bias=bias)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    mlp_name = "mlp"  # the feed-forward module's name in the checkpoint (Mixtral: block_sparse_moe)

    def __init__(self, config, rotary_emb: RotaryEmbedding, qkv_bias: bool, qk_norm: bool, layer_idx: int = 0):
        super().__init__()
        self.self_attn = LlamaAttention(config, rotary_emb, qkv_bias, qk_norm, layer_idx)
        setattr(self, self.mlp_name, self.make_mlp(config, layer_idx))
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def make_mlp(self, config, layer_idx: int) -> nn.Module:
        return LlamaMLP(config)

    def forward(self, positions, hidden_states, residual):
        # The residual add is fused into the next norm: (x, residual) -> (norm(x + r), x + r).
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return getattr(self, self.mlp_name)(hidden_states), residual


class LlamaModel(nn.Module):
    def __init__(self, config, qkv_bias: bool, qk_norm: bool, layer_cls: type = LlamaDecoderLayer,
                 partial_rotary: bool = False):
        super().__init__()
        theta, rope_scaling = rope_parameters(config, allow_partial_rotary=partial_rotary)
        head_dim = _head_dim(config)
        rotary_dim = int(head_dim * partial_rotary_factor(config)) if partial_rotary else head_dim
        self.rotary_emb = RotaryEmbedding(
            head_dim, config.max_position_embeddings, theta, rope_scaling, rotary_dim=rotary_dim
        )
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            layer_cls(config, self.rotary_emb, qkv_bias, qk_norm, i)
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden_states = self.embed_tokens(input_ids)
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class LlamaForCausalLM(nn.Module):
    """forward(input_ids [T], positions [T]) -> hidden states [T, hidden]; compute_logits -> [N, vocab]."""

    qkv_bias = False
    qk_norm = False
    layer_cls: type = LlamaDecoderLayer
    partial_rotary = False  # whether partial_rotary_factor is applied (Phi-3) or an error
    # checkpoint module name -> (fused module name, shard id) for the loader
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, self.qkv_bias, self.qk_norm, self.layer_cls, self.partial_rotary)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding with the LM head (again after `to_empty`, which unties them)."""
        if self.tie_word_embeddings:
            self.lm_head.tie_to(self.model.embed_tokens)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden_states)

    def attention_layers(self) -> list[PagedAttention]:
        return [layer.self_attn.attn for layer in self.model.layers]

    def build_caches(self, device: torch.device, max_model_len: int | None = None) -> None:
        """Compute the non-learned tables (rotary cos/sin) on `device`; called after weights load.
        `max_model_len` (the engine's) picks LongRoPE's factors."""
        self.model.rotary_emb.build_cache(device, max_model_len)


class MistralForCausalLM(LlamaForCausalLM):
    pass


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
