"""SequenceGrammar: one sequence's grammar matcher (xgrammar's GrammarMatcher).

The matcher's state is "the sequence's output so far". The output processor advances it with
each token the sequence keeps (`accept_token`); the engine asks it, before the runner runs, for
the bitmask of the tokens allowed next (`next_token_bitmask`): with speculative drafts, one row
per verified position, found by walking the drafts through the matcher and rolling back, and
the drafts are cut at the first one the grammar rejects (the target could never accept it).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


class SequenceGrammar:
    """The grammar state of one output sequence.

    Args:
        compiled: an xgrammar CompiledGrammar.
        vocab_size: logits width (the bitmask has ceil(vocab_size / 32) int32 words per row).
    """

    __slots__ = ("_matcher", "_vocab_size", "_xgr")

    def __init__(self, compiled, vocab_size: int):
        import xgrammar

        self._xgr = xgrammar
        self._matcher = xgrammar.GrammarMatcher(compiled)
        self._vocab_size = vocab_size

    def accept_token(self, token_id: int) -> bool:
        """Advance by one token; False (state unchanged) when the grammar does not allow it."""
        return bool(self._matcher.accept_token(int(token_id)))

    def is_terminated(self) -> bool:
        """The grammar has ended (it accepted a stop token where it may end)."""
        return bool(self._matcher.is_terminated())

    def next_token_bitmask(self, draft_token_ids: Sequence[int] = ()) -> tuple[np.ndarray, list[int]]:
        """The allowed tokens after the output, and after each grammar-valid draft prefix.

        Returns (bitmask, drafts): bitmask int32 [len(drafts) + 1, ceil(vocab / 32)], bit t of
        row j set when token t may follow the output and drafts[:j]; drafts is the longest
        prefix of draft_token_ids the grammar accepts, cut before a draft that would end the
        grammar (no position follows the end; the target samples that stop token itself).
        The matcher is left as it was.
        """
        xgr = self._xgr
        matcher = self._matcher
        bitmask = xgr.allocate_token_bitmask(len(draft_token_ids) + 1, self._vocab_size)
        matcher.fill_next_token_bitmask(bitmask, 0)
        walked = kept = 0  # tokens fed to the matcher, drafts kept
        for j, token_id in enumerate(draft_token_ids):
            if not matcher.accept_token(int(token_id)):
                break
            walked += 1
            if matcher.is_terminated():
                break  # a stop token: leave it to the target, see above
            kept += 1
            matcher.fill_next_token_bitmask(bitmask, j + 1)
        if walked:
            matcher.rollback(walked)
        return bitmask[: kept + 1].numpy(), list(draft_token_ids[:kept])
