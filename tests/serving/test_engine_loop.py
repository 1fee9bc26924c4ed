"""The engine thread without a server: exactly one final response per request on success, bad
input, cancellation, engine death and unload; a dead engine answers UNAVAILABLE."""

import threading
import time

import pytest

from paged_engine.output.request_output import CompletionOutput, RequestOutput
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
        self.n = 1


class FakeResponseSender:
    def __init__(self):
        self.cancelled = False
        self.polls = 0

    def is_cancelled(self):
        self.polls += 1
        return self.cancelled


class RecordingSender:
    """Stands in for ResponseSenderThread: records what would be sent."""

    def __init__(self):
        self.sent = []
        self.lock = threading.Lock()

    def send(self, response_sender, outputs=None, *, final, error=None, tracker=None):
        with self.lock:
            self.sent.append((response_sender, outputs, error, final))
        if tracker is not None:
            tracker.num_sent += 1

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

    def make(engine, sender=None, metrics=None, **kwargs):
        sender = sender or RecordingSender()
        kwargs.setdefault("cancel_poll_interval_s", 0.0)
        loop = EngineLoop(engine, sender, metrics, Logger(), **kwargs)
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


class GatedSender(RecordingSender):
    """A sender thread that is behind: responses leave only when `release()` is called."""

    def __init__(self):
        super().__init__()
        self.gate = threading.Event()
        self.trackers = []

    def send(self, response_sender, outputs=None, *, final, error=None, tracker=None):
        with self.lock:
            self.sent.append((response_sender, outputs, error, final))
            self.trackers.append(tracker)

    def release(self):
        with self.lock:
            trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            if tracker is not None:
                tracker.num_sent += 1


class RecordingMetrics:
    def __init__(self):
        self.observed = []
        self.finishes = []
        self.token_latencies = []  # (per-bucket counts, sum, count) as published

    def observe(self, name, value):
        self.observed.append((name, value))

    def finished(self, reason, observed):
        self.finishes.append(reason)
        self.observed.extend(observed.items())

    def add_token_latencies(self, taken):
        self.token_latencies.append(taken)

    def update_from_stats(self, stats):
        pass


def test_deltas_merge_while_the_previous_response_waits_and_nothing_is_lost(loop_factory):
    engine = FakeEngine()
    sender, metrics = GatedSender(), RecordingMetrics()
    loop, _ = loop_factory(engine, sender=sender, metrics=metrics)
    rs = FakeResponseSender()
    loop.submit(rs, _parsed(40))
    while not sender.of(rs):
        time.sleep(0.001)
    while engine.steps < 15:  # the first response is stuck: the next deltas are held
        time.sleep(0.001)
    assert len(sender.of(rs)) == 1
    deadline = time.monotonic() + 10
    while not any(final for _, _, final in sender.of(rs)) and time.monotonic() < deadline:
        sender.release()
        time.sleep(0.01)
    responses = sender.of(rs)
    texts = [o["text_output"][0] for o, _, _ in responses]
    assert "".join(texts) == "x" * 40
    assert _finals(responses) == 1 and responses[-1][2]
    assert len(responses) < 40 and any(len(t) > 1 for t in texts)
    # Per request, not per response: one request_time_per_output_token observation, the mean;
    # and every token after the first binned once for the per-token histograms (published in a
    # few messages, not one per token).
    tpot = [v for n, v in metrics.observed if n == "vllm:request_time_per_output_token_seconds"]
    assert len(tpot) == 1 and tpot[0] > 0
    deadline = time.monotonic() + 5
    while sum(n for _, _, n in metrics.token_latencies) < 39 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sum(n for _, _, n in metrics.token_latencies) == 39
    assert sum(sum(c) for c, _, _ in metrics.token_latencies) == 39
    assert len(metrics.token_latencies) < 39
    assert metrics.finishes == ["length"]


def test_without_backlog_every_step_is_its_own_response(loop_factory):
    loop, sender = loop_factory(FakeEngine())
    rs = FakeResponseSender()
    loop.submit(rs, _parsed(12))
    assert [o["text_output"][0] for o, _, _ in sender.wait_final(rs)] == ["x"] * 12


def test_cancellation_polls_a_bounded_batch_round_robin(loop_factory):
    engine = FakeEngine()
    loop, sender = loop_factory(engine, cancel_poll_batch=4, cancel_poll_interval_s=0.01)
    senders = [FakeResponseSender() for _ in range(20)]
    for rs in senders:
        loop.submit(rs, _parsed(100_000))
    while engine.steps < 5:
        time.sleep(0.001)
    start_polls = sum(rs.polls for rs in senders)
    time.sleep(0.2)
    polls = sum(rs.polls for rs in senders) - start_polls
    assert 0 < polls <= 4 * (0.2 / 0.01 + 2)  # at most a batch per poll interval
    senders[-1].cancelled = True  # the last one submitted is reached too
    responses = sender.wait_final(senders[-1])
    assert responses[-1][1][0] == "CANCELLED"
    assert all(rs.polls > 0 for rs in senders)


