"""Build a model from a local Hugging Face directory.

    model = load_model("/path/to/model", hf_config, dtype=torch.bfloat16, device="cuda")

1. The model class for `hf_config.architectures` is constructed on the meta device (no memory,
   no init) in the target dtype.
2. The checkpoint's quantization config, if any, gives each linear layer its method
   (`layer.set_quant_method`): quantization is applied from outside the model file.
3. Parameters are materialised on the device (their `weight_loader` and layout attributes kept).
4. Checkpoint tensors are streamed from `model.safetensors` or the shards of
   `model.safetensors.index.json`; each goes to its parameter's `weight_loader`. A name the model
   maps to a fused layer (`packed_modules_mapping`: q_proj -> qkv_proj shard "q") is loaded into
   that layer's slice by the layer itself; a model whose checkpoint names need more than that
   (MoE experts: `experts.3.w1` -> the stacked `experts.w13_weight`, shard (3, "w1")) says where a
   tensor goes with `model.checkpoint_target(name)`. A tensor that holds every shard of a fused
   parameter (Phi-3's `qkv_proj`) is loaded without a shard id; the layer splits it. Anything left
   unloaded is an error.

`load_format="dummy"` skips the checkpoint and fills every weight with small random values of
the right shape, for benchmarks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch import nn

from paged_engine.model_executor.layers.linear import LinearBase, default_weight_loader
from paged_engine.model_executor.models import get_model_class
from paged_engine.model_executor.quantization import QuantizationConfig, get_quantization_config

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
    quant_config: QuantizationConfig | None = None,
    max_model_len: int | None = None,
) -> nn.Module:
    """Construct the model for `hf_config` on `device` in `dtype` and load its weights.

    Args:
        model_dir: local HF model directory (unused for load_format="dummy").
        hf_config: transformers config (or any object with the same attributes).
        dtype: parameter dtype.
        device: where the parameters live.
        load_format: "auto"/"safetensors" (read the checkpoint) or "dummy" (random weights).
        seed: seed of the dummy weights.
        quant_config: the checkpoint's quantization; default: read from hf_config.
        max_model_len: the engine's longest sequence (LongRoPE picks its factors by it).
    Returns:
        the model in eval mode, rotary tables built.
    """
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"unknown load_format {load_format!r}; expected one of {list(LOAD_FORMATS)}")
    model_cls = get_model_class(hf_config)
    if quant_config is None:
        quant_config = get_quantization_config(hf_config, str(model_dir))
    device = torch.device(device)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = model_cls(hf_config)
            if quant_config is not None:
                apply_quantization(model, quant_config)
    finally:
        torch.set_default_dtype(default_dtype)
    materialize(model, device)
    if load_format == "dummy":
        init_dummy_weights(model, seed)
    else:
        if model_dir is None:
            raise ValueError("model_dir is required unless load_format='dummy'")
        load_weights(model, iterate_checkpoint(model_dir), str(model_dir))
    for module in model.modules():
        if isinstance(module, LinearBase):
            module.quant_method.process_weights_after_loading(module)
    model.build_caches(device, max_model_len=max_model_len)
    model.requires_grad_(False)
    return model.eval()


def checkpoint_module_names(model: nn.Module, name: str, layer: LinearBase) -> list[str]:
    """The checkpoint's module names of a linear layer, one per fused shard in shard order
    (`...self_attn.qkv_proj` -> `...q_proj`, `...k_proj`, `...v_proj`), or `[name]` unfused."""
    if not layer.shard_ids:
        return [name]
    parent, _, fused = name.rpartition(".")
    by_shard = {shard: ckpt for ckpt, (fused_name, shard) in getattr(model, "packed_modules_mapping", {}).items()
                if fused_name == fused}
    if set(by_shard) != set(layer.shard_ids):
        return [name]
    return [f"{parent}.{by_shard[shard]}" if parent else by_shard[shard] for shard in layer.shard_ids]


def apply_quantization(model: nn.Module, quant_config: QuantizationConfig) -> None:
    """Give every linear layer its quantization method (None from the config: stays dense).

    Before asking the config, each layer gets `checkpoint_names` (its checkpoint modules, see
    `checkpoint_module_names`), which is what a checkpoint's targets and ignore lists name.
    """
    for name, module in model.named_modules():
        if isinstance(module, LinearBase):
            module.checkpoint_names = checkpoint_module_names(model, name, module)
            method = quant_config.get_quant_method(module, name)
            if method is not None:
                module.set_quant_method(method)


def materialize(model: nn.Module, device: torch.device) -> None:
    """Allocate every meta parameter and buffer on `device`, keeping parameter attributes
    (`weight_loader`, `output_dim`, ...) and ties (a parameter shared by two modules stays one).

    `Module.to_empty` would make new Parameter objects without those attributes.
    """
    made: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            new = made.get(id(param))
            if new is None:
                new = nn.Parameter(torch.empty_like(param, device=device), requires_grad=False)
                new.__dict__.update(param.__dict__)
                made[id(param)] = new
            module._parameters[name] = new
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.is_meta:
                module._buffers[name] = torch.empty_like(buf, device=device)


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


def iterate_checkpoint(model_dir: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, cpu tensor) for every tensor of the checkpoint, one shard open at a time."""
    from safetensors import safe_open

    for path in safetensors_files(model_dir):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def _target(name: str, packed: dict) -> tuple[str, object]:
    """(parameter name, shard id) of a checkpoint tensor name, by the model's packed mapping."""
    for ckpt_module, (fused_module, shard_id) in packed.items():
        part = f".{ckpt_module}."
        if part in name:
            return name.replace(part, f".{fused_module}."), shard_id
    return name, None


