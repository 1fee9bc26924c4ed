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
   first. The queue head is never skipped, so a big request cannot starve; only a sequence
   whose structured-output grammar is still compiling (WAITING_FOR_GRAMMAR) is passed over,
   keeping its place until the engine hands it its grammar.

Speculative decoding: a running sequence about to decode one token may also get
`num_lookahead_tokens` draft slots (k, fewer where the budget, max_tokens or max_model_len leave
less): they count in the token budget and its blocks are allocated for them before the proposer
fills the drafts, never by preempting anyone (without room it simply decodes one token). After
verification the accepted drafts count as computed; rejected slots are overwritten later, and
since only computed (verified) tokens count, no block holding an unverified token is ever
registered in the prefix cache. Speculation is skipped for the whole step when more than
`disable_by_batch_size` sequences run, and per sequence for a while after its drafts were all
rejected (`adaptive`).

n > 1: the request's first sequence (the leader) computes the prompt alone; when it samples its
first token the other n-1 fork: they share the leader's full prompt blocks (all but the block
holding the last prompt token) and compute only that last partial block themselves, then sample
their own first token. Their sequence slots are reserved when the leader is admitted.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from paged_engine.core.batch import (
    ModelRunnerOutput,
    NewSequenceData,
    SampleLogprobs,
    ScheduledSequence,
    SchedulerOutput,
)
from paged_engine.core.block_manager import BlockManager
from paged_engine.core.sequence import Request, Sequence, SequenceStatus

if TYPE_CHECKING:
    from paged_engine.config import EngineConfig

# Longest run of steps a sequence skips speculation after its drafts were all rejected.
MAX_SPEC_BACKOFF_STEPS = 16


