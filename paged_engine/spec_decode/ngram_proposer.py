"""N-gram (prompt lookup) proposer: drafts copied from earlier in the sequence.

For a sequence whose tokens end in t[-n:], look for the longest n in
prompt_lookup_min..prompt_lookup_max such that t[-n:] occurred earlier, and propose the tokens
that followed that occurrence (up to k of them; the most recent occurrence when several match).
Copy- and edit-heavy tasks (rewrite this code, quote this paragraph) repeat long runs of the
prompt, so the drafts are often right; verification makes wrong ones harmless. No model, no
device work: numpy over the sequence's tokens, kept per sequence and extended as it grows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from paged_engine.core.batch import SchedulerOutput
    from paged_engine.spec_decode.config import SpeculativeConfig


def ngram_propose(tokens: np.ndarray, min_n: int, max_n: int, k: int) -> list[int]:
    """Drafts for a sequence `tokens` (1-D int array): up to k tokens, or [] without a match.

    The match is the longest suffix t[-n:], min_n <= n <= max_n, that also ends at an earlier
    position e < len - 1 (occurrences may overlap the suffix); the drafts are t[e + 1: e + 1 + k].
    """
    length = len(tokens)
    if length < min_n + 1 or k < 1:
        return []
    ends = np.flatnonzero(tokens[: length - 1] == tokens[-1])  # earlier positions of the last token
    if ends.size == 0:
        return []
    matched = np.ones(ends.size, dtype=np.int64)  # matched suffix length at each end, so far
    for n in range(2, max_n + 1):
        starts = ends - (n - 1)
        ok = (matched == n - 1) & (starts >= 0)
        if not ok.any():
            break
        ok[ok] = tokens[starts[ok]] == tokens[length - n]
        matched[ok] = n
    best = int(matched.max())
    if best < min_n:
        return []
    end = int(ends[np.flatnonzero(matched == best)[-1]])  # the most recent longest match
    return tokens[end + 1: end + 1 + k].tolist()


class NgramProposer:
    """Fills `draft_token_ids` of the sequences the scheduler reserved draft slots for.

    Args:
        config: the SpeculativeConfig (prompt_lookup_min / prompt_lookup_max).
    """

    def __init__(self, config: "SpeculativeConfig"):
        self.min_n = config.prompt_lookup_min
        self.max_n = config.prompt_lookup_max
        self._tokens: dict[int, np.ndarray] = {}  # seq_id -> its tokens (capacity-doubling buffer)
        self._lengths: dict[int, int] = {}

    def _sequence_tokens(self, seq) -> np.ndarray:
        """The sequence's tokens as an array, extended by what was appended since last time."""
        seq_id, n = seq.seq_id, seq.num_tokens
        buf, have = self._tokens.get(seq_id), self._lengths.get(seq_id, 0)
        if buf is None or have > n:
            buf, have = np.empty(max(64, 2 * n), dtype=np.int64), 0
        elif len(buf) < n:
            grown = np.empty(2 * n, dtype=np.int64)
            grown[:have] = buf[:have]
            buf = grown
        if have < n:
            buf[have:n] = seq.token_slice(have, n)
        self._tokens[seq_id], self._lengths[seq_id] = buf, n
        return buf[:n]

    def propose(self, batch: "SchedulerOutput", seqs_by_id: dict) -> None:
        """Set draft_token_ids (at most num_lookahead_tokens) of each sequence in the batch."""
        for seq_id in batch.finished_seq_ids:
            self._tokens.pop(seq_id, None)
            self._lengths.pop(seq_id, None)
        for s in batch.seqs:
            if s.num_lookahead_tokens <= 0:
                continue
            seq = seqs_by_id.get(s.seq_id)
            if seq is None:
                continue
            s.draft_token_ids = ngram_propose(self._sequence_tokens(seq), self.min_n, self.max_n,
                                              s.num_lookahead_tokens)
        return None

    def shutdown(self) -> None:
        self._tokens.clear()
        self._lengths.clear()
