"""What goes over the wire: the request tensors for each model kind, and what comes back.

Two kinds of Triton model speak different tensor names (see /work/shared/INTERFACES.md):

* ``"vllm"``: the engine model (``paged_llm``), vllm_backend style. Sampling travels as one JSON
  string, ``sampling_parameters``; opt-in outputs (finish reason, token counts, logprobs) are asked
  for with ``return_*`` booleans.
* ``"trtllm"``: the ensemble front door, TensorRT-LLM style: one typed tensor per sampling field
  (``max_tokens`` INT32, ``temperature`` FP32, ``stop_words`` STRING [-1], ...), with a batch
  dimension (``max_batch_size > 0``). TensorRT-LLM decodes greedily unless top_k or top_p is set,
  so a vLLM-style ``temperature > 0`` alone is sent with ``top_p = 1`` (sample the whole
  distribution, as vLLM would).

This module is transport-free: it turns a prompt and sampling keywords into a list of
`TensorValue` (for gRPC) or a JSON body (for HTTP generate), and turns a response's outputs, as
numpy arrays (gRPC) or JSON values (HTTP), into a `Chunk`. `CompletionBuilder` folds the chunks
of one request into a `Completion`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from paged_triton.client.errors import InvalidArgument

VLLM = "vllm"
TRTLLM = "trtllm"

# Sampling keywords the engine model understands (SamplingParams fields). Unknown keywords are
# still sent: the server names them in its error, which is the message the user should see.
VLLM_SAMPLING_KEYS = (
    "n", "max_tokens", "min_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop",
    "stop_token_ids", "include_stop_str_in_output", "ignore_eos", "repetition_penalty",
    "presence_penalty", "frequency_penalty", "logprobs", "skip_special_tokens", "bad_words",
    "prompt_logprobs", "logit_bias", "structured_outputs",
)


@dataclass(frozen=True)
class InputSpec:
    """One model input as the server declares it: Triton datatype and dims (without batch)."""

    datatype: str  # "BYTES", "BOOL", "INT32", "UINT64", "FP32", ...
    dims: tuple[int, ...]


# The inputs each kind declares, used when the server's metadata has not been read (unit tests,
# or a caller that passes `model_kind` and `inputs` itself).
VLLM_INPUTS: dict[str, InputSpec] = {
    "text_input": InputSpec("BYTES", (1,)),
    "input_ids": InputSpec("INT32", (-1,)),
    "stream": InputSpec("BOOL", (1,)),
    "sampling_parameters": InputSpec("BYTES", (1,)),
    "exclude_input_in_output": InputSpec("BOOL", (1,)),
    "return_finish_reason": InputSpec("BOOL", (1,)),
    "return_cumulative_logprob": InputSpec("BOOL", (1,)),
    "return_logprobs": InputSpec("BOOL", (1,)),
    "return_num_input_tokens": InputSpec("BOOL", (1,)),
    "return_num_output_tokens": InputSpec("BOOL", (1,)),
}
TRTLLM_INPUTS: dict[str, InputSpec] = {
    "text_input": InputSpec("BYTES", (1,)),
    "max_tokens": InputSpec("INT32", (1,)),
    "bad_words": InputSpec("BYTES", (-1,)),
    "stop_words": InputSpec("BYTES", (-1,)),
    "end_id": InputSpec("INT32", (1,)),
    "pad_id": InputSpec("INT32", (1,)),
    "top_k": InputSpec("INT32", (1,)),
    "min_tokens": InputSpec("INT32", (1,)),
    "top_p": InputSpec("FP32", (1,)),
    "temperature": InputSpec("FP32", (1,)),
    "repetition_penalty": InputSpec("FP32", (1,)),
    "presence_penalty": InputSpec("FP32", (1,)),
    "frequency_penalty": InputSpec("FP32", (1,)),
    "seed": InputSpec("UINT64", (1,)),
    "stream": InputSpec("BOOL", (1,)),
    "exclude_input_in_output": InputSpec("BOOL", (1,)),
    "return_log_probs": InputSpec("BOOL", (1,)),
}
# Sampling keyword -> ensemble input name, where they differ.
TRTLLM_RENAMES = {"stop": "stop_words", "logprobs": "return_log_probs"}
# The ensemble's max_batch_size (its inputs then take a leading batch dimension of 1).
TRTLLM_MAX_BATCH_SIZE = 64


def _trtllm_sampling(sampling: dict[str, Any]) -> dict[str, Any]:
    """vLLM-style keywords in TensorRT-LLM's terms: there, decoding is greedy unless top_k or
    top_p is set, so temperature > 0 alone gets top_p = 1 (the whole distribution)."""
    temperature = sampling.get("temperature")
    if (temperature is not None and float(temperature) > 0 and sampling.get("top_k") is None
            and sampling.get("top_p") is None):
        sampling = {**sampling, "top_p": 1.0}
    return sampling


@dataclass(frozen=True)
class ModelInfo:
    """What the client needs to know about the model it calls."""

    name: str
    kind: str  # VLLM or TRTLLM
    inputs: dict[str, InputSpec]
    max_batch_size: int = 0

    @classmethod
    def default(cls, name: str, kind: str | None = None) -> "ModelInfo":
        kind = kind or guess_kind(name)
        if kind == VLLM:
            return cls(name, kind, dict(VLLM_INPUTS), 0)
        return cls(name, kind, dict(TRTLLM_INPUTS), TRTLLM_MAX_BATCH_SIZE)

    @classmethod
    def from_config(cls, config: dict, kind: str | None = None) -> "ModelInfo":
        """From the model configuration as JSON (HTTP `/config`, or gRPC config as a dict)."""
        inputs = {}
        for inp in config.get("input", []):
            datatype = _config_type_to_datatype(inp.get("data_type", "TYPE_STRING"))
            dims = tuple(int(d) for d in inp.get("dims", [1]))
            inputs[inp["name"]] = InputSpec(datatype, dims)
        if kind is None:
            kind = VLLM if "sampling_parameters" in inputs else (
                TRTLLM if "max_tokens" in inputs else guess_kind(config.get("name", "")))
        return cls(config.get("name", ""), kind, inputs, int(config.get("max_batch_size", 0) or 0))


def guess_kind(model_name: str) -> str:
    name = model_name.lower()
    return TRTLLM if "ensemble" in name or "tensorrt_llm" in name else VLLM


def _config_type_to_datatype(config_type: str) -> str:
    t = config_type.replace("TYPE_", "")
    return {"STRING": "BYTES", "FP32": "FP32", "FP16": "FP16", "FP64": "FP64"}.get(t, t)


@dataclass
class TensorValue:
    """One request input, ready for a transport: name, Triton datatype, shape, flat values."""

    name: str
    datatype: str
    shape: list[int]
    values: list[Any]

    def as_numpy(self) -> np.ndarray:
        dtype = {
            "BYTES": np.object_, "BOOL": np.bool_, "INT32": np.int32, "INT64": np.int64,
            "UINT32": np.uint32, "UINT64": np.uint64, "FP32": np.float32, "FP64": np.float64,
        }[self.datatype]
        values = [v.encode() if isinstance(v, str) else v for v in self.values]
        return np.array(values, dtype=dtype).reshape(self.shape)


def _coerce(name: str, value: Any, datatype: str) -> list[Any]:
    """A user value as a flat list of the input's type; InvalidArgument naming the field if not."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    try:
        if datatype == "BYTES":
            return [v if isinstance(v, bytes) else str(v) for v in values]
        if datatype == "BOOL":
            out = []
            for v in values:
                if isinstance(v, str):
                    if v.lower() not in ("true", "false", "1", "0"):
                        raise ValueError(v)
                    v = v.lower() in ("true", "1")
                out.append(bool(v))
            return out
        if datatype.startswith(("INT", "UINT")):
            out = []
            for v in values:
                f = float(v)
                if f != int(f):
                    raise ValueError(v)
                out.append(int(f))
            if datatype.startswith("UINT") and any(v < 0 for v in out):
                raise ValueError("negative")
            return out
        if datatype.startswith("FP"):
            return [float(v) for v in values]
    except (TypeError, ValueError):
        raise InvalidArgument(
            f"sampling parameter {name!r} must be {datatype.lower()}, got {value!r}") from None
    return values


