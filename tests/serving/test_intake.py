"""Request intake without a server: the byte cap refuses no prompt that fits, text prompts are
tokenized off the engine thread exactly as the engine would, and lengths are checked first."""

import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from paged_engine.serving.engine_loop import EngineLoop
from paged_engine.serving.intake import (RequestTooLarge, check_lengths, default_max_prompt_bytes,
                                         encode_prompt, longest_token_bytes,
                                         parse_max_prompt_bytes)
from paged_engine.serving.request import RequestError, RequestLimits, parse_request
from test_engine_loop import FakeEngine, FakeResponseSender, Logger, Params, RecordingSender


@pytest.fixture(scope="module", params=["byte_level", "sentencepiece"])
def tokenizer(request, make_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(make_model("llama", request.param))


_PIECES = ["The quick brown fox", " ", "    ", "\n\n", "日本語", "😀🚀", "café", "ab", "42 ",
           "<|end_of_text|>", "\t", "Ελληνικά", "z" * 30]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(_PIECES), st.text(max_size=20)), max_size=30))
def test_no_token_covers_more_text_than_the_longest_vocabulary_entry(tokenizer, parts):
    """The bound the byte cap rests on: bytes of text <= tokens * longest_token_bytes."""
    text = "".join(parts)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert len(text.encode("utf-8")) <= len(ids) * longest_token_bytes(tokenizer)


def test_a_prompt_of_the_longest_tokens_at_max_model_len_passes_the_cap(tokenizer):
    max_model_len = 64
    cap = default_max_prompt_bytes(tokenizer, max_model_len)
    vocab = tokenizer.get_vocab()
    longest = max(vocab, key=lambda t: len(t.encode("utf-8")))
    text = tokenizer.decode([vocab[longest]]) * (max_model_len - 2)
    assert len(text.encode("utf-8")) <= cap
    assert parse_max_prompt_bytes("auto", tokenizer, max_model_len) == cap
    assert parse_max_prompt_bytes("0", tokenizer, max_model_len) is None
    assert parse_max_prompt_bytes("1000", tokenizer, max_model_len) == 1000
    with pytest.raises(ValueError, match="max_prompt_bytes"):
        parse_max_prompt_bytes("lots", tokenizer, max_model_len)


def test_encode_prompt_is_what_the_engine_would_make_and_stops_past_max_model_len(tokenizer):
    for prompt in ["Hello world! 日本語", " leading spaces", "😀 emoji"]:
        ids, truncated = encode_prompt(tokenizer, prompt, 512)
        assert ids == list(tokenizer(prompt).input_ids) and not truncated
    long_prompt = "The quick brown fox jumps. " * 200
    ids, truncated = encode_prompt(tokenizer, long_prompt, 32)
    assert truncated and len(ids) == 33


def test_check_lengths_names_the_numbers():
    check_lengths(10, 500, True, 512)
    check_lengths(10, 10**12, False, 512)  # the default max_tokens: cut by the length limit
    with pytest.raises(RequestTooLarge, match=r"max_tokens \(1000\) is too large.*10 tokens"
                                              r".*max_model_len is 512.*at most 502"):
        check_lengths(10, 1000, True, 512)
    with pytest.raises(RequestTooLarge, match="at most 502"):
        check_lengths(10, 2**70, True, 512)
    with pytest.raises(RequestTooLarge, match="prompt is too long: 513 tokens"):
        check_lengths(513, None, False, 512)
    with pytest.raises(RequestTooLarge, match="more than 512 tokens"):
        check_lengths(513, None, False, 512, truncated=True)


def _get(**tensors):
    arrays = {k: v for k, v in tensors.items()}
    return lambda name: arrays.get(name)


def test_parse_refuses_an_oversized_prompt_before_decoding_it():
    from paged_engine import SamplingParams

    limits = RequestLimits(max_prompt_bytes=100, max_model_len=8)
    big = np.array([b"\xff" * 101], dtype=np.object_)  # not even UTF-8: refused for its size
    with pytest.raises(RequestTooLarge, match="101 bytes, the limit is 100"):
        parse_request(_get(text_input=big), "{}", SamplingParams.from_dict, limits)
    ok = parse_request(_get(text_input=np.array([b"x" * 100], dtype=np.object_)), "{}",
                       SamplingParams.from_dict, limits)
    assert ok.prompt == "x" * 100 and not ok.max_tokens_given
    with pytest.raises(RequestError, match="prompt is too long: 9 tokens"):
        parse_request(_get(input_ids=np.arange(9, dtype=np.int32)), "{}",
                      SamplingParams.from_dict, limits)
    given_ = parse_request(_get(text_input=np.array([b"hi"], dtype=np.object_),
                                sampling_parameters=np.array([b'{"max_tokens": "4"}'],
                                                             dtype=np.object_)),
                           "{}", SamplingParams.from_dict, limits)
    assert given_.max_tokens_given


