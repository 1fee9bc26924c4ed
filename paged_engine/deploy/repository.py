"""Write a deployable model repository for one model.

    prepare_model_repository("/tmp/repo", "/models/llama", block_size=16, max_num_seqs=64)

copies the project's model_repository/ (paged_llm, preprocessing, postprocessing, ensemble,
tensorrt_llm_bls) into the destination, writes paged_llm/1/model.json with the engine arguments
and fills the `tokenizer_dir` parameter of the models that tokenize.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

MODEL_NAMES = ("paged_llm", "preprocessing", "postprocessing", "ensemble", "tensorrt_llm_bls")
# The models whose config.pbtxt takes the tokenizer directory.
TOKENIZER_MODELS = ("preprocessing", "postprocessing", "tensorrt_llm_bls")
_TOKENIZER_PLACEHOLDER = "${tokenizer_dir}"


def template_repository() -> Path:
    """The model_repository/ shipped with the project (source checkout or editable install)."""
    candidates = [
        Path(__file__).resolve().parent.parent.parent / "model_repository",
        Path(os.environ.get("PAGED_TRITON_MODEL_REPOSITORY", "")),
    ]
    for path in candidates:
        if str(path) and (path / "paged_llm" / "config.pbtxt").exists():
            return path
    raise FileNotFoundError(
        "model_repository/ template not found next to the paged_engine package; "
        "set PAGED_TRITON_MODEL_REPOSITORY to a copy of it")


def tokenizer_dir_for(model: str | os.PathLike, engine_args: dict | None = None) -> str:
    """The directory AutoTokenizer loads for `model`: the `tokenizer` engine argument, else the
    model directory, else (a GGUF file) the config-and-tokenizer directory derived from it."""
    from paged_engine.model_executor.gguf_checkpoint import find_gguf_file, gguf_metadata_dir

    explicit = (engine_args or {}).get("tokenizer")
    if explicit:
        return str(explicit)
    gguf_file = find_gguf_file(model)
    if gguf_file is not None:
        return gguf_metadata_dir(gguf_file)
    return str(Path(model).resolve())


def prepare_model_repository(dst_dir: str | os.PathLike, model_dir: str | os.PathLike,
                             **engine_args) -> str:
    """Copy the model repository into dst_dir, configured for model_dir.

    Args:
        dst_dir: destination (created; the four models in it are replaced).
        model_dir: the Hugging Face model directory the engine loads, or a GGUF file (the
            pre/postprocessing tokenizer is then the directory derived from its metadata, cached).
        **engine_args: more EngineConfig fields for paged_llm/1/model.json (e.g. block_size,
            num_kv_blocks, max_num_seqs, dtype, tokenizer). Checked here, so that a typo fails now
            rather than when the server loads the model.
    Returns:
        dst_dir as an absolute path.
    Raises:
        ValueError naming an unknown engine argument.
    """
    from paged_engine.config import EngineConfig

    unknown = sorted(set(engine_args) - EngineConfig.field_names())
    if unknown:
        raise ValueError(f"unknown engine argument(s) {', '.join(unknown)}; known: "
                         f"{', '.join(sorted(EngineConfig.field_names()))}")
    tokenizer_dir = tokenizer_dir_for(model_dir, engine_args)
    model_dir = str(Path(model_dir).resolve())
    dst = Path(dst_dir).resolve()
    dst.mkdir(parents=True, exist_ok=True)
    src = template_repository()
    for name in MODEL_NAMES:
        target = dst / name
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(src / name, target,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".gitkeep"))
    (dst / "ensemble" / "1").mkdir(exist_ok=True)

    model_json = {"model": model_dir, **engine_args}
    (dst / "paged_llm" / "1" / "model.json").write_text(json.dumps(model_json, indent=2) + "\n")
    for name in TOKENIZER_MODELS:
        config = dst / name / "config.pbtxt"
        text = config.read_text()
        if _TOKENIZER_PLACEHOLDER not in text:
            raise RuntimeError(f"{config} has no {_TOKENIZER_PLACEHOLDER} placeholder")
        config.write_text(text.replace(_TOKENIZER_PLACEHOLDER, str(tokenizer_dir)))
    return str(dst)
