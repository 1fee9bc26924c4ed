"""Gemma 2 and Gemma 3 (text) decoders, in one file.

What sets them apart from Llama, all read from the config:
  - heads wider than hidden / num_heads (`head_dim` 256) and the attention scale
    `query_pre_attn_scalar ** -0.5`;
  - RMSNorm as norm(x) * (1 + w), in fp32 (GemmaRMSNorm), four per layer: after attention and
    after the MLP too ("sandwich" norms), the residual added after each post-norm;
  - the embedding scaled by sqrt(hidden_size), the factor rounded to the model dtype first, as
    transformers does (sqrt(2304) is 48.0 in bf16);
  - a gelu-tanh gated MLP (`hidden_activation` gelu_pytorch_tanh);
  - sliding-window attention on the layers `layer_types` marks "sliding_attention" (Gemma 2:
    every other layer; Gemma 3: five of six), full attention on the others;
  - Gemma 2: attention scores soft-capped at `attn_logit_softcapping` and the final logits at
    `final_logit_softcapping` (cap * tanh(x / cap));
  - Gemma 3: RMSNorm over each q and k head, and two rotary tables: the local layers use
    `rope_parameters["sliding_attention"]` (theta 10k), the global ones `["full_attention"]`
    (theta 1M, linear scaling on the larger models). Like transformers, Gemma 3 applies no
    attention soft-capping.
q/k/v and gate/up are fused here and loaded from the checkpoint's separate tensors through
`packed_modules_mapping`, as for Llama.
"""

from __future__ import annotations

import torch
from torch import nn

from paged_engine.model_executor.layers.activation import gated_activation
from paged_engine.model_executor.layers.attention import PagedAttention, layer_sliding_window
from paged_engine.model_executor.layers.layernorm import GemmaRMSNorm
from paged_engine.model_executor.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from paged_engine.model_executor.layers.rotary_embedding import RotaryEmbedding, rope_parameters
from paged_engine.model_executor.layers.vocab_embedding import ParallelLMHead, VocabParallelEmbedding
from paged_engine.model_executor.models.llama import LlamaForCausalLM


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _layer_type(config, layer_idx: int) -> str:
    return (getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers)[layer_idx]


class GemmaAttention(nn.Module):
    def __init__(self, config, rotary_emb: RotaryEmbedding, layer_idx: int, qk_norm: bool, softcap: float | None):
        super().__init__()
        num_heads = config.num_attention_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
        self.head_dim = _head_dim(config)
        bias = bool(getattr(config, "attention_bias", False))
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, num_heads, num_kv_heads, bias=bias)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        self.o_proj = RowParallelLinear(num_heads * self.head_dim, config.hidden_size, bias=bias)
        if qk_norm:
            self.q_norm = GemmaRMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = GemmaRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.rotary_emb = rotary_emb
        self.attn = PagedAttention(
            self.num_heads, self.num_kv_heads, self.head_dim, scale=float(config.query_pre_attn_scalar) ** -0.5,
            sliding_window=layer_sliding_window(config, layer_idx), softcap=softcap,
        )

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        num_tokens = hidden_states.shape[0]
        q, k, v = self.qkv_proj(hidden_states).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(num_tokens, self.num_heads, self.head_dim)
        k = k.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q.reshape(-1, self.head_dim)).view_as(q)
            k = self.k_norm(k.reshape(-1, self.head_dim)).view_as(k)
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v).reshape(num_tokens, self.q_size))


class GemmaMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", "gelu_pytorch_tanh")
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [config.intermediate_size] * 2)
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size)
        self.act_fn = gated_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class GemmaDecoderLayer(nn.Module):
    def __init__(self, config, rotary_emb: RotaryEmbedding, layer_idx: int, qk_norm: bool, softcap: float | None):
        super().__init__()
        eps = config.rms_norm_eps
        self.self_attn = GemmaAttention(config, rotary_emb, layer_idx, qk_norm, softcap)
        self.mlp = GemmaMLP(config)
        self.input_layernorm = GemmaRMSNorm(config.hidden_size, eps=eps)
        self.post_attention_layernorm = GemmaRMSNorm(config.hidden_size, eps=eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, eps=eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, eps=eps)

    def forward(self, positions, hidden_states, residual):
        # Residual adds fused into the next norm, as in Llama: (x, r) -> (norm(x + r), x + r).
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.post_attention_layernorm(self.self_attn(positions, hidden_states))
        hidden_states, residual = self.pre_feedforward_layernorm(hidden_states, residual)
        hidden_states = self.post_feedforward_layernorm(self.mlp(hidden_states))
        return hidden_states, residual


class GemmaModel(nn.Module):
    def __init__(self, config, qk_norm: bool, attn_softcap: float | None, per_layer_rope: bool):
        super().__init__()
        if getattr(config, "use_bidirectional_attention", False):
            raise ValueError("use_bidirectional_attention=True (an encoder) is not supported")
        head_dim, max_pos = _head_dim(config), config.max_position_embeddings
        layer_types = [_layer_type(config, i) for i in range(config.num_hidden_layers)]
        # One rotary table per layer type: Gemma 3's local and global layers differ; Gemma 2 shares one.
        self.rotary_embs = nn.ModuleDict()
        for kind in sorted(set(layer_types)):
            theta, scaling = rope_parameters(config, kind if per_layer_rope else None)
            self.rotary_embs[kind] = RotaryEmbedding(head_dim, max_pos, theta, scaling)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.embed_scale = config.hidden_size**0.5
        self.layers = nn.ModuleList(
            GemmaDecoderLayer(config, self.rotary_embs[layer_types[i]], i, qk_norm, attn_softcap)
            for i in range(config.num_hidden_layers)
        )
        self.norm = GemmaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden_states = self.embed_tokens(input_ids)
        hidden_states = hidden_states * torch.tensor(self.embed_scale, dtype=hidden_states.dtype)
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class Gemma2ForCausalLM(LlamaForCausalLM):
    """forward(input_ids [T], positions [T]) -> hidden [T, hidden]; compute_logits -> [N, vocab]."""

    qk_norm = False
    per_layer_rope = False
    attention_softcap = True  # Gemma 3 ignores attn_logit_softcapping, as transformers does

    def __init__(self, config):
        nn.Module.__init__(self)
        self.config = config
        softcap = getattr(config, "attn_logit_softcapping", None) if self.attention_softcap else None
        self.model = GemmaModel(config, self.qk_norm, softcap, self.per_layer_rope)
        self.final_logit_softcap = getattr(config, "final_logit_softcapping", None)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", True))
        self.tie_weights()

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head.compute_logits(hidden_states)
        if self.final_logit_softcap is not None and logits is not None:  # None: not the sampling rank
            cap = self.final_logit_softcap
            logits = torch.tanh(logits / cap) * cap
        return logits

    def build_caches(self, device: torch.device, max_model_len: int | None = None) -> None:
        for rotary in self.model.rotary_embs.values():
            rotary.build_cache(device, max_model_len)


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    qk_norm = True
    per_layer_rope = True
    attention_softcap = False
