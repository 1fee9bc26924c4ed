"""Structured outputs through a real tritonserver (paged_llm, `sampling_parameters` JSON): a
JSON-schema request streams text that, concatenated, parses and validates with `jsonschema` and
equals the offline engine's; the same through the TensorRT-LLM ensemble's guided-decoding
inputs; vLLM's older `guided_choice` key through Triton's HTTP generate extension; a schema that does not compile answers an error naming it, and the server goes on.
"""

from __future__ import annotations

import json

import pytest

import numpy as np

from serving_client import http_post, inputs, run_one, sampling, trt_inputs

jsonschema = pytest.importorskip("jsonschema")

pytestmark = pytest.mark.server

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 24},
                   "age": {"type": "integer", "minimum": 0, "maximum": 150}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
QUESTION = "Give me a person as JSON with a name and an age."


def chat_text(llm, question: str) -> str:
    return llm.tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                             tokenize=False, add_generation_prompt=True)


def test_json_schema_request_streams_valid_json(smollm2_server, smollm2_llm):
    from paged_engine import SamplingParams

    structured = {"json": PERSON, "disable_any_whitespace": True}
    prompt = chat_text(smollm2_llm, QUESTION)
    ids = smollm2_llm.tokenizer(prompt, add_special_tokens=True).input_ids
    expected = smollm2_llm.generate([ids], SamplingParams(
        temperature=0, max_tokens=48, structured_outputs=structured))[0]
    stream = run_one(smollm2_server.grpc_url, "paged_llm", inputs(
        text_input=prompt, stream=True, return_finish_reason=True,
        sampling_parameters=sampling(max_tokens=48, temperature=0, structured_outputs=structured)))
    assert stream.error is None, stream.error
    assert stream.finals == 1 and len(stream.responses) > 1  # streamed, not one answer
    text = stream.text()
    jsonschema.validate(json.loads(text), PERSON)
    assert text == expected.text
    assert stream.values("finish_reason")[-1][0].decode() == "stop"


def test_ensemble_guided_decoding_json_schema(smollm2_server):
    """TensorRT-LLM's guided_decoding_guide_type / guided_decoding_guide through the ensemble
    (default whitespace rules: the schema caps the name, so the output is bounded)."""
    streamed = run_one(smollm2_server.grpc_url, "ensemble", trt_inputs(
        text_input=QUESTION, apply_chat_template=True, stream=True,
        max_tokens=np.array([64], np.int32), temperature=np.array([0.0], np.float32),
        guided_decoding_guide_type="json_schema", guided_decoding_guide=json.dumps(PERSON)))
    assert streamed.error is None, streamed.error
    jsonschema.validate(json.loads(streamed.text()), PERSON)


def test_guided_choice_through_http_generate(smollm2_server, smollm2_llm):
    status, body = http_post(smollm2_server.http_url, "/v2/models/paged_llm/generate", {
        "text_input": chat_text(smollm2_llm, "Is the sky blue? Answer yes or no."),
        "max_tokens": 8, "temperature": 0, "exclude_input_in_output": True,
        # Request parameters are scalars: the list comes as its JSON text.
        "guided_choice": json.dumps(["yes", "no"])})
    assert status == 200, body
    assert json.loads(body)["text_output"] in ("yes", "no")


@pytest.mark.parametrize("attempt", [0, 1])  # compiled and failed; then refused from the cache
def test_schema_that_does_not_compile_is_an_error_naming_it(smollm2_server, attempt):
    bad = {"json": {"type": "object", "properties": {"x": {"type": "no-such-type"}}}}
    stream = run_one(smollm2_server.grpc_url, "paged_llm", inputs(
        text_input="Hello", stream=True, sampling_parameters=sampling(
            max_tokens=4, structured_outputs=bad)))
    assert stream.error is not None and stream.finals == 1
    assert "structured_outputs.json does not compile" in stream.error
    assert "no-such-type" in stream.error
    ok = run_one(smollm2_server.grpc_url, "paged_llm", inputs(
        text_input="Hello", sampling_parameters=sampling(max_tokens=2, temperature=0)))
    assert ok.error is None, ok.error
