"""Fixtures shared by the whole suite.

Kernels run in Triton's CPU interpreter here, so TRITON_INTERPRET must be set before anything
imports triton. Tiny random models are built once per session; each is a real `transformers`
model written with save_pretrained, and a tokenizer trained locally with `tokenizers`.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402

from paged_engine.tiny_model import make_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def make_model(tmp_path_factory):
    """Factory: make_model(arch="llama", tokenizer="byte_level", **kw) -> model dir, cached per args."""
    cache: dict[tuple, str] = {}

    def make(arch: str = "llama", tokenizer: str = "byte_level", **kwargs) -> str:
        key = (arch, tokenizer, tuple(sorted(kwargs.items())))
        if key not in cache:
            d = tmp_path_factory.mktemp(f"model-{arch}-{tokenizer}")
            cache[key] = make_tiny_model(d, arch=arch, tokenizer=tokenizer, **kwargs)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_model_dir(make_model) -> str:
    """A tiny random Llama (GQA: 4 query heads, 2 KV heads, 2 layers) with a byte-level BPE tokenizer."""
    return make_model("llama", "byte_level")


@pytest.fixture(scope="session")
def triton_server_factory(tmp_path_factory):
    """Factory: triton_server_factory(repo_dir, **TritonServer kwargs) -> a started TritonServer.

    Every server started through it is stopped at the end of the session; a test module that
    wants its own lifetime calls .stop() itself.
    """
    from paged_engine.tritonserver import TritonServer

    servers = []

    def start(repo_dir, **kwargs) -> TritonServer:
        log_dir = tmp_path_factory.mktemp("tritonserver-log")
        kwargs.setdefault("log_file", log_dir / "server.log")
        server = TritonServer(repo_dir, **kwargs)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()
