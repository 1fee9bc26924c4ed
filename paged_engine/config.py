"""EngineConfig: the one configuration object of the engine, validated in `__post_init__`.

Every component copies the fields it needs from it. `device` and `dtype` are resolved here, so
what the components see is always concrete:

- `device="auto"` -> "cuda" when `torch.cuda.is_available()`, else "cpu".
- `dtype="auto"`  -> on CPU "bfloat16" where the CPU computes bf16 natively (AVX512-BF16 or
  AMX-BF16: oneDNN's bf16 GEMMs there run about twice the fp32 rate and halve the bytes read per
  weight), "float32" elsewhere (emulated bf16 is slower than fp32). Set the environment variable
  `PAGED_TRITON_CPU_BF16=0` to keep "auto" at float32 on any CPU (the test suite does, so its
  parity tests against `transformers` stay in fp32). On CUDA the model's own `torch_dtype` when it is bfloat16 or
  float16, and "bfloat16" when the checkpoint is float32 (or says nothing). This is what vLLM
  users expect from "auto" (vLLM also downcasts float32 checkpoints on GPU; we choose bfloat16
  over float16 because its range cannot overflow activations of models trained in bf16).
  GPUs older than Ampere (compute capability < 8.0) have no bf16: there "auto" is "float16".
  Pass `dtype="float32"` explicitly to run a float32 checkpoint in float32 on GPU.

Values may arrive as strings (model.json, CLI): `EngineConfig.from_dict` coerces "16", "true",
"0.9" and rejects unknown keys with a ValueError naming them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

_DTYPE_ALIASES = {
    "auto": "auto",
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
}
_LOAD_FORMATS = ("auto", "safetensors", "dummy")
# Scheduling defaults per device. A CPU is compute-bound from a batch of a few dozen tokens on, so
# a bigger prefill chunk only stalls the running decodes longer (8192 prompt tokens are seconds of
# CPU time) and more than 128 running sequences only lengthen each step; the smaller chunk also
# bounds the padded [sequences, chunk, keys] masks of the CPU attention.
GPU_DEFAULTS = {"max_num_seqs": 256, "max_num_batched_tokens": 8192}
CPU_DEFAULTS = {"max_num_seqs": 128, "max_num_batched_tokens": 2048}


# --- small coercion helpers shared with sampling_params.py -------------------------------------

def parse_bool(name: str, value: Any) -> bool:
    """Accept bools, 0/1 and the strings "true"/"false"/"1"/"0"/"yes"/"no" (any case)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        v = value.strip().lower()
        if v in ("true", "1", "yes", "on"):
            return True
        if v in ("false", "0", "no", "off"):
            return False
    raise ValueError(f"{name} must be a boolean, got {value!r}")


def parse_int(name: str, value: Any, *, allow_none: bool = False) -> int | None:
    """Accept ints, integral floats and numeric strings; reject bools and fractions."""
    if value is None:
        if allow_none:
            return None
        raise ValueError(f"{name} must be an integer, got None")
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if value.is_integer():
            return int(value)
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if isinstance(value, str):
        v = value.strip()
        if allow_none and v.lower() in ("none", "null", ""):
            return None
        try:
            return int(v)
        except ValueError:
            try:
                f = float(v)
            except ValueError:
                raise ValueError(f"{name} must be an integer, got {value!r}") from None
            if f.is_integer():
                return int(f)
        raise ValueError(f"{name} must be an integer, got {value!r}")
    raise ValueError(f"{name} must be an integer, got {value!r}")


def parse_float(name: str, value: Any) -> float:
    """Accept ints, floats and numeric strings; reject bools, NaN and infinities."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{name} must be a number, got {value!r}")
    if isinstance(value, (int, float)):
        f = float(value)
    elif isinstance(value, str):
        try:
            f = float(value.strip())
        except ValueError:
            raise ValueError(f"{name} must be a number, got {value!r}") from None
    else:
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(f):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return f


def check_known_keys(cls_name: str, d: dict, known: set[str]) -> None:
    if not isinstance(d, dict):
        raise ValueError(f"{cls_name} expects a dict, got {type(d).__name__}")
    unknown = sorted(k for k in d if k not in known)
    if unknown:
        raise ValueError(
            f"unknown {cls_name} key(s): {', '.join(map(str, unknown))}; "
            f"known keys: {', '.join(sorted(known))}"
        )


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX-BF16), unless the environment
    says `PAGED_TRITON_CPU_BF16=0`. What `dtype="auto"` picks on CPU."""
    if os.environ.get("PAGED_TRITON_CPU_BF16", "").strip().lower() in ("0", "false", "no", "off"):
        return False
    import torch

    probes = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    probes = [probe for probe in probes if probe is not None]
    if probes:
        return any(bool(probe()) for probe in probes)
    try:  # an older torch without the probes: the kernel's view of the CPU flags
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# --- EngineConfig -------------------------------------------------------------------------------

