"""Model registry: Hugging Face `architectures` name -> model class (model files import layers/ only)."""

from __future__ import annotations

from paged_engine.model_executor.models.gemma import Gemma2ForCausalLM, Gemma3ForCausalLM
from paged_engine.model_executor.models.llama import (
    LlamaForCausalLM,
    MistralForCausalLM,
    Qwen2ForCausalLM,
    Qwen3ForCausalLM,
)
from paged_engine.model_executor.models.mixtral import MixtralForCausalLM
from paged_engine.model_executor.models.phi3 import Phi3ForCausalLM
from paged_engine.model_executor.models.qwen3_moe import Qwen3MoeForCausalLM

MODEL_REGISTRY = {
    "Gemma2ForCausalLM": Gemma2ForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Phi3ForCausalLM": Phi3ForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
}


def supported_architectures() -> list[str]:
    return sorted(MODEL_REGISTRY)


def get_model_class(hf_config) -> type:
    """The model class for `hf_config.architectures`; ValueError naming the supported ones."""
    archs = list(getattr(hf_config, "architectures", None) or [])
    for arch in archs:
        if arch in MODEL_REGISTRY:
            return MODEL_REGISTRY[arch]
    raise ValueError(
        f"unsupported model architecture {archs or None}; supported architectures: "
        f"{', '.join(supported_architectures())}"
    )


__all__ = ["MODEL_REGISTRY", "get_model_class", "supported_architectures"]
