"""Greedy generation equals transformers `generate` token for token (fp32, CPU).

Every configuration that changes how the work is cut up must not change a single token: block
sizes 1/3/16, a KV cache so small that requests get preempted and recomputed, a token budget so
small that prompts are prefilled in chunks mixed with decodes, and prefix-cache hits.
"""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch

from paged_engine import LLM, SamplingParams

MAX_NEW = 12
_hf_cache: dict = {}


def _hf_model(model_dir):
    from transformers import AutoModelForCausalLM

    if model_dir not in _hf_cache:
        _hf_cache[model_dir] = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return _hf_cache[model_dir]


def hf_greedy(model_dir, prompt_ids, max_new_tokens=MAX_NEW, stop_at_eos=False, with_logprobs=False):
    """transformers greedy generate for one prompt (no padding): generated ids (and logprobs)."""
    model = _hf_model(model_dir)
    kwargs = {}
    if not stop_at_eos:
        kwargs["eos_token_id"] = None
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=0, return_dict_in_generate=True, output_logits=with_logprobs, **kwargs,
        )
    ids = out.sequences[0, len(prompt_ids):].tolist()
    if with_logprobs:
        return ids, [torch.log_softmax(l[0].float(), -1) for l in out.logits]
    return ids


def make_prompts(vocab_size, lengths=(1, 6, 17, 33, 11), seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab_size) for _ in range(n)] for n in lengths]


