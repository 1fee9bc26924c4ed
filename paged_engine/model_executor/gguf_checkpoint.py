"""A GGUF file (llama.cpp's format) as a Hugging Face model directory, derived once and cached.

    find_gguf_file("/models/SmolLM2-135M-Instruct.Q4_1.gguf")   # -> the file, or None for a HF dir
    metadata_dir = gguf_metadata_dir(path)           # config.json, generation_config.json, tokenizer
    model_dir = gguf_model_dir(path, "bfloat16")     # the same + model.safetensors in that dtype

The engine runs dense weights, so a GGUF checkpoint is dequantized at load, as vLLM's
transformers fallback does, to the engine's dtype. Nothing of the format is written here: the
config and tokenizer come from the GGUF metadata through transformers' GGUF integration
(`AutoConfig` / `AutoTokenizer` with `gguf_file=`, which reads the file with the `gguf` package),
the weights from `transformers.modeling_gguf_pytorch_utils.load_gguf_checkpoint`, which
dequantizes each tensor with the `gguf` package, maps llama.cpp's tensor names to the
transformers ones and undoes llama.cpp's per-architecture rewrites (the q/k row permutation of
Llama-family models for its rotary layout, Gemma's norm offsets, ...).

What is derived is cached under `cache_dir()/gguf/`, one directory per (file, dtype), keyed by
the file's real path, size and modification time and by the library versions that derive it, so
a changed file, dtype or converter derives anew. A directory is built under a temporary name and
renamed into place when complete (with a lock, so a second process starting at once waits for the
first rather than deriving the same thing again): nobody ever sees a half-written cache.

A file the engine cannot run fails before any work with a ValueError naming the file, what it
holds and what is supported: an architecture without a model file here, a tensor type the
dequantizer does not handle, a split (multi-file) GGUF.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from paged_engine.cache_dir import cache_dir

GGUF_MAGIC = b"GGUF"
# The ggml tensor types dequantized at load: the float types and the block quantizations of
# llama.cpp's common presets (Q4_K_M / Q5_K_M hold Q4_K / Q5_K with Q6_K, and Q5_0 / Q8_0 where
# a row does not divide into 256-element super-blocks). Each is checked against the format's
# specification in tests/engine/test_gguf.py.
SUPPORTED_GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                        "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
# Bumped when what a derived directory holds changes, so old caches are re-derived.
DERIVATION_VERSION = 1
MANIFEST = "paged_triton_gguf.json"
_SPLIT_NAME = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")


class GGUFError(ValueError):
    """A GGUF file the engine cannot run, with the file, the reason and what is supported."""


def is_gguf_file(path: str | os.PathLike) -> bool:
    """Whether `path` is a file that starts with the GGUF magic."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def find_gguf_file(model: str | os.PathLike) -> str | None:
    """The GGUF file `model` names, or None when it is something else (a Hugging Face dir).

    `model` may be the file itself or a directory without config.json holding exactly one .gguf.

    Raises:
        GGUFError: a .gguf path that is not a GGUF file, a directory with several GGUF files, a
            split GGUF.
    """
    path = Path(model).expanduser()
    if path.is_file():
        if is_gguf_file(path):
            _reject_split(path)
            return str(path.resolve())
        if path.suffix.lower() == ".gguf":
            raise GGUFError(f"{path}: not a GGUF file (it does not start with the GGUF magic)")
        return None
    if path.is_dir() and not (path / "config.json").exists():
        files = sorted(p for p in path.glob("*.gguf") if p.is_file())
        if len(files) == 1:
            return find_gguf_file(files[0])
        if len(files) > 1:
            if all(_SPLIT_NAME.search(p.name) for p in files):
                _reject_split(files[0])
            raise GGUFError(
                f"{path} holds {len(files)} GGUF files ({', '.join(p.name for p in files)}); "
                "pass the path of the one to load")
    return None


def _reject_split(path: Path) -> None:
    m = _SPLIT_NAME.search(path.name)
    if m and int(m.group(2)) > 1:
        raise GGUFError(
            f"{path}: split GGUF checkpoints ({m.group(2)} files) are not supported; merge them "
            "into one file first (llama.cpp: llama-gguf-split --merge FIRST_PART OUT.gguf)")