@dataclass
class EngineConfig:
    """Configuration of an LLMEngine.

    Args:
        model: local Hugging Face model directory (config.json, *.safetensors, tokenizer files),
            or a GGUF file (or a directory without config.json holding one): its config and
            tokenizer come from the GGUF metadata and its weights are dequantized to `dtype`,
            once, into a Hugging Face directory cached under the user's cache directory
            (model_executor/gguf_checkpoint.py). After validation `model` is the directory the
            engine loads (for a GGUF, that derived directory) and `gguf_file` the file.
        device: "auto" | "cpu" | "cuda" | "cuda:N".
        dtype: "auto" | "float32" | "bfloat16" | "float16" (aliases fp32/bf16/fp16/half).
        block_size: tokens per KV-cache block.
        num_kv_blocks: KV-cache blocks to allocate; None sizes the cache from
            `gpu_memory_utilization` after a profiling forward (CUDA) or a default (CPU).
        gpu_memory_utilization: fraction of GPU memory the engine may use, in (0, 1].
        max_num_seqs: most sequences running at once. The scheduler never runs more than
            `max_num_batched_tokens` sequences, so each running sequence advances every step.
            None: 256 on GPU, 128 on CPU (`CPU_DEFAULTS`).
        max_num_batched_tokens: token budget of one step (prefill chunks + decodes). None: 8192
            on GPU, 2048 on CPU.
        max_model_len: longest sequence (prompt + output); None = the model's
            max_position_embeddings. The engine caps it further to what the KV cache can hold.
        enable_prefix_caching: reuse KV blocks of identical prompt prefixes across requests.
        seed: seed of the sampler for requests without their own seed.
        enforce_eager: disable CUDA graphs.
        tokenizer: tokenizer directory; None = `model`.
        load_format: "auto"/"safetensors" (load the checkpoint) or "dummy" (random weights,
            for benchmarks).
        speculative_config: speculative decoding, vLLM's keys (a dict, a JSON object string or
            a `SpeculativeConfig`; see paged_engine/spec_decode/config.py), e.g.
            {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}; None: off.
        quantization: the checkpoint's quantization format ("compressed-tensors", "awq",
            "gptq", "fp8"); None reads it from config.json's `quantization_config`. Naming a
            format the checkpoint does not have is an error, except "fp8" on an unquantized
            checkpoint, which quantizes its weights to FP8 while loading (as vLLM does).
        tensor_parallel_size: ranks the model is split over (torch.distributed: NCCL on GPUs,
            gloo on CPU). Rank 0 runs in the engine's process, ranks 1.. are worker processes the
            engine starts on this machine (rank r on cuda:r), or, with `LOCAL_WORLD_SIZE` below
            the size, some are started on other machines (README "Tensor parallelism").
            Attention heads must divide by it, and KV heads divide by it or it by them.
        distributed_timeout_s: the longest a rank waits in a collective of a step before
            declaring its peers dead (a worker that dies mid-step gives an error, not a hang).
    """

    model: str
    device: str = "auto"
    dtype: str = "auto"
    block_size: int = 16
    num_kv_blocks: int | None = None
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    seed: int = 0
    enforce_eager: bool = False
    tokenizer: str | None = None
    load_format: str = "auto"
    speculative_config: Any = None
    quantization: str | None = None
    tensor_parallel_size: int = 1
    distributed_timeout_s: float = 120.0
    # The model's transformers config, loaded in __post_init__.
    hf_config: Any = field(default=None, init=False, repr=False, compare=False)
    # The draft model's transformers config (speculative_config method "draft_model").
    draft_hf_config: Any = field(default=None, init=False, repr=False, compare=False)
    # The GGUF file `model` was derived from, or None.
    gguf_file: str | None = field(default=None, init=False, compare=False)

    def __post_init__(self) -> None:
        # model
        if not isinstance(self.model, (str, os.PathLike)) or not str(self.model):
            raise ValueError(f"model must be a local model directory path, got {self.model!r}")
        self.model = os.fspath(self.model)
        from paged_engine.model_executor.gguf_checkpoint import find_gguf_file

        try:
            self.gguf_file = find_gguf_file(self.model)
        except ValueError as e:
            raise ValueError(f"model: {e}") from None
        if self.gguf_file is None:
            if os.path.isfile(self.model):
                raise ValueError(f"model: {self.model!r} is a file, but neither a GGUF file nor a "
                                 "model directory (pass a Hugging Face model directory or a .gguf)")
            if not os.path.isdir(self.model):
                raise ValueError(f"model: directory {self.model!r} does not exist")
            if not os.path.isfile(os.path.join(self.model, "config.json")):
                raise ValueError(f"model: {self.model!r} has no config.json (not a Hugging Face "
                                 "model dir) and no .gguf file")
        if self.tokenizer is not None:
            if not isinstance(self.tokenizer, (str, os.PathLike)) or not os.path.isdir(self.tokenizer):
                raise ValueError(f"tokenizer: directory {self.tokenizer!r} does not exist")
            self.tokenizer = os.fspath(self.tokenizer)

        # plain scalar fields (coerced so that dicts with string values work)
        self.block_size = parse_int("block_size", self.block_size)
        if not 1 <= self.block_size <= 1024:
            raise ValueError(f"block_size must be in [1, 1024], got {self.block_size}")
        self.num_kv_blocks = parse_int("num_kv_blocks", self.num_kv_blocks, allow_none=True)
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1 or None, got {self.num_kv_blocks}")
        self.gpu_memory_utilization = parse_float("gpu_memory_utilization", self.gpu_memory_utilization)
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        self.max_num_seqs = parse_int("max_num_seqs", self.max_num_seqs, allow_none=True)
        if self.max_num_seqs is not None and self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        self.max_num_batched_tokens = parse_int("max_num_batched_tokens", self.max_num_batched_tokens,
                                                allow_none=True)
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        self.max_model_len = parse_int("max_model_len", self.max_model_len, allow_none=True)
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1 or None, got {self.max_model_len}")
        self.enable_prefix_caching = parse_bool("enable_prefix_caching", self.enable_prefix_caching)
        self.seed = parse_int("seed", self.seed)
        self.enforce_eager = parse_bool("enforce_eager", self.enforce_eager)
        if not isinstance(self.load_format, str) or self.load_format.lower() not in _LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {_LOAD_FORMATS}, got {self.load_format!r}")
        self.load_format = self.load_format.lower()
        if isinstance(self.quantization, str) and self.quantization.strip().lower() in ("", "none", "null"):
            self.quantization = None
        if self.quantization is not None:
            if not isinstance(self.quantization, str):
                raise ValueError(f"quantization must be a format name or None, got {self.quantization!r}")
            self.quantization = self.quantization.strip().lower()

        self.tensor_parallel_size = parse_int("tensor_parallel_size", self.tensor_parallel_size)
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        self.distributed_timeout_s = parse_float("distributed_timeout_s", self.distributed_timeout_s)
        if self.distributed_timeout_s <= 0:
            raise ValueError(f"distributed_timeout_s must be > 0, got {self.distributed_timeout_s}")

        self.device = self._resolve_device(self.device)
        defaults = CPU_DEFAULTS if self.device == "cpu" else GPU_DEFAULTS
        for name, value in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.gguf_file is not None:
            self._derive_from_gguf()
        else:
            self.hf_config = self._load_hf_config()
            self.dtype = self._resolve_dtype(self.dtype)
        if self.tokenizer is None:
            self.tokenizer = self.model

        max_pos = getattr(self.hf_config, "max_position_embeddings", None)
        if self.max_model_len is None:
            self.max_model_len = int(max_pos) if max_pos else 2048
        elif max_pos and self.max_model_len > int(max_pos):
            raise ValueError(
                f"max_model_len={self.max_model_len} is larger than the model's "
                f"max_position_embeddings={max_pos}"
            )

        if self.tensor_parallel_size > 1:
            self._check_tensor_parallel()

        from paged_engine.spec_decode.config import SpeculativeConfig

        self.speculative_config = SpeculativeConfig.from_value(self.speculative_config)
        if self.speculative_config is not None and self.speculative_config.method == "draft_model":
            self.draft_hf_config = self.speculative_config.check_draft(
                self.hf_config, self.tokenizer, self.max_model_len)

    def _check_tensor_parallel(self) -> None:
        """Refuse, by name, a split the layers cannot make (before any worker starts)."""
        tp, cfg = self.tensor_parallel_size, self.hf_config
        heads = int(cfg.num_attention_heads)
        kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
        if heads % tp:
            raise ValueError(f"tensor_parallel_size={tp}: the model's {heads} attention heads do not "
                             "divide over the ranks")
        if (kv_heads % tp) if kv_heads >= tp else (tp % kv_heads):
            raise ValueError(f"tensor_parallel_size={tp}: the model's {kv_heads} KV heads can neither "
                             f"be split over {tp} ranks nor replicated evenly on them")
        for name in ("intermediate_size", "moe_intermediate_size"):
            size = getattr(cfg, name, None)
            if isinstance(size, int) and size % tp:
                raise ValueError(f"tensor_parallel_size={tp}: the model's {name} ({size}) does not "
                                 "divide over the ranks")
        if self.device.startswith("cuda:"):
            raise ValueError(f"device={self.device!r} with tensor_parallel_size={tp}: rank r runs on "
                             "cuda:r of its machine; pass device='cuda' (and CUDA_VISIBLE_DEVICES)")
        if self.device == "cuda":
            import torch

            local = int(os.environ.get("LOCAL_WORLD_SIZE", tp))
            if local > torch.cuda.device_count():
                raise ValueError(f"tensor_parallel_size={tp}: {local} ranks on this machine but only "
                                 f"{torch.cuda.device_count()} CUDA device(s) visible")

    # -- resolution helpers --

    @staticmethod
    def _resolve_device(device: Any) -> str:
        if not isinstance(device, str):
            # allow torch.device
            device = str(device)
        d = device.strip().lower()
        if d == "auto":
            import torch

            return "cuda" if torch.cuda.is_available() else "cpu"
        if d == "cpu":
            return "cpu"
        if d == "cuda" or (d.startswith("cuda:") and d[5:].isdigit()):
            import torch

            if not torch.cuda.is_available():
                raise ValueError(f"device={device!r} requested but CUDA is not available")
            count = torch.cuda.device_count()
            if d.startswith("cuda:") and int(d[5:]) >= count:
                raise ValueError(
                    f"device={device!r}: only {count} CUDA device(s) visible (cuda:0..cuda:{count - 1})"
                )
            return d
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")

    def _load_hf_config(self):
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(self.model)
        except Exception as e:  # noqa: BLE001 - surface as a config error naming the field
            raise ValueError(f"model: cannot load config.json from {self.model!r}: {e}") from e

    def _derive_from_gguf(self) -> None:
        """config and tokenizer from the GGUF metadata, then the weights in the resolved dtype."""
        from paged_engine.model_executor import gguf_checkpoint

        try:
            self.model = gguf_checkpoint.gguf_metadata_dir(self.gguf_file)
            self.hf_config = self._load_hf_config()
            self.dtype = self._resolve_dtype(self.dtype)
            if self.load_format != "dummy":  # random weights need no dequantized copy
                self.model = gguf_checkpoint.gguf_model_dir(self.gguf_file, self.dtype)
        except gguf_checkpoint.GGUFError as e:
            raise ValueError(f"model: {e}") from None

    def _resolve_dtype(self, dtype: Any) -> str:
        if not isinstance(dtype, str):
            dtype = str(dtype).replace("torch.", "")
        key = dtype.strip().lower()
        if key not in _DTYPE_ALIASES:
            raise ValueError(
                f"dtype must be one of 'auto', 'float32', 'bfloat16', 'float16', got {dtype!r}"
            )
        key = _DTYPE_ALIASES[key]
        if key != "auto":
            return key
        if self.device == "cpu":
            return "bfloat16" if cpu_has_native_bf16() else "float32"
        model_dtype = getattr(self.hf_config, "dtype", None) or getattr(self.hf_config, "torch_dtype", None)
        model_dtype = str(model_dtype).replace("torch.", "") if model_dtype is not None else ""
        if model_dtype == "float16":
            return model_dtype
        # bf16 needs compute capability 8.0 (Ampere): before it, Triton cannot compile bf16 dots
        # (torch only emulates bf16 there), so "auto" falls back to float16 as vLLM does.
        import torch

        if torch.cuda.get_device_capability(self.device) < (8, 0):
            return "float16"
        return "bfloat16"

    # -- conveniences --

    @property
    def torch_dtype(self):
        import torch

        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[self.dtype]

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls) if f.init}

    @classmethod
    def from_dict(cls, d: dict) -> "EngineConfig":
        """Build from a dict (e.g. model.json); unknown keys -> ValueError naming them."""
        check_known_keys("EngineConfig", d, cls.field_names())
        if "model" not in d:
            raise ValueError("model is required")
        return cls(**d)

    @classmethod
    def from_json(cls, path: str) -> "EngineConfig":
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def to_dict(self) -> dict:
        d = {name: getattr(self, name) for name in self.field_names()}
        if d["speculative_config"] is not None:
            d["speculative_config"] = d["speculative_config"].to_dict()
        return d
