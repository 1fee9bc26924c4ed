"""OpenAI front door without a Triton server: request mapping, error shape, SSE framing.

The app runs in-process on aiohttp's test server with a fake AsyncClient standing in for Triton.
"""

import asyncio
import json

import pytest

from paged_triton.client.errors import InvalidArgument, NotFound, ServerError, Unavailable
from paged_triton.client.openai_server import (
    OpenAIError,
    OpenAIServer,
    error_from_client,
    plan_chat,
    plan_completion,
)
from fake_triton_client import Chunk, FakeClientBase, FakeStream


def test_plan_completion_maps_fields():
    plan = plan_completion({"model": "m", "prompt": "Hi", "max_tokens": 5, "temperature": 0.2,
                            "stop": "\n", "seed": 7, "n": 2, "top_k": 3, "echo": True,
                            "stream": True, "stream_options": {"include_usage": True}})
    assert plan.prompts == ["Hi", "Hi"] and plan.stream and plan.include_usage
    assert plan.sampling[0] == {"max_tokens": 5, "temperature": 0.2, "stop": ["\n"], "seed": 7, "top_k": 3}
    assert plan.sampling[1]["seed"] == 8  # n choices of one prompt must differ
    assert plan.echo_prompts == ["Hi", "Hi"]
    multi = plan_completion({"prompt": ["a", "b"], "max_completion_tokens": 2})
    assert multi.prompts == ["a", "b"] and multi.sampling[1] == {"max_tokens": 2}


