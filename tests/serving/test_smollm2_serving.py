"""The real chat model through a real tritonserver: the chat template through the ensemble and
through the OpenAI front door, stop strings on real words, and streamed text byte-equal to the
offline LLM's (smollm2_server and smollm2_llm share their engine arguments, tests/conftest.py).
"""

from __future__ import annotations

import numpy as np
import pytest

from serving_client import inputs, run_one, sampling, trt_inputs

pytestmark = pytest.mark.server

MAX_TOKENS = 48
QUESTION = "What is the capital of France?"
LIST_QUESTION = "Name three colors."


def offline_chat(llm, question: str, **params):
    """The offline answer to `question` as one user message through the chat template."""
    from paged_engine import SamplingParams

    ids = llm.tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                            tokenize=True, add_generation_prompt=True)
    ids = list(ids["input_ids"] if not isinstance(ids, list) else ids)
    params.setdefault("max_tokens", MAX_TOKENS)
    return llm.generate([ids], SamplingParams(temperature=0, **params))[0].outputs[0]


def chat_text(llm, question: str) -> str:
    return llm.tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                             tokenize=False, add_generation_prompt=True)


def test_paged_llm_stream_of_a_chat_prompt_equals_offline(smollm2_server, smollm2_llm):
    expected = offline_chat(smollm2_llm, QUESTION)
    assert "Paris" in expected.text and expected.finish_reason == "stop"
    stream = run_one(smollm2_server.grpc_url, "paged_llm", inputs(
        text_input=chat_text(smollm2_llm, QUESTION), stream=True,
        sampling_parameters=sampling(max_tokens=MAX_TOKENS, temperature=0),
        return_finish_reason=True, return_num_output_tokens=True))
    assert stream.error is None, stream.error
    assert stream.finals == 1 and len(stream.responses) > 1
    assert stream.text().encode("utf-8") == expected.text.encode("utf-8")
    assert stream.values("finish_reason")[-1][0].decode() == "stop"
    assert sum(int(r[0]) for r in stream.values("num_output_tokens")) == len(expected.token_ids)


def test_ensemble_applies_the_chat_template(smollm2_server, smollm2_llm):
    expected = offline_chat(smollm2_llm, LIST_QUESTION)
    common = dict(text_input=LIST_QUESTION, apply_chat_template=True,
                  max_tokens=np.array([MAX_TOKENS], np.int32),
                  temperature=np.array([0.0], np.float32))
    streamed = run_one(smollm2_server.grpc_url, "ensemble", trt_inputs(stream=True, **common))
    assert streamed.error is None, streamed.error
    assert len(streamed.responses) > 1
    assert streamed.text().encode("utf-8") == expected.text.encode("utf-8")
    whole = run_one(smollm2_server.grpc_url, "ensemble", trt_inputs(exclude_input_in_output=True,
                                                                 **common))
    assert whole.error is None, whole.error
    assert whole.text() == expected.text


def test_ensemble_stop_words_on_real_words(smollm2_server, smollm2_llm):
    full = offline_chat(smollm2_llm, LIST_QUESTION).text
    word = [w.strip(".,:;") for w in full.split() if w.strip(".,:;").isalpha()][1]
    expected = offline_chat(smollm2_llm, LIST_QUESTION, stop=[word])
    assert expected.text == full[:full.index(word)]
    stream = run_one(smollm2_server.grpc_url, "ensemble", trt_inputs(
        text_input=LIST_QUESTION, apply_chat_template=True, stream=True,
        max_tokens=np.array([MAX_TOKENS], np.int32), temperature=np.array([0.0], np.float32),
        stop_words=[word]))
    assert stream.error is None, stream.error
    assert stream.text() == expected.text


@pytest.fixture(scope="module")
def oai(smollm2_server):
    openai = pytest.importorskip("openai")
    from paged_triton.client.openai_server import ServerThread

    # No --tokenizer: the door finds the tokenizer derived from the GGUF in the model configs.
    with ServerThread(triton_url=smollm2_server.grpc_url) as door:
        yield openai.OpenAI(base_url=door.base_url, api_key="unused", max_retries=0, timeout=120)


def test_openai_chat_completion_answers_through_the_template(oai, smollm2_llm):
    expected = offline_chat(smollm2_llm, QUESTION)
    messages = [{"role": "user", "content": QUESTION}]
    r = oai.chat.completions.create(model="paged_llm", messages=messages, max_tokens=MAX_TOKENS,
                                    temperature=0)
    assert r.choices[0].message.content == expected.text
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == len(expected.token_ids)
    chunks = list(oai.chat.completions.create(model="paged_llm", messages=messages,
                                              max_tokens=MAX_TOKENS, temperature=0, stream=True))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content.encode("utf-8") == expected.text.encode("utf-8")
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_openai_stop_on_a_real_word(oai, smollm2_llm):
    full = offline_chat(smollm2_llm, LIST_QUESTION).text
    word = [w.strip(".,:;") for w in full.split() if w.strip(".,:;").isalpha()][1]
    r = oai.chat.completions.create(model="paged_llm", max_tokens=MAX_TOKENS, temperature=0,
                                    messages=[{"role": "user", "content": LIST_QUESTION}],
                                    stop=[word])
    assert r.choices[0].message.content == full[:full.index(word)]
    assert r.choices[0].finish_reason == "stop"
