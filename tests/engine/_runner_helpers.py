"""Helpers for the engine-model tests: runner configs, scheduler-like chunks, scrambled blocks."""

from __future__ import annotations

import random

from paged_engine.config import EngineConfig
from paged_engine.sampling_params import SamplingParams
from paged_engine.scheduler import ScheduledChunk, SchedulerOutput


def runner_config(model_dir: str, **overrides) -> EngineConfig:
    kwargs = dict(model=model_dir, device="cpu", dtype="float32", block_size=16, num_kv_blocks=64,
                  max_num_seqs=8, max_num_batched_tokens=512, max_model_len=512, seed=0,
                  enforce_eager=True)
    kwargs.update(overrides)
    return EngineConfig(**kwargs)


def chunk(seq_id, token_ids, start_pos, block_table, params=None, do_sample=True,
          prompt_token_ids=None, output_token_ids=()) -> ScheduledChunk:
    return ScheduledChunk(
        seq_id=seq_id,
        token_ids=list(token_ids),
        start_pos=start_pos,
        block_table=list(block_table),
        do_sample=do_sample,
        params=params if params is not None else SamplingParams(temperature=0.0),
        prompt_token_ids=list(prompt_token_ids if prompt_token_ids is not None else token_ids),
        output_token_ids=list(output_token_ids),
    )


def batch(chunks) -> SchedulerOutput:
    chunks = list(chunks)
    return SchedulerOutput(chunks=chunks, num_batched_tokens=sum(len(c.token_ids) for c in chunks),
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
