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

Two things keep the per-token cost of serving bounded under load, where every response and every
`is_cancelled()` is a message to the Triton process:
- A streamed request whose previous response is still waiting for the sender thread gets no
  second one: its next deltas are held and merged, and leave as one response once the previous
  one is out (or with the final). Without load nothing is held and every step is one response.
  Token-window responses (the ensemble's) are never merged: each window is decoded on its own.
- Cancellation is polled round-robin, at most `cancel_poll_batch` requests per poll.
"""

from __future__ import annotations

import dataclasses
import itertools
import queue
import threading
import time
import traceback
import uuid
from dataclasses import dataclass

import numpy as np

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
    text_window: TextWindow | None = None  # token outputs for the ensemble
    num_queued: int = 0  # streamed responses handed to the sender (written by the engine thread)
    num_sent: int = 0  # of those, the ones that have left (written by the sender thread)
    held: object | None = None  # RequestOutput deltas waiting for the previous response to leave


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
        decode_window: paged_engine.detokenizer.decode_window (token outputs for the ensemble).
        cancel_poll_interval_s: how often in-flight requests are asked whether they were cancelled.
        cancel_poll_batch: at most this many of them per poll (round-robin), so the cost of
            polling does not grow with the number of requests in flight.
        stats_interval_s: how often gauges and counters are refreshed while busy (always on idle).
    """

    def __init__(self, engine, sender, metrics, logger, decode_window=None,
                 cancel_poll_interval_s: float = 0.02, stats_interval_s: float = 0.25,
                 cancel_poll_batch: int = 32):
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
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._active: dict[str, _Request] = {}
        self._ids = itertools.count()
        # Request ids are unique across instances and restarts: the ensemble's postprocessing
        # names one in an abort (see `abort`).
        self._id_prefix = uuid.uuid4().hex[:8]
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
        self._thread.start()

    def submit(self, response_sender, parsed, triton_request_id: str = "") -> None:
        """Queue a parsed request; never blocks."""
        request_id = f"{self._id_prefix}-{next(self._ids)}"
        if triton_request_id:
            request_id += f"-{triton_request_id}"
        with self._lock:
            if not self._healthy or self._stop.is_set():
                self._sender.send(response_sender, final=True,
                                  error=("UNAVAILABLE", self._unavailable_message()))
                return
            self._commands.put(_Request(request_id, parsed, response_sender, time.monotonic()))

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
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        self._fail_all("UNAVAILABLE", "paged_llm is being unloaded")

    # -- the thread ---------------------------------------------------------------------------

    def _unavailable_message(self) -> str:
        if self._failure:
            return f"paged_llm engine is unhealthy after an error: {self._failure}"
        return "paged_llm is being unloaded"

    def _run(self) -> None:
        last_cancel_poll = last_stats = 0.0
        was_busy = False
        try:
            while not self._stop.is_set():
                busy = self.engine.has_unfinished_requests()
                self._take_commands(block=not busy)
                now = time.monotonic()
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
                    self._publish_stats()
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
            self._fail_all("UNAVAILABLE", self._unavailable_message())

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
                                    prompt_token_ids=parsed.prompt_token_ids)
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
        self._sender.send(req.response_sender, final=True, error=("CANCELLED", message))

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
                req.last_token_s = now
                req.num_output_tokens += num_new
            if output.finished:
                del self._active[output.request_id]
                self._holding.discard(output.request_id)
                if self._metrics is not None:
                    self._sender.call(self._metrics.observe, "vllm:e2e_request_latency_seconds",
                                      now - req.arrival_s)
                    if req.num_output_tokens > 1:
                        # Once per request, its mean: a message to Triton per token would
                        # cost as much as sending the token.
                        self._sender.call(self._metrics.observe,
                                          "vllm:time_per_output_token_seconds",
                                          (req.last_token_s - req.first_token_s)
                                          / (req.num_output_tokens - 1))
                if output.outputs and output.outputs[0].finish_reason == "abort":
                    # Aborted by the engine itself (not by us): tell the client.
                    self._sender.send(req.response_sender, final=True,
                                      error=("CANCELLED", "request was aborted by the engine"))
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
            arrays = self._build(req, output)
        except Exception as e:
            self._logger.log_error(f"paged_llm: building a response failed: {e!r}")
            if not output.finished:
                self.engine.abort(output.request_id)
                self._active.pop(output.request_id, None)
            self._sender.send(req.response_sender, final=True,
                              error=("INTERNAL", f"building the response failed: {e}"))
            return
        req.num_queued += 1
        self._sender.send(req.response_sender, arrays, final=output.finished, tracker=req)

    def _build(self, req: _Request, output):
        prompt_text = req.parsed.prompt
        if (prompt_text is None and not req.parsed.stream
                and not req.parsed.exclude_input_in_output):
            prompt_text = self.engine.tokenizer.decode(output.prompt_token_ids,
                                                       skip_special_tokens=True)
        if req.parsed.token_outputs and req.text_window is None:
            req.text_window = TextWindow(self.engine.tokenizer, self._decode_window,
                                         getattr(req.parsed.params, "skip_special_tokens", True))
        arrays = build_outputs(req.parsed, output, prompt_text=prompt_text,
                               text_window=req.text_window,
                               on_window_mismatch=self._on_window_mismatch)
        if req.parsed.token_outputs:
            arrays["engine_request_id"] = np.array([req.request_id.encode()], dtype=np.object_)
        return arrays

    def _publish_stats(self) -> None:
        if self._metrics is None:
            return
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
