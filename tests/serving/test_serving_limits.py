"""Hostile and careless requests against the real server: no client can abort another's request,
a huge prompt is refused by its size before it is tokenized (and a running stream goes on),
max_tokens that cannot fit in max_model_len is an error, and the ensemble without text_input
is an error, not an empty success."""

import json

import numpy as np
import pytest

from serving_client import (StreamClient, http_post, inputs, run_one, sampling, trt_inputs,
                            wait_for_metric)

pytestmark = pytest.mark.server

MAX_MODEL_LEN = 512  # conftest's engine arguments


def _engine_id(triton) -> str:
    """The engine request id a client sees in its own token-level responses."""
    s = run_one(triton.grpc_url, "paged_llm", inputs(
        input_ids=np.array([5, 6, 7], np.int32), sampling_parameters=sampling(max_tokens=2)))
    assert s.error is None, s.error
    return s.values("engine_request_id")[0][0].decode()


def _guesses(own_id: str, victim_request_id: str) -> list[str]:
    """What an attacker would try from its own id: the ids issued next to it (a counter at the
    end of the id, or in front of a suffix), with and without the victim's request id."""
    guesses = {own_id, victim_request_id}
    parts = own_id.split("-")
    for i, part in enumerate(parts):
        if part.isdigit():
            for k in range(int(part) - 3, int(part) + 12):
                stem = "-".join(parts[:i] + [str(k)])
                guesses.update({stem, f"{stem}-{victim_request_id}"})
    return sorted(guesses)


@pytest.mark.parametrize("victim_model", ["ensemble", "paged_llm"])
def test_a_client_cannot_abort_another_clients_request(triton, victim_model):
    own = _engine_id(triton)
    assert len(own) >= 32 and victim_model  # 128 random bits, nothing a client chose
    victim = StreamClient(triton.grpc_url)
    if victim_model == "ensemble":
        tensors = trt_inputs(text_input="Hello world", stream=True,
                             max_tokens=np.array([60], np.int32),
                             min_tokens=np.array([60], np.int32))
    else:
        tensors = inputs(input_ids=np.array([5, 6, 7, 8], np.int32), stream=True,
                         sampling_parameters=sampling(max_tokens=60, ignore_eos=True))
    rid = victim.send(victim_model, tensors, request_id="victim-1")
    try:
        while len(victim.streams[rid].responses) < 2:
            victim.poll(timeout_s=60)
        for guess in _guesses(own, rid):
            s = run_one(triton.grpc_url, "paged_llm", inputs(abort_request_id=guess))
            assert s.error is None
        stream = victim.wait_all(timeout_s=120)[rid]
    finally:
        victim.close()
    assert stream.error is None, f"the victim's request was aborted: {stream.error}"
    assert len(stream.responses) == 60


@pytest.mark.parametrize("model", ["paged_llm", "ensemble", "tensorrt_llm_bls"])
def test_a_huge_prompt_is_refused_by_size_and_a_running_stream_goes_on(triton, model):
    running = StreamClient(triton.grpc_url)
    rid = running.send("paged_llm", inputs(
        text_input="Hello", stream=True, return_num_output_tokens=True,
        sampling_parameters=sampling(max_tokens=40, ignore_eos=True)))
    try:
        huge = "The quick brown fox jumps. " * 200_000  # 5.4 MB
        tensors = (inputs(text_input=huge, sampling_parameters=sampling(max_tokens=4))
                   if model == "paged_llm" else
                   trt_inputs(text_input=huge, max_tokens=np.array([4], np.int32)))
        s = run_one(triton.grpc_url, model, tensors)
        assert s.error is not None and "bytes, the limit is" in s.error, s.error
        stream = running.wait_all(timeout_s=120)[rid]
    finally:
        running.close()
    assert stream.error is None
    assert sum(int(v[0]) for v in stream.values("num_output_tokens")) == 40


def test_max_tokens_that_cannot_fit_is_an_error(triton):
    """vLLM's rule: an explicit max_tokens with prompt + max_tokens > max_model_len is refused,
    naming the numbers; without max_tokens the default stops at max_model_len."""
    for max_tokens in (10**12, 2**70, MAX_MODEL_LEN):
        s = run_one(triton.grpc_url, "paged_llm", inputs(
            text_input="Hello", sampling_parameters=sampling(max_tokens=max_tokens)))
        assert s.error is not None, max_tokens
        assert f"max_tokens ({max_tokens}) is too large" in s.error
        assert f"max_model_len is {MAX_MODEL_LEN}" in s.error
    s = run_one(triton.grpc_url, "ensemble", trt_inputs(
        text_input="Hello", max_tokens=np.array([1000], np.int32)))
    assert s.error is not None and "max_tokens (1000) is too large" in s.error
    # a prompt long enough that its max_tokens just fits is served (the boundary itself is
    # tests/serving/test_intake.py's)
    s = run_one(triton.grpc_url, "paged_llm", inputs(
        input_ids=np.arange(10, 10 + MAX_MODEL_LEN - 4, dtype=np.int32) % 300,
        sampling_parameters=sampling(max_tokens=4, ignore_eos=True, temperature=0),
        return_num_output_tokens=True))
    assert s.error is None, s.error
    assert sum(int(v[0]) for v in s.values("num_output_tokens")) == 4
    wait_for_metric(triton.metrics_url, "vllm:kv_cache_blocks_used", lambda v: v == 0)


def test_ensemble_without_text_input_is_an_error(triton):
    s = run_one(triton.grpc_url, "ensemble", trt_inputs(max_tokens=np.array([4], np.int32)))
    assert s.error is not None and "text_input" in s.error and s.finals == 1
    status, body = http_post(triton.http_url, "/v2/models/ensemble/generate", {"max_tokens": 4})
    assert status == 400 and "text_input" in json.loads(body)["error"]
    s = run_one(triton.grpc_url, "tensorrt_llm_bls", trt_inputs(max_tokens=np.array([4], np.int32)))
    assert s.error is not None and "text_input" in s.error
