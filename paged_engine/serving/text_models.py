"""The ensemble's `preprocessing` (text -> token ids) and `postprocessing` (token window -> text).

Postprocessing is stateless: each response of `paged_llm` carries a short window of token ids and
the offset where its new tokens start (`output_ids`, `output_read_offset`), and
`decode_window` turns that into exactly the engine's text delta, holding back nothing and
dropping nothing (TensorRT-LLM's postprocessing decodes each chunk alone, losing SentencePiece
spaces and splitting multi-byte characters). So the concatenated stream equals the offline text
byte for byte with any number of postprocessing instances.
"""

from __future__ import annotations

import collections
import json
import os

import numpy as np

from paged_engine.serving.intake import RequestTooLarge, parse_max_prompt_bytes
from paged_engine.serving.request import RequestError
from paged_engine.serving.sender import make_response
from paged_engine.serving.trtllm_request import batch_size, logit_bias, parse_trtllm_row


def model_param(model_config: dict, key: str, default: str) -> str:
    value = model_config.get("parameters", {}).get(key, {}).get("string_value", default)
    # An unfilled template value ("${tokenizer_dir}") counts as unset.
    return default if value.startswith("${") else value


def truthy(text: str) -> bool:
    return text.strip().lower() in ("1", "true", "yes", "on")


def load_tokenizer(model_config: dict, model_name: str):
    from transformers import AutoTokenizer

    tokenizer_dir = model_param(model_config, "tokenizer_dir", "")
    if not tokenizer_dir:
        raise RuntimeError(
            f"{model_name}: set the 'tokenizer_dir' parameter in config.pbtxt "
            "(paged_engine.deploy.repository.prepare_model_repository fills it)")
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def _input(pb, request, name):
    tensor = pb.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


class PreprocessingModel:
    """The ensemble's front door (TensorRT-LLM's inputs, `max_batch_size > 0`) -> paged_llm's.

    text_input (+ apply_chat_template) -> input_ids INT32 [-1], input_length INT32 [1];
    the TensorRT-LLM sampling tensors (serving/trtllm_request.py: TensorRT-LLM's semantics,
    aliases, what is refused) -> sampling_parameters STRING [1] (JSON); stream,
    exclude_input_in_output, return_num_input_tokens, return_num_output_tokens -> the same names,
    normalised for paged_llm (a stream never repeats the prompt). stop_words and bad_words go on
    as strings: the engine matches stop strings on the text and tokenizes bad words itself.
    One prompt per request: a larger batch is refused (tensorrt_llm_bls takes batches).

    A text_input over `max_prompt_bytes` is refused before it is decoded, and tokenizing stops
    past the model's context length (serving/intake.py).
    """

    def __init__(self, pb_utils):
        self.pb = pb_utils

    def initialize(self, args: dict) -> None:
        model_config = json.loads(args["model_config"])
        self.tokenizer = load_tokenizer(model_config, args["model_name"])
        self.add_special_tokens = truthy(model_param(model_config, "add_special_tokens", "true"))
        self.max_model_len = context_length(model_param(model_config, "tokenizer_dir", ""),
                                             self.tokenizer)
        self.max_prompt_bytes = parse_max_prompt_bytes(
            model_param(model_config, "max_prompt_bytes", "auto"), self.tokenizer, self.max_model_len)

    def _encode(self, request) -> dict[str, np.ndarray]:
        def get(name):
            return _input(self.pb, request, name)

        num_rows = batch_size(get)
        if num_rows != 1:
            raise RequestError(
                f"the ensemble takes one prompt per request, got a batch of {num_rows}: send "
                f"{num_rows} requests (they are batched by the engine), or use tensorrt_llm_bls")
        req = parse_trtllm_row(get, 0, 1, self.max_prompt_bytes)
        ids = tokenize_prompt(self.tokenizer, req, self.add_special_tokens, self.max_model_len)
        settings = dict(req.settings)
        if req.embedding_bias:
            settings["logit_bias"] = {str(k): v for k, v in
                                      logit_bias(self.tokenizer, req.embedding_bias).items()}

        def flag(value):
            return np.array([[value]], dtype=np.bool_)

        return {
            "input_ids": ids,
            "input_length": np.array([[ids.shape[1]]], dtype=np.int32),
            "sampling_parameters": np.array([[json.dumps(settings).encode("utf-8")]],
                                            dtype=np.object_),
            "stream": flag(req.stream),
            "exclude_input_in_output": flag(req.exclude_input_in_output),
            "return_num_input_tokens": flag(req.return_num_input_tokens),
            "return_num_output_tokens": flag(req.return_num_output_tokens),
        }

    def execute(self, requests):
        pb = self.pb
        responses = []
        for request in requests:
            try:
                responses.append(make_response(pb, self._encode(request)))
            except (RequestError, RequestTooLarge, ValueError) as e:
                responses.append(make_response(pb, error=("INVALID_ARG", f"preprocessing: {e}")))
            except Exception as e:
                responses.append(make_response(pb, error=("INVALID_ARG",
                                                          f"preprocessing: {e!r}")))
        return responses


