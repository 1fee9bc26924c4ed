"""SamplingParams: per-request generation parameters, validated on construction.

Semantics follow vLLM: `temperature=0` is greedy; `top_k` -1 (or 0) disables top-k; penalties as
in vLLM (repetition over prompt + output, presence/frequency over the output); `logprobs=N` returns
the sampled token's logprob plus the top-N of the raw model distribution; `min_tokens` suppresses
EOS, `stop_token_ids` and stop strings until that many tokens were generated; `bad_words` are
words the output must not contain (the engine tokenizes them, see `bad_words_token_ids`);
`logit_bias` maps token ids to a value added to their logits before sampling (vLLM / OpenAI).

`structured_outputs` (vLLM's `StructuredOutputsParams`) constrains the output to a JSON schema,
any JSON object, a regular expression, one of a list of strings, or an EBNF grammar: the engine
masks every token the grammar does not allow (paged_engine/structured_output/).

`SamplingParams.from_dict` accepts vllm_backend style JSON where values may be strings
("0.7", "true", "[1, 2]"); an unknown key or a bad value raises ValueError naming the field.
vLLM's older keys `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar` and
`guided_json_object` map onto `structured_outputs`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from paged_engine.config import check_known_keys, parse_bool, parse_float, parse_int

# Most top-N logprobs a request may ask for (vLLM's default max_logprobs, OpenAI's limit).
MAX_LOGPROBS = 20
# Sampling with temperature below this is greedy (vLLM's _SAMPLING_EPS).
SAMPLING_EPS = 1e-5


def _parse_json_maybe(value: Any) -> Any:
    if isinstance(value, str):
        v = value.strip()
        if v[:1] in ("[", "{"):
            try:
                return json.loads(v)
            except json.JSONDecodeError:
                return value
    return value


def _string_list(name: str, value: Any) -> list[str]:
    """None, a string, a list of strings, or such a list as a JSON string -> a list of strings."""
    parsed = _parse_json_maybe(value)
    if parsed is None:
        return []
    if isinstance(parsed, str):
        return [parsed]
    if not isinstance(parsed, (list, tuple)):
        raise ValueError(f"{name} must be a string or a list of strings, got {value!r}")
    for s in parsed:
        if not isinstance(s, str):
            raise ValueError(f"{name} must contain strings, got {s!r}")
    return list(parsed)


@dataclass(frozen=True)
class StructuredOutputsParams:
    """What the output must match (vLLM's `StructuredOutputsParams`); exactly one kind is given.

    Args:
        json: a JSON schema (a dict, or its JSON text): the output is a JSON value valid under it.
        regex: a regular expression the whole output matches.
        choice: a list of strings; the output is exactly one of them.
        grammar: an EBNF grammar (GBNF dialect, as llama.cpp and xgrammar write it) whose rule
            `root` derives the output.
        json_object: True: the output is any JSON object (OpenAI's `json_object` response format).
        disable_any_whitespace: JSON only: no whitespace between JSON tokens but a single space
            after `:` and `,` (small models otherwise tend to emit whitespace without end).
    The output ends where the grammar can end and the model samples its end-of-sequence token;
    EOS is masked until then.
    """

    json: Any = None
    regex: str | None = None
    choice: tuple | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False

    KINDS = ("json", "regex", "choice", "grammar", "json_object")

    def __post_init__(self) -> None:
        given = [k for k in self.KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(
                "structured_outputs must give exactly one of json, regex, choice, grammar, "
                f"json_object; got {given or 'none'}")
        set_ = object.__setattr__  # frozen: normalise once here
        json_spec = _parse_json_maybe(self.json)
        if self.json is not None:
            if isinstance(json_spec, str):
                raise ValueError(f"structured_outputs.json must be a JSON schema (an object), "
                                 f"got a string that is not JSON: {self.json[:80]!r}")
            if not isinstance(json_spec, (dict, bool)):
                raise ValueError("structured_outputs.json must be a JSON schema object, got "
                                 f"{type(json_spec).__name__}")
            set_(self, "json", json_spec)
        if self.regex is not None and (not isinstance(self.regex, str) or not self.regex):
            raise ValueError(f"structured_outputs.regex must be a non-empty string, got {self.regex!r}")
        if self.choice is not None:
            choice = _parse_json_maybe(self.choice)
            if (not isinstance(choice, (list, tuple)) or not choice
                    or not all(isinstance(c, str) and c for c in choice)):
                raise ValueError("structured_outputs.choice must be a non-empty list of non-empty "
                                 f"strings, got {self.choice!r}")
            set_(self, "choice", tuple(choice))
        if self.grammar is not None and (not isinstance(self.grammar, str) or not self.grammar.strip()):
            raise ValueError(f"structured_outputs.grammar must be a non-empty EBNF string, "
                             f"got {self.grammar!r}")
        if self.json_object is not None:
            set_(self, "json_object", parse_bool("structured_outputs.json_object", self.json_object))
        set_(self, "disable_any_whitespace",
             parse_bool("structured_outputs.disable_any_whitespace", self.disable_any_whitespace))

    @property
    def kind(self) -> str:
        return next(k for k in self.KINDS if getattr(self, k) not in (None, False))

    def cache_key(self) -> tuple:
        """(kind, canonical spec, options): equal for requests that compile to the same grammar."""
        kind = self.kind
        spec = getattr(self, kind)
        if kind == "json":
            spec = json.dumps(spec, sort_keys=True, separators=(",", ":"))
        return (kind, spec, self.disable_any_whitespace)

    @classmethod
    def from_dict(cls, value: Any) -> "StructuredOutputsParams":
        """From a dict (or its JSON text); unknown keys are a ValueError naming them."""
        if isinstance(value, cls):
            return value
        parsed = _parse_json_maybe(value)
        if not isinstance(parsed, dict):
            raise ValueError(f"structured_outputs must be an object such as {{\"json\": {{...}}}}, "
                             f"got {value!r}")
        check_known_keys("structured_outputs", parsed,
                         {f.name for f in dataclasses.fields(cls)})
        return cls(**parsed)


# vLLM's keys before StructuredOutputsParams -> its fields.
_GUIDED_KEYS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                "guided_grammar": "grammar", "guided_json_object": "json_object"}


def _logit_bias(value: Any) -> dict[int, float] | None:
    """None, {} or {token id (int or digit string): finite number} -> {int: float} or None."""
    parsed = _parse_json_maybe(value)
    if parsed is None or parsed == {}:
        return None
    if not isinstance(parsed, dict):
        raise ValueError(f"logit_bias must be an object of token id -> bias, got {value!r}")
    out = {}
    for key, bias in parsed.items():
        token_id = parse_int("logit_bias token id", key)
        if token_id < 0:
            raise ValueError(f"logit_bias token ids must be non-negative, got {key!r}")
        bias = parse_float(f"logit_bias[{key}]", bias)
        if bias != bias or bias in (float("inf"), float("-inf")):
            raise ValueError(f"logit_bias[{key}] must be finite, got {bias}")
        out[token_id] = out.get(token_id, 0.0) + bias
    return out


@dataclass
class SamplingParams:
    """Generation parameters of one request.

    Args:
        n: number of output sequences sampled from the prompt (they share its KV blocks).
        max_tokens: most tokens to generate per output (None: up to max_model_len).
        min_tokens: tokens to generate before EOS / stop_token_ids / stop strings may end it.
        temperature: 0 = greedy.
        top_p: nucleus probability in (0, 1].
        top_k: keep the k most likely tokens; -1 (or 0) = all.
        min_p: drop tokens whose probability is below min_p * max probability, in [0, 1].
        seed: per-request seed; the same request then samples the same tokens in any batch.
            With n > 1, output i uses seed + i.
        stop: string or list of strings ending the output (not included unless
            include_stop_str_in_output).
        stop_token_ids: token ids ending the output (kept in token_ids, not in text).
        include_stop_str_in_output: keep the matched stop string (or stop token's text).
        ignore_eos: keep generating after EOS.
        repetition_penalty: > 0; 1 = off.
        presence_penalty, frequency_penalty: in [-2, 2]; 0 = off.
        logprobs: None, or top-N (0..20) logprobs to return per generated token.
        prompt_logprobs: None, or top-N (0..20) logprobs to return per prompt token (vLLM):
            `RequestOutput.prompt_logprobs` is None for the first prompt token, then a dict
            token id -> Logprob holding the actual token and the top-N. A request asking for
            them is not served from the prefix cache (its prompt logits must be computed).
        skip_special_tokens: drop special tokens from the text.
        bad_words: string or list of strings the output must not contain (vLLM semantics): each
            is tokenized without and with a leading space, and the last token of such a
            sequence is masked whenever the generated tokens end with the ones before it (a
            one-token word is always masked). Only generated tokens count, not the prompt.
        logit_bias: {token_id: bias} added to the logits after banned tokens are masked and
            before penalties and temperature (vLLM's order); logprobs stay those of the model.
            Biases must be finite; keys may be strings of ints (JSON objects).
        structured_outputs: a StructuredOutputsParams (or a dict for one): the output must
            match its grammar. Logprobs are then those of the masked distribution (vLLM v1).
    """

    n: int = 1
    max_tokens: int | None = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    bad_words: str | list[str] | None = None
    logit_bias: dict[int, float] | None = None
    structured_outputs: StructuredOutputsParams | None = None
    # Filled by the engine: the token-id sequences of bad_words (both spacings, deduplicated),
    # which the sampler masks.
    bad_words_token_ids: tuple = field(default=(), init=False, repr=False, compare=False)
    # Filled by the engine: stop_token_ids plus the model's EOS ids unless ignore_eos. The
    # sampler masks these while fewer than min_tokens were generated.
    all_stop_token_ids: frozenset = field(default=frozenset(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.n = parse_int("n", self.n)
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        self.max_tokens = parse_int("max_tokens", self.max_tokens, allow_none=True)
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        self.min_tokens = parse_int("min_tokens", self.min_tokens)
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})"
            )
        self.temperature = parse_float("temperature", self.temperature)
        if self.temperature < 0.0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        self.top_p = parse_float("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        self.top_k = parse_int("top_k", self.top_k)
        if self.top_k == 0:
            self.top_k = -1
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 (disabled) or >= 1, got {self.top_k}")
        self.min_p = parse_float("min_p", self.min_p)
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        self.seed = parse_int("seed", self.seed, allow_none=True)
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise ValueError(f"seed must fit in 64 bits, got {self.seed}")

        self.stop = _string_list("stop", self.stop)
        for s in self.stop:
            if not s:
                raise ValueError(f"stop must contain non-empty strings, got {s!r}")

        ids = _parse_json_maybe(self.stop_token_ids)
        if ids is None:
            ids = []
        elif isinstance(ids, (int, str)) and not isinstance(ids, bool):
            ids = [ids]
        elif not isinstance(ids, (list, tuple)):
            raise ValueError(f"stop_token_ids must be a list of ints, got {self.stop_token_ids!r}")
        ids = [parse_int("stop_token_ids", t) for t in ids]
        if any(t < 0 for t in ids):
            raise ValueError(f"stop_token_ids must be non-negative, got {ids}")
        self.stop_token_ids = ids

        self.include_stop_str_in_output = parse_bool(
            "include_stop_str_in_output", self.include_stop_str_in_output
        )
        self.ignore_eos = parse_bool("ignore_eos", self.ignore_eos)
        self.repetition_penalty = parse_float("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0.0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        self.presence_penalty = parse_float("presence_penalty", self.presence_penalty)
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        self.frequency_penalty = parse_float("frequency_penalty", self.frequency_penalty)
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise ValueError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        self.logprobs = parse_int("logprobs", self.logprobs, allow_none=True)
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        self.prompt_logprobs = parse_int("prompt_logprobs", self.prompt_logprobs, allow_none=True)
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= MAX_LOGPROBS:
            raise ValueError(f"prompt_logprobs must be in [0, {MAX_LOGPROBS}], got {self.prompt_logprobs}")
        self.skip_special_tokens = parse_bool("skip_special_tokens", self.skip_special_tokens)
        self.bad_words = _string_list("bad_words", self.bad_words)
        for word in self.bad_words:
            if not word.strip():
                # vLLM strips the leading spaces; nothing would be left to tokenize.
                raise ValueError(f"bad_words must contain non-blank strings, got {word!r}")
        self.logit_bias = _logit_bias(self.logit_bias)
        if self.structured_outputs is not None:
            self.structured_outputs = StructuredOutputsParams.from_dict(self.structured_outputs)
        self.all_stop_token_ids = frozenset(self.stop_token_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls) if f.init}

    @classmethod
    def from_dict(cls, d: dict) -> "SamplingParams":
        """Build from a JSON-like dict whose values may be strings; ValueError names bad keys."""
        if isinstance(d, str):
            try:
                d = json.loads(d) if d.strip() else {}
            except json.JSONDecodeError as e:
                raise ValueError(f"sampling_parameters is not valid JSON: {e}") from None
        guided = {k: d[k] for k in _GUIDED_KEYS if d.get(k) is not None}
        if "guided_json_object" in guided and not parse_bool("guided_json_object",
                                                              guided["guided_json_object"]):
            del guided["guided_json_object"]  # false: no constraint
        if guided:
            if d.get("structured_outputs") is not None:
                raise ValueError(f"give structured_outputs or {sorted(guided)}, not both")
            d = {k: v for k, v in d.items() if k not in _GUIDED_KEYS}
            d["structured_outputs"] = {_GUIDED_KEYS[k]: v for k, v in guided.items()}
        else:
            d = {k: v for k, v in d.items() if k not in _GUIDED_KEYS}
        check_known_keys("SamplingParams", d, cls.field_names())
        return cls(**d)

    def to_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.field_names()}

    def _for_engine(
        self, eos_token_ids: frozenset, index: int = 0, bad_words_token_ids: tuple = ()
    ) -> "SamplingParams":
        """The engine's private copy for output `index`: n=1, seed+index, stop ids with EOS,
        and the tokenized bad_words (tuple of token-id tuples)."""
        p = dataclasses.replace(self, n=1)
        p.bad_words_token_ids = tuple(tuple(ids) for ids in bad_words_token_ids)
        if self.seed is not None and index:
            p.seed = self.seed + index
        if index:
            p.prompt_logprobs = None  # a request's prompt logprobs come from its first output
        stop_ids = set(self.stop_token_ids)
        if not self.ignore_eos:
            stop_ids |= set(eos_token_ids)
        p.all_stop_token_ids = frozenset(stop_ids)
        return p
