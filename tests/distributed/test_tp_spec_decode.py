"""Speculative decoding (n-gram drafts) on a two-rank engine: the drafts travel in the batch, every
rank computes their KV, rank 0 verifies them; greedy output is one rank's without speculation."""

from __future__ import annotations

from paged_engine import LLM, SamplingParams

ARGS = dict(device="cpu", dtype="float32", block_size=8, num_kv_blocks=96, max_model_len=256, enforce_eager=True)


def test_ngram_drafts_on_two_ranks_give_one_ranks_greedy_tokens(tiny_model_dir):
    # Repetitive prompts, so the n-gram proposer finds drafts.
    prompts = ["abc abc abc abc abc abc", "one two one two one two one two", "xyz"]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    one = LLM(tiny_model_dir, **ARGS)
    want = [o.outputs[0].token_ids for o in one.generate(prompts, params)]
    one.shutdown()
    two = LLM(tiny_model_dir, tensor_parallel_size=2,
              speculative_config={"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3,
                                  "prompt_lookup_min": 1}, **ARGS)
    try:
        got = [o.outputs[0].token_ids for o in two.generate(prompts, params)]
        stats = two.engine.stats()
    finally:
        two.shutdown()
    assert got == want
    assert stats["spec_num_draft_tokens"] > 0  # drafts were really verified
