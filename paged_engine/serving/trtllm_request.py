"""TensorRT-LLM's front door: the `ensemble` / `tensorrt_llm_bls` inputs -> an engine request.

TensorRT-LLM clients send one typed tensor per setting, with a batch dimension (their models have
`max_batch_size > 0`: a prompt is `text_input` [1, 1]). This module reads one batch row of them
and returns what the engine needs: the prompt, the `sampling_parameters` JSON keys and the
output options. It accepts TensorRT-LLM's whole input set, applying what maps and refusing, with
a message naming the input, what cannot be honoured:

| input (alias) | here |
|---|---|
| text_input | the prompt |
| max_tokens | max_tokens (absent: 16) |
| num_return_sequences | n; one response per sequence, each with sequence_index |
| top_k (runtime_top_k), top_p (runtime_top_p), temperature | TensorRT-LLM semantics, below |
| seed (random_seed) | seed |
| min_tokens (min_length) | min_tokens (values < 1 have no effect, as in TensorRT-LLM) |
| repetition_penalty, presence_penalty, frequency_penalty | the same |
| stop_words, bad_words | stop strings (matched on the text), bad words (vLLM semantics); one word per element, "" for none |
| end_id | an extra stop token id (-1: none); the model's EOS ids stop it too |
| pad_id | ignored (responses are never padded) |
| embedding_bias_words + embedding_bias_weights | logit_bias: each token of each word (tokenized without special tokens) gets the word's weight added |
| exclude_input_in_output | non-streaming: prompt in front unless true (TensorRT-LLM's default false); streaming never repeats the prompt |
| stream (streaming) | stream |
| return_log_probs | cum_log_probs and output_log_probs (the sampled tokens') |
| return_num_input_tokens, return_num_output_tokens | num_input_tokens, num_output_tokens |
| beam_width | 1 only (no beam search) |
| length_penalty (len_penalty) | accepted, no effect: it only scores beams |
| return_context_logits, return_generation_logits, return_perf_metrics | false only |
| guided_decoding_guide_type + guided_decoding_guide | structured_outputs: `json` (any JSON object; no guide), `json_schema` (guide: the schema's JSON), `regex`, `ebnf_grammar`; `structural_tag` is refused |
| decoder_text_input, prompt_embedding_table, prompt_vocab_size, prompt_table_extra_id, lora_task_id, lora_weights, lora_config, num_draft_tokens, use_draft_logits, image_input, image_bytes_input, image_url_input, video_bytes_input | refused when given (no encoder-decoder, p-tuning, LoRA, external drafts or images) |

Sampling follows TensorRT-LLM's C++ runtime, where 0 turns top-k and top-p off: with neither
set (or both 0) decoding is greedy whatever the temperature; `top_k: 1` is greedy; otherwise
the request samples with its temperature (default 1.0), top_k 0 meaning all tokens and top_p 0
meaning no nucleus cut. So the documented `{"top_k": 1, "top_p": 0}` is greedy, and a request
that sets only `temperature` is greedy, as on TensorRT-LLM.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from paged_engine.serving.request import RequestError

# Inputs TensorRT-LLM defines that paged_llm cannot honour: refused whenever they are given.
UNSUPPORTED_INPUTS = {
    "decoder_text_input": "encoder-decoder models are not supported",
    "prompt_embedding_table": "prompt tuning is not supported",
    "prompt_vocab_size": "prompt tuning is not supported",
    "prompt_table_extra_id": "prompt tuning is not supported",
    "lora_task_id": "LoRA is not supported",
    "lora_weights": "LoRA is not supported",
    "lora_config": "LoRA is not supported",
    "image_input": "images are not supported",
    "image_bytes_input": "images are not supported",
    "image_url_input": "images are not supported",
    "video_bytes_input": "video is not supported",
}
# TensorRT-LLM's guide types -> structured_outputs keys (None: the type takes no guide).
GUIDE_TYPES = {"json": None, "json_schema": "json", "regex": "regex", "ebnf_grammar": "grammar"}
# Boolean inputs that may only be false.
FALSE_ONLY_INPUTS = {
    "return_context_logits": "context logits are not returned (return_log_probs gives the "
                             "sampled tokens' log probabilities)",
    "return_generation_logits": "generation logits are not returned (return_log_probs gives "
                                "the sampled tokens' log probabilities)",
    "return_perf_metrics": "per-request perf metrics are not returned (the vllm:* metrics on "
                           "the metrics port have them in aggregate)",
    "use_draft_logits": "speculative decoding with external draft logits is not supported",
}
# Every input name and its older alias: (name, alias).
ALIASES = (("top_k", "runtime_top_k"), ("top_p", "runtime_top_p"), ("seed", "random_seed"),
           ("min_tokens", "min_length"), ("length_penalty", "len_penalty"),
           ("stream", "streaming"))
BOOL_INPUTS = ("stream", "exclude_input_in_output", "return_log_probs", "return_num_input_tokens",
               "return_num_output_tokens", "apply_chat_template")


@dataclass
class TrtllmRequest:
    """One batch row of a TensorRT-LLM style request, as the engine takes it."""

    text: str
    settings: dict  # SamplingParams keys, for `sampling_parameters`
    stream: bool = False
    exclude_input_in_output: bool = False  # TensorRT-LLM's: already true for a stream
    return_log_probs: bool = False
    return_num_input_tokens: bool = False
    return_num_output_tokens: bool = False
    apply_chat_template: bool = False
    embedding_bias: list[tuple[str, float]] = field(default_factory=list)


def batch_size(get_input: Callable[[str], np.ndarray | None]) -> int:
    """Rows in a batched request: text_input's first dimension (1 when absent)."""
    text = get_input("text_input")
    if text is None:
        return 1
    array = np.asarray(text)
    return int(array.shape[0]) if array.ndim >= 2 else 1


