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

import numpy as np

from paged_engine.serving.request import trtllm_sampling_settings
from paged_engine.serving.sender import make_response


def _param(model_config: dict, key: str, default: str) -> str:
    value = model_config.get("parameters", {}).get(key, {}).get("string_value", default)
    # An unfilled template value ("${tokenizer_dir}") counts as unset.
    return default if value.startswith("${") else value


def _bool(text: str) -> bool:
    return text.strip().lower() in ("1", "true", "yes", "on")


def _load_tokenizer(model_config: dict, model_name: str):
    from transformers import AutoTokenizer

    tokenizer_dir = _param(model_config, "tokenizer_dir", "")
    if not tokenizer_dir:
        raise RuntimeError(
            f"{model_name}: set the 'tokenizer_dir' parameter in config.pbtxt "
            "(paged_engine.serving.repository.prepare_model_repository fills it)")
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def _input(pb, request, name):
    tensor = pb.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


class PreprocessingModel:
    """The ensemble's front door -> what paged_llm takes.

    text_input (+ apply_chat_template) -> input_ids INT32 [-1], input_length INT32 [1];
    TensorRT-LLM style sampling tensors (max_tokens, temperature, stop_words, bad_words,
    end_id, ...) -> sampling_parameters STRING [1] (JSON). stop_words and bad_words go on as
    strings (SamplingParams `stop` and `bad_words`): the engine matches stop strings on the text
    and tokenizes bad words itself, with and without a leading space (vLLM semantics).
    """

    def __init__(self, pb_utils):
        self.pb = pb_utils

    def initialize(self, args: dict) -> None:
        model_config = json.loads(args["model_config"])
        self.tokenizer = _load_tokenizer(model_config, args["model_name"])
        self.add_special_tokens = _bool(_param(model_config, "add_special_tokens", "true"))

    def _encode(self, request) -> dict[str, np.ndarray]:
        text_array = _input(self.pb, request, "text_input")
        if text_array is None:
            raise ValueError("missing input 'text_input'")
        flat = np.asarray(text_array).reshape(-1)
        if flat.size != 1:
            raise ValueError(f"input 'text_input' must hold one string, got {flat.size}")
        text = flat[0]
        text = text.decode("utf-8") if isinstance(text, (bytes, np.bytes_)) else str(text)
        if text == "":
            raise ValueError("input 'text_input' is empty: the prompt needs at least one token")
        chat = _input(self.pb, request, "apply_chat_template")
        if chat is not None and bool(np.asarray(chat).reshape(-1)[0]):
            messages = json.loads(text) if text.lstrip().startswith("[") else [
                {"role": "user", "content": text}]
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                     tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
        else:
            ids = self.tokenizer.encode(text, add_special_tokens=self.add_special_tokens)
        ids = np.asarray(ids, dtype=np.int32).reshape(-1)
        settings = trtllm_sampling_settings(lambda name: _input(self.pb, request, name))
        return {
            "input_ids": ids,
            "input_length": np.array([ids.size], dtype=np.int32),
            "sampling_parameters": np.array([json.dumps(settings).encode("utf-8")],
                                            dtype=np.object_),
        }

    def execute(self, requests):
        pb = self.pb
        responses = []
        for request in requests:
            try:
                responses.append(make_response(pb, self._encode(request)))
            except Exception as e:
                responses.append(make_response(pb, error=("INVALID_ARG", f"preprocessing: {e}")))
        return responses


class PostprocessingModel:
    """output_ids window + output_read_offset (+ output_final, output_text_offset/_length) -> text.

    cum_log_probs / output_log_probs pass through (as in_cum_log_probs / in_output_log_probs) so
    every ensemble output comes from this one step, one ensemble response per engine response.
    """

    def __init__(self, pb_utils, decode_window=None):
        self.pb = pb_utils
        self._decode_window = decode_window
        self._aborted: collections.OrderedDict[str, None] = collections.OrderedDict()

    def initialize(self, args: dict) -> None:
        model_config = json.loads(args["model_config"])
        self.tokenizer = _load_tokenizer(model_config, args["model_name"])
        self.skip_special_tokens = _bool(_param(model_config, "skip_special_tokens", "true"))
        self.engine_model = _param(model_config, "engine_model", "paged_llm")
        if self._decode_window is None:
            from paged_engine.detokenizer import decode_window

            self._decode_window = decode_window

    def _decode(self, request) -> dict[str, np.ndarray]:
        ids = _input(self.pb, request, "output_ids")
        if ids is None:
            raise ValueError("missing input 'output_ids'")
        ids = [int(t) for t in np.asarray(ids).reshape(-1)]
        offset = _input(self.pb, request, "output_read_offset")
        read_offset = int(np.asarray(offset).reshape(-1)[0]) if offset is not None else 0
        if not 0 <= read_offset <= len(ids):
            raise ValueError(f"output_read_offset {read_offset} outside the window of {len(ids)}")
        final = _input(self.pb, request, "output_final")
        final = bool(np.asarray(final).reshape(-1)[0]) if final is not None else False
        text = self._decode_window(self.tokenizer, ids, read_offset,
                                   skip_special_tokens=self.skip_special_tokens, final=final)
        skip = _input(self.pb, request, "output_text_offset")
        if skip is not None:
            text = text[int(np.asarray(skip).reshape(-1)[0]):]
        length = _input(self.pb, request, "output_text_length")
        if length is not None:
            keep = int(np.asarray(length).reshape(-1)[0])
            if keep >= 0:
                text = text[:keep]
        out = {"text_output": np.array([text], dtype=np.object_)}
        for src, dst in (("in_cum_log_probs", "cum_log_probs"),
                         ("in_output_log_probs", "output_log_probs")):
            value = _input(self.pb, request, src)
            out[dst] = (np.asarray(value, dtype=np.float32).reshape(-1) if value is not None
                        else np.zeros((0,), dtype=np.float32))
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
        pb = self.pb
        abort = pb.InferenceRequest(
            model_name=self.engine_model, requested_output_names=[],
            inputs=[pb.Tensor("abort_request_id",
                              np.array([request_id.encode("utf-8")], dtype=np.object_))])
        try:
            for response in abort.exec(decoupled=True):
                if response.has_error():
                    pb.Logger.log_warn(f"postprocessing: abort of {request_id} failed: "
                                       f"{response.error().message()}")
        except Exception as e:  # the request is gone either way; never fail the batch for it
            pb.Logger.log_warn(f"postprocessing: abort of {request_id} failed: {e!r}")

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
