"""Build the output tensors of one `paged_llm` response from an engine `RequestOutput`.

Returns plain numpy arrays keyed by output name; the sender thread wraps them in
`pb_utils.Tensor`s, so this module runs (and is tested) without Triton.

Text outputs follow vllm_backend: one element per completion (`n` of them); streaming responses
carry this step's deltas, a non-streaming response carries the whole text, with the prompt in
front unless `exclude_input_in_output`.

Token outputs feed the ensemble's stateless postprocessing model: `output_ids` is a short window
of generated token ids and `output_read_offset` says where the ids to decode start in it;
`output_final` marks the last response (its decode also emits a held-back tail, as `flush()`
does). The response's text is `decode_window(tokenizer, output_ids, output_read_offset,
final=output_final)[output_text_offset:][:output_text_length]` (length -1: to the end); offset and
length differ from 0 / -1 only around stop strings (see TextWindow).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np


def _logprob_value(entry: Any) -> float:
    return float(getattr(entry, "logprob", entry))


def _position_json(per_token) -> dict | None:
    if per_token is None:
        return None
    return {
        str(token_id): {
            "logprob": _logprob_value(lp),
            "rank": getattr(lp, "rank", None),
            "decoded_token": getattr(lp, "decoded_token", None),
        }
        for token_id, lp in per_token.items()
    }


def _logprobs_json(completion, num_new_tokens: int, all_tokens: bool) -> str:
    """vllm_backend's `logprobs` element: per token {token_id: {logprob, rank, decoded_token}}."""
    logprobs = completion.logprobs
    if logprobs is None:
        return "null"
    items = logprobs if all_tokens else logprobs[len(logprobs) - num_new_tokens:]
    return json.dumps([_position_json(per_token) for per_token in items], ensure_ascii=False)


def _prompt_logprobs_json(output) -> str:
    """Per prompt token, as `logprobs` (the actual token first, then the top-N). Nothing predicts
    the first token: its entry names the token with logprob, rank and decoded_token null."""
    entries = []
    for token_id, per_token in zip(output.prompt_token_ids, output.prompt_logprobs):
        entry = _position_json(per_token)
        if entry is None:
            entry = {str(token_id): {"logprob": None, "rank": None, "decoded_token": None}}
        entries.append(entry)
    return json.dumps(entries, ensure_ascii=False)


def _chosen_logprobs(completion, token_ids: list[int]) -> list[float]:
    """Logprob of each token in token_ids (the last len(token_ids) generated); 0.0 if unknown."""
    logprobs = completion.logprobs
    if not logprobs:
        return [0.0] * len(token_ids)
    tail = logprobs[len(logprobs) - len(token_ids):]
    chosen = []
    for token_id, per_token in zip(token_ids, tail):
        entry = per_token.get(token_id) if per_token else None
        chosen.append(_logprob_value(entry) if entry is not None else 0.0)
    return chosen


def _num_detokenized(completion, include_stop_str_in_output: bool) -> int:
    """Generated ids that reached the engine's detokenizer: an EOS / stop token id that ended
    the output does not (unless include_stop_str_in_output)."""
    end = len(completion.token_ids)
    if (completion.finish_reason == "stop" and not isinstance(completion.stop_reason, str)
            and not include_stop_str_in_output):
        end -= 1
    return end


class WindowMismatch(ValueError):
    """The token window does not decode to a text holding the engine's text; args[1] is the
    window sent anyway."""


