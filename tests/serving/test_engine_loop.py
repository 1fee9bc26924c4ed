"""The engine thread without a server: exactly one final response per request on success, bad
input, cancellation, engine death and unload; a dead engine answers UNAVAILABLE."""

import threading
import time

import pytest

from paged_engine.outputs import CompletionOutput, RequestOutput
from paged_engine.serving.engine_loop import EngineLoop
from paged_engine.serving.request import ParsedRequest


class FakeEngine:
    """Emits one token "x" per step per request until max_tokens; fails on request."""

    def __init__(self, fail_at_step=None):
        self.requests = {}
        self.aborted = []
        self.steps = 0
        self.fail_at_step = fail_at_step
        self.tokenizer = None

    def add_request(self, request_id, prompt=None, params=None, prompt_token_ids=None):
        if prompt == "too long":
            raise ValueError("prompt is too long: 999 tokens, max_model_len is 8")
        self.requests[request_id] = [params, 0]

    def has_unfinished_requests(self):
        return bool(self.requests or self.aborted)

    def abort(self, request_id):
        if self.requests.pop(request_id, None) is not None:
            self.aborted.append(request_id)
            return True
        return False

    def step(self):
        self.steps += 1
        if self.fail_at_step is not None and self.steps >= self.fail_at_step:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        time.sleep(0.002)
        outs = [RequestOutput(rid, None, [1], [CompletionOutput(0, [], "", finish_reason="abort")],
                              True) for rid in self.aborted]
        self.aborted = []
        for rid, state in list(self.requests.items()):
            params, n = state
            state[1] = n = n + 1
            reason = "length" if n >= params.max_tokens else None
            outs.append(RequestOutput(rid, None, [1], [CompletionOutput(
                0, [7] * n, "x" * n, new_token_ids=[7], new_text="x", finish_reason=reason)],
                reason is not None))
            if reason:
                del self.requests[rid]
        return outs

    def stats(self):
        return {"running": len(self.requests), "waiting": 0, "kv_blocks_total": 8,
                "kv_blocks_free": 8 - len(self.requests)}


class Params:
    def __init__(self, max_tokens):
        self.max_tokens = max_tokens


class FakeResponseSender:
    def __init__(self):
        self.cancelled = False

    def is_cancelled(self):
        return self.cancelled


class RecordingSender:
    """Stands in for ResponseSenderThread: records what would be sent."""

    def __init__(self):
        self.sent = []
        self.lock = threading.Lock()

    def send(self, response_sender, outputs=None, *, final, error=None):
        with self.lock:
            self.sent.append((response_sender, outputs, error, final))

    def call(self, fn, *args):
        fn(*args)

    def of(self, response_sender):
        with self.lock:
            return [s[1:] for s in self.sent if s[0] is response_sender]

    def wait_final(self, response_sender, timeout_s=10.0):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(final for _, _, final in self.of(response_sender)):
                return self.of(response_sender)
            time.sleep(0.005)
        raise AssertionError("no final response")


class Logger:
    def __init__(self):
        self.errors = []

    def log_error(self, msg):
        self.errors.append(msg)

    log_warn = log_info = log_error


def _parsed(max_tokens, prompt="hi", stream=True):
    return ParsedRequest(prompt=prompt, prompt_token_ids=None, params=Params(max_tokens),
                         stream=stream, exclude_input_in_output=True)


@pytest.fixture
def loop_factory():
    loops = []

    def make(engine):
        sender = RecordingSender()
        loop = EngineLoop(engine, sender, None, Logger(), cancel_poll_interval_s=0.0)
        loop.start()
        loops.append(loop)
        return loop, sender

    yield make
    for loop in loops:
        loop.stop()


def _finals(responses):
    return sum(1 for _, _, final in responses if final)


def test_stream_and_non_stream_end_with_one_final(loop_factory):
    loop, sender = loop_factory(FakeEngine())
    a, b = FakeResponseSender(), FakeResponseSender()
    loop.submit(a, _parsed(3))
    loop.submit(b, _parsed(2, stream=False))
    ra, rb = sender.wait_final(a), sender.wait_final(b)
    assert [o["text_output"][0] for o, _, _ in ra] == ["x", "x", "x"]
    assert _finals(ra) == 1 and ra[-1][2]
    assert len(rb) == 1 and rb[0][0]["text_output"][0] == "xx" and rb[0][2]


def test_bad_request_in_engine_gets_invalid_arg(loop_factory):
    loop, sender = loop_factory(FakeEngine())
    bad, good = FakeResponseSender(), FakeResponseSender()
    loop.submit(bad, _parsed(3, prompt="too long"))
    loop.submit(good, _parsed(2))
    (outputs, error, final), = sender.wait_final(bad)
    assert error[0] == "INVALID_ARG" and "too long" in error[1] and final
    assert _finals(sender.wait_final(good)) == 1


def test_cancellation_aborts_and_sends_one_cancelled_final(loop_factory):
    engine = FakeEngine()
    loop, sender = loop_factory(engine)
    rs = FakeResponseSender()
    loop.submit(rs, _parsed(10_000))
    while not sender.of(rs):
        time.sleep(0.005)
    rs.cancelled = True
    responses = sender.wait_final(rs)
    assert responses[-1][1][0] == "CANCELLED" and responses[-1][2]
    time.sleep(0.05)  # the engine's own "abort" output must not produce a second final
    assert _finals(sender.of(rs)) == 1
    assert not engine.requests and not engine.has_unfinished_requests()


def test_engine_death_fails_everything_with_unavailable(loop_factory):
    loop, sender = loop_factory(FakeEngine(fail_at_step=3))
    a, b = FakeResponseSender(), FakeResponseSender()
    loop.submit(a, _parsed(100))
    loop.submit(b, _parsed(100, stream=False))
    for rs in (a, b):
        responses = sender.wait_final(rs)
        assert responses[-1][1][0] == "UNAVAILABLE" and "illegal memory" in responses[-1][1][1]
        assert _finals(responses) == 1
    deadline = time.monotonic() + 5
    while loop.healthy and time.monotonic() < deadline:
        time.sleep(0.005)
    assert not loop.healthy
    late = FakeResponseSender()
    loop.submit(late, _parsed(1))
    (outputs, error, final), = sender.wait_final(late)
    assert error[0] == "UNAVAILABLE" and final


def test_stop_ends_requests_in_flight(loop_factory):
    loop, sender = loop_factory(FakeEngine())
    rs = FakeResponseSender()
    loop.submit(rs, _parsed(10_000))
    while not sender.of(rs):
        time.sleep(0.005)
    loop.stop()
    responses = sender.of(rs)
    assert _finals(responses) == 1 and responses[-1][1][0] == "UNAVAILABLE"