def load_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]], source: str) -> None:
    """Hand every checkpoint tensor to its parameter's weight loader; error on anything left out.

    Args:
        weights: (checkpoint name, tensor) pairs.
        source: where they come from, for error messages.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    packed = getattr(model, "packed_modules_mapping", {})
    checkpoint_target = getattr(model, "checkpoint_target", None)
    tied = getattr(model, "tie_word_embeddings", False)
    loaded: set[tuple[str, object]] = set()
    for name, tensor in weights:
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        if name == "lm_head.weight" and tied:
            continue  # tied: the head is the embedding (some checkpoints store both)
        hit = checkpoint_target(name) if checkpoint_target is not None else None
        target, shard = hit if hit is not None else _target(name, packed)
        param = params.get(target)
        if param is None:
            raise ValueError(unexpected_tensor_message(model, name, source))
        loader = getattr(param, "weight_loader", default_weight_loader)
        try:
            with torch.no_grad():
                if shard is None:
                    loader(param, tensor)
                else:
                    loader(param, tensor, shard)
        except ValueError as e:
            raise ValueError(f"{source}: checkpoint tensor {name!r}: {e}") from None
        shard_ids = getattr(param, "shard_ids", None)
        if shard is None and shard_ids:  # a fused tensor: every shard at once
            loaded.update((target, s) for s in shard_ids)
        else:
            loaded.add((target, shard))
    expected: set[tuple[str, object]] = set()
    for name, param in model.named_parameters():  # tied duplicates removed
        shard_ids = getattr(param, "shard_ids", None)
        keys = {(name, s) for s in shard_ids} if shard_ids else {(name, None)}
        if getattr(param, "optional", False):
            # Absent altogether is fine (the method reads `loaded_from_checkpoint`); some fused
            # shards with it and others without is not.
            param.loaded_from_checkpoint = bool(keys & loaded)
            if not param.loaded_from_checkpoint:
                continue
        expected.update(keys)
    missing = sorted(f"{n}" if s is None else f"{n}[{s}]" for n, s in expected - loaded)
    if missing:
        raise ValueError(f"{source}: checkpoint lacks weights: {missing[:8]}")


# Tensor-name endings of quantized checkpoint formats (GPTQ/AWQ/Marlin, bitsandbytes,
# compressed-tensors, FP8): tell such a checkpoint apart from one of another architecture.
_QUANTIZED_SUFFIXES = {
    "qweight": "GPTQ/AWQ", "qzeros": "GPTQ/AWQ", "g_idx": "GPTQ", "scales": "GPTQ/AWQ",
    "weight_packed": "compressed-tensors", "weight_scale": "FP8/compressed-tensors",
    "weight_zero_point": "compressed-tensors", "input_scale": "FP8", "weight_shape":
    "compressed-tensors", "SCB": "bitsandbytes int8", "absmax": "bitsandbytes 4-bit",
    "quant_map": "bitsandbytes 4-bit", "quant_state.bitsandbytes__nf4": "bitsandbytes 4-bit",
    "quant_state.bitsandbytes__fp4": "bitsandbytes 4-bit", "nested_absmax": "bitsandbytes 4-bit",
}


def unexpected_tensor_message(model: nn.Module, name: str, source: str) -> str:
    """Why a checkpoint tensor fits no parameter: the file, the format it looks like, what runs."""
    from paged_engine.model_executor.models import supported_architectures
    from paged_engine.model_executor.quantization import supported_quantization

    where = _file_holding(source, name)
    arch = type(model).__name__
    supported_quant = ", ".join(supported_quantization()) or "none yet"
    fmt = next((f for suffix, f in _QUANTIZED_SUFFIXES.items() if name.endswith("." + suffix)), None)
    if fmt is not None:
        return (
            f"{where}: tensor {name!r} is a {fmt} quantized weight, but config.json declares no "
            f"quantization format this engine runs; supported: unquantized float16/bfloat16/"
            f"float32 safetensors, GGUF files (dequantized at load), and the quantization "
            f"formats: {supported_quant}")
    return (
        f"{where}: tensor {name!r} is not a weight of {arch}, the architecture config.json "
        f"declares: the checkpoint is of another architecture or layout; supported "
        f"architectures: {', '.join(supported_architectures())} (unquantized safetensors or GGUF)")


def _file_holding(source: str, name: str) -> str:
    """The safetensors file of `source` (a model directory) that holds tensor `name`."""
    try:
        from safetensors import safe_open

        for path in safetensors_files(source):
            with safe_open(str(path), framework="pt", device="cpu") as f:
                if name in f.keys():
                    return str(path)
    except (OSError, ValueError):
        pass
    return source


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int = 0, scale: float = 1e-3) -> None:
    """Fill weights with uniform(-scale, scale) values (norm weights with 1), as vLLM's dummy load."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        elif not param.dtype.is_floating_point:
            param.zero_()  # packed integers, group indices: zeros are valid everywhere
            param.loaded_from_checkpoint = True
        elif param.dtype.is_floating_point:
            # Draw in float32: uniform_ on bf16 with a tiny range is fine, but keep one code path.
            tmp = torch.empty(param.shape, dtype=torch.float32, device=device)
            tmp.uniform_(-scale, scale, generator=generator)
            param.copy_(tmp)