class ThreadRecordingTokenizer:
    """A tokenizer stand-in that records which thread tokenized (shared across copies)."""

    threads: list = []

    class _Encoding:
        def __init__(self, ids):
            self.input_ids = ids

    def __call__(self, text, truncation=False, max_length=None):
        ThreadRecordingTokenizer.threads.append(threading.current_thread().name)
        ids = [ord(c) % 50 for c in text]
        return self._Encoding(ids[:max_length] if truncation else ids)


class RecordingEngine(FakeEngine):
    def __init__(self):
        super().__init__()
        self.added = []

    def add_request(self, request_id, prompt=None, params=None, prompt_token_ids=None):
        self.added.append((threading.current_thread().name, prompt, prompt_token_ids))
        super().add_request(request_id, prompt, params, prompt_token_ids)


def _parsed(prompt, max_tokens, given=False):
    from paged_engine.serving.request import ParsedRequest

    return ParsedRequest(prompt=prompt, prompt_token_ids=None, params=Params(max_tokens),
                         stream=True, exclude_input_in_output=True, max_tokens_given=given)


def test_text_prompts_are_tokenized_off_the_engine_thread_and_checked_first():
    engine, sender = RecordingEngine(), RecordingSender()
    loop = EngineLoop(engine, sender, None, Logger(), cancel_poll_interval_s=0.0,
                      tokenizer=ThreadRecordingTokenizer(), max_model_len=8)
    loop.start()
    try:
        ThreadRecordingTokenizer.threads.clear()
        good, too_long, too_many = FakeResponseSender(), FakeResponseSender(), FakeResponseSender()
        loop.submit(good, _parsed("abc", 2, given=True))
        loop.submit(too_long, _parsed("abcdefghij", 2))
        loop.submit(too_many, _parsed("abc", 6, given=True))
        responses = sender.wait_final(good)
        assert [o["text_output"][0] for o, _, _ in responses] == ["x", "x"]
        (_, error, final), = sender.wait_final(too_long)
        assert error[0] == "INVALID_ARG" and "more than 8 tokens" in error[1] and final
        (_, error, final), = sender.wait_final(too_many)
        assert error[0] == "INVALID_ARG" and "at most 5 tokens" in error[1]
        # Only the fitting request reached the engine, as token ids, added on the engine thread;
        # all tokenizing happened on the intake thread.
        assert engine.added == [("paged-llm-engine", "abc", [47, 48, 49])]
        assert set(ThreadRecordingTokenizer.threads) == {"paged-llm-intake"}
    finally:
        loop.stop()


def test_a_slow_tokenization_does_not_hold_up_the_engine_thread():
    """While one prompt is being tokenized, a stream already running keeps getting steps."""
    gate = threading.Event()

    class SlowTokenizer(ThreadRecordingTokenizer):
        def __call__(self, text, truncation=False, max_length=None):
            if text == "slow":
                gate.wait(5)
            return super().__call__(text, truncation, max_length)

    engine, sender = RecordingEngine(), RecordingSender()
    loop = EngineLoop(engine, sender, None, Logger(), cancel_poll_interval_s=0.0,
                      tokenizer=SlowTokenizer(), max_model_len=1000)
    loop.start()
    try:
        running = FakeResponseSender()
        loop.submit(running, _parsed("abc", 50))
        while not sender.of(running):
            time.sleep(0.001)
        slow = FakeResponseSender()
        loop.submit(slow, _parsed("slow", 2))
        responses = sender.wait_final(running)  # finishes while "slow" is still tokenizing
        assert len(responses) == 50 and not gate.is_set()
        gate.set()
        assert sender.wait_final(slow)[-1][2]
    finally:
        gate.set()
        loop.stop()


@pytest.mark.parametrize("inputs,error", [
    (dict(text_input=np.array([b"a", b"b"], dtype=np.object_)),
     "input 'text_input' must hold exactly one value, got shape [2]"),
    (dict(text_input=np.array([b"caf\xe9"], dtype=np.object_)), "input 'text_input' is not valid UTF-8"),
    (dict(text_input=np.array([b"hi"], dtype=np.object_),
          sampling_parameters=np.array([b'{"max_tokens": \xff}'], dtype=np.object_)),
     "input 'sampling_parameters' is not valid UTF-8"),
    (dict(text_input=np.array([b"hi"], dtype=np.object_),
          sampling_parameters=np.array([b"{}", b"{}"], dtype=np.object_)),
     "input 'sampling_parameters' must hold exactly one value, got shape [2]"),
], ids=["two-prompts", "prompt-not-utf8", "params-not-utf8", "two-params"])
def test_parse_names_the_malformed_input(inputs, error):
    from paged_engine import SamplingParams

    with pytest.raises(RequestError) as e:
        parse_request(_get(**inputs), "{}", SamplingParams.from_dict, RequestLimits())
    assert error in str(e.value)
