"""What the engine returns: RequestOutput with one CompletionOutput per sampled sequence.

Each `LLMEngine.step()` returns fresh snapshots (later steps never mutate them), so a serving
thread can hand them to another thread safely. (`CompletionOutput.token_ids` is copied from the
engine's append-only list when first read, which gives the same list.)
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    """Logprob of one token under the raw model distribution (log_softmax of the logits)."""

    logprob: float
    rank: int  # 1 = most likely
    decoded_token: str


@dataclass
class CompletionOutput:
    """One output sequence of a request.

    Attributes:
        index: which of the request's n outputs.
        token_ids: all token ids generated so far (an EOS / stop token that ended it included).
        text: all text so far, cut before the matched stop string (after it with
            include_stop_str_in_output). Text that could still become a stop string is held back
            until it is decided, so `text` only ever grows.
        new_token_ids: the token ids generated in this step.
        new_text: this step's text delta; the concatenation of every step's new_text == text.
        finish_reason: None while running, else "stop" | "length" | "abort" | "error" (the
            request failed after it was queued: `RequestOutput.error` says why).
        stop_reason: the matched stop string or stop token id; None for EOS / length / abort.
        cumulative_logprob: sum of the generated tokens' logprobs (0.0 unless the runner
            returned logprobs, i.e. SamplingParams.logprobs was set).
        logprobs: None, or per generated token a dict token_id -> Logprob (the sampled token
            plus the top-N).
        detok_window: (ids, read_offset): recent prompt+output token ids from which
            `detokenizer.decode_window(tokenizer, ids, read_offset)` reproduces this step's raw
            detokenizer delta (equal to new_text unless a stop string held back or cut text).
    """

    index: int
    token_ids: list[int]
    text: str
    new_token_ids: list[int] = field(default_factory=list)
    new_text: str = ""
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    cumulative_logprob: float = 0.0
    logprobs: list[dict[int, Logprob]] | None = None
    detok_window: tuple[list[int], int] = field(default_factory=lambda: ([], 0))

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class LivePrefix:
    """The first `length` items of `items`, a list that is only ever appended to.

    The engine passes one as `CompletionOutput.token_ids` instead of a copy; the copy is made
    on first read. Copying every sequence's ids every step costs O(tokens so far) per token,
    the largest host cost of a long decode batch, and most steps' outputs are never read whole.
    """

    __slots__ = ("items", "length")

    def __init__(self, items: list[int], length: int):
        self.items = items
        self.length = length


def _get_token_ids(self: CompletionOutput) -> list[int]:
    ids = self._token_ids
    if isinstance(ids, LivePrefix):
        ids = self._token_ids = ids.items[: ids.length]
    return ids


def _set_token_ids(self: CompletionOutput, ids: list[int] | LivePrefix) -> None:
    self._token_ids = ids


# Set after @dataclass, so the generated __init__, __eq__ and __repr__ go through it.
CompletionOutput.token_ids = property(_get_token_ids, _set_token_ids,
                                      doc="All token ids generated so far (a list).")


@dataclass
class RequestOutput:
    """The state of one request after a step (or at the end of LLM.generate).

    Attributes:
        request_id: the id given to add_request.
        prompt: the prompt text when one was given, else None.
        prompt_token_ids: the tokenized prompt.
        outputs: n CompletionOutputs in index order.
        finished: all outputs finished.
        num_cached_tokens: prompt tokens served from the prefix cache.
        prompt_logprobs: with SamplingParams.prompt_logprobs, per prompt token (computed so
            far; all of them once the first token is generated) None for the first, then a dict
            token id -> Logprob of the actual token and the top-N; else None.
        error: why the request failed after it was queued (an output with finish_reason
            "error": its structured_outputs grammar did not compile, or left nothing to
            sample); None otherwise.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    error: str | None = None

    # Conveniences for outputs[0] (the common n=1 case).
    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def stop_reason(self) -> str | int | None:
        return self.outputs[0].stop_reason

    @property
    def logprobs(self) -> list[dict[int, Logprob]] | None:
        return self.outputs[0].logprobs

    @property
    def cumulative_logprob(self) -> float:
        return self.outputs[0].cumulative_logprob

    @property
    def new_token_ids(self) -> list[int]:
        return self.outputs[0].new_token_ids

    @property
    def new_text(self) -> str:
        return self.outputs[0].new_text
