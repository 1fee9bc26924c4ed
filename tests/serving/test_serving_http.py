"""Triton's HTTP generate extension with plain JSON keys (no sampling_parameters tensor)."""

import json

import pytest

from paged_engine import SamplingParams
from serving_client import http_post, sse_events

pytestmark = pytest.mark.server

PROMPT = "Hello world! 日本語"


@pytest.fixture(scope="module")
def expected(offline_llm):
    return offline_llm.generate([PROMPT], SamplingParams(max_tokens=8, temperature=0.0))[0]


def test_generate_plain_json(triton, expected):
    status, body = http_post(triton.http_url, "/v2/models/paged_llm/generate", {
        "text_input": PROMPT, "max_tokens": 8, "temperature": 0.0,
        "exclude_input_in_output": True, "return_finish_reason": True,
        "return_num_output_tokens": True})
    assert status == 200, body
    reply = json.loads(body)
    assert reply["text_output"] == expected.text
    assert reply["finish_reason"] == "length"
    assert reply["num_output_tokens"] == 8

    # vllm_backend default: the prompt in front of a non-streamed text.
    status, body = http_post(triton.http_url, "/v2/models/paged_llm/generate",
                             {"text_input": PROMPT, "max_tokens": "8", "temperature": "0"})
    assert status == 200, body
    assert json.loads(body)["text_output"] == PROMPT + expected.text


def test_generate_stream_plain_json(triton, expected):
    status, body = http_post(triton.http_url, "/v2/models/paged_llm/generate_stream", {
        "text_input": PROMPT, "stream": True, "max_tokens": 8, "temperature": 0.0,
        "return_finish_reason": True})
    assert status == 200, body
    events = sse_events(body)
    assert len(events) > 1
    assert "".join(e["text_output"] for e in events) == expected.text
    assert events[-1]["finish_reason"] == "length"


def test_generate_unknown_key_is_an_error(triton):
    status, body = http_post(triton.http_url, "/v2/models/paged_llm/generate",
                             {"text_input": PROMPT, "max_tokenz": 8})
    assert status == 400, body
    assert "max_tokenz" in json.loads(body)["error"]


def test_ensemble_generate(triton, expected):
    status, body = http_post(triton.http_url, "/v2/models/ensemble/generate", {
        "text_input": PROMPT, "max_tokens": 8, "temperature": 0.0,
        "exclude_input_in_output": True})
    assert status == 200, body
    assert json.loads(body)["text_output"] == expected.text