def _prompt_input(prompt: "str | list[int]") -> tuple[str, Any]:
    """(input name, value): text goes as text_input, a list of token ids as input_ids."""
    if isinstance(prompt, str):
        return "text_input", prompt
    if isinstance(prompt, (list, tuple)) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return "input_ids", list(prompt)
    raise InvalidArgument("the prompt must be a string or a list of token ids")


def build_inputs(model: ModelInfo, prompt: "str | list[int]", stream: bool,
                 sampling: dict[str, Any]) -> list[TensorValue]:
    """The request's input tensors for the gRPC protocol.

    Args:
        model: the model's kind and declared inputs.
        prompt: the prompt text, or its token ids (sent as `input_ids`).
        stream: whether the server should stream deltas.
        sampling: sampling keywords (max_tokens=..., temperature=..., stop=[...], ...); None values
            are dropped.
    Returns:
        the tensors, shaped for the model (a leading batch dim of 1 when it batches).
    """
    sampling = {k: v for k, v in sampling.items() if v is not None}
    # Required inputs fail loudly when the model lacks them; optional flags are left out.
    prompt_name, prompt_value = _prompt_input(prompt)
    required: dict[str, Any] = {prompt_name: prompt_value}
    optional: dict[str, Any] = {"stream": stream, "exclude_input_in_output": True}
    if model.kind == VLLM:
        if sampling:
            required["sampling_parameters"] = json.dumps(sampling)
        optional.update(_vllm_return_flags(sampling))
    else:
        for key, value in _trtllm_sampling(sampling).items():
            required[TRTLLM_RENAMES.get(key, key)] = value
    tensors = []
    for name, value in [*required.items(), *optional.items()]:
        spec = model.inputs.get(name)
        if spec is None:
            if name in required:
                raise InvalidArgument(
                    f"model {model.name!r} has no input {name!r} (its inputs: "
                    f"{', '.join(sorted(model.inputs))})")
            continue
        values = _coerce(name, value, spec.datatype)
        dims = [len(values) if d == -1 else d for d in spec.dims] or [1]
        if int(np.prod(dims)) != len(values):
            dims = [len(values)]
        shape = ([1] if model.max_batch_size > 0 else []) + dims
        tensors.append(TensorValue(name, spec.datatype, shape, values))
    return tensors


