"""The two seams of an engine step, as plain data: `SchedulerOutput` (scheduler -> runner) and
`ModelRunnerOutput` (runner -> scheduler).

Both hold only ints, lists, strings and `SamplingParams` (itself plain data): copies, never the
engine's own lists or objects, so a batch can be pickled to a tensor-parallel worker, kept, or
compared in a test. The runner keeps its own copy of each sequence's tokens and block table
(vLLM v1's `CachedRequestState`): a sequence arrives once with everything (`NewSequenceData`), and
from then on each step carries only what changed, so a decode step of a long sequence costs a
few ints, not its whole history. `finished_seq_ids` tells the runner which copies to drop
(finished, aborted and preempted sequences; a preempted one comes back later as new).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import numpy as np

    from paged_engine.sampling_params import SamplingParams


@dataclass
class NewSequenceData:
    """Everything the runner needs about a sequence it does not hold yet.

    Sent on a sequence's first step, after an n>1 fork and when a preempted sequence resumes.
    """

    prompt_token_ids: list[int]
    output_token_ids: list[int]  # generated before this step (non-empty after preemption)
    block_ids: list[int]         # the whole block table
    params: "SamplingParams"


@dataclass
class ScheduledSequence:
    """The work of one sequence in one step.

    The runner computes the KV of tokens [start_pos, start_pos + num_tokens) of the sequence,
    then, when `do_sample`, samples after the last one. `draft_token_ids` (speculative decoding)
    are proposed tokens that follow them: the runner computes their KV too and verifies them.
    `num_lookahead_tokens` is how many draft slots the scheduler reserved (blocks and token
    budget): the proposer fills at most that many drafts, before the batch goes to the runner.
    `grammar_bitmask` (structured outputs) is filled by the engine after the proposer.
    """

    seq_id: int
    start_pos: int                   # tokens whose KV is in the cache before this step
    num_tokens: int                  # tokens whose KV this step computes (a prefill chunk, or 1)
    do_sample: bool                  # the chunk ends at the sequence's last known token
    new_token_ids: list[int] = field(default_factory=list)  # appended since the runner's copy
    new_block_ids: list[int] = field(default_factory=list)  # appended to the block table since
    new: NewSequenceData | None = None                      # set when the runner has no copy
    draft_token_ids: list[int] = field(default_factory=list)
    num_lookahead_tokens: int = 0
    # Structured outputs: the tokens the sequence's grammar allows at each sampled position,
    # numpy int32 [len(draft_token_ids) + 1, ceil(vocab / 32)], bit t of word t // 32 set when
    # token t is allowed (xgrammar's layout). None: unconstrained.
    grammar_bitmask: "np.ndarray | None" = None


@dataclass
class SchedulerOutput:
    seqs: list[ScheduledSequence]    # any mix of prefill chunks and decodes, in schedule order
    num_batched_tokens: int
    finished_seq_ids: list[int]      # the runner drops these copies before this step's work

    @property
    def is_empty(self) -> bool:
        return not self.seqs


class SampleLogprobs(NamedTuple):
    """Logprobs of one sampled token: its raw logprob, its 1-based rank, the top-N alternatives."""

    logprob: float
    rank: int
    top: list[tuple[int, float]]  # [(token_id, logprob)] best first, N = params.logprobs


class PromptLogprobs(NamedTuple):
    """Logprobs of the prompt tokens first_index, first_index + 1, ... (one chunk's worth)."""

    first_index: int
    logprobs: list[SampleLogprobs]


@dataclass
class ModelRunnerOutput:
    """Per scheduled sequence, in batch order: the tokens it sampled this step.

    An empty list for a prefill chunk that does not reach the sequence's end; one token for a
    plain decode; 1..k+1 when k draft tokens were verified. `logprobs` runs parallel to
    `sampled_token_ids` (one entry per sampled token). `prompt_logprobs` holds, for sequences
    whose params ask for them, the logprobs of the prompt tokens this step's logits predict.
    """

    sampled_token_ids: list[list[int]]
    logprobs: list[list[SampleLogprobs]]
    prompt_logprobs: list[PromptLogprobs | None] | None = None

    @classmethod
    def empty(cls, num_seqs: int = 0) -> "ModelRunnerOutput":
        return cls([[] for _ in range(num_seqs)], [[] for _ in range(num_seqs)])