class Scheduler:
    """Decides what every step computes, owns the waiting queue, running list and block manager.

    Args:
        config: the engine config (block_size, max_num_seqs, max_num_batched_tokens,
            enable_prefix_caching, max_model_len, speculative_config are used).
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
        self.seqs_by_id: dict[int, Sequence] = {}  # unfinished sequences (batches name them by id)
        self._pending_finished_seq_ids: list[int] = []
        self._running_dirty = False
        spec = getattr(config, "speculative_config", None)
        self.num_spec_tokens = spec.num_speculative_tokens if spec is not None else 0
        self.spec_disable_by_batch_size = spec.disable_by_batch_size if spec is not None else None
        self.spec_adaptive = spec.adaptive if spec is not None else False
        self.max_model_len = getattr(config, "max_model_len", None)
        # counters
        self.num_preemptions = 0
        self.prefix_cache_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_cache_hits = 0     # of those, tokens served from the cache
        self.spec_num_drafts = 0           # sequence-steps that verified at least one draft
        self.spec_num_draft_tokens = 0     # draft tokens verified
        self.spec_num_accepted_tokens = 0  # of those, accepted
        self.spec_accepted_per_pos = [0] * self.num_spec_tokens  # accepted at draft position j

    # -- requests in and out --

    def add_request(self, request: Request) -> None:
        for seq in request.seqs:
            self.seqs_by_id[seq.seq_id] = seq
        self.waiting.append(request.leader)

    def _drop_runner_copy(self, seq: Sequence) -> None:
        if seq.runner_has_copy:
            seq.runner_has_copy = False
            self._pending_finished_seq_ids.append(seq.seq_id)

    def finish_seq(self, seq: Sequence, reason: str, stop_reason=None) -> None:
        """End a sequence (stop, length, abort): free its blocks now, tell the runner next step."""
        if seq.status == SequenceStatus.FINISHED:
            return
        if seq.status == SequenceStatus.RUNNING:
            self.block_manager.free(seq)
            self._running_dirty = True
        elif seq.status in (SequenceStatus.WAITING, SequenceStatus.WAITING_FOR_GRAMMAR):
            self.waiting.remove(seq)
            self.block_manager.free(seq)  # holds none; kept for safety
        elif seq.status == SequenceStatus.PENDING_FORK:
            seq.request.pending_children.remove(seq)
        self._drop_runner_copy(seq)
        self.seqs_by_id.pop(seq.seq_id, None)
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

    def _num_lookahead(self, seq: Sequence, num_new_tokens: int, budget: int) -> int:
        """Draft slots for `seq` this step (0 unless it decodes its last token)."""
        if num_new_tokens != 1 or seq.num_computed_tokens + 1 != seq.num_tokens:
            return 0
        if seq.spec_skip_steps > 0:
            seq.spec_skip_steps -= 1
            return 0
        k = min(self.num_spec_tokens, budget - 1)
        max_tokens = seq.params.max_tokens
        if max_tokens is not None:  # drafts past max_tokens would be dropped unseen
            k = min(k, max_tokens - seq.num_output_tokens - 1)
        if self.max_model_len is not None:  # draft positions stay below max_model_len
            k = min(k, self.max_model_len - seq.num_tokens)
        return max(k, 0)

    def _schedule_seq(self, seq: Sequence, num_new_tokens: int, num_lookahead: int = 0
                      ) -> ScheduledSequence:
        """The plain-data work item of `seq` for this step; brings its runner fields up to date."""
        start = seq.num_computed_tokens
        scheduled = ScheduledSequence(
            seq_id=seq.seq_id,
            start_pos=start,
            num_tokens=num_new_tokens,
            do_sample=start + num_new_tokens == seq.num_tokens,
            num_lookahead_tokens=num_lookahead,
        )
        table = seq.block_table
        if not seq.runner_has_copy:
            scheduled.new = NewSequenceData(
                prompt_token_ids=list(seq.prompt_token_ids),
                output_token_ids=list(seq.output_token_ids),
                block_ids=list(table),
                params=seq.params,
            )
            seq.runner_has_copy = True
        else:
            if seq.num_runner_tokens < seq.num_tokens:
                scheduled.new_token_ids = seq.token_slice(seq.num_runner_tokens, seq.num_tokens)
            if seq.num_runner_blocks < len(table):
                scheduled.new_block_ids = table[seq.num_runner_blocks:]
        seq.num_runner_tokens = seq.num_tokens
        seq.num_runner_blocks = len(table)
        return scheduled

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self._drop_runner_copy(seq)
        self.num_preemptions += 1

    def schedule(self) -> SchedulerOutput:
        self.remove_finished()
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSequence] = []
        preempted = False

        speculate = self.num_spec_tokens > 0 and (
            self.spec_disable_by_batch_size is None
            or len(self.running) <= self.spec_disable_by_batch_size)

        # 1. running sequences, oldest admission first
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            assert num_new > 0, seq
            lookahead = self._num_lookahead(seq, num_new, budget) if speculate else 0
            # Draft slots only where blocks are free: never preempt for a speculation.
            if lookahead and self.block_manager.allocate(seq, num_new + lookahead):
                scheduled.append(self._schedule_seq(seq, num_new, lookahead))
                budget -= num_new + lookahead
                i += 1
                continue
            fits = True
            while not self.block_manager.allocate(seq, num_new):
                victim = self.running.pop()  # the most recently admitted
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    fits = False
                    break
            if not fits:
                break
            scheduled.append(self._schedule_seq(seq, num_new))
            budget -= num_new
            i += 1

        # 2. admit waiting sequences, FCFS, unless this step had to preempt
        if not preempted and self.waiting:
            slots_used = self._num_seq_slots_used()
            index = 0  # the queue head, but for sequences whose grammar is still compiling
            while index < len(self.waiting) and budget > 0:
                seq = self.waiting[index]
                if seq.status is SequenceStatus.WAITING_FOR_GRAMMAR:
                    if seq.grammar is None:
                        index += 1
                        continue
                    seq.status = SequenceStatus.WAITING
                slots = 1 + (len(seq.request.pending_children) if seq.index == 0 else 0)
                if slots_used + slots > self.max_num_seqs:
                    break
                # Prompt logprobs need the logits of every prompt position: compute them all.
                cached = ([] if seq.params.prompt_logprobs is not None
                          else self.block_manager.find_cached_prefix(seq))
                num_computed = len(cached) * self.block_size
                num_new = min(seq.num_tokens - num_computed, budget)
                if not self.block_manager.allocate(seq, num_new, cached):
                    break
                del self.waiting[index]
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
                scheduled.append(self._schedule_seq(seq, num_new))
                budget -= num_new

        finished_ids: list[int] = []
        if scheduled:
            # Held back while nothing runs, so the runner hears of them with the next real batch.
            finished_ids, self._pending_finished_seq_ids = self._pending_finished_seq_ids, []
        return SchedulerOutput(
            seqs=scheduled,
            num_batched_tokens=self.max_num_batched_tokens - budget,
            finished_seq_ids=finished_ids,
        )

    # -- after the runner --

    def update_from_output(
        self, batch: SchedulerOutput, output: ModelRunnerOutput
    ) -> list[tuple[Sequence, list[int], list[SampleLogprobs]]]:
        """Advance computed tokens, append sampled tokens, register full blocks, fork n>1 children.

        With k draft tokens verified, the KV of the accepted ones (all sampled tokens but the
        last) is valid, so they count as computed; rejected slots are simply overwritten later.
        Returns (sequence, its new token ids, their logprobs) for every sequence that sampled;
        the output processor then decides where each stops (and drops tokens past a stop).
        """
        results = []
        register_full_blocks = self.block_manager.register_full_blocks
        seqs_by_id = self.seqs_by_id
        for scheduled, tokens, logprobs in zip(batch.seqs, output.sampled_token_ids, output.logprobs):
            seq = seqs_by_id.get(scheduled.seq_id)
            if seq is None or seq.status is not SequenceStatus.RUNNING:
                continue  # aborted while the step ran
            num_accepted_drafts = len(tokens) - 1 if tokens else 0
            if scheduled.draft_token_ids and tokens:
                self._count_spec(seq, len(scheduled.draft_token_ids), num_accepted_drafts)
            seq.num_computed_tokens += scheduled.num_tokens + num_accepted_drafts
            if tokens:
                seq.output_token_ids.extend(tokens)
            register_full_blocks(seq)
            if not tokens:
                continue
            results.append((seq, tokens, logprobs))
            if seq.index == 0 and seq.request.pending_children:
                self._fork_children(seq)
        return results

    def _count_spec(self, seq: Sequence, num_drafts: int, num_accepted: int) -> None:
        self.spec_num_drafts += 1
        self.spec_num_draft_tokens += num_drafts
        self.spec_num_accepted_tokens += num_accepted
        per_pos = self.spec_accepted_per_pos
        for j in range(min(num_accepted, len(per_pos))):
            per_pos[j] += 1
        if self.spec_adaptive:
            if num_accepted == 0:  # verification compute spent for nothing: back off
                seq.spec_backoff_steps = min(max(1, 2 * seq.spec_backoff_steps), MAX_SPEC_BACKOFF_STEPS)
                seq.spec_skip_steps = seq.spec_backoff_steps
            else:
                seq.spec_backoff_steps = 0

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
