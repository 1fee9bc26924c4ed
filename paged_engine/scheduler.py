"""Scheduler: continuous batching by a per-step token budget. Torch-free.

Every sequence has `num_computed_tokens` (KV in the cache) and `num_tokens` (prompt + output);
each step gives it `num_tokens - num_computed_tokens` more, capped by what is left of the budget
(vLLM V1's formulation). A decode is the case "1 token left"; a long prompt is split across steps
(chunked prefill) and mixed with decodes; a preempted sequence recomputes prompt + output the same
way. The step:

1. Running sequences, oldest admission first. A sequence that needs a new block and finds none
   preempts the most recently admitted running sequence (possibly itself): its blocks are freed
   and it goes back to the front of the waiting queue to be recomputed later (its full blocks
   usually survive in the prefix cache).
2. If nothing was preempted, waiting sequences in FCFS order are admitted while the budget, the
   sequence limit and the free blocks allow; admission looks the prompt up in the prefix cache
   first. The queue head is never skipped, so a big request cannot starve.

n > 1: the request's first sequence (the leader) computes the prompt alone; when it samples its
first token the other n-1 fork: they share the leader's full prompt blocks (all but the block
holding the last prompt token) and compute only that last partial block themselves, then sample
their own first token. Their sequence slots are reserved when the leader is admitted.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from paged_engine.block_manager import BlockManager
from paged_engine.sequence import Request, Sequence, SequenceStatus

if TYPE_CHECKING:
    from paged_engine.config import EngineConfig
    from paged_engine.sampling_params import SamplingParams


@dataclass
class ScheduledChunk:
    """The work of one sequence in one step (the seam with the model runner).

    `block_table`, `prompt_token_ids` and `output_token_ids` are the sequence's live lists (no
    per-step copies): read them during `run()`, do not keep or mutate them.
    """

    seq_id: int                  # unique per sequence (n>1 children have their own)
    token_ids: list[int]         # tokens whose KV is computed this step (prefill chunk, or the 1 decode token)
    start_pos: int               # position of token_ids[0] == tokens already in cache before this step
    block_table: list[int]       # physical block ids covering at least start_pos + len(token_ids) tokens
    do_sample: bool              # True when this chunk ends at the sequence's last token (sample one token)
    params: "SamplingParams"
    prompt_token_ids: list[int]  # for repetition penalty
    output_token_ids: list[int]  # generated so far (penalties, seeded sampling position = len of this)


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk]     # any mix of prefill chunks and decodes
    num_batched_tokens: int
    finished_seq_ids: list[int]      # seqs finished/aborted/preempted since last step: runner drops state
    # The scheduled sequences, parallel to `chunks` (engine-internal).
    seqs: list[Sequence] = field(default_factory=list, repr=False)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


class Scheduler:
    """Decides what every step computes, owns the waiting queue, running list and block manager.

    Args:
        config: the engine config (block_size, max_num_seqs, max_num_batched_tokens,
            enable_prefix_caching are used).
        num_kv_blocks: blocks actually allocated by the runner.
    """

    def __init__(self, config: "EngineConfig", num_kv_blocks: int):
        self.block_size = config.block_size
        self.max_num_batched_tokens = config.max_num_batched_tokens
        # Never run more sequences than tokens per step: then every running sequence advances
        # at least every other step and none can starve behind the budget.
        self.max_num_seqs = min(config.max_num_seqs, config.max_num_batched_tokens)
        self.block_manager = BlockManager(num_kv_blocks, config.block_size, config.enable_prefix_caching)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._pending_finished_seq_ids: list[int] = []
        self._running_dirty = False
        # counters
        self.num_preemptions = 0
        self.prefix_cache_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_cache_hits = 0     # of those, tokens served from the cache

    # -- requests in and out --

    def add_request(self, request: Request) -> None:
        self.waiting.append(request.leader)

    def finish_seq(self, seq: Sequence, reason: str, stop_reason: Any = None) -> None:
        """End a sequence (stop, length, abort): free its blocks now, tell the runner next step."""
        if seq.status == SequenceStatus.FINISHED:
            return
        if seq.status == SequenceStatus.RUNNING:
            self.block_manager.free(seq)
            self._running_dirty = True
            self._pending_finished_seq_ids.append(seq.seq_id)
        elif seq.status == SequenceStatus.WAITING:
            self.waiting.remove(seq)
            self.block_manager.free(seq)  # holds none; kept for safety
            self._pending_finished_seq_ids.append(seq.seq_id)
        elif seq.status == SequenceStatus.PENDING_FORK:
            seq.request.pending_children.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason

    def has_unfinished_seqs(self) -> bool:
        self.remove_finished()
        return bool(self.waiting or self.running)

    def remove_finished(self) -> None:
        """Drop finished sequences from the running list (finish_seq only marks them)."""
        if self._running_dirty:
            self.running = [s for s in self.running if s.status == SequenceStatus.RUNNING]
            self._running_dirty = False

    # -- scheduling --

    def _num_seq_slots_used(self) -> int:
        """Running sequences plus the slots reserved for not-yet-forked n>1 children."""
        return len(self.running) + sum(
            len(s.request.pending_children) for s in self.running if s.index == 0
        )

    def _make_chunk(self, seq: Sequence, num_new_tokens: int) -> ScheduledChunk:
        start = seq.num_computed_tokens
        end = start + num_new_tokens
        return ScheduledChunk(
            seq_id=seq.seq_id,
            token_ids=seq.token_slice(start, end),
            start_pos=start,
            block_table=seq.block_table,
            do_sample=end == seq.num_tokens,
            params=seq.params,
            prompt_token_ids=seq.prompt_token_ids,
            output_token_ids=seq.output_token_ids,
        )

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self._pending_finished_seq_ids.append(seq.seq_id)
        self.num_preemptions += 1

    def schedule(self) -> SchedulerOutput:
        self.remove_finished()
        budget = self.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        seqs: list[Sequence] = []
        preempted = False

        # 1. running sequences, oldest admission first
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            assert num_new > 0, seq
            scheduled = True
            while not self.block_manager.allocate(seq, num_new):
                victim = self.running.pop()  # the most recently admitted
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    scheduled = False
                    break
            if not scheduled:
                break
            chunks.append(self._make_chunk(seq, num_new))
            seqs.append(seq)
            budget -= num_new
            i += 1

        # 2. admit waiting sequences, FCFS, unless this step had to preempt
        if not preempted and self.waiting:
            slots_used = self._num_seq_slots_used()
            while self.waiting and budget > 0:
                seq = self.waiting[0]
                slots = 1 + (len(seq.request.pending_children) if seq.index == 0 else 0)
                if slots_used + slots > self.max_num_seqs:
                    break
                cached = self.block_manager.find_cached_prefix(seq)
                num_computed = len(cached) * self.block_size
                num_new = min(seq.num_tokens - num_computed, budget)
                if not self.block_manager.allocate(seq, num_new, cached):
                    break
                self.waiting.popleft()
                if not seq.ever_admitted:
                    seq.ever_admitted = True
                    seq.num_cached_tokens = num_computed
                    if seq.index == 0:
                        seq.request.num_cached_tokens = num_computed
                    self.prefix_cache_queries += seq.num_tokens
                    self.prefix_cache_hits += num_computed
                seq.num_computed_tokens = num_computed
                seq.status = SequenceStatus.RUNNING
                self.running.append(seq)
                slots_used += slots
                chunks.append(self._make_chunk(seq, num_new))
                seqs.append(seq)
                budget -= num_new

        finished_ids: list[int] = []
        if chunks:
            # Held back while nothing runs, so the runner hears of them with the next real batch.
            finished_ids, self._pending_finished_seq_ids = self._pending_finished_seq_ids, []
        return SchedulerOutput(
            chunks=chunks,
            num_batched_tokens=self.max_num_batched_tokens - budget,
            finished_seq_ids=finished_ids,
            seqs=seqs,
        )

    # -- after the runner --

    def update_from_output(
        self, batch: SchedulerOutput, sampled_token_ids: list[int], logprobs: list | None
    ) -> list[tuple[Sequence, int, Any]]:
        """Advance computed tokens, register full blocks, append sampled tokens, fork n>1 children.

        Returns (sequence, sampled token id, its SampleLogprobs or None) for every sequence
        that sampled; the engine then detokenizes and decides stops (finish_seq).
        """
        results = []
        register_full_blocks = self.block_manager.register_full_blocks
        num_logprobs = len(logprobs) if logprobs is not None else 0
        j = 0
        for chunk, seq in zip(batch.chunks, batch.seqs):
            token = lp = None
            if chunk.do_sample:
                token = int(sampled_token_ids[j])
                lp = logprobs[j] if j < num_logprobs else None
                j += 1
            if seq.status is not SequenceStatus.RUNNING:
                continue  # aborted while the step ran
            seq.num_computed_tokens += len(chunk.token_ids)
            register_full_blocks(seq)
            if token is None:
                continue
            seq.output_token_ids.append(token)
            results.append((seq, token, lp))
            if seq.index == 0 and seq.request.pending_children:
                self._fork_children(seq)
        return results

    def _fork_children(self, leader: Sequence) -> None:
        request = leader.request
        # Share every full prompt block except the one holding the last prompt token: a child
        # recomputes that block privately (never writing into a shared block) to get its logits.
        num_shared_blocks = (leader.num_prompt_tokens - 1) // self.block_size
        for child in request.pending_children:
            self.block_manager.fork(leader, child, num_shared_blocks)
            child.num_computed_tokens = num_shared_blocks * self.block_size
            child.ever_admitted = True
            child.status = SequenceStatus.RUNNING
            self.running.append(child)
        request.pending_children = []

    # -- views --

    def live_seqs(self) -> list[Sequence]:
        self.remove_finished()
        return list(self.running) + list(self.waiting)
