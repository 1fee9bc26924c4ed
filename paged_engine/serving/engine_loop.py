"""The engine thread: the only thread that touches the `LLMEngine` (which is not thread-safe).

`execute` calls `submit` and returns; adds wait in a thread-safe queue and are taken between
engine steps. While any work exists the thread steps the engine; each step's outputs become
responses handed to the sender thread. Cancellation is polled between steps: a cancelled request
is aborted in the engine at once (its KV blocks are freed) and ends with a CANCELLED error; so
does a request named by `abort` (how a cancelled ensemble reaches its running paged_llm step). If
the engine raises, every request in flight and every later one gets UNAVAILABLE and the health
gauge drops to 0 (Triton 2.51's Python backend cannot mark a model not ready).

Every request gets exactly one final response: the request leaves `_active` in the same place
where its final response is queued.

Text prompts are tokenized before they reach this thread, by the intake thread (serving/
intake.py), which also refuses prompts longer than max_model_len and an explicit max_tokens that
cannot fit; the engine thread only queues token ids.

Engine request ids are 128 random bits (plus nothing a client chose): the id is the capability
to abort a request (`abort`, how a cancelled ensemble reaches its running paged_llm step), and
only the owner's pipeline ever sees it, in its own responses.

Three things keep the per-token cost of serving bounded under load, where every response, every
metric update and every `is_cancelled()` is a message to the Triton process:
- Per-token latencies are binned on this thread and published with the stats (serving/metrics.py).
- A streamed request whose previous response is still waiting for the sender thread gets no
  second one: its next deltas are held and merged, and leave as one response once the previous
  one is out (or with the final). Without load nothing is held and every step is one response.
  Token-window responses (the ensemble's) are never merged: each window is decoded on its own.
- Cancellation is polled round-robin, at most `cancel_poll_batch` requests per poll.
"""

from __future__ import annotations

import dataclasses
import queue
import secrets
import threading
import time
import traceback
from dataclasses import dataclass

import numpy as np

from paged_engine.serving.intake import PromptTokenizer, RequestTooLarge, check_lengths
from paged_engine.serving.metrics import TokenLatencyBuckets
from paged_engine.serving.response import TextWindow, build_outputs


@dataclass
class _Request:
    request_id: str
    parsed: object  # ParsedRequest
    response_sender: object
    arrival_s: float
    first_token_s: float | None = None
    last_token_s: float | None = None
    num_output_tokens: int = 0
    text_windows: dict = dataclasses.field(default_factory=dict)  # sequence index -> TextWindow
    finals_sent: set = dataclasses.field(default_factory=set)  # sequences whose last window left
    num_queued: int = 0  # streamed responses handed to the sender (written by the engine thread)
    num_sent: int = 0  # of those, the ones that have left (written by the sender thread)
    held: object | None = None  # RequestOutput deltas waiting for the previous response to leave
    prompt_token_ids: list[int] | None = None  # set by the intake thread for text prompts
    triton_request_id: str = ""  # the client's id, for logs only


def _merge_outputs(earlier, later):
    """One RequestOutput carrying the deltas of two consecutive ones of a request."""
    outs = []
    for a, b in zip(earlier.outputs, later.outputs):
        if a.index != b.index:
            raise ValueError(f"cannot merge completions {a.index} and {b.index}")
        new_ids = list(a.new_token_ids) + list(b.new_token_ids)
        outs.append(dataclasses.replace(b, new_token_ids=new_ids, new_text=a.new_text + b.new_text))
    return dataclasses.replace(later, outputs=outs)


