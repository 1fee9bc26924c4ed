"""Sequence (one output being generated) and Request (a prompt with its n sequences).

The sequence owns its state: prompt and output token ids, block table, computed and cached token
counts, what the runner has been sent of it, and the text state the output processor keeps for
stop strings. Only the block manager changes `block_table` / `block_hashes`; only the scheduler
changes `status`, `num_computed_tokens` and the runner fields; only the output processor changes
the text state. Torch-free.
"""

from __future__ import annotations

import enum
import itertools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from paged_engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"      # in the scheduler's waiting queue (new or preempted); holds no blocks
    # In the waiting queue, but its structured-output grammar is still compiling: skipped by
    # admission (others go ahead) until the engine sets its `grammar`.
    WAITING_FOR_GRAMMAR = "waiting_for_grammar"
    RUNNING = "running"      # in the running list; holds blocks for its computed tokens
    PENDING_FORK = "pending_fork"  # n>1 child waiting for its leader's prompt to be computed
    FINISHED = "finished"


_seq_counter = itertools.count()


class Sequence:
    """One output sequence: prompt + generated tokens and its KV-cache bookkeeping."""

    def __init__(self, request: "Request", index: int, params: "SamplingParams"):
        self.seq_id: int = next(_seq_counter)
        self.request = request
        self.index = index
        self.params = params
        # Shared with the request and the other children; never mutated.
        self.prompt_token_ids: list[int] = request.prompt_token_ids
        self.num_prompt_tokens = len(self.prompt_token_ids)
        self.output_token_ids: list[int] = []

        # KV-cache state (block manager)
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # chained hashes of this sequence's full blocks
        self.num_registered_blocks = 0     # leading blocks already in the prefix-cache table
        # Scheduler state
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0       # tokens whose KV is in the cache
        self.num_cached_tokens = 0         # prompt tokens served by the prefix cache (first admission)
        self.ever_admitted = False
        # What the runner holds of this sequence (see core/batch.py): nothing until it is
        # scheduled; dropped with its blocks on finish and preemption.
        self.runner_has_copy = False
        self.num_runner_tokens = 0         # tokens the runner's copy has
        self.num_runner_blocks = 0         # block-table entries the runner's copy has
        # Speculative decoding (scheduler): steps left without drafts after rejections, and the
        # current back-off length (doubles after each step that accepts none of its drafts).
        self.spec_skip_steps = 0
        self.spec_backoff_steps = 0
        # Structured outputs: the sequence's grammar matcher (structured_output/grammar.py), set
        # by the engine once compiled; None for an unconstrained sequence. Opaque here.
        self.grammar = None

        # Output state (output processor): detokenizer, text, logprobs
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.detokenizer = None
        self.output_text = ""       # detokenized so far (cut at the stop string once matched)
        self.num_emitted_chars = 0  # prefix of output_text already returned as new_text
        self.cumulative_logprob = 0.0
        self.logprobs: list | None = [] if params.logprobs is not None else None
        # Prompt logprobs (leader only): entry i for prompt token i, None for the first.
        self.prompt_logprobs: list | None = [None] if params.prompt_logprobs is not None else None
        self.pending_token_ids: list[int] = []  # generated since the last RequestOutput
        self.pending_text = ""
        self.detok_window: tuple[list[int], int] = ([], 0)

    # -- token views --

    @property
    def num_tokens(self) -> int:
        return self.num_prompt_tokens + len(self.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def last_token_id(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    def token_slice(self, start: int, end: int) -> list[int]:
        """token_ids[start:end] of prompt + output without concatenating the whole sequence."""
        p = self.num_prompt_tokens
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p : end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - p]

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def text(self) -> str:
        return self.output_text[: self.num_emitted_chars]

    def __repr__(self) -> str:
        return (
            f"Sequence(id={self.seq_id}, req={self.request.request_id!r}, idx={self.index}, "
            f"status={self.status.value}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, blocks={self.block_table})"
        )


class Request:
    """A prompt and its n output sequences (children share the prompt's KV blocks)."""

    def __init__(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: "SamplingParams",
        child_params: list["SamplingParams"],
        arrival_index: int,
    ):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.arrival_index = arrival_index
        self.seqs = [Sequence(self, i, p) for i, p in enumerate(child_params)]
        # Children 1..n-1 wait until sequence 0 (the leader) has computed the prompt, then fork:
        # they take references to its full prompt blocks instead of recomputing them.
        self.pending_children = self.seqs[1:]
        for s in self.pending_children:
            s.status = SequenceStatus.PENDING_FORK
        self.num_cached_tokens = 0
        self.prompt_counted = False
        # Why the request failed after it was queued (finish_reason "error"), e.g. its grammar
        # did not compile.
        self.error: str | None = None

    @property
    def leader(self) -> Sequence:
        return self.seqs[0]

    @property
    def is_finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)
