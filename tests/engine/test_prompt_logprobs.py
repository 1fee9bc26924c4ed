"""prompt_logprobs (vLLM semantics) against transformers' own forward over the prompt.

For prompt token i >= 1 the engine must report log_softmax(logits[i - 1])[token_i], its rank and
the top-N, exactly as the reference model computes them, however the prompt is cut up: chunked
prefill, block sizes, a prefix-cache hit (which must not skip the computation), preemption,
n > 1. Perplexity through the engine equals the reference perplexity.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from paged_engine import LLM, SamplingParams

_hf_cache: dict = {}


def _reference(model_dir, prompt):
    from transformers import AutoModelForCausalLM

    if model_dir not in _hf_cache:
        _hf_cache[model_dir] = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = _hf_cache[model_dir](torch.tensor([prompt])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)  # row i predicts token i + 1


def _check(model_dir, prompt, prompt_logprobs, k, atol=1e-4):
    ref = _reference(model_dir, prompt)
    assert len(prompt_logprobs) == len(prompt)
    assert prompt_logprobs[0] is None
    for i in range(1, len(prompt)):
        entry = prompt_logprobs[i]
        row = ref[i - 1]
        token = prompt[i]
        assert token in entry, i
        assert entry[token].logprob == pytest.approx(row[token].item(), abs=atol), i
        assert entry[token].rank == int((row >= row[token]).sum()), i
        top = row.topk(k).indices.tolist() if k else []
        others = [t for t in entry if t != token]
        assert set(others) <= set(top) and set(top) - {token} <= set(entry), i
        for t in top:
            assert entry[t].logprob == pytest.approx(row[t].item(), abs=atol)


def _prompts(vocab, lengths, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


@pytest.mark.parametrize("block_size, budget", [(4, 8192), (16, 7), (1, 5)])
def test_prompt_logprobs_match_transformers(tiny_model_dir, block_size, budget):
    llm = LLM(tiny_model_dir, device="cpu", dtype="float32", block_size=block_size, num_kv_blocks=256,
              max_num_batched_tokens=budget)
    prompts = _prompts(llm.engine.vocab_size, (1, 2, 13, 30))
    outs = llm.generate(prompts, SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=3))
    for prompt, out in zip(prompts, outs):
        _check(tiny_model_dir, prompt, out.prompt_logprobs, 3)
        assert out.outputs[0].logprobs is None  # only prompt logprobs were asked for
    plain = llm.generate(prompts[:1], SamplingParams(max_tokens=2))
    assert plain[0].prompt_logprobs is None


def test_prefix_cache_hit_still_computes_prompt_logprobs(tiny_model_dir):
    llm = LLM(tiny_model_dir, device="cpu", dtype="float32", block_size=4, num_kv_blocks=128)
    (prompt,) = _prompts(llm.engine.vocab_size, (21,), seed=1)
    llm.generate([prompt], SamplingParams(max_tokens=1))  # fills the prefix cache
    hits = llm.stats()["prefix_cache_hits"]
    (out,) = llm.generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=0))
    assert llm.stats()["prefix_cache_hits"] == hits and out.num_cached_tokens == 0
    _check(tiny_model_dir, prompt, out.prompt_logprobs, 0)
    assert all(len(e) == 1 for e in out.prompt_logprobs[1:])  # N = 0: the actual token only


def test_prompt_logprobs_survive_preemption_and_n(tiny_model_dir):
    # 10 blocks of 4 for three 15-token prompts generating 12 tokens each: someone is preempted
    # and recomputed, and must not record its prompt twice.
    llm = LLM(tiny_model_dir, device="cpu", dtype="float32", block_size=4, num_kv_blocks=10,
              max_num_batched_tokens=16)
    prompts = _prompts(llm.engine.vocab_size, (15, 15, 15), seed=2)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, prompt_logprobs=2)
    outs = llm.generate(prompts, params)
    assert llm.stats()["preemptions"] > 0
    for prompt, out in zip(prompts, outs):
        _check(tiny_model_dir, prompt, out.prompt_logprobs, 2)
    (out,) = llm.generate([prompts[0]], SamplingParams(n=3, max_tokens=2, temperature=1.0, seed=3,
                                                         prompt_logprobs=1))
    assert len(out.outputs) == 3
    _check(tiny_model_dir, prompts[0], out.prompt_logprobs, 1)


def test_perplexity_through_the_engine(tiny_model_dir):
    llm = LLM(tiny_model_dir, device="cpu", dtype="float32", block_size=16, num_kv_blocks=64,
              max_num_batched_tokens=9)
    (prompt,) = _prompts(llm.engine.vocab_size, (40,), seed=4)
    (out,) = llm.generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=0))
    nll = -sum(e[t].logprob for e, t in zip(out.prompt_logprobs[1:], prompt[1:])) / (len(prompt) - 1)
    ref = _reference(tiny_model_dir, prompt)
    ref_nll = -ref[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])].mean().item()
    assert math.exp(nll) == pytest.approx(math.exp(ref_nll), rel=1e-5)


@pytest.mark.parametrize("bad", [-1, 21, "x", 1.5])
def test_bad_prompt_logprobs_is_an_error(bad):
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=bad)
