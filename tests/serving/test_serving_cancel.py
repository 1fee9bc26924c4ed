"""Cancelling a stream aborts the request in the engine at once: its KV blocks come back
(visible in the KV gauge on the metrics endpoint) and the server keeps serving."""

import time

import numpy as np
import pytest

from serving_client import (StreamClient, inputs, metrics, run_one, sampling, trt_inputs,
                            wait_for_metric)

pytestmark = pytest.mark.server

USED = "vllm:kv_cache_blocks_used"
RUNNING = "vllm:num_requests_running"


GENERATED = "vllm:generation_tokens_total"
MAX_TOKENS = 400


def _cancel_mid_stream(triton, model, tensors):
    wait_for_metric(triton.metrics_url, USED, lambda v: v == 0)
    generated_before = metrics(triton.metrics_url).get(GENERATED, 0.0)
    client = StreamClient(triton.grpc_url)
    rid = client.send(model, tensors)
    while len(client.streams[rid].responses) < 2 and not client.streams[rid].finals:
        client.poll(timeout_s=60)
    assert client.streams[rid].finals == 0
    wait_for_metric(triton.metrics_url, USED, lambda v: v > 0)
    assert client.streams[rid].finals == 0, "finished before it could be cancelled"
    client.close(cancel=True)
    wait_for_metric(triton.metrics_url, USED, lambda v: v == 0, timeout_s=10)
    wait_for_metric(triton.metrics_url, RUNNING, lambda v: v == 0, timeout_s=10)
    # Aborted, not run to the end: far fewer tokens were generated than it asked for.
    time.sleep(0.5)
    generated = metrics(triton.metrics_url)[GENERATED] - generated_before
    assert generated < MAX_TOKENS - 50, generated


def _good_request_works(triton):
    stream = run_one(triton.grpc_url, "paged_llm", inputs(
        text_input="Hello", stream=True, sampling_parameters=sampling(max_tokens=3, ignore_eos=True),
        return_num_output_tokens=True))
    assert stream.error is None and stream.finals == 1
    # (a busy sender thread may merge deltas into fewer responses: count tokens, not responses)
    assert sum(int(v[0]) for v in stream.values("num_output_tokens")) == 3


PROMPT = "Hello world"


def test_cancel_paged_llm_stream_frees_blocks(triton):
    _cancel_mid_stream(triton, "paged_llm", inputs(
        text_input=PROMPT, stream=True,
        sampling_parameters=sampling(max_tokens=MAX_TOKENS, ignore_eos=True)))
    _good_request_works(triton)
    assert metrics(triton.metrics_url)["vllm:engine_healthy"] == 1


def test_cancel_ensemble_stream_frees_blocks(triton):
    _cancel_mid_stream(triton, "ensemble", trt_inputs(
        text_input=PROMPT, stream=True, max_tokens=np.array([MAX_TOKENS], np.int32),
        min_tokens=np.array([MAX_TOKENS], np.int32)))  # no EOS before it is cancelled
    _good_request_works(triton)
