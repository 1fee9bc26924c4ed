"""vllm_backend clients' expectations, as their tests and Triton's docs state them: the generate
extension's `id` and `parameters`, return_logprobs without `logprobs` (JSON null), decoded_token
following the streamed text (special tokens too), a cancelled request's CANCELLED error, and the
vllm:* metrics (per-request histograms, per-token latencies with vLLM's names)."""

import json
import time

import numpy as np
import pytest

from paged_engine import SamplingParams
from serving_client import (StreamClient, http_post, inputs, metrics, run_one, sampling,
                            wait_for_metric)

pytestmark = pytest.mark.server

PROMPT = "Hello world! 日本語"


def test_generate_extension_id_and_parameters(triton, offline_llm):
    """Triton's docs/protocol/extension_generate.md: `id` is the request id and `parameters`
    holds the sampling settings."""
    expected = offline_llm.generate([PROMPT], SamplingParams(max_tokens=6, temperature=0.0))[0]
    status, body = http_post(triton.http_url, "/v2/models/paged_llm/generate", {
        "id": "42", "text_input": PROMPT,
        "parameters": {"max_tokens": 6, "temperature": 0, "exclude_input_in_output": True}})
    assert status == 200, body
    reply = json.loads(body)
    assert reply["id"] == "42" and reply["text_output"] == expected.text
    status, body = http_post(triton.http_url, "/v2/models/paged_llm/generate_stream", {
        "id": "43", "text_input": PROMPT, "stream": True,
        "parameters": {"max_tokens": 6, "temperature": 0}})
    assert status == 200, body
    events = [json.loads(line[5:]) for line in body.splitlines() if line.startswith("data:")]
    assert "".join(e["text_output"] for e in events) == expected.text


def _logprobs_of(stream):
    return [json.loads(r["logprobs"][0]) for r in stream.responses]


def test_return_logprobs_without_logprobs_key_is_null(triton):
    for stream in (True, False):
        s = run_one(triton.grpc_url, "paged_llm", inputs(
            text_input=PROMPT, stream=stream, return_logprobs=True,
            sampling_parameters=sampling(max_tokens=4, temperature=0)))
        assert s.error is None, s.error
        assert _logprobs_of(s) and all(lp is None for lp in _logprobs_of(s))


def test_decoded_tokens_concatenate_to_the_text(triton):
    """vllm_backend's additional-outputs test: greedy, the rank-1 tokens' decoded_token values,
    concatenated (after the prompt when not streaming), equal text_output; at most logprobs + 1
    entries per token, each {logprob, rank, decoded_token}."""
    for stream in (True, False):
        s = run_one(triton.grpc_url, "paged_llm", inputs(
            text_input=PROMPT, stream=stream, return_logprobs=True,
            sampling_parameters=sampling(max_tokens=12, temperature=0, logprobs=2)))
        assert s.error is None, s.error
        for r, per_response in zip(s.responses, _logprobs_of(s)):
            text = ""
            for entry in per_response:
                assert 1 <= len(entry) <= 3
                assert all(set(d) == {"logprob", "rank", "decoded_token"} for d in entry.values())
                text += next(d["decoded_token"] for d in entry.values() if d["rank"] == 1)
            assert (text if stream else PROMPT + text) == r["text_output"][0].decode()


def test_a_skipped_special_token_has_an_empty_decoded_token(triton, offline_llm):
    """The tokenizer's EOS (a special token), forced with logit_bias and ignore_eos, is skipped
    in the text; its decoded_token is empty, so the sampled tokens' decoded_token values (each
    entry's first) still concatenate to the text."""
    eos = offline_llm.tokenizer.convert_tokens_to_ids(offline_llm.tokenizer.eos_token)
    settings = dict(max_tokens=8, temperature=0, logprobs=0, ignore_eos=True,
                    logit_bias={str(eos): 50.0})
    for stream in (True, False):
        s = run_one(triton.grpc_url, "paged_llm", inputs(
            text_input=PROMPT, stream=stream, return_logprobs=True,
            exclude_input_in_output=True, sampling_parameters=sampling(**settings)))
        assert s.error is None, s.error
        entries = [e for lp in _logprobs_of(s) for e in lp]
        assert len(entries) == 8 and all(next(iter(e)) == str(eos) for e in entries)
        assert all(next(iter(e.values()))["decoded_token"] == "" for e in entries)
        assert s.text() == ""