@pytest.mark.parametrize("body,param", [
    ({"prompt": ""}, "prompt"), ({}, "prompt"), ({"prompt": [1, -2]}, "prompt"),
    ({"prompt": [[]]}, "prompt"), ({"prompt": "x", "suffix": "y"}, "suffix"),
    ({"prompt": "x", "logprobs": 21}, "logprobs"), ({"prompt": "x", "logprobs": True}, "logprobs"),
    ({"prompt": "x", "top_logprobs": 2}, "top_logprobs"), ({"prompt": "x", "echo": "yes"}, "echo"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"), ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "temperature": "hot"}, "temperature"), ({"prompt": "x", "stop": [1]}, "stop"),
    ({"prompt": "x", "frobnicate": 1}, "frobnicate"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
])
def test_plan_completion_rejects_with_param(body, param):
    with pytest.raises(OpenAIError) as e:
        plan_completion(body)
    assert e.value.status == 400 and e.value.param == param
    assert set(e.value.body()["error"]) == {"message", "type", "param", "code"}


def test_plan_chat_renders_messages():
    seen: list = []

    def render(messages, tools=None):
        seen.append(messages)
        return "PROMPT"

    plan = plan_chat({"messages": [{"role": "developer", "content": "be brief"},
                                   {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                      "max_tokens": 3}, render)
    assert plan.prompts == ["PROMPT"] and plan.sampling == [{"max_tokens": 3}]
    # Without max_tokens a chat answer runs to the end (the engine's "null": max_model_len).
    assert plan_chat({"messages": [{"role": "user", "content": "x"}]}, render).sampling == [
        {"max_tokens": "null"}]
    assert seen[0] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    for bad in ({"messages": []}, {"messages": [{"content": "x"}]},
                {"messages": [{"role": "wizard", "content": "x"}]}):
        with pytest.raises(OpenAIError):
            plan_chat(bad, render)


def test_error_mapping_statuses():
    assert error_from_client(InvalidArgument("bad")).status == 400
    assert error_from_client(NotFound("no model")).status == 404
    assert error_from_client(Unavailable("down")).status == 503
    assert error_from_client(ServerError("oops")).status == 500
    assert error_from_client(InvalidArgument("bad")).body()["error"]["message"] == "bad"


class FakeClient(FakeClientBase):
    """Echoes the prompt's words back as one token each; 'reject' in a prompt is InvalidArgument."""

    def chunks_for(self, prompt, max_tokens=16, **_):
        if "reject" in prompt:
            return FakeStream([], InvalidArgument("max_tokens must be >= 1, got -3"))
        max_tokens = 1000 if max_tokens == "null" else max_tokens
        words = [" " + w for w in prompt.split()][:max_tokens]
        chunks = [Chunk(w, num_output_tokens=1) for w in words]
        chunks[-1].finish_reason = "length" if len(words) == max_tokens else "stop"
        chunks[-1].num_input_tokens = len(prompt.split())
        return FakeStream(chunks)


def _run(coro_fn):
    from aiohttp.test_utils import TestClient, TestServer

    async def main():
        fake = FakeClient()
        app = OpenAIServer(fake, tokenizer=None).app()
        async with TestClient(TestServer(app)) as http:
            return await coro_fn(http, fake)

    return asyncio.run(main())


def _sse_events(text):
    return [ln[len("data: "):] for ln in text.split("\n") if ln.startswith("data: ")]


def test_completions_non_streaming_usage_and_finish_reason():
    async def go(http, fake):
        r = await http.post("/v1/completions", json={"model": "paged_llm", "prompt": "a b c d",
                                                     "max_tokens": 3, "echo": True})
        return r.status, await r.json()

    status, body = _run(go)
    assert status == 200 and body["object"] == "text_completion"
    assert body["choices"][0]["text"] == "a b c d a b c"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}


def test_completions_streaming_sse_with_usage_and_done():
    async def go(http, fake):
        r = await http.post("/v1/completions", json={"prompt": "x y", "stream": True,
                                                     "stream_options": {"include_usage": True}})
        assert r.headers["Content-Type"].startswith("text/event-stream")
        return _sse_events(await r.text())

    events = _run(go)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    texts = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert texts == " x y"
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 2


def test_chat_streaming_role_first_then_content(tmp_path, tiny_model_dir):
    from paged_triton.client import openai_server

    async def go(http, fake):
        r = await http.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hello there"}], "stream": True, "max_tokens": 2})
        return fake, _sse_events(await r.text())

    original = openai_server.find_tokenizer_dir

    async def fake_find(client):
        return tiny_model_dir

    openai_server.find_tokenizer_dir = fake_find
    try:
        fake, events = _run(go)
    finally:
        openai_server.find_tokenizer_dir = original
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    prompt = fake.calls[0][0]
    assert "hello there" in prompt and prompt != "hello there"  # the chat template was applied


def test_errors_have_openai_shape_and_status():
    async def go(http, fake):
        out = []
        for path, body in (("/v1/completions", {"prompt": "reject me"}),
                           ("/v1/completions", {"prompt": "reject me", "stream": True}),
                           ("/v1/completions", {"model": "other", "prompt": "x"}),
                           ("/v1/completions", "not json"),
                           ("/v1/nothing", {})):
            data = body if isinstance(body, str) else json.dumps(body)
            r = await http.post(path, data=data, headers={"Content-Type": "application/json"})
            out.append((r.status, await r.json()))
        r = await http.get("/v1/models")
        out.append((r.status, await r.json()))
        r = await http.get("/health")
        out.append((r.status, None))
        return out

    (s1, b1), (s2, b2), (s3, b3), (s4, b4), (s5, b5), (s6, b6), (s7, _) = _run(go)
    assert s1 == 400 and b1["error"]["message"] == "max_tokens must be >= 1, got -3"
    assert s2 == 400 and b2["error"]["type"] == "invalid_request_error"  # before the stream starts
    assert s3 == 404 and b3["error"]["code"] == "model_not_found"
    assert s4 == 400 and "JSON" in b4["error"]["message"]
    assert s5 == 404 and "error" in b5
    assert s6 == 200 and b6["data"][0]["id"] == "paged_llm"
    assert s7 == 200


def test_usage_counts_each_prompt_once_per_n():
    async def go(http, fake):
        r = await http.post("/v1/completions", json={"prompt": ["a b", "a b"], "n": 2,
                                                     "max_tokens": 1})
        return await r.json()

    body = _run(go)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    # two prompts of 2 tokens, each shared by its 2 choices; 4 choices of 1 token
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 4, "total_tokens": 8}