class TextWindow:
    """Chooses the token window of each response of one request (output 0).

    The engine's `detok_window` reproduces the detokenizer's raw text delta of a step. The text
    the engine sends can lag behind that (text that may become a stop string is held back) or
    stop short of it (cut at a stop string); then the window reaches back to an anchor, the
    start of a window whose decode holds everything sent since, and `text_skip` / `text_length`
    pick this response's characters out of its decode. The anchor also covers a step whose own
    window does not reproduce its text. Positions are in the generated token ids (the output
    text is theirs decoded alone).
    """

    def __init__(self, tokenizer, decode_window, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._decode_window = decode_window
        self._skip_special_tokens = skip_special_tokens
        # (context start, read start, text sent since read start), or None before the first step.
        self._anchor: tuple[int, int, str] | None = None
        self._pending = False  # the engine holds back text the anchor's decode already has

    def _decode(self, ids: list[int], read_offset: int, final: bool) -> str:
        return self._decode_window(self._tokenizer, ids, read_offset,
                                   skip_special_tokens=self._skip_special_tokens, final=final)

    def _try(self, token_ids, context_start, read_start, end, sent, new_text, final):
        ids = list(token_ids[context_start:end])
        read_offset = read_start - context_start
        decoded = self._decode(ids, read_offset, final)
        wanted = sent + new_text
        if decoded == wanted:
            self._anchor, self._pending = (context_start, read_start, wanted), False
            return ids, read_offset, len(sent), -1
        if decoded.startswith(wanted):
            self._anchor, self._pending = (context_start, read_start, wanted), True
            return ids, read_offset, len(sent), len(new_text)
        raise WindowMismatch(
            f"token window does not reproduce the text: decoded {decoded!r}, engine sent "
            f"{wanted!r}", (ids, read_offset, len(sent), len(new_text)))

    def step(self, completion, final: bool, include_stop_str_in_output: bool = False
             ) -> tuple[list[int], int, int, int]:
        """(ids, read_offset, text_skip, text_length) of one streamed response."""
        token_ids = completion.token_ids
        end = _num_detokenized(completion, include_stop_str_in_output)
        new_text = completion.new_text
        if not self._pending:
            window_ids, window_read = completion.detok_window
            context_start = end - len(window_ids)
            try:
                return self._try(token_ids, context_start, context_start + window_read, end, "",
                                 new_text, final)
            except WindowMismatch:
                if self._anchor is None:
                    raise
        context_start, read_start, sent = self._anchor
        return self._try(token_ids, context_start, read_start, end, sent, new_text, final)

    def whole(self, completion, prompt_token_ids, include_prompt: bool,
              include_stop_str_in_output: bool = False):
        """(ids, read_offset, text_skip, text_length) of a response with the whole output."""
        output_ids = list(completion.token_ids[:_num_detokenized(completion,
                                                                 include_stop_str_in_output)])
        if include_prompt:
            # TensorRT-LLM style: the prompt's tokens decode in front of the output.
            ids = list(prompt_token_ids) + output_ids
            wanted = self._decode(list(prompt_token_ids), 0, True) + completion.text
        else:
            ids = output_ids
            wanted = completion.text
        decoded = self._decode(ids, 0, True)
        if decoded == wanted:
            return ids, 0, 0, -1
        if decoded.startswith(wanted):
            return ids, 0, 0, len(wanted)
        raise WindowMismatch(
            f"token window does not reproduce the text: decoded {decoded!r}, engine sent "
            f"{wanted!r}", (ids, 0, 0, -1))


def build_outputs(parsed, output, *, prompt_text: str | None,
                  text_window: TextWindow | None = None,
                  on_window_mismatch=None, first_response: bool = True) -> dict[str, np.ndarray]:
    """Output arrays of one response.

    Args:
        parsed: the request's ParsedRequest.
        output: the engine's RequestOutput of this step (streaming) or at finish (non-streaming).
        prompt_text: the prompt as text, put in front in non-streaming responses unless excluded.
        text_window: the request's TextWindow, needed for token outputs (parsed.token_outputs).
        on_window_mismatch: called with a message when the token window cannot reproduce the
            engine's text (the window is sent anyway).
        first_response: whether this is the request's first response: the prompt's logprobs
            (SamplingParams.prompt_logprobs) go out once, with it.
    Returns:
        output name -> numpy array.
    """
    whole = not parsed.stream
    completions = list(output.outputs)
    prepend = "" if (parsed.exclude_input_in_output or not whole) else (prompt_text or "")
    texts = [prepend + (c.text if whole else c.new_text) for c in completions]
    out: dict[str, np.ndarray] = {"text_output": np.array(texts, dtype=np.object_)}
    if parsed.return_finish_reason:
        out["finish_reason"] = np.array([str(c.finish_reason) for c in completions],
                                        dtype=np.object_)
    if parsed.return_cumulative_logprob:
        out["cumulative_logprob"] = np.array(
            [float(c.cumulative_logprob or 0.0) for c in completions], dtype=np.float32)
    if parsed.return_logprobs:
        out["logprobs"] = np.array(
            [_logprobs_json(c, len(c.new_token_ids), whole) for c in completions],
            dtype=np.object_)
    if (first_response and getattr(output, "prompt_logprobs", None) is not None
            and getattr(parsed.params, "prompt_logprobs", None) is not None):
        out["prompt_logprobs"] = np.array([_prompt_logprobs_json(output)], dtype=np.object_)
    if parsed.return_num_input_tokens:
        out["num_input_tokens"] = np.array([len(output.prompt_token_ids)], dtype=np.uint32)
    if parsed.return_num_output_tokens:
        out["num_output_tokens"] = np.array(
            [len(c.token_ids) if whole else len(c.new_token_ids) for c in completions],
            dtype=np.uint32)
    if parsed.token_outputs:
        first = completions[0]
        new_ids = list(first.token_ids) if whole else list(first.new_token_ids)
        include_stop = getattr(parsed.params, "include_stop_str_in_output", False)
        try:
            if whole:
                window = text_window.whole(first, output.prompt_token_ids,
                                           include_prompt=not parsed.exclude_input_in_output,
                                           include_stop_str_in_output=include_stop)
            else:
                window = text_window.step(first, final=bool(output.finished),
                                          include_stop_str_in_output=include_stop)
        except WindowMismatch as e:
            if on_window_mismatch is not None:
                on_window_mismatch(str(e))
            window = e.args[1]
        ids, read_offset, text_skip, text_length = window
        out["output_ids"] = np.array(ids, dtype=np.int32)
        out["output_read_offset"] = np.array([read_offset], dtype=np.int32)
        out["output_text_offset"] = np.array([text_skip], dtype=np.int32)
        out["output_text_length"] = np.array([text_length], dtype=np.int32)
        out["output_final"] = np.array([bool(output.finished)], dtype=np.bool_)
        out["cum_log_probs"] = np.array([float(first.cumulative_logprob or 0.0)],
                                        dtype=np.float32)
        out["output_log_probs"] = np.array(_chosen_logprobs(first, new_ids), dtype=np.float32)
    return out
