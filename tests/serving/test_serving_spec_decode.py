"""Speculative decoding through a real tritonserver: paged_llm and the ensemble stream the same
bytes as the offline engine without speculation, the vllm:spec_decode_* counters count, a
cancelled stream gives back its blocks, and a bad speculative_config fails the load naming it.

The server's draft model is the served model itself (a relative path in model.json), so nearly
every step emits k + 1 tokens at once: each streamed response carries several tokens.
"""

import json

import numpy as np
import pytest

from paged_engine import SamplingParams
from serving_client import inputs, metrics, run_one, sampling, trt_inputs, wait_for_metric
from test_serving_cancel import _cancel_mid_stream
from test_serving_stream import CANDIDATE_PROMPTS

pytestmark = pytest.mark.server

MAX_TOKENS = 24
K = 4


@pytest.fixture(scope="module")
def spec_triton(serving_model_dir, engine_args, triton_server_factory, tmp_path_factory):
    from paged_engine.deploy.repository import prepare_model_repository

    repo = prepare_model_repository(
        tmp_path_factory.mktemp("spec-repo"), serving_model_dir, **engine_args,
        speculative_config={"method": "draft_model", "model": "draft", "num_speculative_tokens": K})
    import os
    os.symlink(serving_model_dir, os.path.join(repo, "paged_llm", "1", "draft"))
    server = triton_server_factory(repo, extra_args=["--exit-timeout-secs=3"])
    yield server
    server.stop()


@pytest.fixture(scope="module")
def reference(offline_llm):
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    outs = offline_llm.generate(CANDIDATE_PROMPTS, params)
    return dict(zip(CANDIDATE_PROMPTS, outs))


def test_paged_llm_stream_equals_non_speculative(spec_triton, reference):
    multi_token = 0
    for prompt, expected in reference.items():
        stream = run_one(spec_triton.grpc_url, "paged_llm", inputs(
            text_input=prompt, stream=True,
            sampling_parameters=sampling(max_tokens=str(MAX_TOKENS), temperature="0"),
            return_num_output_tokens=True, return_finish_reason=True))
        assert stream.error is None, stream.error
        assert stream.text().encode("utf-8") == expected.text.encode("utf-8"), prompt
        counts = [int(r[0]) for r in stream.values("num_output_tokens")]
        assert sum(counts) == len(expected.token_ids)
        multi_token += sum(c > 1 for c in counts)
        assert stream.values("finish_reason")[-1][0].decode() == expected.finish_reason
    assert multi_token >= len(reference)  # responses really carried several tokens
    # Counters are published by the engine thread shortly after the last response.
    wait_for_metric(spec_triton.metrics_url, "vllm:spec_decode_num_accepted_tokens_total",
                    lambda v: v > 0)
    m = metrics(spec_triton.metrics_url)
    assert m["vllm:spec_decode_num_accepted_tokens_total"] > 0
    assert m["vllm:spec_decode_num_draft_tokens_total"] >= m["vllm:spec_decode_num_accepted_tokens_total"]
    assert m["vllm:spec_decode_num_drafts_total"] > 0
    assert m["vllm:spec_decode_num_accepted_tokens_per_pos"] > 0


def test_ensemble_stream_equals_non_speculative(spec_triton, reference, offline_llm):
    for prompt, expected in reference.items():
        stream = run_one(spec_triton.grpc_url, "ensemble", trt_inputs(
            text_input=prompt, stream=True, max_tokens=np.array([MAX_TOKENS], np.int32),
            temperature=np.array([0.0], np.float32)))
        assert stream.error is None, stream.error
        assert stream.text().encode("utf-8") == expected.text.encode("utf-8"), prompt
    # With a stop string (text held back, then cut inside a multi-token step).
    prompt, expected = next(iter(reference.items()))
    stop = expected.text[5:8]
    want = offline_llm.generate([prompt], SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0,
                                                         stop=[stop]))[0]
    stream = run_one(spec_triton.grpc_url, "ensemble", trt_inputs(
        text_input=prompt, stream=True, max_tokens=np.array([MAX_TOKENS], np.int32),
        temperature=np.array([0.0], np.float32), stop_words=np.array([stop.encode()], object)))
    assert stream.error is None, stream.error
    assert stream.text().encode("utf-8") == want.text.encode("utf-8")


def test_cancel_mid_verification_frees_blocks(spec_triton):
    _cancel_mid_stream(spec_triton, "paged_llm", inputs(
        text_input="Hello world", stream=True,
        sampling_parameters=sampling(max_tokens=400, ignore_eos=True)))
    stream = run_one(spec_triton.grpc_url, "paged_llm", inputs(
        text_input="Hello", stream=True, sampling_parameters=sampling(max_tokens=3)))
    assert stream.error is None and stream.finals == 1  # the server keeps serving
    wait_for_metric(spec_triton.metrics_url, "vllm:kv_cache_blocks_used", lambda v: v == 0)


def test_bad_speculative_config_fails_the_load(serving_model_dir, tmp_path):
    from paged_engine.serving.llm_model import default_engine_factory, load_engine_args

    version = tmp_path / "1"
    version.mkdir()
    (version / "model.json").write_text(json.dumps({
        "model": serving_model_dir, "device": "cpu",
        "speculative_config": json.dumps({"method": "ngram", "num_speculative_tokens": 40})}))
    with pytest.raises(ValueError, match="num_speculative_tokens must be in"):
        default_engine_factory(load_engine_args(str(version)))