def _row(array: np.ndarray, name: str, row: int, num_rows: int) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim < 2:  # sent without the batch dimension
        return array.reshape(-1)
    if array.shape[0] != num_rows:
        raise RequestError(f"input '{name}' has batch size {array.shape[0]}, but text_input has "
                           f"{num_rows}")
    return array[row].reshape(-1)


def _decode(value, name: str) -> str:
    if isinstance(value, (bytes, np.bytes_)):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise RequestError(f"input '{name}' is not valid UTF-8: {e}") from None
    return str(value)


def parse_trtllm_row(get_input: Callable[[str], np.ndarray | None], row: int = 0,
                     num_rows: int = 1, max_prompt_bytes: int | None = None) -> TrtllmRequest:
    """Read batch row `row` of a TensorRT-LLM style request.

    Args:
        get_input: name -> numpy array of that input tensor (with its batch dimension), or None.
        row, num_rows: which row, of how many (`batch_size(get_input)`).
        max_prompt_bytes: refuse a longer text_input before decoding it (None: no limit).
    Raises:
        RequestError naming the input.
    """
    def value_of(name: str):
        array = get_input(name)
        if array is None:
            return None
        flat = _row(array, name, row, num_rows)
        if flat.size != 1:
            raise RequestError(f"input '{name}' must hold one value per batch row, "
                               f"got {flat.size}")
        item = flat[0]
        return item.item() if hasattr(item, "item") and not isinstance(item, bytes) else item

    def strings_of(name: str) -> list[str] | None:
        array = get_input(name)
        if array is None:
            return None
        return [_decode(v, name) for v in _row(array, name, row, num_rows)]

    def aliased(name: str, alias: str):
        a, b = value_of(name), value_of(alias)
        if a is not None and b is not None:
            raise RequestError(f"give '{name}' or its older name '{alias}', not both")
        return a if a is not None else b

    for name, reason in UNSUPPORTED_INPUTS.items():
        if get_input(name) is not None:
            raise RequestError(f"input '{name}' cannot be honoured: {reason}")
    for name, reason in FALSE_ONLY_INPUTS.items():
        value = value_of(name)
        if value is not None and bool(value):
            raise RequestError(f"input '{name}' must be false: {reason}")
    drafts = value_of("num_draft_tokens")
    if drafts is not None and int(drafts) > 0:
        raise RequestError("input 'num_draft_tokens' cannot be honoured: speculative decoding "
                           "with an external draft model is not supported")

    text_array = get_input("text_input")
    if text_array is None:
        raise RequestError("missing input 'text_input': the prompt is required")
    flat = _row(text_array, "text_input", row, num_rows)
    if flat.size != 1:
        raise RequestError(f"input 'text_input' must hold one string per batch row, got {flat.size}")
    raw = flat[0]
    if max_prompt_bytes is not None:
        from paged_engine.serving.intake import check_prompt_bytes

        size = len(raw) if isinstance(raw, (bytes, np.bytes_)) else len(str(raw).encode("utf-8"))
        check_prompt_bytes(size, max_prompt_bytes)
    text = _decode(raw, "text_input")
    if text == "":
        raise RequestError("input 'text_input' is empty: the prompt needs at least one token")

    flags = {}
    for name in BOOL_INPUTS:
        value = aliased(name, "streaming") if name == "stream" else value_of(name)
        if value is not None:
            if not isinstance(value, (bool, np.bool_)):
                raise RequestError(f"input '{name}' must be BOOL, got {type(value).__name__}")
            flags[name] = bool(value)

    def number(name, value, kind):
        try:
            return kind(value)
        except (TypeError, ValueError):
            raise RequestError(f"input '{name}' must be a number, got {value!r}") from None

    settings: dict = {}
    for name, kind in (("max_tokens", int), ("temperature", float),
                       ("repetition_penalty", float), ("presence_penalty", float),
                       ("frequency_penalty", float)):
        value = value_of(name)
        if value is not None:
            settings[name] = number(name, value, kind)
    seed = aliased("seed", "random_seed")
    if seed is not None:
        settings["seed"] = number("seed", seed, int)
    min_tokens = aliased("min_tokens", "min_length")
    if min_tokens is not None and number("min_tokens", min_tokens, int) > 0:
        settings["min_tokens"] = int(min_tokens)
    n = value_of("num_return_sequences")
    if n is not None:
        settings["n"] = number("num_return_sequences", n, int)
        if settings["n"] < 1:
            raise RequestError(f"input 'num_return_sequences' must be >= 1, got {n}")
    beam_width = value_of("beam_width")
    if beam_width is not None and number("beam_width", beam_width, int) != 1:
        raise RequestError(f"input 'beam_width' must be 1, got {beam_width}: beam search is not "
                           "supported (num_return_sequences samples several sequences)")
    length_penalty = aliased("length_penalty", "len_penalty")
    if length_penalty is not None:
        number("length_penalty", length_penalty, float)  # checked; it only scores beams
    _sampling_semantics(settings, aliased("top_k", "runtime_top_k"),
                        aliased("top_p", "runtime_top_p"))

    stop_words = strings_of("stop_words")
    if stop_words is not None and [w for w in stop_words if w]:
        settings["stop"] = [w for w in stop_words if w]  # clients send [""] for none
    bad_words = strings_of("bad_words")
    if bad_words is not None and [w for w in bad_words if w]:
        settings["bad_words"] = [w for w in bad_words if w]  # the engine tokenizes them
    end_id = value_of("end_id")
    if end_id is not None:
        if isinstance(end_id, (bool, np.bool_)) or not isinstance(end_id, (int, np.integer)) \
                or end_id < -1:
            raise RequestError(f"input 'end_id' must be a token id (or -1 for none), got {end_id!r}")
        if end_id >= 0:
            settings["stop_token_ids"] = [int(end_id)]
    pad_id = value_of("pad_id")  # responses are never padded; only checked
    if pad_id is not None:
        number("pad_id", pad_id, int)
    if flags.get("return_log_probs"):
        settings["logprobs"] = 0  # the sampled token's logprob is all output_log_probs needs

    bias = []
    words, weights = strings_of("embedding_bias_words"), get_input("embedding_bias_weights")
    if (words is None) != (weights is None):
        raise RequestError("give both 'embedding_bias_words' and 'embedding_bias_weights', or "
                           "neither")
    if words is not None:
        weight_row = _row(weights, "embedding_bias_weights", row, num_rows)
        if len(words) != weight_row.size:
            raise RequestError(f"'embedding_bias_words' has {len(words)} words but "
                               f"'embedding_bias_weights' {weight_row.size} weights")
        bias = [(w, float(x)) for w, x in zip(words, weight_row.tolist()) if w]

    guide_type, guide = value_of("guided_decoding_guide_type"), value_of("guided_decoding_guide")
    if guide_type is not None or guide is not None:
        settings["structured_outputs"] = _structured_outputs(
            None if guide_type is None else _decode(guide_type, "guided_decoding_guide_type"),
            None if guide is None else _decode(guide, "guided_decoding_guide"))

    stream = flags.get("stream", False)
    return TrtllmRequest(
        text=text, settings=settings, stream=stream,
        exclude_input_in_output=stream or flags.get("exclude_input_in_output", False),
        return_log_probs=flags.get("return_log_probs", False),
        return_num_input_tokens=flags.get("return_num_input_tokens", False),
        return_num_output_tokens=flags.get("return_num_output_tokens", False),
        apply_chat_template=flags.get("apply_chat_template", False),
        embedding_bias=bias)


