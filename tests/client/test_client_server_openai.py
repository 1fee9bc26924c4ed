"""The OpenAI front door, driven by the official `openai` client, against a real tritonserver."""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.server

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def door(llm_server):
    from paged_triton.client.openai_server import ServerThread

    # No --tokenizer: the front door reads tokenizer_dir from the server's model configs.
    with ServerThread(triton_url=llm_server.grpc_url) as d:
        yield d


@pytest.fixture(scope="module")
def oai(door):
    return openai.OpenAI(base_url=door.base_url, api_key="unused", max_retries=0, timeout=60)


EXACT = {"ignore_eos": True}


def test_models_and_health(oai, door):
    import urllib.request

    assert [m.id for m in oai.models.list().data] == ["paged_llm"]
    with urllib.request.urlopen(f"http://{door.host}:{door.port}/health") as r:
        assert r.status == 200


def test_completion_usage_and_finish_reason(oai):
    r = oai.completions.create(model="paged_llm", prompt="Once upon a time", max_tokens=6,
                               temperature=0, extra_body=EXACT)
    assert r.object == "text_completion" and r.choices[0].text
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 6 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + 6
    stream = oai.completions.create(model="paged_llm", prompt="Once upon a time", max_tokens=6,
                                    temperature=0, stream=True, extra_body=EXACT,
                                    stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == r.choices[0].text  # greedy: streaming and not agree
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 6


def test_chat_completion_streaming_and_not(oai):
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Say something."}]
    r = oai.chat.completions.create(model="paged_llm", messages=messages, max_tokens=5,
                                    temperature=0, extra_body=EXACT)
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 5
    chunks = list(oai.chat.completions.create(model="paged_llm", messages=messages, max_tokens=5,
                                              temperature=0, stream=True, extra_body=EXACT))
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert content == r.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_n_choices(oai):
    r = oai.completions.create(model="paged_llm", prompt="A", max_tokens=3, n=2, seed=1,
                               extra_body=EXACT)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.usage.completion_tokens == 6


def test_errors_in_openai_shape(oai):
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model="paged_llm", prompt="x", max_tokens=3, temperature=-1)
    assert e.value.status_code == 400 and "temperature" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError):  # rejected before the stream starts
        list(oai.completions.create(model="paged_llm", prompt="x", temperature=-1, stream=True))
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model="gpt-nothing", prompt="x")
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model="paged_llm", messages=[])
    assert e.value.body["param"] == "messages"


def test_client_disconnect_cancels_the_request(oai, engine_metrics):
    engine_metrics.wait_idle()
    stream = oai.completions.create(model="paged_llm", prompt="Once upon a time " * 8,
                                    max_tokens=900, stream=True, extra_body=EXACT)
    for i, _ in enumerate(stream):
        if i == 2:
            break
    assert engine_metrics.wait("vllm:kv_cache_blocks_used", lambda v: v > 0) > 0
    start = time.monotonic()
    stream.close()
    engine_metrics.wait_idle()
    assert time.monotonic() - start < 10


def test_bad_words_reach_the_engine(oai, llm_server, tiny_model_dir):
    """vLLM's `bad_words` extra field passes through: the text equals the offline engine's."""
    from paged_engine import LLM, SamplingParams

    prompt = "Once upon a time"
    plain = oai.completions.create(model="paged_llm", prompt=prompt, max_tokens=8,
                                   temperature=0, extra_body=EXACT).choices[0].text
    llm = LLM(tiny_model_dir, device="cpu", dtype="float32")
    try:
        first_token = llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0,
                                                            ignore_eos=True))[0].token_ids[0]
        word = llm.engine.tokenizer.decode([first_token]).strip()
        assert word, "the first greedy token decodes to whitespace only"
        expected = llm.generate([prompt], SamplingParams(
            max_tokens=8, temperature=0, ignore_eos=True, bad_words=[word]))[0].text
    finally:
        llm.shutdown()
    r = oai.completions.create(model="paged_llm", prompt=prompt, max_tokens=8, temperature=0,
                               extra_body={**EXACT, "bad_words": [word]})
    assert r.choices[0].text == expected
    assert r.choices[0].text != plain