# llama.cpp's `general.architecture` names that are not transformers' model_type for the same
# model (transformers renames them in load_gguf_checkpoint; a Gemma 3 file holds the text model).
GGUF_ARCH_TO_MODEL_TYPE = {"gemma3": "gemma3_text", "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe"}


def supported_gguf_architectures() -> list[str]:
    """GGUF `general.architecture` values this engine has a model file for."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from paged_engine.model_executor.models import MODEL_REGISTRY

    gguf_name = {t: a for a, t in GGUF_ARCH_TO_MODEL_TYPE.items()}
    return sorted(gguf_name.get(t, t) for t, cls in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()
                  if cls in MODEL_REGISTRY)


def check_gguf_file(path: str | os.PathLike) -> dict:
    """Read the file's header and reject what the engine cannot run, before any conversion.

    Returns:
        {"architecture": GGUF general.architecture, "tensor_types": {type name: count}}.
    Raises:
        GGUFError naming the file, the architecture or the tensors and types, and what is
        supported.
    """
    path = str(path)
    reader = _reader(path)
    field = reader.fields.get("general.architecture")
    arch = bytes(field.parts[field.data[0]]).decode("utf-8") if field is not None else None
    supported_archs = supported_gguf_architectures()
    if arch not in supported_archs:
        raise GGUFError(
            f"{path}: GGUF architecture {arch!r} is not supported; supported GGUF architectures: "
            f"{', '.join(supported_archs)}")
    counts: dict[str, int] = {}
    unsupported: list[tuple[str, str]] = []
    for tensor in reader.tensors:
        type_name = tensor.tensor_type.name
        counts[type_name] = counts.get(type_name, 0) + 1
        if type_name not in SUPPORTED_GGUF_TYPES:
            unsupported.append((tensor.name, type_name))
    if unsupported:
        shown = ", ".join(f"{name!r} ({t})" for name, t in unsupported[:3])
        more = f" and {len(unsupported) - 3} more" if len(unsupported) > 3 else ""
        raise GGUFError(
            f"{path}: GGUF tensor type(s) {', '.join(sorted({t for _, t in unsupported}))} are not "
            f"supported (tensor {shown}{more}); supported GGUF types: "
            f"{', '.join(SUPPORTED_GGUF_TYPES)}")
    return {"architecture": arch, "tensor_types": counts}


def _reader(path: str):
    try:
        from gguf import GGUFReader
    except ImportError as e:  # pragma: no cover - a dependency of the project
        raise GGUFError(f"{path}: reading GGUF files needs the 'gguf' package (pip install gguf)") from e
    try:
        return GGUFReader(path)
    except Exception as e:  # noqa: BLE001 - a truncated or corrupt file
        raise GGUFError(f"{path}: cannot read the GGUF file: {e}") from e


# --- the cache --------------------------------------------------------------------------------

def _source_key(path: str) -> str:
    """What identifies the derivation: the file (path, size, mtime) and the deriving code."""
    import gguf
    import transformers

    st = os.stat(path)
    gguf_version = getattr(gguf, "__version__", None)
    if gguf_version is None:
        from importlib.metadata import version

        gguf_version = version("gguf")
    ident = json.dumps([os.path.realpath(path), st.st_size, st.st_mtime_ns, DERIVATION_VERSION,
                        transformers.__version__, gguf_version])
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def _entry_dir(path: str, suffix: str = "") -> Path:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(path).stem)[:80]
    return cache_dir() / "gguf" / f"{stem}-{_source_key(path)}{suffix}"


def _is_complete(d: Path) -> bool:
    return (d / MANIFEST).is_file()


@contextlib.contextmanager
def _locked(lock_path: Path):
    import fcntl

    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _derive(final: Path, build, manifest: dict) -> Path:
    """`final`, built by `build(tmp_dir)` unless already complete; published by one rename."""
    if _is_complete(final):
        return final
    with _locked(final.with_name(final.name + ".lock")):
        if _is_complete(final):  # another process finished it while we waited
            return final
        # Under the lock nobody else builds this entry: leftovers are from a killed process.
        for stale in final.parent.glob(final.name + ".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))
        try:
            build(tmp)
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            if final.exists():  # incomplete (no manifest): from before this layout
                shutil.rmtree(final)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def _manifest(path: str, **extra) -> dict:
    st = os.stat(path)
    return {"gguf_file": os.path.realpath(path), "size_bytes": st.st_size,
            "mtime_ns": st.st_mtime_ns, "derivation_version": DERIVATION_VERSION, **extra}


# --- derivation -------------------------------------------------------------------------------

def gguf_metadata_dir(path: str | os.PathLike) -> str:
    """A directory with the file's config.json (architectures filled in), generation_config.json
    and tokenizer files (chat template included): what AutoConfig and AutoTokenizer load.

    Raises:
        GGUFError for a file the engine cannot run (see check_gguf_file).
    """
    path = os.fspath(path)
    final = _entry_dir(path)
    if _is_complete(final):
        return str(final)
    info = check_gguf_file(path)

    def build(tmp: Path) -> None:
        from transformers import AutoConfig, AutoTokenizer, GenerationConfig
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        folder, name = os.path.split(os.path.realpath(path))
        try:
            config = AutoConfig.from_pretrained(folder, gguf_file=name)
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        except Exception as e:  # noqa: BLE001 - transformers' reason, with the file named
            raise GGUFError(f"{path}: transformers cannot read this GGUF file's config or "
                            f"tokenizer: {e}") from e
        # The metadata has no class name: the engine picks its model by `architectures`.
        config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
        config.save_pretrained(tmp)
        GenerationConfig.from_model_config(config).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return str(_derive(final, build, _manifest(path, **info)))


def gguf_model_dir(path: str | os.PathLike, dtype: str) -> str:
    """gguf_metadata_dir's files plus model.safetensors, every tensor dequantized to `dtype`.

    Args:
        path: the .gguf file.
        dtype: "float32", "bfloat16" or "float16".
    Raises:
        GGUFError for a file the engine cannot run (see check_gguf_file).
    """
    import torch

    path = os.fspath(path)
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtypes:
        raise ValueError(f"dtype must be one of {', '.join(dtypes)}, got {dtype!r}")
    torch_dtype = dtypes[dtype]
    final = _entry_dir(path, f"-{dtype}")
    if _is_complete(final):
        return str(final)
    metadata_dir = Path(gguf_metadata_dir(path))

    def build(tmp: Path) -> None:
        from safetensors.torch import save_file

        for f in metadata_dir.iterdir():
            if f.is_file() and f.name != MANIFEST:
                shutil.copy2(f, tmp / f.name)
        config_file = tmp / "config.json"
        config = json.loads(config_file.read_text())
        config["torch_dtype"] = dtype
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        tensors = _dequantized_state_dict(path, metadata_dir, torch_dtype)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})

    return str(_derive(final, build, _manifest(path, dtype=dtype)))


def _dequantized_state_dict(path: str, metadata_dir: Path, dtype) -> dict:
    """transformers-named tensors of the file in `dtype`, llama.cpp's rewrites undone."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(str(metadata_dir))
    # The transformers model is only the name map: built on the meta device it costs nothing.
    with torch.device("meta"):
        hf_model = AutoModelForCausalLM.from_config(config)
    kwargs = {}
    if "torch_dtype" in inspect.signature(load_gguf_checkpoint).parameters:
        kwargs["torch_dtype"] = dtype  # cast tensor by tensor: less peak memory
    try:
        parsed = load_gguf_checkpoint(path, return_tensors=True, model_to_load=hf_model, **kwargs)
    except Exception as e:  # noqa: BLE001 - name the file
        raise GGUFError(f"{path}: cannot dequantize the GGUF tensors: {e}") from e
    tensors = {name: t.to(dtype).contiguous() for name, t in parsed["tensors"].items()}
    if not tensors:
        raise GGUFError(f"{path}: no tensor of the file maps to a {type(hf_model).__name__} weight")
    return tensors


__all__ = [
    "GGUFError",
    "SUPPORTED_GGUF_TYPES",
    "check_gguf_file",
    "find_gguf_file",
    "gguf_metadata_dir",
    "gguf_model_dir",
    "is_gguf_file",
    "supported_gguf_architectures",
]