def _structured_outputs(guide_type: str | None, guide: str | None) -> dict:
    """TensorRT-LLM's guided decoding inputs -> the `structured_outputs` sampling key."""
    if guide_type is None:
        raise RequestError("input 'guided_decoding_guide' needs 'guided_decoding_guide_type' "
                           f"(one of {', '.join(GUIDE_TYPES)})")
    if guide_type not in GUIDE_TYPES:
        raise RequestError(f"input 'guided_decoding_guide_type' must be one of "
                           f"{', '.join(GUIDE_TYPES)}, got {guide_type!r}")
    key = GUIDE_TYPES[guide_type]
    if key is None:
        return {"json_object": True}
    if not guide:
        raise RequestError(f"guided_decoding_guide_type {guide_type!r} needs the input "
                           "'guided_decoding_guide'")
    return {key: guide}


def _sampling_semantics(settings: dict, top_k, top_p) -> None:
    """TensorRT-LLM's top_k / top_p / temperature -> vLLM's (see the module docstring)."""
    k = 0 if top_k is None else top_k
    p = 0.0 if top_p is None else top_p
    try:
        k, p = int(k), float(p)
    except (TypeError, ValueError):
        raise RequestError(f"inputs 'top_k' / 'top_p' must be numbers, got {top_k!r} / "
                           f"{top_p!r}") from None
    if k < 0:
        raise RequestError(f"input 'top_k' must be >= 0 (0: all tokens), got {k}")
    if not 0.0 <= p <= 1.0:
        raise RequestError(f"input 'top_p' must be in [0, 1] (0: no nucleus cut), got {p}")
    temperature = settings.get("temperature", 1.0)
    if (k == 0 and p == 0.0) or k == 1 or temperature == 0.0:
        settings["temperature"] = 0.0
        return
    settings["temperature"] = temperature
    if k > 0:
        settings["top_k"] = k
    if p > 0.0:
        settings["top_p"] = p


def logit_bias(tokenizer, embedding_bias: list[tuple[str, float]]) -> dict[int, float]:
    """{token id: summed weight} for (word, weight) pairs: every token of the word (tokenized
    without special tokens; TensorRT-LLM's preprocessing also biases the BOS it adds) gets it."""
    out: dict[int, float] = {}
    for word, weight in embedding_bias:
        for token_id in tokenizer.encode(word, add_special_tokens=False):
            out[int(token_id)] = out.get(int(token_id), 0.0) + weight
    return out
