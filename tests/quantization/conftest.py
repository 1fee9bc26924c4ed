"""Quantized checkpoints of a tiny random Llama, built once by the formats' own tools and cached.

`build_checkpoints.py` runs in the side environment `.ci/setup` makes (`.venv-quant`, or the
python named by PAGED_TRITON_QUANT_PYTHON). The checkpoints are cached under
~/.cache/paged-triton/quant-checkpoints by a hash of the builder and the source model, so a
second run of the suite does not rebuild them (about a minute on two cores).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUILDER = Path(__file__).with_name("build_checkpoints.py")
CACHE = Path(os.environ.get("PAGED_TRITON_CACHE", Path.home() / ".cache" / "paged-triton")) / "quant-checkpoints"

# The tiny model's shapes give every linear more than one group of 64 inputs (hidden 128,
# intermediate 256) and fused shards of unequal sizes (q 128 rows, k and v 64).
QUANT_MODEL = dict(hidden_size=128, intermediate_size=256, num_heads=4, num_kv_heads=2)


def quant_tools_python() -> str:
    python = os.environ.get("PAGED_TRITON_QUANT_PYTHON") or str(REPO / ".venv-quant" / "bin" / "python")
    if not os.path.exists(python):
        pytest.fail(f"the quantization tools' environment is missing ({python}): run `bash .ci/setup`, "
                    "which builds .venv-quant with llm-compressor and auto-gptq")
    return python


def _key(model_dir: str) -> str:
    h = hashlib.sha256(BUILDER.read_bytes())
    for name in ("config.json", "model.safetensors"):
        h.update((Path(model_dir) / name).read_bytes())
    return h.hexdigest()[:16]


@pytest.fixture(scope="session")
def quant_model_dir(make_model) -> str:
    return make_model("llama", "byte_level", **QUANT_MODEL)


@pytest.fixture(scope="session")
def quant_checkpoints(quant_model_dir, tmp_path_factory):
    """Factory: quant_checkpoints(name) -> directory of that checkpoint (built on first use)."""
    root = CACHE / _key(quant_model_dir)
    python = quant_tools_python()

    def get(name: str) -> str:
        path = root / name
        if not (path / "config.json").exists():
            root.mkdir(parents=True, exist_ok=True)
            # Build everything at once: the tools' start-up is most of the cost.
            cwd = tmp_path_factory.mktemp("build")  # not the repo: its kernels/ shadows a package
            proc = subprocess.run([python, "-P", str(BUILDER), quant_model_dir, str(root)], cwd=cwd,
                                  capture_output=True, text=True, timeout=1800,
                                  env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            if proc.returncode != 0:
                pytest.fail(f"build_checkpoints.py failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
        assert (path / "config.json").exists(), name
        return str(path)

    return get


@pytest.fixture
def copy_checkpoint(tmp_path):
    """copy_checkpoint(src, edit_config) -> a copy of a checkpoint whose config.json `edit_config` changed."""
    import json

    def copy(src: str, edit=None) -> str:
        dst = tmp_path / Path(src).name
        shutil.copytree(src, dst)
        if edit is not None:
            config = json.loads((dst / "config.json").read_text())
            edit(config)
            (dst / "config.json").write_text(json.dumps(config))
        return str(dst)

    return copy
