"""The user's cache directory: what paged-triton derives once and reuses on later starts.

    cache_dir()  # $PAGED_TRITON_CACHE, else $XDG_CACHE_HOME/paged-triton, else ~/.cache/paged-triton

Holds the Hugging Face directories derived from GGUF files (model_executor/gguf_checkpoint.py),
the launcher's tiny default model and the Python backend copies of deploy/tritonserver.py.
Torch-free and import-free, so every layer (the engine, deploy/) can use it.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The cache root (not created here)."""
    explicit = os.environ.get("PAGED_TRITON_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "paged-triton"
