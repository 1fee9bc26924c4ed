"""Helpers for the engine-model tests: runner configs, scheduler-like work items, scrambled blocks."""

from __future__ import annotations

import random

from paged_engine.config import EngineConfig
from paged_engine.sampling_params import SamplingParams
from paged_engine.core.batch import NewSequenceData, ScheduledSequence, SchedulerOutput


def runner_config(model_dir: str, **overrides) -> EngineConfig:
    kwargs = dict(model=model_dir, device="cpu", dtype="float32", block_size=16, num_kv_blocks=64,
                  max_num_seqs=8, max_num_batched_tokens=512, max_model_len=512, seed=0,
                  enforce_eager=True)
    kwargs.update(overrides)
    return EngineConfig(**kwargs)


def chunk(seq_id, token_ids, start_pos, block_table, params=None, do_sample=True,
          prompt_token_ids=None, output_token_ids=()) -> ScheduledSequence:
    """Compute `token_ids` at positions start_pos.. of a sequence, sent whole to the runner.

    The sequence is prompt_token_ids + output_token_ids (default: the prompt is token_ids alone,
    or what precedes them padded with token 0 when start_pos > 0); token_ids must be its tokens
    [start_pos, start_pos + len(token_ids)).
    """
    token_ids = list(token_ids)
    if prompt_token_ids is None:
        prompt_token_ids = [0] * start_pos + token_ids
    prompt, output = list(prompt_token_ids), list(output_token_ids)
    full = prompt + output
    assert full[start_pos:start_pos + len(token_ids)] == token_ids, "chunk tokens are not the sequence's"
    return ScheduledSequence(
        seq_id=seq_id,
        start_pos=start_pos,
        num_tokens=len(token_ids),
        do_sample=do_sample,
        new=NewSequenceData(prompt, output, list(block_table),
                            params if params is not None else SamplingParams(temperature=0.0)),
    )


def batch(chunks) -> SchedulerOutput:
    chunks = list(chunks)
    return SchedulerOutput(seqs=chunks, num_batched_tokens=sum(c.num_tokens for c in chunks),
                           finished_seq_ids=[])


class BlockAllocator:
    """Hands out physical blocks in a scrambled order, so block tables are never contiguous."""

    def __init__(self, num_blocks: int, seed: int = 0):
        self.free = list(range(num_blocks))
        random.Random(seed).shuffle(self.free)

    def take(self, n: int) -> list[int]:
        out, self.free = self.free[:n], self.free[n:]
        assert len(out) == n, "test ran out of blocks"
        return out


def sampled(out) -> list[int]:
    """The tokens of a ModelRunnerOutput in batch order, one per sequence that sampled."""
    assert all(len(t) <= 1 for t in out.sampled_token_ids), "no drafts here: one token at most"
    return [t[0] for t in out.sampled_token_ids if t]


def sampled_logprobs(out) -> list:
    return [lp[0] for lp in out.logprobs if lp]
