"""Where a sequence stops: the one place that decides it.

In vLLM's order, for each generated token: nothing stops before `min_tokens` tokens were
generated; then EOS (unless ignore_eos), then `stop_token_ids`, then the stop strings in the
text; then `max_tokens` and `max_model_len` ("length"). A suffix of the text that could still
grow into a stop string is held back from the stream until decided, so text after a stop string
never reaches a delta. The model's EOS ids are gathered here once (tokenizer, config.json and
generation_config.json: Llama 3 lists several); the engine puts them into each request's
`all_stop_token_ids`, which the sampler masks during min_tokens.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from paged_engine.core.sequence import Sequence


def model_eos_token_ids(model_dir: str, hf_config, tokenizer) -> frozenset[int]:
    """EOS ids: the tokenizer's, config.json's and generation_config.json's."""
    ids: set[int] = set()

    def add(value: Any) -> None:
        if isinstance(value, bool):
            return
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            for v in value:
                add(v)

    add(getattr(tokenizer, "eos_token_id", None))
    add(getattr(hf_config, "eos_token_id", None))
    path = os.path.join(model_dir, "generation_config.json")
    if os.path.isfile(path):
        try:
            with open(path) as f:
                add(json.load(f).get("eos_token_id"))
        except (OSError, ValueError):
            pass
    return frozenset(ids)


def find_stop_string(text: str, stops: list[str], start: int) -> tuple[int, str] | None:
    """The stop string occurrence in text[start:] that ends first: (index, stop) or None."""
    best = None
    for s in stops:
        idx = text.find(s, max(0, start))
        if idx >= 0:
            key = (idx + len(s), idx)
            if best is None or key < best[0]:
                best = (key, idx, s)
    return None if best is None else (best[1], best[2])


def partial_stop_suffix_len(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of some stop string."""
    longest = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:k]):
                longest = k
                break
    return longest


class StopChecker:
    """Stop decisions for the sequences of one engine.

    Args:
        eos_token_ids: the model's EOS ids.
        max_model_len: longest prompt + output.
    """

    def __init__(self, eos_token_ids: frozenset[int], max_model_len: int):
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len

    @staticmethod
    def stops_active(seq: "Sequence", num_output_tokens: int) -> bool:
        """Whether stops may end the sequence once it has num_output_tokens (min_tokens passed)."""
        return num_output_tokens > seq.params.min_tokens

    def token_stop(self, seq: "Sequence", token_id: int) -> tuple[str, Any] | None:
        """("stop", stop_reason) when `token_id` ends the sequence (EOS / a stop token id)."""
        params = seq.params
        if token_id in self.eos_token_ids and not params.ignore_eos:
            return "stop", None
        if token_id in params.stop_token_ids:
            return "stop", token_id
        return None

    def string_stop(self, seq: "Sequence", prev_len: int) -> str | None:
        """The stop string that text added after `prev_len` completes, or None.

        On a match the sequence's text is cut before the stop string (after it with
        include_stop_str_in_output), never into text already returned.
        """
        params = seq.params
        if not params.stop:
            return None
        max_stop_len = max(len(s) for s in params.stop)
        match = find_stop_string(seq.output_text, params.stop, prev_len - max_stop_len + 1)
        if match is None:
            return None
        idx, s = match
        end = idx + len(s) if params.include_stop_str_in_output else idx
        seq.output_text = seq.output_text[: max(end, seq.num_emitted_chars)]
        return s

    def length_stop(self, seq: "Sequence", num_output_tokens: int) -> bool:
        """max_tokens reached, or the sequence filled max_model_len."""
        max_tokens = seq.params.max_tokens
        if max_tokens is not None and num_output_tokens >= max_tokens:
            return True
        return seq.num_prompt_tokens + num_output_tokens >= self.max_model_len

    @staticmethod
    def held_back_chars(seq: "Sequence") -> int:
        """Characters at the end of the text that may still become a stop string."""
        return partial_stop_suffix_len(seq.output_text, seq.params.stop) if seq.params.stop else 0
