"""Tensor parallelism on the real model, SmolLM2-135M-Instruct (CPU, gloo).

Its 9 attention heads and 3 KV heads do not split over 2 ranks: tensor_parallel_size=2 is refused
by name before any worker starts, and 3 ranks (3 query heads and one KV head each, a third of
the MLP and of the vocabulary) give the greedy tokens of one rank, and the same seeded samples.
"""

from __future__ import annotations

import pytest

from paged_engine import LLM, SamplingParams
from paged_engine.config import EngineConfig

QUESTIONS = ["What is the capital of France?", "Name three colors."]


def chat(tokenizer, question):
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=True,
                                        add_generation_prompt=True)
    return list(ids["input_ids"] if not isinstance(ids, list) else ids)


@pytest.fixture(scope="module")
def smollm2_tp3(smollm2_gguf, smollm2_dir, smollm2_engine_args):
    llm = LLM(smollm2_gguf, tensor_parallel_size=3, **smollm2_engine_args)
    yield llm
    llm.shutdown()


def test_two_ranks_are_refused_by_name(smollm2_gguf, smollm2_dir, smollm2_engine_args):
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2: the model's 9 attention heads"):
        EngineConfig(model=smollm2_gguf, tensor_parallel_size=2, **smollm2_engine_args)


def test_greedy_and_seeded_tokens_equal_one_rank(smollm2_llm, smollm2_tp3):
    prompts = [chat(smollm2_llm.tokenizer, q) for q in QUESTIONS]
    greedy = SamplingParams(max_tokens=16, temperature=0.0)
    seeded = SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=42)
    for params in (greedy, seeded):
        want = [o.outputs[0].token_ids for o in smollm2_llm.generate(prompts, params)]
        got = [o.outputs[0].token_ids for o in smollm2_tp3.generate(prompts, params)]
        assert got == want
    assert smollm2_tp3.engine.executor.runner.num_kv_heads == 1
