"""The response-sender thread: the only place that talks back to Triton after `execute` returns.

Sending a response and updating a metric are each a message to the Triton process; doing them
here keeps the engine thread stepping. Items leave in the order they were queued, so a request's
responses keep their order and its final flag comes last.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable

_STOP = object()


def make_response(pb, outputs: dict | None = None, error: tuple[str, str] | None = None):
    """A `pb_utils.InferenceResponse` from output arrays, or an error one from (code name, e.g.
    "INVALID_ARG", message); None when there is neither (a bare final flag)."""
    if error is not None:
        code_name, message = error
        code = getattr(pb.TritonError, code_name, pb.TritonError.INTERNAL)
        return pb.InferenceResponse(output_tensors=[], error=pb.TritonError(message, code))
    if outputs is None:
        return None
    return pb.InferenceResponse(output_tensors=[pb.Tensor(name, array) for name, array in outputs.items()])


class ResponseSenderThread:
    """Sends queued responses and runs queued metric updates on its own thread.

    Args:
        pb_utils: the `triton_python_backend_utils` module.
        logger: `pb_utils.Logger` or anything with log_error / log_warn.
    """

    def __init__(self, pb_utils, logger):
        self._pb = pb_utils
        self._logger = logger
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="paged-llm-sender", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def send(self, response_sender, outputs: dict | None = None, *, final: bool,
             error: tuple[str, str] | None = None, tracker=None) -> None:
        """Queue one response.

        Args:
            response_sender: the request's `pb_utils.InferenceResponseSender`.
            outputs: output name -> numpy array, or None for an error or empty final response.
            final: set TRITONSERVER_RESPONSE_COMPLETE_FINAL on it.
            error: (code name of pb_utils.TritonError, e.g. "INVALID_ARG", message).
            tracker: an object whose ``num_sent`` this thread increments once the response has
                left (sent or failed), so the engine thread can tell whether it is behind.
        """
        self._queue.put((response_sender, outputs, error, final, tracker))

    def call(self, fn: Callable, *args) -> None:
        """Run fn(*args) on the sender thread (metric updates)."""
        self._queue.put((fn, args))

    def stop(self, timeout_s: float = 10.0) -> None:
        """Send everything queued so far, then end the thread."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout_s)

    def _run(self) -> None:
        final_flag = self._pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            try:
                if len(item) == 2:
                    fn, args = item
                    fn(*args)
                    continue
                response_sender, outputs, error, final, tracker = item
                try:
                    response = make_response(self._pb, outputs, error)
                    flags = final_flag if final else 0
                    if response is None:
                        response_sender.send(flags=flags)
                    else:
                        response_sender.send(response, flags=flags)
                finally:
                    if tracker is not None:
                        tracker.num_sent += 1  # only this thread writes it
            except Exception as e:  # a client gone away must not stop the others' responses
                self._logger.log_warn(f"paged_llm: sending a response failed: {e!r}")
