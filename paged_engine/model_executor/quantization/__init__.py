"""Quantization methods: one `QuantizationConfig` per checkpoint format, found from `quantization_config`.

| format (`quant_method`) | file | weights |
|---|---|---|
| `compressed-tensors` (llm-compressor) | compressed_tensors.py | pack-quantized int4/int8 (W4A16, W8A16), float-quantized FP8 (W8A8, W8A16) |
| `awq` (AutoAWQ GEMM) | awq.py | int4, zero points |
| `gptq` (AutoGPTQ / GPTQModel) | gptq.py | int4/int8, act-order |
| `fp8` (transformers FP8, AutoFP8) | fp8.py | FP8 per tensor or in 128x128 blocks; online FP8 of a dense checkpoint |

Integer formats load into one packed layout (`wna16.py`, the Triton dequant-GEMM's); FP8 ones
into one FP8 layout (`fp8.py`). Imports: torch and the layers' interface only. Nothing here is
imported by a model file: the loader applies a method to each linear layer from outside (base.py).
"""

from __future__ import annotations

import json
import os

from paged_engine.model_executor.quantization.awq import AWQConfig
from paged_engine.model_executor.quantization.base import (
    LinearMethodBase,
    QuantizationConfig,
    UnquantizedLinearMethod,
)
from paged_engine.model_executor.quantization.compressed_tensors import CompressedTensorsConfig
from paged_engine.model_executor.quantization.fp8 import Fp8Config
from paged_engine.model_executor.quantization.gptq import GPTQConfig

# quant_method name in config.json -> QuantizationConfig subclass. Formats register here.
QUANTIZATION_METHODS: dict[str, type[QuantizationConfig]] = {
    "awq": AWQConfig,
    "compressed-tensors": CompressedTensorsConfig,
    "fp8": Fp8Config,
    "gptq": GPTQConfig,
}
# Other spellings of the same formats (vLLM's `--quantization compressed_tensors`).
_ALIASES = {"compressed_tensors": "compressed-tensors"}


def supported_quantization() -> list[str]:
    return sorted(QUANTIZATION_METHODS)


def _raw_config(hf_config, model_path: str) -> dict | None:
    raw = getattr(hf_config, "quantization_config", None)
    if raw is not None and not isinstance(raw, dict):
        raw = raw.to_dict() if hasattr(raw, "to_dict") else dict(vars(raw))
    if raw is None and model_path and os.path.isfile(os.path.join(model_path, "quantize_config.json")):
        # AutoGPTQ's older checkpoints keep it beside config.json, without a quant_method.
        with open(os.path.join(model_path, "quantize_config.json")) as f:
            raw = json.load(f)
        raw.setdefault("quant_method", "gptq")
    return raw


def get_quantization_config(hf_config, model_path: str, override: str | None = None) -> QuantizationConfig | None:
    """The checkpoint's quantization config, None for an unquantized one.

    Args:
        override: the `quantization` engine argument: must name the checkpoint's own format; on
            an unquantized checkpoint only "fp8" (quantize while loading) is accepted.
    Raises:
        ValueError naming the file, the format and what is supported, for a format this engine
        does not run (rather than failing later on an unknown checkpoint tensor), and for an
        override that contradicts the checkpoint.
    """
    raw = _raw_config(hf_config, model_path)
    if raw is None and override is None:
        return None
    supported = ", ".join(supported_quantization())
    if override is not None:
        override = _ALIASES.get(override.lower(), override.lower())
        if override not in QUANTIZATION_METHODS:
            raise ValueError(f"quantization={override!r} is not supported; supported formats: {supported}")
    method = _ALIASES.get(str((raw or {}).get("quant_method") or "").lower(),
                          str((raw or {}).get("quant_method") or "").lower())
    if raw is None:
        if override != "fp8":
            raise ValueError(f"{model_path}: quantization={override!r} was asked for, but the checkpoint is "
                             "not quantized (config.json has no quantization_config); only 'fp8' "
                             "quantizes an unquantized checkpoint while loading")
        return Fp8Config.online()
    if override is not None and override != method:
        raise ValueError(f"{model_path}: quantization={override!r} was asked for, but the checkpoint is "
                         f"quantized as {method or '(unnamed)'!r} (config.json quantization_config)")
    if method not in QUANTIZATION_METHODS:
        raise ValueError(
            f"{model_path}: quantization format {method or '(unnamed)'!r} is not supported "
            f"(config.json quantization_config: {raw}); supported formats: {supported}")
    try:
        return QUANTIZATION_METHODS[method].from_config(raw)
    except ValueError as e:
        raise ValueError(f"{model_path}: {e}") from None


__all__ = [
    "LinearMethodBase",
    "QUANTIZATION_METHODS",
    "QuantizationConfig",
    "UnquantizedLinearMethod",
    "get_quantization_config",
    "supported_quantization",
]
