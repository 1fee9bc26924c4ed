"""gRPC streaming through paged_llm and through the ensemble equals the offline LLM.generate
byte for byte (multi-byte UTF-8 and leading spaces included); non-streaming is one response."""

import numpy as np
import pytest

from paged_engine import SamplingParams
from serving_client import inputs, trt_inputs, run_one, sampling

pytestmark = pytest.mark.server

CANDIDATE_PROMPTS = [
    "Hello world! 日本語",
    "中文文本也需要测试。",
    "Emoji: 😀 🚀 and café",
    "The lazy dog",
    "Paged attention stores",
    "こんにちは世界",
    "A serving system streams",
    "Numbers: 3.14159 and 42",
]
MAX_TOKENS = 16


def _has_multibyte_and_leading_space(text: str) -> bool:
    multibyte = any(len(ch.encode("utf-8")) > 1 and ch != "\ufffd" for ch in text)
    leading_space = any(text[i] == " " and not text[i + 1].isspace()
                        for i in range(len(text) - 1))
    return multibyte and leading_space


@pytest.fixture(scope="module")
def reference(offline_llm):
    """Offline greedy outputs; the prompt whose output has multi-byte text and leading spaces."""
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    outs = offline_llm.generate(CANDIDATE_PROMPTS, params)
    by_prompt = {p: o for p, o in zip(CANDIDATE_PROMPTS, outs)}
    chosen = [p for p, o in by_prompt.items() if _has_multibyte_and_leading_space(o.text)]
    assert chosen, f"no candidate output has multi-byte text and a leading space: " \
                   f"{[o.text for o in outs]}"
    return by_prompt, chosen[0]


def test_paged_llm_stream_equals_offline(triton, reference):
    by_prompt, prompt = reference
    for p in (prompt, CANDIDATE_PROMPTS[0]):
        expected = by_prompt[p]
        stream = run_one(triton.grpc_url, "paged_llm", inputs(
            text_input=p, stream=True,
            sampling_parameters=sampling(max_tokens=str(MAX_TOKENS), temperature="0"),
            return_finish_reason=True, return_num_output_tokens=True))
        assert stream.error is None, stream.error
        assert stream.finals == 1
        assert len(stream.responses) > 1  # deltas, not one blob
        assert stream.text().encode("utf-8") == expected.text.encode("utf-8")
        assert sum(int(r[0]) for r in stream.values("num_output_tokens")) == len(expected.token_ids)
        assert stream.values("finish_reason")[-1][0].decode() == expected.finish_reason


def test_ensemble_stream_equals_offline(triton, reference):
    by_prompt, prompt = reference
    expected = by_prompt[prompt]
    stream = run_one(triton.grpc_url, "ensemble", trt_inputs(
        text_input=prompt, stream=True, max_tokens=np.array([MAX_TOKENS], np.int32),
        temperature=np.array([0.0], np.float32)))
    assert stream.error is None, stream.error
    assert stream.finals == 1
    assert len(stream.responses) > 1
    assert stream.text().encode("utf-8") == expected.text.encode("utf-8")


def test_non_streaming_is_one_response(triton, reference):
    by_prompt, prompt = reference
    expected = by_prompt[prompt]
    stream = run_one(triton.grpc_url, "paged_llm", inputs(
        text_input=prompt, sampling_parameters=sampling(max_tokens=MAX_TOKENS, temperature=0.0),
        return_num_input_tokens=True, return_num_output_tokens=True))
    assert stream.error is None, stream.error
    assert len(stream.responses) == 1 and stream.finals == 1
    # vllm_backend: the prompt comes first unless exclude_input_in_output.
    assert stream.text() == prompt + expected.text
    assert int(stream.responses[0]["num_input_tokens"][0]) == len(expected.prompt_token_ids)
    assert int(stream.responses[0]["num_output_tokens"][0]) == len(expected.token_ids)

    excluded = run_one(triton.grpc_url, "ensemble", trt_inputs(
        text_input=prompt, max_tokens=np.array([MAX_TOKENS], np.int32),
        temperature=np.array([0.0], np.float32), exclude_input_in_output=True))
    assert excluded.error is None, excluded.error
    assert len(excluded.responses) == 1
    assert excluded.text() == expected.text
