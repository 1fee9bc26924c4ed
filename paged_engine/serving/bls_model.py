"""`tensorrt_llm_bls`: TensorRT-LLM's BLS front door, one Python model running pre -> engine -> post.

It takes TensorRT-LLM's inputs and batch dimension (as the ensemble does, see
serving/trtllm_request.py), batches of several prompts included: each row becomes its own
paged_llm request and its responses carry `batch_index`. Tokenization and detokenization run
here; the engine is reached with a decoupled BLS request to paged_llm's token-level interface,
always streamed, so that this model holds the engine request id from the first token on. A
non-streaming request is assembled here and answered once per sequence.

Cancellation reaches the engine: each row's thread asks whether the client cancelled (at most
every `_CANCEL_POLL_S`, since each question is a message to Triton), and then aborts the engine
request by its id through paged_llm's abort input (and cancels the BLS stream where the Python
backend can, Triton >= 25.04). The client gets a CANCELLED error as its final response. Until the
first token the engine request id is not known, so a request cancelled while still queued in the
engine is aborted when its first token comes.

Every request gets exactly one final flag: the row that finishes last sends it.

With `model_transaction_policy { decoupled: false }` (TensorRT-LLM's `decoupled_mode: false`)
the model serves Triton's unary endpoints (HTTP `/v2/models/tensorrt_llm_bls/infer`, gRPC
ModelInfer), which do not take decoupled models: then a request gets exactly one response, so
`stream`, `num_return_sequences` > 1 and batches of several prompts are refused.
"""

from __future__ import annotations

import json
import threading
import time

import numpy as np

from paged_engine.serving.intake import RequestTooLarge, parse_max_prompt_bytes
from paged_engine.serving.request import RequestError
from paged_engine.serving.text_models import (context_length, load_tokenizer, model_param,
                                              send_engine_abort, tokenize_prompt, truthy,
                                              window_text)
from paged_engine.serving.trtllm_request import batch_size, logit_bias, parse_trtllm_row

_CANCEL_POLL_S = 0.02
_ENGINE_OUTPUTS = ["output_ids", "output_read_offset", "output_text_offset", "output_text_length",
                   "output_final", "cum_log_probs", "output_log_probs", "output_sequence_index",
                   "num_input_tokens", "num_output_tokens", "engine_request_id"]


class _Request:
    """One client request: its rows share the response sender and the final flag."""

    def __init__(self, request, sender, num_rows: int):
        self.request = request
        self.sender = sender
        self.lock = threading.Lock()
        self.rows_left = num_rows
        self.cancelled = False
        self.last_cancel_poll = 0.0

    def is_cancelled(self) -> bool:
        now = time.monotonic()
        if not self.cancelled and now - self.last_cancel_poll >= _CANCEL_POLL_S:
            self.last_cancel_poll = now
            try:
                self.cancelled = bool(self.sender.is_cancelled())
            except Exception:
                self.cancelled = True
        return self.cancelled


def _check_one_response(rows) -> None:
    """A non-decoupled model answers each request once."""
    if len(rows) > 1:
        raise RequestError(f"a batch of {len(rows)} prompts needs the decoupled model (this "
                           "tensorrt_llm_bls is configured with decoupled: false)")
    if rows[0].stream:
        raise RequestError("'stream' needs the decoupled model (this tensorrt_llm_bls is "
                           "configured with decoupled: false)")
    if int(rows[0].settings.get("n", 1)) > 1:
        raise RequestError("num_return_sequences > 1 needs the decoupled model (this "
                           "tensorrt_llm_bls is configured with decoupled: false)")


