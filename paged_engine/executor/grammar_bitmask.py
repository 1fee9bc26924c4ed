"""Applying structured outputs' token bitmasks to the logits, before any sampling.

The engine sends, per constrained sequence, one int32 row per sampled position (bit t of word
t // 32 set when token t is allowed: xgrammar's layout); the runner stacks the rows of a step
and sets every disallowed logit to -inf, so greedy argmax, random sampling and speculative
verification all only ever pick an allowed token. Tokens past the bitmask's width (a logits
width above the grammar's vocabulary) are disallowed. Plain torch: any device.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """bool [rows, vocab_size] from int32 [rows, words]: True where the token is allowed."""
    bits = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    allowed = ((bitmask.unsqueeze(-1) >> bits) & 1).bool().reshape(bitmask.shape[0], -1)
    if allowed.shape[1] >= vocab_size:
        return allowed[:, :vocab_size]
    pad = torch.zeros(bitmask.shape[0], vocab_size - allowed.shape[1], dtype=torch.bool,
                      device=bitmask.device)
    return torch.cat([allowed, pad], dim=1)


def apply_grammar_bitmask(logits: torch.Tensor, rows: Sequence[int],
                          bitmasks: Sequence[np.ndarray]) -> None:
    """Mask, in place, the logits rows `rows` with the stacked `bitmasks` (one per row, in order).

    Args:
        logits: [num_rows, vocab] of the step's sampled positions.
        rows: indices into logits, one per bitmask row.
        bitmasks: int32 arrays [n_i, words] whose rows, concatenated, match `rows`.
    """
    if not rows:
        return
    stacked = torch.from_numpy(np.ascontiguousarray(np.concatenate(bitmasks, axis=0)))
    if stacked.shape[0] != len(rows):
        raise ValueError(f"grammar bitmask has {stacked.shape[0]} rows for {len(rows)} positions")
    allowed = unpack_bitmask(stacked.to(logits.device, non_blocking=True), logits.shape[1])
    index = torch.tensor(list(rows), dtype=torch.int64).to(logits.device, non_blocking=True)
    logits[index] = logits[index].masked_fill_(~allowed, float("-inf"))
