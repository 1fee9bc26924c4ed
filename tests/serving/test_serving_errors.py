"""Each bad input gets its own error naming the problem; a good request right after succeeds,
and nothing is left behind in the engine (requests, KV blocks)."""

import numpy as np
import pytest

from serving_client import inputs, trt_inputs, run_one, sampling, wait_for_metric

pytestmark = pytest.mark.server

BAD = {
    "malformed_json": (dict(text_input="Hi", sampling_parameters='{"max_tokens": 4,'),
                       "not valid JSON"),
    "not_an_object": (dict(text_input="Hi", sampling_parameters="[1, 2]"), "JSON object"),
    "unknown_key": (dict(text_input="Hi", sampling_parameters=sampling(max_tokenz=4)),
                    "max_tokenz"),
    "wrong_type": (dict(text_input="Hi", sampling_parameters=sampling(temperature="hot")),
                   "temperature"),
    "negative_max_tokens": (dict(text_input="Hi", sampling_parameters=sampling(max_tokens=-1)),
                            "max_tokens"),
    "empty_prompt": (dict(text_input="", sampling_parameters=sampling(max_tokens=4)), "empty"),
    "too_long_prompt": (dict(text_input="The quick brown fox jumps. " * 60,  # > 512 tokens
                             sampling_parameters=sampling(max_tokens=4)), "too long"),
    "no_prompt": (dict(sampling_parameters=sampling(max_tokens=4)), "text_input"),
    "stream_with_input": (dict(text_input="Hi", stream=True, exclude_input_in_output=False),
                          "exclude_input_in_output"),

    "stop_not_strings": (dict(text_input="Hi", sampling_parameters=sampling(stop=[1, 2])),
                         "stop"),
    "bad_words_not_strings": (dict(text_input="Hi", sampling_parameters=sampling(bad_words=[1])),
                              "bad_words"),
}


def _good(triton):
    stream = run_one(triton.grpc_url, "paged_llm", inputs(
        text_input="Hello", stream=True, sampling_parameters=sampling(max_tokens=2, ignore_eos=True),
        return_num_output_tokens=True))
    assert stream.error is None, stream.error
    assert stream.finals == 1
    assert sum(int(v[0]) for v in stream.values("num_output_tokens")) == 2
    # Nothing leaked: no request left in the engine, no KV block held.
    wait_for_metric(triton.metrics_url, "vllm:num_requests_running", lambda v: v == 0)
    wait_for_metric(triton.metrics_url, "vllm:num_requests_waiting", lambda v: v == 0)
    wait_for_metric(triton.metrics_url, "vllm:kv_cache_blocks_used", lambda v: v == 0)


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_errors_then_good_request_succeeds(triton, case):
    tensors, needle = BAD[case]
    stream = run_one(triton.grpc_url, "paged_llm", inputs(**tensors))
    assert stream.error is not None, f"{case}: no error, got {stream.responses}"
    assert needle in stream.error, stream.error
    assert stream.finals == 1
    _good(triton)


def test_wrong_tensor_type_is_rejected(triton):
    stream = run_one(triton.grpc_url, "paged_llm", inputs(
        text_input="Hi", stream=np.array([1], np.int32)))
    assert stream.error is not None and "stream" in stream.error
    _good(triton)


def test_ensemble_bad_input_errors(triton):
    stream = run_one(triton.grpc_url, "ensemble", trt_inputs(
        text_input="Hi", max_tokens=np.array([-3], np.int32)))
    assert stream.error is not None and "max_tokens" in stream.error
    stream = run_one(triton.grpc_url, "ensemble", trt_inputs(text_input=""))
    assert stream.error is not None and "empty" in stream.error
    stream = run_one(triton.grpc_url, "ensemble", trt_inputs(text_input="Hi", bad_words=["  "]))
    assert stream.error is not None and "bad_words" in stream.error
    _good(triton)
