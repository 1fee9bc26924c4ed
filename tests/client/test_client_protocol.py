"""Request tensors / HTTP bodies for both model kinds, and response parsing (no server)."""

import json

import numpy as np
import pytest

from paged_triton.client.errors import InvalidArgument
from paged_triton.client.protocol import (
    TRTLLM,
    VLLM,
    Chunk,
    CompletionBuilder,
    ModelInfo,
    build_http_body,
    build_inputs,
    parse_outputs,
)


def by_name(tensors):
    return {t.name: t for t in tensors}


def test_vllm_inputs_carry_sampling_as_json_and_ask_for_counts():
    info = ModelInfo.default("paged_llm")
    assert info.kind == VLLM
    t = by_name(build_inputs(info, "Hello", True, {"max_tokens": 8, "temperature": 0.5,
                                                   "stop": ["\n"], "seed": None}))
    assert t["text_input"].values == ["Hello"] and t["text_input"].shape == [1]
    assert t["stream"].values == [True] and t["stream"].datatype == "BOOL"
    assert json.loads(t["sampling_parameters"].values[0]) == {
        "max_tokens": 8, "temperature": 0.5, "stop": ["\n"]}  # None dropped
    assert t["exclude_input_in_output"].values == [True]
    for flag in ("return_finish_reason", "return_num_input_tokens", "return_num_output_tokens"):
        assert t[flag].values == [True]
    assert "return_logprobs" not in t
    assert t["text_input"].as_numpy().dtype == np.object_


def test_vllm_without_sampling_sends_no_sampling_parameters_and_logprobs_flags():
    info = ModelInfo.default("paged_llm")
    assert "sampling_parameters" not in by_name(build_inputs(info, "x", False, {}))
    t = by_name(build_inputs(info, "x", False, {"logprobs": 2}))
    assert t["return_logprobs"].values == [True] and t["return_cumulative_logprob"].values == [True]


def test_optional_flags_the_model_lacks_are_left_out():
    info = ModelInfo("m", VLLM, {"text_input": ModelInfo.default("x").inputs["text_input"]})
    assert [t.name for t in build_inputs(info, "x", True, {})] == ["text_input"]
    with pytest.raises(InvalidArgument, match="sampling_parameters"):
        build_inputs(info, "x", True, {"max_tokens": 3})


def test_trtllm_inputs_are_typed_tensors():
    info = ModelInfo.default("ensemble")
    assert info.kind == TRTLLM
    t = by_name(build_inputs(info, "Hi", True, {"max_tokens": 7, "temperature": 0.7, "top_k": 5,
                                                "seed": 3, "stop": ["a", "bc"]}))
    assert (t["max_tokens"].datatype, t["max_tokens"].values) == ("INT32", [7])
    assert (t["temperature"].datatype, t["temperature"].values) == ("FP32", [0.7])
    assert (t["seed"].datatype, t["seed"].values) == ("UINT64", [3])
    assert t["stop_words"].values == ["a", "bc"] and t["stop_words"].shape == [1, 2]
    assert t["stream"].values == [True] and t["stream"].shape == [1, 1]  # the batch dimension
    assert t["max_tokens"].as_numpy().dtype == np.int32
    assert "top_p" not in t  # top_k given: TensorRT-LLM samples with it


def test_trtllm_temperature_alone_samples_the_whole_distribution():
    """TensorRT-LLM decodes greedily without top_k / top_p; vLLM's temperature alone samples."""
    info = ModelInfo.default("ensemble")
    t = by_name(build_inputs(info, "Hi", True, {"temperature": 0.7}))
    assert t["top_p"].values == [1.0]
    t = by_name(build_inputs(info, "Hi", True, {"temperature": 0.0}))
    assert "top_p" not in t
    body = build_http_body(info, "Hi", True, {"temperature": 0.7, "top_p": 0.5})
    assert body["top_p"] == 0.5