def build_http_body(model: ModelInfo, prompt: str, stream: bool, sampling: dict[str, Any]) -> dict:
    """The JSON body for Triton's `/v2/models/<m>/generate[_stream]`.

    Keys that name model inputs become tensors; the others become request parameters, which the
    engine model reads when `sampling_parameters` is absent. Request parameters must be scalars,
    so lists (stop, stop_token_ids) travel as JSON strings ("values may be strings").
    """
    sampling = {k: v for k, v in sampling.items() if v is not None}
    prompt_name, prompt_value = _prompt_input(prompt)
    body: dict[str, Any] = {prompt_name: prompt_value, "stream": stream}
    if model.kind == VLLM:
        body["exclude_input_in_output"] = True
        for key, value in _vllm_return_flags(sampling).items():
            if key in model.inputs:
                body[key] = value
        for key, value in sampling.items():
            if key == "stop" and isinstance(value, str):
                value = [value]  # so that a stop string that looks like JSON stays a string
            body[key] = json.dumps(value) if isinstance(value, (list, tuple, dict)) else value
    else:
        if "exclude_input_in_output" in model.inputs:
            body["exclude_input_in_output"] = True
        for key, value in _trtllm_sampling(sampling).items():
            name = TRTLLM_RENAMES.get(key, key)
            if name not in model.inputs:
                raise InvalidArgument(
                    f"model {model.name!r} has no input {name!r} (its inputs: "
                    f"{', '.join(sorted(model.inputs))})")
            spec = model.inputs[name]
            values = _coerce(name, value, spec.datatype)
            body[name] = values if -1 in spec.dims else values[0]
    return body


def _vllm_return_flags(sampling: dict[str, Any]) -> dict[str, bool]:
    flags = {"return_finish_reason": True, "return_num_input_tokens": True,
             "return_num_output_tokens": True}
    if sampling.get("logprobs") is not None:
        flags["return_logprobs"] = True
        flags["return_cumulative_logprob"] = True
    return flags


@dataclass
class Chunk:
    """One response of a request: a text delta and whatever else the model sent with it.

    `num_output_tokens` is this response's increment (the engine model sends increments);
    `num_input_tokens` is the prompt length where the model sent it.
    """

    text: str = ""
    finish_reason: str | None = None
    num_input_tokens: int | None = None
    num_output_tokens: int | None = None
    cumulative_logprob: float | None = None
    logprobs: list | None = None
    prompt_logprobs: list | None = None  # per prompt token (None first), on the first response


