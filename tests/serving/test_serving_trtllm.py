"""TensorRT-LLM clients against the ensemble and tensorrt_llm_bls, as their own clients speak:
[1, 1] shapes, TensorRT-LLM's full optional input set (beam_width, num_return_sequences,
length_penalty, embedding bias, return_* flags, older names), TensorRT-LLM's sampling semantics
(the docs' "top_k": 1, "top_p": 0 is greedy), refusals that name the input, batches and
cancellation through the BLS model. References come from the offline engine."""

import json

import numpy as np
import pytest

from paged_engine import SamplingParams
from serving_client import (StreamClient, http_post, metrics, run_one, trt_inputs,
                            wait_for_metric)

pytestmark = pytest.mark.server

PROMPT = "Hello world! 日本語"
MODELS = ["ensemble", "tensorrt_llm_bls"]


def i32(v):
    return np.array([v], np.int32)


def f32(v):
    return np.array([v], np.float32)


@pytest.fixture(scope="module")
def greedy(offline_llm):
    return offline_llm.generate([PROMPT], SamplingParams(max_tokens=12, temperature=0.0))[0]


def _text_of(stream, index=0):
    return b"".join(r["text_output"][0] for r in stream.responses
                    if int(r["sequence_index"].reshape(-1)[0]) == index).decode("utf-8")


@pytest.mark.parametrize("model", MODELS)
def test_end_to_end_client_request(triton, greedy, model):
    """What TensorRT-LLM's end_to_end_grpc_client sends by default: [1, 1] shapes, beam_width 1,
    temperature 1.0 without top_k / top_p (greedy there), num_return_sequences 1, exclude false
    (streaming then never repeats the prompt)."""
    base = dict(text_input=PROMPT, max_tokens=i32(12), beam_width=i32(1), temperature=f32(1.0),
                num_return_sequences=i32(1), exclude_input_in_output=False)
    for stream in (True, False):
        s = run_one(triton.grpc_url, model, trt_inputs(**base, stream=stream))
        assert s.error is None, s.error
        assert s.finals == 1
        assert all(r["text_output"].shape == (1,) for r in s.responses)  # output[0].decode()
        assert s.text() == (greedy.text if stream else PROMPT + greedy.text), (model, stream)
        if stream:
            assert len(s.responses) > 1


@pytest.mark.parametrize("model", MODELS)
def test_documented_greedy_request_over_http_generate(triton, greedy, model):
    status, body = http_post(triton.http_url, f"/v2/models/{model}/generate", {
        "text_input": PROMPT, "max_tokens": 12, "bad_words": "", "stop_words": "",
        "top_k": 1, "top_p": 0})
    assert status == 200, body
    reply = json.loads(body)
    assert reply["text_output"] == PROMPT + greedy.text
    assert reply["batch_index"] == 0 and reply["sequence_index"] == 0


@pytest.mark.parametrize("model", MODELS)
def test_older_input_names_and_their_conflicts(triton, greedy, model):
    s = run_one(triton.grpc_url, model, trt_inputs(
        text_input=PROMPT, max_tokens=i32(12), runtime_top_k=i32(1), runtime_top_p=f32(0.0),
        random_seed=np.array([7], np.uint64), len_penalty=f32(1.0), min_length=i32(1),
        streaming=True, exclude_input_in_output=True))
    assert s.error is None, s.error
    assert s.text() == greedy.text and len(s.responses) > 1
    s = run_one(triton.grpc_url, model, trt_inputs(
        text_input=PROMPT, max_tokens=i32(4), top_k=i32(1), runtime_top_k=i32(1)))
    assert s.error is not None and "'top_k' or its older name 'runtime_top_k'" in s.error


REFUSED = {
    "beam_width": (dict(beam_width=i32(2)), "beam_width"),
    "return_context_logits": (dict(return_context_logits=True), "return_context_logits"),
    "return_generation_logits": (dict(return_generation_logits=True), "return_generation_logits"),
    "return_perf_metrics": (dict(return_perf_metrics=True), "return_perf_metrics"),
    "lora_task_id": (dict(lora_task_id=np.array([3], np.uint64)), "LoRA"),
    "decoder_text_input": (dict(decoder_text_input="x"), "encoder-decoder"),
    "top_p_above_1": (dict(top_p=f32(1.5)), "top_p"),
    "embedding_bias_mismatch": (dict(embedding_bias_words=["a", "b"],
                                     embedding_bias_weights=np.array([1.0], np.float32)),
                                "embedding_bias"),
}


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("case", sorted(REFUSED))
def test_what_cannot_be_honoured_is_refused_naming_the_input(triton, model, case):
    extra, needle = REFUSED[case]
    s = run_one(triton.grpc_url, model, trt_inputs(text_input="Hi", max_tokens=i32(4), **extra))
    assert s.error is not None, (case, s.responses)
    assert needle in s.error and s.finals == 1


