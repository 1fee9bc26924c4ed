"""Tensor parallelism end to end on CPU (gloo): tensor_parallel_size=2 against one rank.

Each tiny model is served by one LLM with two ranks (rank 0 here, a worker process) for the whole
module, next to a tp=1 LLM of the same checkpoint: greedy tokens equal, seeded sampling gives
the same tokens and close logprobs, the logits of a batch (prefill + decode, shuffled blocks)
are close. The models cover the splits: KV heads == tp (each rank one KV head), KV heads < tp
(the KV head replicated on both ranks) with tied embeddings, Qwen2's q/k/v biases (split with
the outputs), and a vocabulary that does not divide by the ranks.
"""

from __future__ import annotations

import pytest
import torch

from paged_engine import LLM, SamplingParams
from paged_engine.config import EngineConfig
from paged_engine.core.batch import NewSequenceData, ScheduledSequence, SchedulerOutput
from paged_engine.executor.model_runner import ModelRunner

# A 64-token step budget: the long prompt is prefilled in chunks (steps that sample nothing).
ARGS = dict(device="cpu", dtype="float32", block_size=8, num_kv_blocks=96, max_model_len=256,
            max_num_seqs=8, max_num_batched_tokens=64, enforce_eager=True)
PROMPTS = ["hello world", "the quick brown fox jumps over the lazy dog " * 3, "a", "naïve café 東京"]
MODELS = {
    # name: (arch, make_tiny_model overrides)
    "gqa-kv2": ("llama", dict(num_heads=4, num_kv_heads=2)),
    "kv1-tied": ("llama", dict(num_heads=4, num_kv_heads=1, tie_word_embeddings=True)),
    "qwen2-bias": ("qwen2", dict(num_heads=4, num_kv_heads=2)),
}


@pytest.fixture(scope="module", params=list(MODELS))
def pair(request, make_model):
    """(model dir, tp=1 LLM, tp=2 LLM) of one tiny model; the tp=2 engine is shut down after."""
    arch, overrides = MODELS[request.param]
    model = make_model(arch, "byte_level", **overrides)
    one = LLM(model, **ARGS)
    two = LLM(model, tensor_parallel_size=2, **ARGS)
    yield model, one, two
    two.shutdown()
    one.shutdown()


def prefill_batch(prompts, tables, first_id):
    greedy = SamplingParams(temperature=0.0)
    seqs = [ScheduledSequence(first_id + i, 0, len(p), True, new=NewSequenceData(list(p), [], t, greedy))
            for i, (p, t) in enumerate(zip(prompts, tables))]
    return SchedulerOutput(seqs, sum(len(p) for p in prompts), [])


def tokens(outs):
    return [[c.token_ids for c in o.outputs] for o in outs]


def test_greedy_tokens_equal_one_rank(pair):
    _, one, two = pair
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    assert tokens(two.generate(PROMPTS, params)) == tokens(one.generate(PROMPTS, params))


def test_seeded_sampling_equals_one_rank(pair):
    _, one, two = pair
    params = [SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, top_k=40, seed=100 + i, n=2,
                             logprobs=3, prompt_logprobs=2, ignore_eos=True) for i in range(len(PROMPTS))]
    ref, got = one.generate(PROMPTS, params), two.generate(PROMPTS, params)
    assert tokens(got) == tokens(ref)
    for r, g in zip(ref, got):
        for rc, gc in zip(r.outputs, g.outputs):
            assert gc.cumulative_logprob == pytest.approx(rc.cumulative_logprob, abs=1e-3)
        assert len(g.prompt_logprobs) == len(r.prompt_logprobs) == len(r.prompt_token_ids)
        for rp, gp in zip(r.prompt_logprobs[1:], g.prompt_logprobs[1:]):  # the first has none
            assert set(gp) == set(rp)
            for t in rp:
                assert gp[t].logprob == pytest.approx(rp[t].logprob, abs=1e-4)


def test_logits_close_to_one_rank(pair):
    model, _, two = pair
    runner = ModelRunner(EngineConfig(model=model, **ARGS))
    prompts = [list(range(3, 40)), [5, 9, 200, 17], [300] * 19]
    free = list(range(96))
    torch.manual_seed(0)
    free = [free[i] for i in torch.randperm(96).tolist()]  # scattered physical blocks
    tables = []
    for p in prompts:
        n = -(-(len(p) + 1) // 8)
        tables.append(free[:n])
        free = free[n:]
    prefill = prefill_batch(prompts, tables, 100)
    # The same sequences one token further, as a decode step after the prefill.
    decode = SchedulerOutput([ScheduledSequence(100 + i, len(p), 1, True, new_token_ids=[7])
                              for i, p in enumerate(prompts)], len(prompts), [])
    for b in (prefill, decode):
        want = runner.compute_logits(b)
        got = two.engine.executor.compute_logits(b)
        for w, g in zip(want, got):
            assert g.shape == w.shape
            torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
    runner.shutdown()


def test_each_rank_holds_its_kv_shard(pair):
    model, one, two = pair
    ex = two.engine.executor
    kv_heads = ex.runner.num_kv_heads
    assert kv_heads == max(1, one.engine.executor.runner.num_kv_heads // 2)
    assert ex.runner.k_caches[0].shape[2] == kv_heads
    assert ex.num_steps > 0 and ex.broadcast_bytes > 0
