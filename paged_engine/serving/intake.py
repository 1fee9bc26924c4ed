"""Request intake: size limits, and text prompts tokenized off the engine thread.

A prompt costs its sender only. Two limits keep one request from stalling everyone else's:

- A byte cap on the prompt text (`max_prompt_bytes`), checked in `execute` before anything is
  decoded or tokenized. The default follows from `max_model_len`: no token of the vocabulary
  spans more than `longest_token_bytes` bytes of text, so a prompt longer than
  `max_model_len * longest_token_bytes` bytes cannot fit in the model, and is refused unread.
  (That bound holds for tokenizers whose normalizer never shortens text: byte-level BPE,
  SentencePiece with byte fallback, and no normalizer at all. A tokenizer with a normalizer gets
  four times the headroom, since Unicode normalization can shrink text up to threefold.)
- Text prompts are tokenized here, on the intake thread with its own copy of the tokenizer, not
  inside `LLMEngine.add_request` on the engine thread, which would stop every stream while it
  runs. Tokenization is truncated at `max_model_len + 1` tokens: a prompt that long is refused
  anyway, and the Python list of its ids is what holds the interpreter lock.

It also decides a request whose `max_tokens` cannot fit (vLLM's OpenAI server's rule): an explicit
`max_tokens` with prompt + max_tokens > max_model_len is an error naming the numbers. Without an
explicit `max_tokens` the default (16) applies and generation stops at max_model_len with
finish_reason "length".
"""

from __future__ import annotations

import copy
import queue
import threading
import traceback
from typing import Callable

# Unicode normalization (NFKC) can map three UTF-8 bytes to one (full-width forms).
_NORMALIZER_HEADROOM = 4


class RequestTooLarge(ValueError):
    """A request that exceeds a size limit; the message names the limit (INVALID_ARG)."""


def longest_token_bytes(tokenizer) -> int:
    """The most UTF-8 bytes any vocabulary entry (added tokens included) is written with.

    Byte-level BPE writes one text byte as one or two bytes of its alphabet and SentencePiece
    writes a space as the three-byte "▁", so this is never less than the text a token covers.
    """
    vocab = tokenizer.get_vocab()
    return max((len(token.encode("utf-8")) for token in vocab), default=1) or 1


def default_max_prompt_bytes(tokenizer, max_model_len: int) -> int:
    """The byte cap that refuses no prompt that fits in max_model_len tokens (see module doc)."""
    per_token = longest_token_bytes(tokenizer)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(backend, "normalizer", None) is not None:
        per_token *= _NORMALIZER_HEADROOM
    return int(max_model_len) * per_token


def parse_max_prompt_bytes(value: str | None, tokenizer, max_model_len: int | None) -> int | None:
    """The `max_prompt_bytes` model parameter: "auto" (or unset) derives it, "0" turns it off,
    a positive integer sets it. Raises ValueError naming a bad value."""
    text = (value or "auto").strip().lower()
    if text in ("auto", "") or text.startswith("${"):
        return default_max_prompt_bytes(tokenizer, max_model_len) if max_model_len else None
    try:
        number = int(text)
    except ValueError:
        raise ValueError(f"max_prompt_bytes must be 'auto', 0 (off) or a positive integer, "
                         f"got {value!r}") from None
    if number < 0:
        raise ValueError(f"max_prompt_bytes must be 'auto', 0 (off) or a positive integer, "
                         f"got {value!r}")
    return number or None


def check_prompt_bytes(num_bytes: int, max_prompt_bytes: int | None, what: str = "text_input"):
    if max_prompt_bytes is not None and num_bytes > max_prompt_bytes:
        raise RequestTooLarge(
            f"input '{what}' is too large: {num_bytes} bytes, the limit is {max_prompt_bytes} "
            f"bytes (no prompt that long fits in max_model_len tokens; the model parameter "
            f"max_prompt_bytes sets the limit)")


def check_lengths(num_prompt_tokens: int, max_tokens: int | None, max_tokens_given: bool,
                  max_model_len: int | None, truncated: bool = False) -> None:
    """Refuse a prompt longer than max_model_len, and an explicit max_tokens that cannot fit."""
    if max_model_len is None:
        return
    if truncated or num_prompt_tokens > max_model_len:
        count = f"more than {max_model_len}" if truncated else str(num_prompt_tokens)
        raise RequestTooLarge(
            f"prompt is too long: {count} tokens, max_model_len is {max_model_len}")
    if max_tokens_given and max_tokens is not None \
            and num_prompt_tokens + max_tokens > max_model_len:
        raise RequestTooLarge(
            f"max_tokens ({max_tokens}) is too large: the prompt has {num_prompt_tokens} tokens "
            f"and max_model_len is {max_model_len}, so at most "
            f"{max_model_len - num_prompt_tokens} tokens can be generated")


def encode_prompt(tokenizer, prompt: str, max_model_len: int | None) -> tuple[list[int], bool]:
    """(token ids, truncated): what `LLMEngine.add_request` would make of the text prompt
    (`tokenizer(prompt).input_ids`), cut at max_model_len + 1 tokens when given."""
    if max_model_len is None:
        return list(tokenizer(prompt).input_ids), False
    ids = list(tokenizer(prompt, truncation=True, max_length=max_model_len + 1).input_ids)
    return ids, len(ids) > max_model_len


class PromptTokenizer:
    """Tokenizes text prompts on its own thread, with its own copy of the tokenizer.

    Args:
        tokenizer: the engine's tokenizer (copied: Hugging Face fast tokenizers are not safe to
            share between threads that change their truncation settings).
        max_model_len: prompts are cut at max_model_len + 1 tokens (and then refused).
        on_ready: called with (item, token ids) once tokenized.
        on_error: called with (item, message) when tokenization fails.
        logger: `pb_utils.Logger`-like.
    """

    def __init__(self, tokenizer, max_model_len: int | None, on_ready: Callable,
                 on_error: Callable, logger):
        try:
            self._tokenizer = copy.deepcopy(tokenizer)
        except Exception:  # a tokenizer that does not copy: the same object, used by this thread only
            self._tokenizer = tokenizer
        self._max_model_len = max_model_len
        self._on_ready = on_ready
        self._on_error = on_error
        self._logger = logger
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="paged-llm-intake", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def put(self, item, prompt: str) -> None:
        self._queue.put((item, prompt))

    def stop(self, timeout_s: float = 5.0) -> list:
        """End the thread; returns the items that were still waiting."""
        self._queue.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        left = []
        while True:
            try:
                entry = self._queue.get_nowait()
            except queue.Empty:
                return left
            if entry is not None:
                left.append(entry[0])

    def _run(self) -> None:
        while True:
            entry = self._queue.get()
            if entry is None:
                return
            item, prompt = entry
            try:
                ids, truncated = encode_prompt(self._tokenizer, prompt, self._max_model_len)
            except Exception as e:
                self._logger.log_warn(f"paged_llm: tokenizing a prompt failed: "
                                      f"{traceback.format_exc()}")
                self._on_error(item, f"could not tokenize the prompt: {e!r}")
                continue
            self._on_ready(item, ids, truncated)
