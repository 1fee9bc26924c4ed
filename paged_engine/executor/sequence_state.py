"""The runner's own copy of each sequence it is computing, kept in step with the scheduler's batches.

A sequence arrives once with its whole state (`ScheduledSequence.new`); later steps carry only
the tokens and blocks appended since (`new_token_ids`, `new_block_ids`), and `finished_seq_ids`
drops copies. Every tensor-parallel rank applies the same batches and so holds the same copies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from paged_engine.core.batch import SchedulerOutput
    from paged_engine.sampling_params import SamplingParams


class SequenceState:
    """What the runner and the sampler read of one sequence (tokens, block table, parameters)."""

    __slots__ = ("seq_id", "prompt_token_ids", "output_token_ids", "block_table", "params")

    def __init__(self, seq_id: int, prompt_token_ids: list[int], output_token_ids: list[int],
                 block_table: list[int], params: "SamplingParams"):
        self.seq_id = seq_id
        self.prompt_token_ids = prompt_token_ids
        self.output_token_ids = output_token_ids
        self.block_table = block_table
        self.params = params

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_slice(self, start: int, end: int) -> list[int]:
        """token_ids[start:end] of prompt + output without concatenating the whole sequence."""
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p: end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - p]


class SequenceStates:
    """seq_id -> SequenceState, updated from each SchedulerOutput."""

    def __init__(self):
        self._states: dict[int, SequenceState] = {}

    def __len__(self) -> int:
        return len(self._states)

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._states

    def get(self, seq_id: int) -> SequenceState | None:
        return self._states.get(seq_id)

    def update(self, batch: "SchedulerOutput") -> list[SequenceState]:
        """Apply a batch: drop finished copies, add new ones, extend the others.

        Returns the states of `batch.seqs`, in order. A sequence sent as new replaces any copy
        of the same id (a resumed sequence is always sent whole).
        """
        states = self._states
        for seq_id in batch.finished_seq_ids:
            states.pop(seq_id, None)
        rows = []
        for s in batch.seqs:
            new = s.new
            if new is not None:
                state = SequenceState(s.seq_id, list(new.prompt_token_ids), list(new.output_token_ids),
                                      list(new.block_ids), new.params)
                states[s.seq_id] = state
            else:
                state = states.get(s.seq_id)
                if state is None:
                    raise ValueError(f"sequence {s.seq_id} was scheduled as cached but the runner has no copy")
                if s.new_token_ids:
                    state.output_token_ids.extend(s.new_token_ids)
                if s.new_block_ids:
                    state.block_table.extend(s.new_block_ids)
            if s.start_pos + s.num_tokens > state.num_tokens:
                raise ValueError(
                    f"sequence {s.seq_id}: step computes tokens up to {s.start_pos + s.num_tokens} "
                    f"but the runner knows {state.num_tokens}")
            rows.append(state)
        return rows