def _first(value: Any) -> Any:
    """The first element of a numpy array / list / scalar (the n=1 output)."""
    if isinstance(value, np.ndarray):
        if value.size == 0:
            return None
        return value.reshape(-1)[0]
    if isinstance(value, (list, tuple)):
        return _first(value[0]) if value else None
    return value


def _text(value: Any) -> str | None:
    v = _first(value)
    if v is None:
        return None
    if isinstance(v, bytes):
        return v.decode("utf-8", errors="replace")
    return str(v)


def parse_outputs(outputs: dict[str, Any]) -> Chunk:
    """A `Chunk` from one response's outputs: numpy arrays (gRPC) or JSON values (HTTP)."""
    chunk = Chunk()
    chunk.text = _text(outputs.get("text_output")) or ""
    reason = _text(outputs.get("finish_reason"))
    chunk.finish_reason = reason or None
    for name in ("num_input_tokens", "num_output_tokens"):
        v = _first(outputs.get(name))
        if v is not None:
            setattr(chunk, name, int(v))
    for name in ("cumulative_logprob", "cum_log_probs"):
        v = _first(outputs.get(name))
        if v is not None:
            chunk.cumulative_logprob = float(v)
    lp = _text(outputs.get("logprobs"))
    if lp:
        try:
            parsed = json.loads(lp)
            chunk.logprobs = parsed if isinstance(parsed, list) else [parsed]
        except ValueError:
            chunk.logprobs = None
    plp = _text(outputs.get("prompt_logprobs"))
    if plp:
        try:
            parsed = json.loads(plp)
            chunk.prompt_logprobs = parsed if isinstance(parsed, list) else None
        except ValueError:
            chunk.prompt_logprobs = None
    return chunk


@dataclass
class Completion:
    """The result of one request.

    Attributes:
        text: the generated text (prompt excluded).
        finish_reason: "stop", "length", "abort", or None when the model does not report it.
        num_input_tokens: prompt tokens, when the model reports them.
        num_output_tokens: generated tokens (sum of the per-response increments), when reported.
        cumulative_logprob, logprobs: when asked for with `logprobs=N`.
        prompt_logprobs: when asked for with `prompt_logprobs=N` (None for the first token).
        num_responses: how many responses the server sent.
        ttft_s: seconds from sending to the first non-empty text (or first response).
        latency_s: seconds from sending to the final response.
    """

    text: str = ""
    finish_reason: str | None = None
    num_input_tokens: int | None = None
    num_output_tokens: int | None = None
    cumulative_logprob: float | None = None
    logprobs: list | None = None
    prompt_logprobs: list | None = None
    num_responses: int = 0
    ttft_s: float | None = None
    latency_s: float | None = None


class CompletionBuilder:
    """Folds a request's chunks into a `Completion`, timing them as they arrive.

    The text is joined when `completion` is read, so a long stream costs O(length) in all.
    """

    def __init__(self, start_s: float | None = None):
        self.start_s = time.perf_counter() if start_s is None else start_s
        self._completion = Completion()
        self._texts: list[str] = []
        self._num_joined = 0

    @property
    def completion(self) -> Completion:
        if self._num_joined != len(self._texts):
            self._completion.text = "".join(self._texts)
            self._num_joined = len(self._texts)
        return self._completion

    def add(self, chunk: Chunk) -> None:
        c = self._completion
        now = time.perf_counter()
        c.num_responses += 1
        if c.ttft_s is None and (chunk.text or chunk.num_output_tokens):
            c.ttft_s = now - self.start_s
        if chunk.text:
            self._texts.append(chunk.text)
        if chunk.finish_reason:
            c.finish_reason = chunk.finish_reason
        if chunk.num_input_tokens is not None:
            c.num_input_tokens = chunk.num_input_tokens
        if chunk.num_output_tokens is not None:
            c.num_output_tokens = (c.num_output_tokens or 0) + chunk.num_output_tokens
        if chunk.cumulative_logprob is not None:
            c.cumulative_logprob = chunk.cumulative_logprob
        if chunk.logprobs is not None:
            if c.logprobs is None:
                c.logprobs = []
            c.logprobs.extend(chunk.logprobs)
        if chunk.prompt_logprobs is not None:
            c.prompt_logprobs = chunk.prompt_logprobs

    def finish(self) -> Completion:
        """Stamp the end time (the final response, or the moment the stream was closed)."""
        c = self.completion
        if c.latency_s is None:
            c.latency_s = time.perf_counter() - self.start_s
            if c.ttft_s is None:
                c.ttft_s = c.latency_s
        return c