class EngineLoop:
    """Runs `engine.step()` on its own thread while work exists.

    Args:
        engine: an LLMEngine.
        sender: a ResponseSenderThread.
        metrics: a ServingMetrics, or None.
        logger: `pb_utils.Logger`-like.
        decode_window: paged_engine.output.detokenizer.decode_window (token outputs for the ensemble).
        cancel_poll_interval_s: how often in-flight requests are asked whether they were cancelled.
        cancel_poll_batch: at most this many of them per poll (round-robin), so the cost of
            polling does not grow with the number of requests in flight.
        stats_interval_s: how often gauges and counters are refreshed while busy (always on idle).
        tokenizer: tokenize text prompts with a copy of it on the intake thread (None: the engine
            tokenizes them in add_request, on this thread).
        max_model_len: the engine's; prompts and max_tokens are checked against it before they
            are queued (None: only the engine checks).
    """

    def __init__(self, engine, sender, metrics, logger, decode_window=None,
                 cancel_poll_interval_s: float = 0.02, stats_interval_s: float = 0.25,
                 cancel_poll_batch: int = 32, tokenizer=None, max_model_len: int | None = None):
        self.engine = engine
        self._sender = sender
        self._metrics = metrics
        self._logger = logger
        self._decode_window = decode_window
        self._cancel_poll_interval_s = cancel_poll_interval_s
        self._cancel_poll_batch = max(1, cancel_poll_batch)
        self._poll_queue: list[str] = []  # request ids left to poll in this round, last first
        self._holding: set[str] = set()  # requests with held deltas
        self._stats_interval_s = stats_interval_s
        self._health_interval_s = 1.0
        self._token_latencies = TokenLatencyBuckets()  # published with the stats
        # Publishing the bins is about 40 metric messages; once a second is plenty for a
        # Prometheus scrape (and always when the engine goes idle).
        self._token_latency_interval_s = 1.0
        self._last_token_latency_publish = 0.0
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._active: dict[str, _Request] = {}
        self._max_model_len = max_model_len
        self._intake = None
        if tokenizer is not None:
            self._intake = PromptTokenizer(tokenizer, max_model_len, self._on_tokenized,
                                           self._on_tokenize_error, logger)
        self._stop = threading.Event()
        self._lock = threading.Lock()  # orders submit() against the thread's death
        self._healthy = True
        self._failure: str | None = None
        self._window_warned = False
        self._thread = threading.Thread(target=self._run, name="paged-llm-engine", daemon=True)

    # -- called from execute / finalize ---------------------------------------------------------

    @property
    def healthy(self) -> bool:
        return self._healthy

    def start(self) -> None:
        if self._intake is not None:
            self._intake.start()
        self._thread.start()

    def submit(self, response_sender, parsed, triton_request_id: str = "") -> None:
        """Queue a parsed request; never blocks (text prompts go to the intake thread first)."""
        # Unguessable: the id is what an abort names (see `abort`).
        req = _Request(secrets.token_hex(16), parsed, response_sender, time.monotonic(),
                       triton_request_id=triton_request_id)
        if parsed.prompt_token_ids is None and self._intake is not None:
            self._intake.put(req, parsed.prompt)
            return
        self._admit(req, parsed.prompt_token_ids, truncated=False)

    def _on_tokenized(self, req: _Request, ids: list[int], truncated: bool) -> None:
        self._admit(req, ids, truncated)

    def _on_tokenize_error(self, req: _Request, message: str) -> None:
        self._sender.send(req.response_sender, final=True, error=("INVALID_ARG", message))

    def _admit(self, req: _Request, ids: list[int] | None, truncated: bool) -> None:
        """Check the lengths of a request whose ids are known, then queue it for the engine."""
        if ids is not None:
            params = req.parsed.params
            try:
                check_lengths(len(ids), getattr(params, "max_tokens", None),
                              req.parsed.max_tokens_given, self._max_model_len, truncated)
            except RequestTooLarge as e:
                self._sender.send(req.response_sender, final=True, error=("INVALID_ARG", str(e)))
                return
        req.prompt_token_ids = ids
        with self._lock:
            if not self._healthy or self._stop.is_set():
                self._sender.send(req.response_sender, final=True,
                                  error=("UNAVAILABLE", self.unavailable_message()))
                return
            self._commands.put(req)

    def abort(self, request_id: str) -> None:
        """Abort a request by its engine request id (sent as `engine_request_id`); never blocks.

        Triton 2.51's ensemble does not cancel a decoupled step already running when its client
        cancels, only the step requests after it; the postprocessing model sees those cancelled
        and names the engine request here (through a BLS request to paged_llm).
        """
        self._commands.put(("abort", request_id))

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop stepping; requests still in flight end with UNAVAILABLE."""
        with self._lock:
            self._stop.set()
            self._commands.put(None)
        waiting = self._intake.stop() if self._intake is not None else []
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        for req in waiting:
            self._sender.send(req.response_sender, final=True,
                              error=("UNAVAILABLE", "paged_llm is being unloaded"))
        self._fail_all("UNAVAILABLE", "paged_llm is being unloaded")

    # -- the thread ---------------------------------------------------------------------------

    def unavailable_message(self) -> str:
        if self._failure:
            return f"paged_llm engine is unhealthy after an error: {self._failure}"
        return "paged_llm is being unloaded"

    def _run(self) -> None:
        last_cancel_poll = last_stats = last_health_check = 0.0
        was_busy = False
        try:
            while not self._stop.is_set():
                busy = self.engine.has_unfinished_requests()
                self._take_commands(block=not busy)
                now = time.monotonic()
                if not busy and now - last_health_check >= self._health_interval_s:
                    # A tensor-parallel worker that dies while nothing runs turns health red now,
                    # not at the next request.
                    check = getattr(self.engine, "check_health", None)
                    if check is not None:
                        check()
                    last_health_check = now
                if self._active and now - last_cancel_poll >= self._cancel_poll_interval_s:
                    self._poll_cancellations()
                    last_cancel_poll = now
                busy = self.engine.has_unfinished_requests()
                if busy:
                    outputs = self.engine.step()
                    self._handle_outputs(outputs)
                if self._holding:
                    self._release_held()
                now = time.monotonic()
                # Refresh the gauges while busy now and then, and once more on going idle so
                # they show freed blocks.
                if (busy and now - last_stats >= self._stats_interval_s) or (was_busy and not busy):
                    self._publish_stats(idle=not busy)
                    last_stats = now
                was_busy = busy
        except BaseException as e:  # the engine is gone: fail everything, turn health red
            self._failure = f"{type(e).__name__}: {e}"
            self._logger.log_error(
                f"paged_llm: engine thread died: {self._failure}\n{traceback.format_exc()}")
            with self._lock:
                self._healthy = False
            if self._metrics is not None:
                self._sender.call(self._metrics.set_healthy, False)
            self._fail_all("UNAVAILABLE", self.unavailable_message())

    def _take_commands(self, block: bool) -> None:
        try:
            item = self._commands.get(timeout=0.1) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            if isinstance(item, tuple):
                self._abort(item[1], "request was cancelled")
            elif item is not None:
                self._add(item)
            try:
                item = self._commands.get_nowait()
            except queue.Empty:
                return

    def _add(self, req: _Request) -> None:
        parsed = req.parsed
        try:
            self.engine.add_request(req.request_id, prompt=parsed.prompt, params=parsed.params,
                                    prompt_token_ids=req.prompt_token_ids)
        except (ValueError, TypeError) as e:
            self._sender.send(req.response_sender, final=True, error=("INVALID_ARG", str(e)))
            return
        self._active[req.request_id] = req

    def _abort(self, request_id: str, message: str) -> None:
        req = self._active.pop(request_id, None)
        if req is None:  # finished already, or unknown
            return
        self._holding.discard(request_id)
        self.engine.abort(request_id)  # frees its KV blocks now
        self._record_finish(req, time.monotonic(), "abort", None)
        self._sender.send(req.response_sender, final=True, error=("CANCELLED", message))

    def _record_finish(self, req: _Request, now: float, reason: str | None, output) -> None:
        """The per-request metrics of a finished (or aborted) request: one message."""
        if self._metrics is None:
            return
        observed = {"vllm:e2e_request_latency_seconds": now - req.arrival_s}
        if req.num_output_tokens > 1:
            observed["vllm:request_time_per_output_token_seconds"] = (
                (req.last_token_s - req.first_token_s) / (req.num_output_tokens - 1))
        params = req.parsed.params
        observed["vllm:request_params_n"] = getattr(params, "n", 1)
        max_tokens = getattr(params, "max_tokens", None)
        if max_tokens is not None:
            observed["vllm:request_params_max_tokens"] = max_tokens
        if output is not None:
            observed["vllm:request_prompt_tokens"] = len(output.prompt_token_ids)
            observed["vllm:request_generation_tokens"] = req.num_output_tokens
            observed["vllm:request_max_num_generation_tokens"] = max(
                (len(c.token_ids) for c in output.outputs), default=0)
        self._sender.call(self._metrics.finished, reason, observed)

    def _poll_cancellations(self) -> None:
        if not self._poll_queue:
            self._poll_queue = list(reversed(self._active))
        for _ in range(min(self._cancel_poll_batch, len(self._poll_queue))):
            request_id = self._poll_queue.pop()
            req = self._active.get(request_id)
            if req is None:  # finished since the round began
                continue
            try:
                cancelled = req.response_sender.is_cancelled()
            except Exception:  # pragma: no cover - the backend lost the request
                cancelled = True
            if cancelled:
                self._abort(request_id, "request was cancelled")

    def _on_window_mismatch(self, message: str) -> None:
        if not self._window_warned:
            self._window_warned = True
            self._logger.log_warn(f"paged_llm: {message}")

    def _handle_outputs(self, outputs) -> None:
        now = time.monotonic()
        for output in outputs:
            req = self._active.get(output.request_id)
            if req is None:  # aborted by us already
                continue
            parsed = req.parsed
            num_new = sum(len(c.new_token_ids) for c in output.outputs)
            if num_new:
                if req.first_token_s is None:
                    req.first_token_s = now
                    if self._metrics is not None:
                        self._sender.call(self._metrics.observe, "vllm:time_to_first_token_seconds",
                                          now - req.arrival_s)
                else:
                    self._token_latencies.add(now - req.last_token_s)  # binned here, no message
                req.last_token_s = now
                req.num_output_tokens += num_new
            if output.finished:
                del self._active[output.request_id]
                self._holding.discard(output.request_id)
                reason = output.outputs[0].finish_reason if output.outputs else None
                self._record_finish(req, now, reason, output)
                if reason == "abort":
                    # Aborted by the engine itself (not by us): tell the client.
                    self._sender.send(req.response_sender, final=True,
                                      error=("CANCELLED", "request was aborted by the engine"))
                    continue
                if reason == "error":
                    # Failed after it was queued (its structured-output grammar did not
                    # compile): the request's own error; nothing else is affected.
                    self._sender.send(req.response_sender, final=True,
                                      error=("INVALID_ARG", output.error or "request failed"))
                    continue
            elif not parsed.stream:
                continue
            if req.held is not None:
                output, req.held = _merge_outputs(req.held, output), None
            if (not output.finished and not parsed.token_outputs and parsed.stream
                    and req.num_queued > req.num_sent):
                req.held = output  # the previous response is still queued: merge into the next
                self._holding.add(output.request_id)
                continue
            self._holding.discard(output.request_id)
            self._queue_response(req, output)

    def _release_held(self) -> None:
        """Queue the held deltas of requests whose previous response has left."""
        for request_id in list(self._holding):
            req = self._active.get(request_id)
            if req is None or req.held is None:
                self._holding.discard(request_id)
            elif req.num_queued == req.num_sent:
                output, req.held = req.held, None
                self._holding.discard(request_id)
                self._queue_response(req, output)

    def _queue_response(self, req: _Request, output) -> None:
        try:
            if req.parsed.token_outputs:
                responses = self._build_token_responses(req, output)
            else:
                responses = [self._build(req, output)]
        except Exception as e:
            self._logger.log_error(f"paged_llm: building a response failed: {e!r}")
            if not output.finished:
                self.engine.abort(output.request_id)
                self._active.pop(output.request_id, None)
            self._sender.send(req.response_sender, final=True,
                              error=("INTERNAL", f"building the response failed: {e}"))
            return
        if not responses and output.finished:  # nothing new, but the request is done
            self._sender.send(req.response_sender, final=True)
            return
        for i, arrays in enumerate(responses):
            req.num_queued += 1
            last = i == len(responses) - 1
            self._sender.send(req.response_sender, arrays, final=output.finished and last,
                              tracker=req)

    def _prompt_text(self, req: _Request, output) -> str | None:
        prompt_text = req.parsed.prompt
        if (prompt_text is None and not req.parsed.stream
                and not req.parsed.exclude_input_in_output):
            prompt_text = self.engine.tokenizer.decode(output.prompt_token_ids,
                                                       skip_special_tokens=True)
        return prompt_text

    def _build(self, req: _Request, output):
        return build_outputs(req.parsed, output, prompt_text=self._prompt_text(req, output),
                             on_window_mismatch=self._on_window_mismatch,
                             first_response=req.num_queued == 0)

    def _build_token_responses(self, req: _Request, output) -> list[dict]:
        """Token-window responses (the ensemble's and tensorrt_llm_bls's): one per sequence that
        has something to say, each with its sequence index, as TensorRT-LLM answers
        num_return_sequences; a non-streaming request gets each whole sequence at the end."""
        responses = []
        prompt_text = self._prompt_text(req, output)
        for completion in output.outputs:
            if req.parsed.stream and not completion.new_token_ids and not (
                    completion.finished and completion.index not in req.finals_sent):
                continue  # a sibling that did not move this step
            if completion.finished:
                req.finals_sent.add(completion.index)
            window = req.text_windows.get(completion.index)
            if window is None:
                window = req.text_windows[completion.index] = TextWindow(
                    self.engine.tokenizer, self._decode_window,
                    getattr(req.parsed.params, "skip_special_tokens", True))
            one = dataclasses.replace(output, outputs=[completion],
                                      finished=completion.finished)
            arrays = build_outputs(req.parsed, one, prompt_text=prompt_text, text_window=window,
                                   on_window_mismatch=self._on_window_mismatch,
                                   first_response=req.num_queued + len(responses) == 0)
            arrays["engine_request_id"] = np.array([req.request_id.encode()], dtype=np.object_)
            arrays["output_sequence_index"] = np.array([completion.index], dtype=np.int32)
            responses.append(arrays)
        return responses

    def _publish_stats(self, idle: bool = False) -> None:
        if self._metrics is None:
            return
        now = time.monotonic()
        if idle or now - self._last_token_latency_publish >= self._token_latency_interval_s:
            self._last_token_latency_publish = now
            taken = self._token_latencies.take()
            if taken is not None:
                self._sender.call(self._metrics.add_token_latencies, taken)
        try:
            stats = dict(self.engine.stats())
        except Exception as e:  # stats are best effort; never kill the engine thread for them
            self._logger.log_warn(f"paged_llm: engine.stats() failed: {e!r}")
            return
        self._sender.call(self._metrics.update_from_stats, stats)

    def _fail_all(self, code: str, message: str) -> None:
        pending = list(self._active.values())
        self._active.clear()
        self._holding.clear()
        while True:
            try:
                item = self._commands.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Request):
                pending.append(item)
        for req in pending:
            self._sender.send(req.response_sender, final=True, error=(code, message))