class TensorrtLlmBlsModel:
    """initialize / execute / finalize of `tensorrt_llm_bls` (decoupled, or not: see above).

    Args:
        pb_utils: the `triton_python_backend_utils` module.
    """

    def __init__(self, pb_utils, decode_window=None):
        self.pb = pb_utils
        self._decode_window = decode_window
        self._threads: set[threading.Thread] = set()
        self._threads_lock = threading.Lock()

    def initialize(self, args: dict) -> None:
        pb = self.pb
        model_config = json.loads(args["model_config"])
        self.decoupled = bool(pb.using_decoupled_model_transaction_policy(model_config))
        self.tokenizer = load_tokenizer(model_config, args["model_name"])
        self.add_special_tokens = truthy(model_param(model_config, "add_special_tokens", "true"))
        self.skip_special_tokens = truthy(model_param(model_config, "skip_special_tokens", "true"))
        # TensorRT-LLM's parameter name for the engine model works too.
        self.engine_model = model_param(model_config, "tensorrt_llm_model_name", "") or \
            model_param(model_config, "engine_model", "paged_llm")
        self.max_model_len = context_length(model_param(model_config, "tokenizer_dir", ""),
                                            self.tokenizer)
        self.max_prompt_bytes = parse_max_prompt_bytes(
            model_param(model_config, "max_prompt_bytes", "auto"), self.tokenizer,
            self.max_model_len)
        if self._decode_window is None:
            from paged_engine.output.detokenizer import decode_window

            self._decode_window = decode_window

    def execute(self, requests):
        """Parse each request and hand its rows to their threads; returns None."""
        pb = self.pb
        for request in requests:
            sender = request.get_response_sender()

            def get(name, _request=request):
                tensor = pb.get_input_tensor_by_name(_request, name)
                return None if tensor is None else tensor.as_numpy()

            try:
                num_rows = batch_size(get)
                rows = [parse_trtllm_row(get, row, num_rows, self.max_prompt_bytes)
                        for row in range(num_rows)]
                if not self.decoupled:
                    _check_one_response(rows)
            except (RequestError, RequestTooLarge) as e:
                self._send(sender, error=("INVALID_ARG", f"tensorrt_llm_bls: {e}"), final=True)
                continue
            except Exception as e:
                self._send(sender, error=("INVALID_ARG", f"tensorrt_llm_bls: {e!r}"), final=True)
                continue
            state = _Request(request, sender, num_rows)
            for row, parsed in enumerate(rows):
                thread = threading.Thread(target=self._serve_row, args=(state, row, parsed),
                                          name=f"bls-row-{row}", daemon=True)
                with self._threads_lock:
                    self._threads.add(thread)
                thread.start()
        return None

    def finalize(self) -> None:
        with self._threads_lock:
            threads = list(self._threads)
        deadline = time.monotonic() + 10.0
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    # -- one row -------------------------------------------------------------------------------

    def _send(self, sender, outputs: dict | None = None, error=None, final: bool = False) -> None:
        pb = self.pb
        flags = pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0
        try:
            if error is not None:
                code = getattr(pb.TritonError, error[0], pb.TritonError.INTERNAL)
                sender.send(pb.InferenceResponse(output_tensors=[],
                                                 error=pb.TritonError(error[1], code)), flags=flags)
            elif outputs is not None:
                sender.send(pb.InferenceResponse(
                    output_tensors=[pb.Tensor(k, v) for k, v in outputs.items()]), flags=flags)
            else:
                sender.send(flags=flags)
        except Exception as e:  # the client went away; nothing else to do for it
            pb.Logger.log_warn(f"tensorrt_llm_bls: sending a response failed: {e!r}")

    def _row_done(self, state: _Request) -> bool:
        """Count a finished row; True for the last one (it sends the final flag)."""
        with state.lock:
            state.rows_left -= 1
            return state.rows_left == 0

    def _serve_row(self, state: _Request, row: int, parsed) -> None:
        try:
            self._run_row(state, row, parsed)
        except Exception as e:
            self.pb.Logger.log_error(f"tensorrt_llm_bls: row {row} failed: {e!r}")
            self._send(state.sender, error=("INTERNAL", f"tensorrt_llm_bls: {e!r}"),
                       final=self._row_done(state))
        finally:
            with self._threads_lock:
                self._threads.discard(threading.current_thread())

    def _engine_request(self, parsed, input_ids: np.ndarray):
        pb = self.pb
        settings = dict(parsed.settings)
        if parsed.embedding_bias:
            settings["logit_bias"] = {str(k): v for k, v in
                                      logit_bias(self.tokenizer, parsed.embedding_bias).items()}
        tensors = {
            "input_ids": input_ids.reshape(-1),
            "sampling_parameters": np.array([json.dumps(settings).encode("utf-8")],
                                            dtype=np.object_),
            # Always streamed from the engine: the engine request id comes with the first token.
            "stream": np.array([True]),
            "exclude_input_in_output": np.array([True]),
            "return_num_input_tokens": np.array([parsed.return_num_input_tokens]),
            "return_num_output_tokens": np.array([parsed.return_num_output_tokens]),
        }
        return pb.InferenceRequest(model_name=self.engine_model,
                                   inputs=[pb.Tensor(k, v) for k, v in tensors.items()],
                                   requested_output_names=_ENGINE_OUTPUTS)

    def _run_row(self, state: _Request, row: int, parsed) -> None:
        try:
            input_ids = tokenize_prompt(self.tokenizer, parsed, self.add_special_tokens,
                                        self.max_model_len)
        except (RequestError, ValueError) as e:
            self._send(state.sender, error=("INVALID_ARG", f"tensorrt_llm_bls: {e}"),
                       final=self._row_done(state))
            return
        num_sequences = int(parsed.settings.get("n", 1))
        prompt_text = "" if parsed.exclude_input_in_output else \
            self.tokenizer.decode(input_ids.reshape(-1).tolist(), skip_special_tokens=True)
        finished: set[int] = set()
        texts: dict[int, list[str]] = {}
        log_probs: dict[int, list[np.ndarray]] = {}
        out_tokens: dict[int, int] = {}
        engine_id = None
        responses = self._engine_request(parsed, input_ids).exec(decoupled=True)
        for response in responses:
            outputs = {} if response.has_error() else {
                t.name(): t.as_numpy() for t in response.output_tensors()}
            if engine_id is None and "engine_request_id" in outputs:
                value = outputs["engine_request_id"].reshape(-1)[0]
                engine_id = value.decode() if isinstance(value, bytes) else str(value)
            if state.is_cancelled():
                self._cancel(responses, engine_id)
                self._send(state.sender, error=("CANCELLED", "request was cancelled"),
                           final=self._row_done(state))
                return
            if response.has_error():
                message = response.error().message()
                code = "CANCELLED" if "cancel" in message.lower() else "INVALID_ARG"
                self._send(state.sender, error=(code, message), final=self._row_done(state))
                self._drain(responses)
                return
            if "output_ids" not in outputs:
                continue  # an empty final flag
            index = int(outputs["output_sequence_index"].reshape(-1)[0])
            text = window_text(outputs.get, self.tokenizer, self._decode_window,
                               self.skip_special_tokens)
            final = bool(outputs["output_final"].reshape(-1)[0])
            if final:
                finished.add(index)
            count = int(outputs["num_output_tokens"].reshape(-1).sum()) \
                if "num_output_tokens" in outputs else None
            chosen = outputs.get("output_log_probs", np.zeros((0,), np.float32)).reshape(-1)
            last = final and len(finished) == num_sequences
            if parsed.stream:
                self._send(state.sender, self._outputs(parsed, row, index, text, outputs, chosen,
                                                       count),
                           final=last and self._row_done(state))
            else:
                texts.setdefault(index, []).append(text)
                log_probs.setdefault(index, []).append(chosen)
                if count is not None:
                    out_tokens[index] = out_tokens.get(index, 0) + count
                if final:
                    whole = prompt_text + "".join(texts.pop(index))
                    self._send(state.sender, self._outputs(
                        parsed, row, index, whole, outputs, np.concatenate(log_probs.pop(index)),
                        out_tokens.get(index)), final=last and self._row_done(state))
            if last:
                self._drain(responses)
                return
        # The engine stream ended without every sequence's last window (it should not).
        self._send(state.sender, error=("INTERNAL", "tensorrt_llm_bls: the engine stream ended "
                                                    "early"), final=self._row_done(state))

    def _outputs(self, parsed, row: int, index: int, text: str, engine: dict,
                 chosen_log_probs: np.ndarray, num_output_tokens: int | None) -> dict:
        """One response, shaped as TensorRT-LLM's BLS model shapes them."""
        out = {
            "text_output": np.array([text.encode("utf-8")], dtype=np.object_),
            "cum_log_probs": engine.get("cum_log_probs",
                                        np.zeros((1,), np.float32)).astype(np.float32).reshape(-1),
            "output_log_probs": chosen_log_probs.astype(np.float32).reshape(1, -1),
            "batch_index": np.array([[row]], dtype=np.int32),
            "sequence_index": np.array([[index]], dtype=np.int32),
        }
        if parsed.return_num_input_tokens and "num_input_tokens" in engine:
            out["num_input_tokens"] = np.array(
                [[int(engine["num_input_tokens"].reshape(-1)[0])]], dtype=np.int32)
        if parsed.return_num_output_tokens and num_output_tokens is not None:
            out["num_output_tokens"] = np.array([[num_output_tokens]], dtype=np.int32)
        return out

    def _cancel(self, responses, engine_id: str | None) -> None:
        cancel = getattr(responses, "cancel", None)  # the Python backend's, from Triton 25.04
        if callable(cancel):
            try:
                cancel()
            except Exception:
                pass
        if engine_id is not None:
            send_engine_abort(self.pb, self.engine_model, engine_id, "tensorrt_llm_bls")
        self._drain(responses)

    @staticmethod
    def _drain(responses) -> None:
        """Read the engine stream to its end (its final flag), so nothing is left behind."""
        try:
            for _ in responses:
                pass
        except Exception:
            pass
