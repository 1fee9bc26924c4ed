"""Mixture-of-experts MLP: top-k routing and the experts stacked for one fused kernel.

    experts = FusedMoE(num_experts, top_k, hidden_size, intermediate_size, renormalize=True,
                       checkpoint_names={"w1": "w1", "w3": "w3", "w2": "w2"})
    out = experts(hidden_states, router_logits)      # [T, H]

The checkpoint stores each expert apart (`experts.{i}.w1/w3/w2` in Mixtral, `experts.{i}.gate_proj/
up_proj/down_proj` in Qwen3-MoE). The layer holds them stacked, `w13_weight [E, 2 * I, H]` (gate
rows, then up rows) and `w2_weight [E, H, I]`, and its weight loader puts each checkpoint tensor
into its expert's slice: shard id `(expert, "w1" | "w3" | "w2")`. A checkpoint that already stacks
them (transformers 5's in-memory layout, `experts.gate_up_proj` / `experts.down_proj`) loads
without a shard id. `expert_checkpoint_target` maps checkpoint names to those parameters; the model
file exposes it to the loader as `checkpoint_target`.

Tensor parallelism shards the experts like the MLP's linears: each rank holds every expert's slice
of the intermediate features (gate/up column-split, down row-split) and the partial outputs are
summed over ranks.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from paged_engine.distributed.parallel_state import get_tp_group, tensor_model_parallel_all_reduce
from paged_engine.model_executor.layers.linear import divide
from paged_triton.kernels import ops

_EXPERT_TENSOR = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<expert>\d+)\.(?P<leaf>[A-Za-z0-9_]+)\.weight$")
_STACKED_TENSOR = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<leaf>gate_up_proj|down_proj)$")
_SHARD_PARAM = {"w1": "w13_weight", "w3": "w13_weight", "w2": "w2_weight"}


def expert_checkpoint_target(name: str, checkpoint_names: dict[str, str]) -> tuple[str, object] | None:
    """(parameter name, shard id) of an expert tensor of the checkpoint, None for other tensors.

    Args:
        checkpoint_names: the checkpoint's leaf name of each projection -> "w1" (gate), "w3" (up)
            or "w2" (down), e.g. {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}.
    """
    m = _EXPERT_TENSOR.match(name)
    if m is not None and m["leaf"] in checkpoint_names:
        kind = checkpoint_names[m["leaf"]]
        return f"{m['prefix']}.{_SHARD_PARAM[kind]}", (int(m["expert"]), kind)
    m = _STACKED_TENSOR.match(name)
    if m is not None:
        return f"{m['prefix']}.{'w13_weight' if m['leaf'] == 'gate_up_proj' else 'w2_weight'}", None
    return None


class FusedMoE(nn.Module):
    """The experts of one MoE layer and their routing.

    Args:
        num_experts, top_k: experts, and experts per token.
        hidden_size, intermediate_size: each expert's MLP sizes (intermediate: all ranks').
        renormalize: divide the top-k probabilities by their sum (Mixtral; Qwen3-MoE's
            `norm_topk_prob`).
        activation: "silu" or "gelu_tanh".
    """

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int,
                 renormalize: bool, activation: str = "silu"):
        super().__init__()
        if not 0 < top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok must be in [1, {num_experts}], got {top_k}")
        self.num_experts, self.top_k = num_experts, top_k
        self.renormalize = renormalize
        self.activation = activation
        self.tp_group = get_tp_group()
        self.tp_rank, self.tp_size = self.tp_group.rank, self.tp_group.size
        self.intermediate_size = intermediate_size
        self.intermediate_per_partition = divide(intermediate_size, self.tp_size, "expert intermediate features")
        i_p = self.intermediate_per_partition
        self.w13_weight = nn.Parameter(torch.empty(num_experts, 2 * i_p, hidden_size), requires_grad=False)
        self.w2_weight = nn.Parameter(torch.empty(num_experts, hidden_size, i_p), requires_grad=False)
        for param, kinds in ((self.w13_weight, ("w1", "w3")), (self.w2_weight, ("w2",))):
            param.weight_loader = self.weight_loader
            param.shard_ids = tuple((e, kind) for e in range(num_experts) for kind in kinds)

    # -- loading ------------------------------------------------------------------------------

    def _rank_rows(self, loaded: torch.Tensor, dim: int, what: str) -> torch.Tensor:
        """This rank's share of the intermediate features of a checkpoint tensor along `dim`."""
        if loaded.shape[dim] != self.intermediate_size:
            raise ValueError(f"FusedMoE {what}: checkpoint tensor has shape {tuple(loaded.shape)}, expected "
                             f"{self.intermediate_size} intermediate features along dim {dim}")
        i_p = self.intermediate_per_partition
        return loaded.narrow(dim, self.tp_rank * i_p, i_p)

    @staticmethod
    def _copy(dst: torch.Tensor, src: torch.Tensor, what: str) -> None:
        if tuple(dst.shape) != tuple(src.shape):
            raise ValueError(f"FusedMoE {what}: checkpoint tensor has shape {tuple(src.shape)}, the layer "
                             f"expects {tuple(dst.shape)}")
        dst.copy_(src)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        """shard_id (expert, "w1"|"w3"|"w2") for one expert's [I, H] / [H, I] tensor; None for
        all experts stacked ([E, 2 * I, H] gate then up, or [E, H, I])."""
        i_p = self.intermediate_per_partition
        if shard_id is None:
            if loaded.dim() != 3 or loaded.shape[0] != self.num_experts:
                raise ValueError(f"FusedMoE: stacked expert tensor has shape {tuple(loaded.shape)}, expected "
                                 f"[{self.num_experts}, ...]")
            if param is self.w13_weight:
                gate, up = loaded.chunk(2, dim=1)
                loaded = torch.cat([self._rank_rows(gate, 1, "gate"), self._rank_rows(up, 1, "up")], dim=1)
            else:
                loaded = self._rank_rows(loaded, 2, "down")
            return self._copy(param.data, loaded, "stacked experts")
        if not (isinstance(shard_id, tuple) and len(shard_id) == 2 and shard_id in param.shard_ids):
            raise ValueError(f"FusedMoE: unknown expert shard {shard_id!r} for this parameter")
        expert, kind = shard_id
        if kind == "w2":
            return self._copy(param.data[expert], self._rank_rows(loaded, 1, f"expert {expert} w2"),
                              f"expert {expert} w2")
        offset = 0 if kind == "w1" else i_p
        self._copy(param.data[expert, offset:offset + i_p], self._rank_rows(loaded, 0, f"expert {expert} {kind}"),
                   f"expert {expert} {kind}")

    # -- compute ------------------------------------------------------------------------------

    def select_experts(self, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(fp32 weights, ids) [T, top_k]: softmax over the experts in fp32, the top k, optionally
        renormalised to sum to 1 (transformers' Mixtral and Qwen3-MoE routers)."""
        probs = torch.softmax(router_logits.float(), dim=-1)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, ids

    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        weights, ids = self.select_experts(router_logits)
        out = ops.fused_moe(hidden_states, self.w13_weight, self.w2_weight, weights, ids, self.activation)
        return out if self.tp_size == 1 else tensor_model_parallel_all_reduce(out, self.tp_group)
