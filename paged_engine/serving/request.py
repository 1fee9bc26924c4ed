"""Turn one Triton request for `paged_llm` into an engine request, or an error naming the problem.

Sampling settings come as vllm_backend clients send them:

1. `sampling_parameters`: a JSON object; values may be strings ("0.7", "true").
2. The request's parameters, when `sampling_parameters` is absent, so that Triton's HTTP
   `/v2/models/paged_llm/generate` works with plain JSON keys
   (`{"text_input": ..., "max_tokens": 8}`: keys that name no model input become request
   parameters, so paged_llm has no input named like a sampling key).

TensorRT-LLM style tensors (`max_tokens`, `temperature`, `stop_words`, `bad_words`, `end_id`, ...)
arrive at the ensemble and at tensorrt_llm_bls, which turn them into `sampling_parameters` with
serving/trtllm_request.py.

Parsing runs in `execute`, touches no engine state and is thread-safe, so a bad request is
answered at once without waiting for the engine thread.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from paged_engine.serving.intake import check_prompt_bytes

# Request parameters that Triton's own front ends add; they are not sampling settings. `id` is
# the request id of the generate extension (`{"id": "42", "text_input": ...}`), which Triton
# 2.51 hands on as a parameter.
_RESERVED_PARAMETER_PREFIXES = ("triton_",)
_RESERVED_PARAMETERS = frozenset({"id", "priority", "timeout", "sequence_id", "sequence_start",
                                  "sequence_end", "headers", "binary_data_output"})

_BOOL_INPUTS = (
    "stream",
    "exclude_input_in_output",
    "return_finish_reason",
    "return_cumulative_logprob",
    "return_logprobs",
    "return_num_input_tokens",
    "return_num_output_tokens",
)


class RequestError(ValueError):
    """A request that cannot be served; the message names the problem (INVALID_ARG)."""


@dataclass
class ParsedRequest:
    """Everything the engine thread and the response builder need from one request."""

    prompt: str | None
    prompt_token_ids: list[int] | None
    params: Any  # SamplingParams
    stream: bool = False
    exclude_input_in_output: bool = False
    return_finish_reason: bool = False
    return_cumulative_logprob: bool = False
    return_logprobs: bool = False
    return_num_input_tokens: bool = False
    return_num_output_tokens: bool = False
    # Token-level outputs for the ensemble's stateless postprocessing (output_ids window,
    # cum_log_probs, output_log_probs); on whenever the prompt came as input_ids.
    token_outputs: bool = False
    # Whether the request named max_tokens itself (an explicit max_tokens that cannot fit in
    # max_model_len is an error; the default one is cut by the length limit).
    max_tokens_given: bool = False


@dataclass(frozen=True)
class RequestLimits:
    """Size limits checked while parsing, before the prompt is decoded or tokenized.

    max_prompt_bytes: most bytes of prompt text (None: no limit); see serving/intake.py.
    max_model_len: the engine's; an input_ids prompt longer than it is refused at once.
    """

    max_prompt_bytes: int | None = None
    max_model_len: int | None = None


def _one_value(array: np.ndarray, name: str):
    flat = np.asarray(array).reshape(-1)
    if flat.size != 1:
        raise RequestError(
            f"input '{name}' must hold exactly one value, got shape {list(array.shape)}")
    return flat[0]


def _utf8(value, name: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(f"input '{name}' is not valid UTF-8: {e}") from None


def _scalar(array: np.ndarray, name: str):
    value = _one_value(array, name)
    if isinstance(value, (bytes, np.bytes_)):
        return _utf8(value, name)
    return value.item() if hasattr(value, "item") else value


def _strings(array: np.ndarray, name: str) -> list[str]:
    out = []
    for value in np.asarray(array).reshape(-1):
        if isinstance(value, (bytes, np.bytes_)):
            value = _utf8(value, name)
        elif not isinstance(value, str):
            value = str(value)
        out.append(value)
    return out


def _parse_json_object(text: str, what: str) -> dict:
    try:
        obj = json.loads(text) if text else {}
    except json.JSONDecodeError as e:
        raise RequestError(f"{what} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise RequestError(f"{what} must be a JSON object, got {type(obj).__name__}")
    return obj


def _prompt_text(array: np.ndarray, max_prompt_bytes: int | None) -> str:
    """The text_input string, its size checked before it is decoded."""
    value = _one_value(array, "text_input")
    if isinstance(value, (bytes, np.bytes_)):
        check_prompt_bytes(len(value), max_prompt_bytes)
        return _utf8(value, "text_input")
    if not isinstance(value, str):
        raise RequestError("input 'text_input' must be a string")
    check_prompt_bytes(len(value.encode("utf-8")), max_prompt_bytes)
    return value


def parse_request(
    get_input: Callable[[str], np.ndarray | None],
    parameters_json: str,
    sampling_params_from_dict: Callable[[dict], Any],
    limits: RequestLimits = RequestLimits(),
) -> ParsedRequest:
    """Parse one request.

    Args:
        get_input: name -> numpy array of that input tensor, or None when absent.
        parameters_json: the request's parameters as Triton hands them over (a JSON object string).
        sampling_params_from_dict: `SamplingParams.from_dict` (raises ValueError naming the field).
        limits: size limits (a prompt over them is refused before it is decoded).
    Returns:
        A ParsedRequest.
    Raises:
        RequestError naming the problem.
    """
    flags: dict[str, bool] = {}
    for name in _BOOL_INPUTS:
        array = get_input(name)
        if array is not None:
            value = _scalar(array, name)
            if not isinstance(value, (bool, np.bool_)):
                raise RequestError(f"input '{name}' must be BOOL, got {type(value).__name__}")
            flags[name] = bool(value)

    # Prompt: text or token ids, exactly one.
    prompt = prompt_token_ids = None
    text_array, ids_array = get_input("text_input"), get_input("input_ids")
    if text_array is not None and ids_array is not None:
        raise RequestError("give either 'text_input' or 'input_ids', not both")
    if text_array is not None:
        prompt = _prompt_text(text_array, limits.max_prompt_bytes)
        if prompt == "":
            raise RequestError("input 'text_input' is empty: the prompt needs at least one token")
    elif ids_array is not None:
        ids = np.asarray(ids_array).reshape(-1)
        if ids.dtype.kind not in "iu":
            raise RequestError(f"input 'input_ids' must be integers, got {ids.dtype}")
        if ids.size == 0:
            raise RequestError("input 'input_ids' is empty: the prompt needs at least one token")
        if (ids < 0).any():
            raise RequestError("input 'input_ids' holds negative token ids")
        if limits.max_model_len is not None and ids.size > limits.max_model_len:
            raise RequestError(f"prompt is too long: {ids.size} tokens, max_model_len is "
                               f"{limits.max_model_len}")
        prompt_token_ids = ids.tolist()
    else:
        raise RequestError("missing prompt: give 'text_input' (or 'input_ids')")

    # Sampling settings: sampling_parameters JSON, else the request's parameters; tensors override.
    sp_array = get_input("sampling_parameters")
    if sp_array is not None:
        text = _scalar(sp_array, "sampling_parameters")
        settings = _parse_json_object(text, "input 'sampling_parameters'")
    else:
        settings = {
            k: v for k, v in _parse_json_object(parameters_json, "request parameters").items()
            if k not in _RESERVED_PARAMETERS and not k.startswith(_RESERVED_PARAMETER_PREFIXES)
        }
    token_outputs = prompt_token_ids is not None
    # return_logprobs without a `logprobs` key answers JSON null, as vllm_backend does.

    try:
        params = sampling_params_from_dict(settings)
    except (ValueError, TypeError) as e:
        raise RequestError(f"bad sampling parameters: {e}") from None

    stream = flags.get("stream", False)
    exclude = flags.get("exclude_input_in_output")
    if stream and exclude is False:
        raise RequestError(
            "streaming with 'exclude_input_in_output' = false is not allowed: "
            "a stream sends only generated text"
        )
    if exclude is None:
        exclude = stream
    return ParsedRequest(
        prompt=prompt,
        prompt_token_ids=prompt_token_ids,
        params=params,
        stream=stream,
        exclude_input_in_output=exclude,
        return_finish_reason=flags.get("return_finish_reason", False),
        return_cumulative_logprob=flags.get("return_cumulative_logprob", False),
        return_logprobs=flags.get("return_logprobs", False),
        return_num_input_tokens=flags.get("return_num_input_tokens", False),
        return_num_output_tokens=flags.get("return_num_output_tokens", False),
        token_outputs=token_outputs,
        max_tokens_given=settings.get("max_tokens") not in (None, "", "null", "None"),
    )