def test_a_merged_response_carries_both_steps_for_every_completion():
    from paged_engine.output.request_output import Logprob
    from paged_engine.serving.engine_loop import _merge_outputs
    from paged_engine.serving.response import build_outputs

    def step(ids_so_far, new_ids, text, new_text, finish=None):
        return [CompletionOutput(i, list(ids_so_far[i]), text[i], new_token_ids=list(new_ids[i]),
                                 new_text=new_text[i], finish_reason=finish,
                                 logprobs=[{t: Logprob(-0.5 * t, 1, str(t))} for t in ids_so_far[i]])
                for i in range(2)]

    first = RequestOutput("r", None, [1], step([[5, 6], [8]], [[6], [8]], ["ab", "c"], ["b", "c"]), False)
    second = RequestOutput("r", None, [1], step([[5, 6, 7], [8, 9]], [[7], [9]], ["abd", "ce"], ["d", "e"],
                                                finish="length"), True)
    merged = _merge_outputs(first, second)
    parsed = ParsedRequest(prompt="p", prompt_token_ids=None, params=Params(3), stream=True,
                           return_logprobs=True, return_num_output_tokens=True, return_finish_reason=True)
    arrays = build_outputs(parsed, merged, prompt_text="p")
    assert list(arrays["text_output"]) == ["bd", "ce"]
    assert list(arrays["num_output_tokens"]) == [2, 2]
    assert list(arrays["finish_reason"]) == ["length", "length"] and merged.finished
    import json
    assert [list(map(int, (k for d in json.loads(x) for k in d))) for x in arrays["logprobs"]] == [[6, 7], [8, 9]]


def test_a_non_streaming_request_observes_its_latencies_once(loop_factory):
    metrics = RecordingMetrics()
    loop, sender = loop_factory(FakeEngine(), metrics=metrics)
    rs = FakeResponseSender()
    loop.submit(rs, _parsed(5, stream=False))
    (outputs, _, final), = sender.wait_final(rs)
    assert final and outputs["text_output"][0] == "xxxxx"
    observed = dict(metrics.observed)
    assert [n for n, _ in metrics.observed].count("vllm:time_to_first_token_seconds") == 1
    assert observed["vllm:request_generation_tokens"] == 5
    assert observed["vllm:request_max_num_generation_tokens"] == 5
    assert observed["vllm:request_prompt_tokens"] == 1
    assert observed["vllm:request_params_max_tokens"] == 5
    assert observed["vllm:request_time_per_output_token_seconds"] > 0
    assert metrics.finishes == ["length"]


def test_prompt_logprobs_go_out_once_with_the_first_response():
    """paged_llm's prompt_logprobs output (the OpenAI door's echo): every prompt token, the
    first named with null logprob, the others as in `logprobs`; only on the first response."""
    import json

    from paged_engine.output.request_output import Logprob
    from paged_engine.sampling_params import SamplingParams
    from paged_engine.serving.response import build_outputs

    prompt_lp = [None, {7: Logprob(-1.5, 3, " b"), 2: Logprob(-0.2, 1, " x")}]
    output = RequestOutput("r", "a b", [4, 7], [CompletionOutput(0, [9], "c", new_token_ids=[9],
                                                                 new_text="c")], False,
                           prompt_logprobs=prompt_lp)
    parsed = ParsedRequest(prompt="a b", prompt_token_ids=None,
                           params=SamplingParams(prompt_logprobs=1), stream=True)
    first = build_outputs(parsed, output, prompt_text="a b", first_response=True)
    assert json.loads(first["prompt_logprobs"][0]) == [
        {"4": {"logprob": None, "rank": None, "decoded_token": None}},
        {"7": {"logprob": -1.5, "rank": 3, "decoded_token": " b"},
         "2": {"logprob": -0.2, "rank": 1, "decoded_token": " x"}}]
    later = build_outputs(parsed, output, prompt_text="a b", first_response=False)
    assert "prompt_logprobs" not in later
    plain = ParsedRequest(prompt="a b", prompt_token_ids=None, params=SamplingParams(), stream=True)
    assert "prompt_logprobs" not in build_outputs(plain, output, prompt_text="a b")