def test_trtllm_rejects_unknown_and_mistyped_fields_naming_them():
    info = ModelInfo.default("ensemble")
    with pytest.raises(InvalidArgument, match="min_p"):
        build_inputs(info, "x", True, {"min_p": 0.1})
    with pytest.raises(InvalidArgument, match="max_tokens"):
        build_inputs(info, "x", True, {"max_tokens": 2.5})
    with pytest.raises(InvalidArgument, match="seed"):
        build_inputs(info, "x", True, {"seed": -1})


def test_batching_model_gets_a_batch_dim():
    info = ModelInfo.from_config({"name": "ensemble", "max_batch_size": 8, "input": [
        {"name": "text_input", "data_type": "TYPE_STRING", "dims": ["1"]},
        {"name": "max_tokens", "data_type": "TYPE_INT32", "dims": ["1"]},
        {"name": "stop_words", "data_type": "TYPE_STRING", "dims": ["-1"]}]})
    assert info.kind == TRTLLM and info.max_batch_size == 8
    t = by_name(build_inputs(info, "x", True, {"max_tokens": 4, "stop": ["a", "b", "c"]}))
    assert t["text_input"].shape == [1, 1]
    assert t["stop_words"].shape == [1, 3]
    assert t["stop_words"].as_numpy().shape == (1, 3)


def test_from_config_detects_kind_from_inputs():
    vllm = ModelInfo.from_config({"name": "whatever", "input": [
        {"name": "text_input", "data_type": "TYPE_STRING", "dims": [1]},
        {"name": "sampling_parameters", "data_type": "TYPE_STRING", "dims": [1]},
        {"name": "max_tokens", "data_type": "TYPE_INT32", "dims": [1]}]})
    assert vllm.kind == VLLM and vllm.inputs["text_input"].datatype == "BYTES"


def test_http_body_flattens_lists_into_json_strings():
    body = build_http_body(ModelInfo.default("paged_llm"), "Hi", True,
                           {"max_tokens": 4, "stop": ["x", "y"], "stop_token_ids": [1, 2]})
    assert body["text_input"] == "Hi" and body["stream"] is True
    assert body["max_tokens"] == 4
    assert json.loads(body["stop"]) == ["x", "y"] and json.loads(body["stop_token_ids"]) == [1, 2]
    assert body["exclude_input_in_output"] is True and body["return_finish_reason"] is True
    ens = build_http_body(ModelInfo.default("ensemble"), "Hi", False, {"stop": "x", "max_tokens": 3})
    assert ens["stop_words"] == ["x"] and ens["max_tokens"] == 3 and ens["stream"] is False


def test_parse_outputs_numpy_and_json():
    chunk = parse_outputs({
        "text_output": np.array([b"caf\xc3\xa9"], dtype=object),
        "finish_reason": np.array([b"stop"], dtype=object),
        "num_input_tokens": np.array([5], dtype=np.uint32),
        "num_output_tokens": np.array([2], dtype=np.uint32),
        "cumulative_logprob": np.array([-1.5], dtype=np.float32),
        "logprobs": np.array([b'{"3": {"logprob": -0.1, "rank": 1, "decoded_token": "a"}}'], dtype=object),
    })
    assert chunk == Chunk("café", "stop", 5, 2, -1.5, [{"3": {"logprob": -0.1, "rank": 1, "decoded_token": "a"}}])
    empty_reason = parse_outputs({"text_output": "x", "finish_reason": "", "num_output_tokens": 1})
    assert empty_reason.finish_reason is None and empty_reason.text == "x"
    assert parse_outputs({"text_output": ["a", "b"]}).text == "a"
    assert parse_outputs({"cum_log_probs": np.array([[-2.0]], dtype=np.float32)}).cumulative_logprob == -2.0


def test_completion_builder_sums_increments():
    b = CompletionBuilder()
    b.add(Chunk("He", num_output_tokens=1))
    b.add(Chunk("llo", num_output_tokens=2, num_input_tokens=4))
    b.add(Chunk("", finish_reason="length", num_output_tokens=0))
    c = b.finish()
    assert (c.text, c.finish_reason, c.num_input_tokens, c.num_output_tokens, c.num_responses) == \
        ("Hello", "length", 4, 3, 3)
    assert 0 <= c.ttft_s <= c.latency_s