def tokenize_prompt(tokenizer, req, add_special_tokens: bool, max_model_len: int | None
                    ) -> np.ndarray:
    """A TrtllmRequest's prompt as input_ids [1, tokens] (chat template when asked); tokenizing
    stops past max_model_len, and such a prompt is refused."""
    text = req.text
    if req.apply_chat_template:
        messages = json.loads(text) if text.lstrip().startswith("[") else [
            {"role": "user", "content": text}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
    else:
        kwargs = {"add_special_tokens": add_special_tokens}
        if max_model_len is not None:
            kwargs.update(truncation=True, max_length=max_model_len + 1)
        ids = tokenizer(text, **kwargs).input_ids
    if max_model_len is not None and len(ids) > max_model_len:
        raise RequestError(f"prompt is too long: more than {max_model_len} tokens, the model's "
                           f"context length")
    return np.asarray(ids, dtype=np.int32).reshape(1, -1)


def context_length(tokenizer_dir: str, tokenizer) -> int | None:
    """The model's context length (config.json beside the tokenizer), else the tokenizer's."""
    try:
        with open(os.path.join(tokenizer_dir, "config.json")) as f:
            config = json.load(f)
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            if isinstance(config.get(key), int) and config[key] > 0:
                return config[key]
    except (OSError, ValueError):
        pass
    length = getattr(tokenizer, "model_max_length", None)
    return length if isinstance(length, int) and 0 < length < 10**8 else None


class PostprocessingModel:
    """output_ids window + output_read_offset (+ output_final, output_text_offset/_length) -> text.

    cum_log_probs / output_log_probs, the sequence index and the token counts pass through (as
    in_*) so every ensemble output comes from this one step, one ensemble response per engine
    response, shaped as TensorRT-LLM's ensemble shapes them.
    """

    def __init__(self, pb_utils, decode_window=None):
        self.pb = pb_utils
        self._decode_window = decode_window
        self._aborted: collections.OrderedDict[str, None] = collections.OrderedDict()

    def initialize(self, args: dict) -> None:
        model_config = json.loads(args["model_config"])
        self.tokenizer = load_tokenizer(model_config, args["model_name"])
        self.skip_special_tokens = truthy(model_param(model_config, "skip_special_tokens", "true"))
        self.engine_model = model_param(model_config, "engine_model", "paged_llm")
        if self._decode_window is None:
            from paged_engine.output.detokenizer import decode_window

            self._decode_window = decode_window

    def _decode(self, request) -> dict[str, np.ndarray]:
        text = window_text(lambda name: _input(self.pb, request, name), self.tokenizer,
                           self._decode_window, self.skip_special_tokens)
        # Shapes as TensorRT-LLM's ensemble returns them for one prompt: text_output [1] (so
        # its clients' `output[0].decode()` works), output_log_probs [beams=1, tokens], the
        # indices and counts [1, 1].
        out = {"text_output": np.array([text], dtype=np.object_)}
        cum = _input(self.pb, request, "in_cum_log_probs")
        out["cum_log_probs"] = (np.asarray(cum, dtype=np.float32).reshape(-1) if cum is not None
                                else np.zeros((1,), dtype=np.float32))
        log_probs = _input(self.pb, request, "in_output_log_probs")
        out["output_log_probs"] = (np.asarray(log_probs, dtype=np.float32).reshape(1, -1)
                                   if log_probs is not None else np.zeros((1, 0), np.float32))
        index = _input(self.pb, request, "in_sequence_index")
        out["sequence_index"] = np.array(
            [[int(np.asarray(index).reshape(-1)[0]) if index is not None else 0]], np.int32)
        out["batch_index"] = np.zeros((1, 1), dtype=np.int32)  # one prompt per request
        for src, dst in (("in_num_input_tokens", "num_input_tokens"),
                         ("in_num_output_tokens", "num_output_tokens")):
            value = _input(self.pb, request, src)
            if value is not None:
                out[dst] = np.array([[int(np.asarray(value).reshape(-1).sum())]], np.int32)
        return out

    def _abort_engine_request(self, request) -> None:
        """The ensemble was cancelled: tell paged_llm to abort the engine request now.

        Triton 2.51's ensemble cancels only the step requests that follow a cancellation, not
        the decoupled paged_llm request already running, so without this the engine would run
        the request to its end. A BLS request with `abort_request_id` reaches paged_llm's
        execute, which hands the abort to its engine thread.
        """
        name = _input(self.pb, request, "engine_request_id")
        if name is None:
            return
        value = np.asarray(name).reshape(-1)[0]
        request_id = value.decode("utf-8") if isinstance(value, bytes) else str(value)
        if request_id in self._aborted:
            return
        self._aborted[request_id] = None
        while len(self._aborted) > 1024:
            self._aborted.popitem(last=False)
        send_engine_abort(self.pb, self.engine_model, request_id, "postprocessing")

    def execute(self, requests):
        pb = self.pb
        responses = []
        for request in requests:
            if request.is_cancelled():
                self._abort_engine_request(request)
                responses.append(make_response(pb, error=("CANCELLED", "request was cancelled")))
                continue
            try:
                responses.append(make_response(pb, self._decode(request)))
            except Exception as e:
                responses.append(make_response(pb, error=("INVALID_ARG", f"postprocessing: {e}")))
        return responses


def window_text(get_input, tokenizer, decode_window, skip_special_tokens: bool) -> str:
    """The text of one token-window response of paged_llm (see serving/response.py):
    decode_window(output_ids, output_read_offset, final=output_final), cut by
    output_text_offset / output_text_length. get_input: name -> array or None."""
    ids = get_input("output_ids")
    if ids is None:
        raise ValueError("missing input 'output_ids'")
    ids = [int(t) for t in np.asarray(ids).reshape(-1)]
    offset = get_input("output_read_offset")
    read_offset = int(np.asarray(offset).reshape(-1)[0]) if offset is not None else 0
    if not 0 <= read_offset <= len(ids):
        raise ValueError(f"output_read_offset {read_offset} outside the window of {len(ids)}")
    final = get_input("output_final")
    final = bool(np.asarray(final).reshape(-1)[0]) if final is not None else False
    text = decode_window(tokenizer, ids, read_offset, skip_special_tokens=skip_special_tokens,
                         final=final)
    skip = get_input("output_text_offset")
    if skip is not None:
        text = text[int(np.asarray(skip).reshape(-1)[0]):]
    length = get_input("output_text_length")
    if length is not None:
        keep = int(np.asarray(length).reshape(-1)[0])
        if keep >= 0:
            text = text[:keep]
    return text


def send_engine_abort(pb, engine_model: str, request_id: str, who: str) -> None:
    """Abort an engine request by its (unguessable) engine request id, with a BLS request to
    paged_llm's `abort_request_id` input; failures are logged, never raised."""
    abort = pb.InferenceRequest(
        model_name=engine_model, requested_output_names=[],
        inputs=[pb.Tensor("abort_request_id",
                          np.array([request_id.encode("utf-8")], dtype=np.object_))])
    # (The id is not logged: it is the capability to abort the request.)
    try:
        for response in abort.exec(decoupled=True):
            if response.has_error():
                pb.Logger.log_warn(f"{who}: aborting an engine request failed: "
                                   f"{response.error().message()}")
    except Exception as e:  # the request is gone either way; never fail the batch for it
        pb.Logger.log_warn(f"{who}: aborting an engine request failed: {e!r}")