def assert_parity(model_dir, llm, prompts, max_new_tokens=MAX_NEW):
    outs = llm.generate(prompts, SamplingParams(max_tokens=max_new_tokens, temperature=0.0, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        assert out.prompt_token_ids == prompt
        assert out.token_ids == hf_greedy(model_dir, prompt, max_new_tokens), f"prompt len {len(prompt)}"
        assert out.finish_reason == "length"
    return outs


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_greedy_matches_transformers(make_model, arch):
    model_dir = make_model(arch)
    llm = LLM(model_dir, device="cpu", dtype="float32", block_size=16, num_kv_blocks=64)
    prompts = make_prompts(llm.engine.vocab_size)
    outs = assert_parity(model_dir, llm, prompts)
    # The text is the decode of the tokens.
    for out in outs:
        assert out.text == llm.tokenizer.decode(out.token_ids, skip_special_tokens=True)
    assert llm.stats()["kv_blocks_free"] == 64


@pytest.mark.parametrize("block_size", [1, 3])
def test_greedy_block_sizes(tiny_model_dir, block_size):
    llm = LLM(tiny_model_dir, device="cpu", dtype="float32", block_size=block_size, num_kv_blocks=1024 // block_size)
    assert_parity(tiny_model_dir, llm, make_prompts(llm.engine.vocab_size, lengths=(1, 5, 9, 20)))


def test_greedy_with_preemption(tiny_model_dir):
    # 4 prompts need ~ (33+12)/4 blocks each at the end; 16 blocks cannot hold them all at once.
    llm = LLM(tiny_model_dir, device="cpu", dtype="float32", block_size=4, num_kv_blocks=16)
    assert_parity(tiny_model_dir, llm, make_prompts(llm.engine.vocab_size, lengths=(20, 6, 17, 33)))
    stats = llm.stats()
    assert stats["preemptions"] > 0
    assert stats["kv_blocks_free"] == 16


def test_greedy_with_chunked_prefill(tiny_model_dir):
    llm = LLM(tiny_model_dir, device="cpu", dtype="float32", block_size=4, num_kv_blocks=128,
              max_num_batched_tokens=7)
    batches = []
    run = llm.engine.executor.execute_model

    def recording_run(batch):
        batches.append([(c.num_tokens, c.start_pos, c.do_sample) for c in batch.seqs])
        assert batch.num_batched_tokens <= 7
        return run(batch)

    llm.engine.executor.execute_model = recording_run
    assert_parity(tiny_model_dir, llm, make_prompts(llm.engine.vocab_size, lengths=(3, 25, 9)))
    # A prompt was split (a chunk that starts mid-prompt and does not sample) ...
    assert any(start > 0 and not do_sample and n > 1 for b in batches for n, start, do_sample in b)
    # ... and prefill chunks ran in the same step as decodes.
    assert any(any(n == 1 and start > 0 for n, start, _ in b) and any(n > 1 for n, _, _ in b) for b in batches)


def test_prefix_caching_same_tokens(tiny_model_dir):
    llm = LLM(tiny_model_dir, device="cpu", dtype="float32", block_size=8, num_kv_blocks=128)
    rng = random.Random(1)
    vocab = llm.engine.vocab_size
    prefix = [rng.randrange(3, vocab) for _ in range(21)]
    first = assert_parity(tiny_model_dir, llm, [prefix + [5, 6]])
    assert first[0].num_cached_tokens == 0
    prompts = [prefix + [rng.randrange(3, vocab) for _ in range(k)] for k in (1, 4, 9)]
    outs = assert_parity(tiny_model_dir, llm, prompts)
    assert [o.num_cached_tokens for o in outs] == [16, 16, 16]  # two full blocks of 8
    stats = llm.stats()
    assert stats["prefix_cache_hits"] == 48 and stats["prefix_cache_queries"] > 48
    # The exact same prompt again: everything but the last token's block comes from the cache.
    again = assert_parity(tiny_model_dir, llm, [prompts[2]])
    assert again[0].num_cached_tokens == 24


def test_eos_stops_like_transformers(tiny_model_dir, tmp_path):
    # Make the model's EOS a token that greedy decoding really produces, then compare with
    # transformers, which stops at EOS too.
    probe = make_prompts(384, lengths=(7,), seed=3)[0]
    ref = hf_greedy(tiny_model_dir, probe, 8)
    eos = ref[4]
    model_dir = tmp_path / "eos-model"
    shutil.copytree(tiny_model_dir, model_dir)
    for name in ("config.json", "generation_config.json"):
        path = model_dir / name
        if path.exists():
            cfg = json.loads(path.read_text())
            cfg["eos_token_id"] = eos
            path.write_text(json.dumps(cfg))
    model_dir = str(model_dir)
    llm = LLM(model_dir, device="cpu", dtype="float32")
    want = hf_greedy(model_dir, probe, 8, stop_at_eos=True)
    assert want[-1] == eos and len(want) <= 5
    out = llm.generate([probe], SamplingParams(max_tokens=8, temperature=0))[0]
    assert out.token_ids == want
    assert out.finish_reason == "stop" and out.stop_reason is None
    # ignore_eos keeps going; min_tokens forbids EOS (so the tokens then differ from greedy).
    out = llm.generate([probe], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    assert out.token_ids == ref and out.finish_reason == "length"
    out = llm.generate([probe], SamplingParams(max_tokens=8, temperature=0, min_tokens=8))[0]
    assert len(out.token_ids) == 8 and eos not in out.token_ids


def test_logprobs_match_transformers(tiny_model_dir):
    llm = LLM(tiny_model_dir, device="cpu", dtype="float32")
    prompt = make_prompts(llm.engine.vocab_size, lengths=(9,), seed=5)[0]
    ids, ref_lps = hf_greedy(tiny_model_dir, prompt, 6, with_logprobs=True)
    out = llm.generate([prompt], SamplingParams(max_tokens=6, temperature=0, logprobs=3, ignore_eos=True))[0]
    assert out.token_ids == ids
    assert len(out.logprobs) == 6
    total = 0.0
    for tok, entry, ref in zip(ids, out.logprobs, ref_lps):
        assert entry[tok].rank == 1
        assert abs(entry[tok].logprob - ref[tok].item()) < 1e-4
        top = torch.topk(ref, 3).indices.tolist()
        assert set(entry) == set(top)
        total += ref[tok].item()
    assert abs(out.cumulative_logprob - total) < 1e-3
    # decoded_token of the sampled tokens concatenates to the text (partial characters wait for
    # the token that completes them), as in vLLM and vllm_backend's additional-outputs tests.
    assert "".join(e[t].decoded_token for t, e in zip(ids, out.logprobs)) == \
        llm.tokenizer.decode(ids, skip_special_tokens=True)


def test_seeded_sampling_same_alone_and_in_busy_batch(tiny_model_dir):
    llm = LLM(tiny_model_dir, device="cpu", dtype="float32", block_size=4, num_kv_blocks=48,
              max_num_batched_tokens=16)
    vocab = llm.engine.vocab_size
    prompt = make_prompts(vocab, lengths=(10,), seed=7)[0]
    seeded = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.95, top_k=50, seed=1234, ignore_eos=True)
    alone = llm.generate([prompt], seeded)[0].token_ids
    others = make_prompts(vocab, lengths=(30, 3, 22, 14), seed=8)
    busy_params = [SamplingParams(max_tokens=14, temperature=1.0, ignore_eos=True)] * 4
    outs = llm.generate(others[:2] + [prompt] + others[2:], busy_params[:2] + [seeded] + busy_params[2:])
    assert outs[2].token_ids == alone
    # n > 1: outputs use seed, seed+1, ... so they differ from each other but are reproducible.
    two = SamplingParams(n=2, max_tokens=10, temperature=0.9, top_p=0.95, top_k=50, seed=1234, ignore_eos=True)
    out = llm.generate([prompt], two)[0]
    assert [c.index for c in out.outputs] == [0, 1]
    assert out.outputs[0].token_ids == alone
    assert out.outputs[1].token_ids != alone
    assert llm.generate([prompt], two)[0].outputs[1].token_ids == out.outputs[1].token_ids
    assert llm.stats()["kv_blocks_free"] == 48


def test_n_greedy_children_share_prompt_and_match(tiny_model_dir):
    llm = LLM(tiny_model_dir, device="cpu", dtype="float32", block_size=4, num_kv_blocks=64,
              enable_prefix_caching=False)
    prompt = make_prompts(llm.engine.vocab_size, lengths=(14,), seed=9)[0]
    out = llm.generate([prompt], SamplingParams(n=3, max_tokens=6, temperature=0, ignore_eos=True))[0]
    want = hf_greedy(tiny_model_dir, prompt, 6)
    assert [c.token_ids for c in out.outputs] == [want] * 3
    assert out.finished and all(c.finish_reason == "length" for c in out.outputs)
