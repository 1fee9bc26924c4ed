"""Build a model from a local Hugging Face directory.

    model = load_model("/path/to/model", hf_config, dtype=torch.bfloat16, device="cuda")

Weights come from `model.safetensors` or from the shards listed in `model.safetensors.index.json`.
Checkpoint q/k/v and gate/up tensors are copied into the model's fused `qkv_proj` and
`gate_up_proj` (the model's `packed_modules_mapping` names them). `load_format="dummy"` skips the
checkpoint and fills every weight with small random values of the right shape, for benchmarks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from paged_engine.models import get_model_class

LOAD_FORMATS = ("auto", "safetensors", "dummy")

# Checkpoint tensors that carry nothing the model needs (old Llama checkpoints store rotary tables).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


def load_model(
    model_dir: str | os.PathLike | None,
    hf_config,
    dtype: torch.dtype,
    device: torch.device | str,
    load_format: str = "auto",
    seed: int = 0,
) -> nn.Module:
    """Construct the model for `hf_config` on `device` in `dtype` and load its weights.

    Args:
        model_dir: local HF model directory (unused for load_format="dummy").
        hf_config: transformers config (or any object with the same attributes).
        dtype: parameter dtype.
        device: where the parameters live.
        load_format: "auto"/"safetensors" (read the checkpoint) or "dummy" (random weights).
        seed: seed of the dummy weights.
    Returns:
        the model in eval mode, rotary tables built.
    """
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"unknown load_format {load_format!r}; expected one of {list(LOAD_FORMATS)}")
    model_cls = get_model_class(hf_config)
    device = torch.device(device)
    # Construct on the meta device in the target dtype: no throwaway init, no fp32 copy of the weights.
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = model_cls(hf_config)
    finally:
        torch.set_default_dtype(default_dtype)
    model = model.to_empty(device=device)
    model.tie_weights()
    if load_format == "dummy":
        init_dummy_weights(model, seed)
    else:
        if model_dir is None:
            raise ValueError("model_dir is required unless load_format='dummy'")
        load_weights(model, model_dir)
    model.build_caches(device)
    model.requires_grad_(False)
    return model.eval()


def safetensors_files(model_dir: str | os.PathLike) -> list[Path]:
    """The checkpoint's safetensors files: the shards named by the index, or every *.safetensors."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
    elif (model_dir / "model.safetensors").exists():
        # Some repos also ship other formats' files (e.g. Mistral's consolidated.safetensors).
        files = [model_dir / "model.safetensors"]
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {str(model_dir)!r}")
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise FileNotFoundError(f"safetensors shards listed in the index are missing: {missing}")
    return files


def iterate_checkpoint(model_dir: str | os.PathLike):
    """Yield (name, cpu tensor) for every tensor of the checkpoint, one shard open at a time."""
    from safetensors import safe_open

    for path in safetensors_files(model_dir):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def load_weights(model: nn.Module, model_dir: str | os.PathLike) -> None:
    """Copy checkpoint tensors into `model`, fusing q/k/v and gate/up; error on anything left out."""
    params = dict(model.named_parameters(remove_duplicate=False))
    packed = getattr(model, "packed_modules_mapping", {})
    loaded: set[str] = set()
    for name, tensor in iterate_checkpoint(model_dir):
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        if name == "lm_head.weight" and getattr(model, "tie_word_embeddings", False):
            continue  # tied: the head is the embedding (some checkpoints store both)
        target, shard = name, None
        for ckpt_module, (fused_module, shard_id) in packed.items():
            part = f".{ckpt_module}."
            if part in name:
                target, shard = name.replace(part, f".{fused_module}."), shard_id
                break
        param = params.get(target)
        if param is None:
            raise ValueError(f"checkpoint tensor {name!r} has no matching model parameter")
        dst = param.data if shard is None else _shard_view(model, target, param.data, shard)
        if tuple(dst.shape) != tuple(tensor.shape):
            raise ValueError(
                f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                f"model expects {tuple(dst.shape)}"
            )
        dst.copy_(tensor)
        loaded.add(name if shard is None else f"{target}:{shard}")
    expected = set()
    for name, param in model.named_parameters():  # duplicates (tied) removed
        fused = next((f for f, _ in packed.values() if f".{f}." in name), None)
        if fused is None:
            expected.add(name)
        else:
            expected.update(f"{name}:{s}" for f, s in packed.values() if f == fused)
    missing = sorted(expected - loaded)
    if missing:
        raise ValueError(f"checkpoint in {str(model_dir)!r} lacks weights: {missing[:8]}")


def _shard_view(model: nn.Module, param_name: str, data: torch.Tensor, shard) -> torch.Tensor:
    """The rows of a fused weight/bias that one checkpoint tensor fills (dim 0 of both)."""
    if ".qkv_proj." in param_name:
        attn = model.get_submodule(param_name.rsplit(".qkv_proj.", 1)[0])
        q_size, kv_size = attn.q_size, attn.kv_size
        start, size = {"q": (0, q_size), "k": (q_size, kv_size), "v": (q_size + kv_size, kv_size)}[shard]
    else:  # gate_up_proj: [gate; up], each half of dim 0
        size = data.shape[0] // 2
        start = shard * size
    return data.narrow(0, start, size)


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int = 0, scale: float = 1e-3) -> None:
    """Fill weights with uniform(-scale, scale) values (norm weights with 1), as vLLM's dummy load."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        elif param.dtype.is_floating_point:
            # Draw in float32: uniform_ on bf16 with a tiny range is fine, but keep one code path.
            tmp = torch.empty(param.shape, dtype=torch.float32, device=device)
            tmp.uniform_(-scale, scale, generator=generator)
            param.copy_(tmp)