@pytest.mark.parametrize("model", MODELS)
def test_num_return_sequences_one_response_per_sequence(triton, offline_llm, model):
    params = SamplingParams(n=2, max_tokens=8, temperature=1.0, seed=11)
    expected = offline_llm.generate([PROMPT], params)[0]
    assert expected.outputs[0].text != expected.outputs[1].text
    for stream in (True, False):
        s = run_one(triton.grpc_url, model, trt_inputs(
            text_input=PROMPT, max_tokens=i32(8), num_return_sequences=i32(2), top_p=f32(1.0),
            seed=np.array([11], np.uint64), stream=stream, exclude_input_in_output=True))
        assert s.error is None, s.error
        assert s.finals == 1
        assert {int(r["sequence_index"].reshape(-1)[0]) for r in s.responses} == {0, 1}
        assert [_text_of(s, i) for i in (0, 1)] == [c.text for c in expected.outputs], stream
        if not stream:
            assert len(s.responses) == 2


@pytest.mark.parametrize("model", MODELS)
def test_embedding_bias_is_applied_as_logit_bias(triton, offline_llm, greedy, model):
    tokenizer = offline_llm.tokenizer
    # a generated token that is a word of its own (it decodes cleanly and encodes back to itself)
    word = next(w for t in greedy.token_ids[1:]
                if (w := tokenizer.decode([t])).strip() and "\ufffd" not in w
                and tokenizer.encode(w, add_special_tokens=False) == [t])
    bias = {t: -100.0 for t in tokenizer.encode(word, add_special_tokens=False)}
    expected = offline_llm.generate([PROMPT], SamplingParams(max_tokens=12, temperature=0.0,
                                                             logit_bias=bias))[0]
    assert expected.token_ids != greedy.token_ids
    s = run_one(triton.grpc_url, model, trt_inputs(
        text_input=PROMPT, max_tokens=i32(12), exclude_input_in_output=True,
        embedding_bias_words=[word], embedding_bias_weights=np.array([-100.0], np.float32)))
    assert s.error is None, s.error
    assert s.text() == expected.text


@pytest.mark.parametrize("model", MODELS)
def test_log_probs_and_token_counts(triton, offline_llm, greedy, model):
    s = run_one(triton.grpc_url, model, trt_inputs(
        text_input=PROMPT, max_tokens=i32(12), stream=True, return_log_probs=True,
        return_num_input_tokens=True, return_num_output_tokens=True))
    assert s.error is None, s.error
    log_probs = np.concatenate([r["output_log_probs"].reshape(-1) for r in s.responses])
    assert len(log_probs) == len(greedy.token_ids) and (log_probs < 0).all()
    assert all(int(r["num_input_tokens"][0][0]) == len(greedy.prompt_token_ids)
               for r in s.responses)
    assert sum(int(r["num_output_tokens"][0][0]) for r in s.responses) == len(greedy.token_ids)
    assert float(s.responses[-1]["cum_log_probs"][0]) == pytest.approx(float(log_probs.sum()),
                                                                       abs=1e-3)


def test_bls_serves_a_batch_row_by_row(triton, offline_llm):
    prompts = [PROMPT, "The quick brown fox"]
    expected = offline_llm.generate(prompts, SamplingParams(max_tokens=6, temperature=0.0))
    batch = dict(text_input=np.array([[p.encode()] for p in prompts], dtype=np.object_),
                 max_tokens=np.array([[6], [6]], np.int32), stream=np.array([[True], [True]]))
    s = run_one(triton.grpc_url, "tensorrt_llm_bls", [
        t for name, value in batch.items() for t in _raw(name, value)])
    assert s.error is None, s.error
    assert s.finals == 1
    for row, want in enumerate(expected):
        got = b"".join(r["text_output"][0] for r in s.responses
                       if int(r["batch_index"][0][0]) == row).decode()
        assert got == want.text
    # the ensemble takes one prompt per request and says so
    s = run_one(triton.grpc_url, "ensemble", [
        t for name, value in batch.items() for t in _raw(name, value)])
    assert s.error is not None and "one prompt per request" in s.error


def _raw(name, array):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    datatype = "BYTES" if array.dtype == np.object_ else np_to_triton_dtype(array.dtype)
    tensor = grpcclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return [tensor]


def test_bls_cancellation_reaches_the_engine(triton):
    used, generated = "vllm:kv_cache_blocks_used", "vllm:generation_tokens_total"
    wait_for_metric(triton.metrics_url, used, lambda v: v == 0)
    before = metrics(triton.metrics_url).get(generated, 0.0)
    client = StreamClient(triton.grpc_url)
    rid = client.send("tensorrt_llm_bls", trt_inputs(
        text_input=PROMPT, max_tokens=i32(400), min_tokens=i32(400), stream=True))
    while len(client.streams[rid].responses) < 2:
        client.poll(timeout_s=60)
    wait_for_metric(triton.metrics_url, used, lambda v: v > 0)
    client.close(cancel=True)
    wait_for_metric(triton.metrics_url, used, lambda v: v == 0, timeout_s=10)
    wait_for_metric(triton.metrics_url, "vllm:num_requests_running", lambda v: v == 0)
    assert metrics(triton.metrics_url)[generated] - before < 400 - 50