def test_cancelled_non_streaming_request_gets_cancelled_error(triton):
    """vllm_backend's request-cancellation test: a non-streaming request, the stream stopped
    with cancel_requests=True after a while; exactly one result, a CANCELLED error, and the
    engine aborted the request (its KV blocks come back)."""
    from tritonclient.utils import InferenceServerException

    used = "vllm:kv_cache_blocks_used"
    wait_for_metric(triton.metrics_url, used, lambda v: v == 0)
    client = StreamClient(triton.grpc_url)
    client.send("paged_llm", inputs(
        text_input=PROMPT, stream=False,
        sampling_parameters=sampling(max_tokens=400, ignore_eos=True)))
    wait_for_metric(triton.metrics_url, used, lambda v: v > 0)
    errors = []
    client.client.stop_stream(cancel_requests=True)
    time.sleep(1)
    while not client.events.empty():
        _, result, error = client.events.get()
        errors.append(error if error is not None else result)
    assert len(errors) == 1 and isinstance(errors[0], InferenceServerException), errors
    assert errors[0].status() == "StatusCode.CANCELLED"
    wait_for_metric(triton.metrics_url, used, lambda v: v == 0, timeout_s=10)
    client.client.close()


def _count(values, name):
    return values.get(f"{name}_count", 0.0)


def test_vllm_metrics(triton):
    """vllm_backend's metrics test, and vLLM's per-token names: one request of 8 tokens adds one
    observation to each per-request histogram and 7 to each per-token one."""
    names = ["vllm:request_params_n", "vllm:request_params_max_tokens",
             "vllm:request_prompt_tokens", "vllm:request_generation_tokens",
             "vllm:request_max_num_generation_tokens", "vllm:e2e_request_latency_seconds",
             "vllm:request_time_per_output_token_seconds", "vllm:time_to_first_token_seconds"]
    per_token = ["vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds"]
    wait_for_metric(triton.metrics_url, "vllm:num_requests_running", lambda v: v == 0)
    time.sleep(0.5)  # the last request's per-token bins are published when the engine idles
    before = metrics(triton.metrics_url)
    length_before = _successes(triton, "length")
    s = run_one(triton.grpc_url, "paged_llm", inputs(
        text_input=PROMPT, stream=True,
        sampling_parameters=sampling(max_tokens=8, ignore_eos=True, temperature=0)))
    assert s.error is None, s.error
    deadline = time.monotonic() + 10
    while True:
        after = metrics(triton.metrics_url)
        if all(_count(after, n) - _count(before, n) >= 7 for n in per_token) \
                or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    for name in names:
        assert _count(after, name) - _count(before, name) == 1, name
    assert after["vllm:request_params_n_sum"] - before.get("vllm:request_params_n_sum", 0) == 1
    assert after["vllm:request_params_max_tokens_sum"] - \
        before.get("vllm:request_params_max_tokens_sum", 0) == 8
    assert after["vllm:request_generation_tokens_sum"] - \
        before.get("vllm:request_generation_tokens_sum", 0) == 8
    for name in per_token:
        # one observation per token after the first
        assert _count(after, name) - _count(before, name) == 7, name
        inf = after[f"{name}_bucket{{le=+Inf}}"] - before.get(f"{name}_bucket{{le=+Inf}}", 0)
        assert inf == 7
    assert _successes(triton, "length") - length_before == 1


def _successes(triton, reason: str) -> float:
    import urllib.request

    from paged_triton.client.metrics import parse_prometheus

    with urllib.request.urlopen(triton.metrics_url, timeout=10) as r:
        samples, _ = parse_prometheus(r.read().decode())
    return sum(s.value for s in samples if s.name == "vllm:request_success_total"
               and s.label("finished_reason") == reason and s.label("model") == "paged_llm")
