"""The OpenAI door's planning without a server: structured outputs mapping, tool calls (schemas
checked with jsonschema, Hermes parsing, streamed calls), logprobs shapes, API key and CORS."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import pytest

from paged_triton.client import tool_calls
from paged_triton.client.openai_errors import OpenAIError
from paged_triton.client.openai_protocol import (
    chat_logprobs,
    completion_logprobs,
    plan_chat,
    plan_completion,
)
from paged_triton.client.openai_server import OpenAIServer
from fake_triton_client import Chunk, FakeClientBase, FakeStream

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "days": {"type": "integer", "minimum": 1}},
                   "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time"}}
USER = [{"role": "user", "content": "hi"}]


def _render(messages, tools=None):
    return "PROMPT" + (" +tools" if tools is not None else "")


def _chat(**body):
    return plan_chat({"messages": USER, **body}, _render)


@pytest.mark.parametrize("body,expected", [
    ({"response_format": {"type": "json_object"}}, {"json_object": True}),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object"}}}}, {"json": {"type": "object"}}),
    ({"structured_outputs": {"choice": ["a", "b"]}}, {"choice": ["a", "b"]}),
    ({"guided_regex": "[0-9]+"}, {"regex": "[0-9]+"}),
    ({"guided_json": '{"type": "integer"}'}, {"json": {"type": "integer"}}),
    ({"guided_json_object": True}, {"json_object": True}),
    ({"structured_outputs": {"regex": "a+", "disable_any_whitespace": True}},
     {"regex": "a+", "disable_any_whitespace": True}),
    ({"response_format": {"type": "text"}}, None),
])
def test_structured_outputs_mapping(body, expected):
    sampling = _chat(**body).sampling[0]
    assert sampling.get("structured_outputs") == expected
    completion = plan_completion({"prompt": "x", **body}).sampling[0]
    assert completion.get("structured_outputs") == expected


@pytest.mark.parametrize("body,param", [
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": "json"}, "response_format"),
    ({"structured_outputs": {"json": {}, "regex": "a"}}, "structured_outputs"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
     "response_format"),
    ({"tools": "x"}, "tools"), ({"tools": [{"type": "function", "function": {}}]}, "tools"),
    ({"tools": [WEATHER, WEATHER]}, "tools"), ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "always"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"tools": [WEATHER], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"logprobs": 3}, "logprobs"), ({"echo": True}, "echo"),
])
def test_chat_refusals_name_the_field(body, param):
    with pytest.raises(OpenAIError) as e:
        _chat(**body)
    assert e.value.status == 400 and e.value.param == param


def test_required_tool_schema_accepts_exactly_the_calls():
    plan = _chat(tools=[WEATHER, TIME], tool_choice="required")
    assert plan.prompts == ["PROMPT +tools"]
    schema = plan.sampling[0]["structured_outputs"]["json"]
    jsonschema.Draft202012Validator.check_schema(schema)
    good = [{"name": "get_weather", "parameters": {"city": "Paris", "days": 2}},
            {"name": "get_time", "parameters": {}}]
    jsonschema.validate(good, schema)
    for bad in ([], [{"name": "get_weather", "parameters": {"days": 2}}],
                [{"name": "get_weather", "parameters": {"city": "P", "days": 0}}],
                [{"name": "other", "parameters": {}}], {"name": "get_time", "parameters": {}}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    single = _chat(tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(good, single.sampling[0]["structured_outputs"]["json"])
    parsed = tool_calls.parse_forced(json.dumps(good), plan.tools)
    assert [c["function"]["name"] for c in parsed.tool_calls] == ["get_weather", "get_time"]
    assert json.loads(parsed.tool_calls[0]["function"]["arguments"]) == {"city": "Paris", "days": 2}


def test_named_tool_forces_its_parameters():
    plan = _chat(tools=[WEATHER, TIME],
                 tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert plan.sampling[0]["structured_outputs"] == {"json": WEATHER["function"]["parameters"]}
    parsed = tool_calls.parse_forced('{"city": "Oslo"}', plan.tools)
    assert parsed.content is None and parsed.tool_calls[0]["function"] == {
        "name": "get_weather", "arguments": '{"city": "Oslo"}'}
    assert tool_calls.parse_forced('{"city": "Os', plan.tools).tool_calls == []  # cut short


def test_tool_choice_none_and_auto():
    assert _chat(tools=[WEATHER], tool_choice="none").prompts == ["PROMPT"]
    auto = _chat(tools=[WEATHER])
    assert auto.prompts == ["PROMPT +tools"] and "structured_outputs" not in auto.sampling[0]


def test_hermes_parsing():
    one = tool_calls.parse_hermes('Let me check.\n<tool_call>\n{"name": "get_weather", '
                                  '"arguments": {"city": "Paris"}}\n</tool_call>')
    assert one.content == "Let me check."
    assert one.tool_calls[0]["function"] == {"name": "get_weather",
                                             "arguments": '{"city": "Paris"}'}
    assert one.tool_calls[0]["id"].startswith("call_")
    two = tool_calls.parse_hermes('<tool_call>{"name": "a", "arguments": {}}</tool_call>\n'
                                  '<tool_call>{"name": "b", "arguments": {"x": 1}}')  # unclosed
    assert two.content is None and [c["function"]["name"] for c in two.tool_calls] == ["a", "b"]
    broken = '<tool_call>{"name": "a", "arguments": {</tool_call>'
    assert tool_calls.parse_hermes(broken).content == broken
    assert tool_calls.parse_hermes(broken).tool_calls == []
    assert tool_calls.parse_hermes("no calls").content == "no calls"


def test_stream_splitter_holds_a_call_split_across_deltas():
    plan = _chat(tools=[WEATHER]).tools
    splitter = tool_calls.StreamSplitter(plan)
    text = 'Sure <tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>'
    sent = "".join(splitter.feed(text[i:i + 3]) for i in range(0, len(text), 3))
    assert sent == "Sure "
    done = splitter.finish()
    assert done.content is None and done.tool_calls[0]["function"]["name"] == "get_weather"
    plain = tool_calls.StreamSplitter(plan)
    sent = "".join(plain.feed(d) for d in ["a <", "tool", " b"])
    assert sent + (plain.finish().content or "") == "a <tool b"


def test_history_with_tool_calls_renders_as_text():
    messages = [{"role": "user", "content": "w?"},
                {"role": "assistant", "content": "", "tool_calls": [{
                    "id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    text = tool_calls.history_as_text(messages)
    assert "tool_calls" not in text[1]
    assert tool_calls.parse_hermes(text[1]["content"]).tool_calls[0]["function"]["arguments"] \
        == '{"city": "Rome"}'
    assert text[2]["content"] == "<tool_response>\nsunny\n</tool_response>"


def _entry(*tokens):
    """An engine logprobs entry: the actual token first, (id, text, logprob, rank)."""
    return {str(i): {"logprob": lp, "rank": r, "decoded_token": t} for i, t, lp, r in tokens}


def test_logprobs_shapes():
    entries = [_entry((5, " a", -0.5, 2), (7, " b", -0.2, 1), (5, " a", -0.5, 2)),
               _entry((9, "!", -0.1, 1), (9, "!", -0.1, 1), (3, "?", -3.0, 2))]
    chat = chat_logprobs(entries, 1)
    assert [t["token"] for t in chat["content"]] == [" a", "!"]
    assert chat["content"][0]["top_logprobs"] == [{"token": " b", "logprob": -0.2,
                                                   "bytes": list(b" b")}]
    assert chat["content"][1]["bytes"] == [33]
    prompt = [{"4": {"logprob": None, "rank": None, "decoded_token": None}},
              _entry((6, "X", float("-inf"), 9000), (8, "Y", -0.01, 1))]
    comp = completion_logprobs(prompt + entries, 1, decode=lambda t: f"<{t}>")
    assert comp["tokens"] == ["<4>", "X", " a", "!"]
    assert comp["token_logprobs"] == [None, -9999.0, -0.5, -0.1]  # -inf is sent as vLLM does
    assert comp["top_logprobs"][0] is None and comp["top_logprobs"][2] == {" a": -0.5, " b": -0.2}
    assert comp["text_offset"] == [0, 3, 4, 6]


def test_completion_logprobs_plan():
    plan = plan_completion({"prompt": [1, 2, 3], "logprobs": 2, "echo": True},
                           decode=lambda ids: "abc")
    assert plan.prompts == [[1, 2, 3]] and plan.echo_prompts == ["abc"]
    assert plan.sampling[0]["logprobs"] == 2 and plan.sampling[0]["prompt_logprobs"] == 2
    assert "prompt_logprobs" not in plan_completion({"prompt": "x", "logprobs": 0}).sampling[0]


# -- the app with a fake Triton client ----------------------------------------------------------

class _ScriptedClient(FakeClientBase):
    """Answers every request with the scripted text, a few characters per chunk."""

    def __init__(self, text):
        super().__init__()
        self.text = text

    def chunks_for(self, prompt, **sampling):
        pieces = [self.text[i:i + 4] for i in range(0, len(self.text), 4)]
        chunks = [Chunk(p, num_output_tokens=1) for p in pieces]
        chunks[-1].finish_reason, chunks[0].num_input_tokens = "stop", 3
        return FakeStream(chunks)


def _app_run(text, coro_fn, tiny_model_dir, **server_kwargs):
    from aiohttp.test_utils import TestClient, TestServer

    async def main():
        fake = _ScriptedClient(text)
        app = OpenAIServer(fake, tokenizer=tiny_model_dir, **server_kwargs).app()
        async with TestClient(TestServer(app)) as http:
            return await coro_fn(http, fake)

    return asyncio.run(main())


CALL_TEXT = 'On it.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'


def test_auto_tool_calls_non_streaming_and_streaming(tiny_model_dir):
    body = {"messages": USER, "tools": [WEATHER]}

    async def go(http, fake):
        r = await http.post("/v1/chat/completions", json=body)
        whole = await r.json()
        r = await http.post("/v1/chat/completions", json={**body, "stream": True})
        events = [ln[6:] for ln in (await r.text()).split("\n") if ln.startswith("data: ")]
        return fake, whole, [json.loads(e) for e in events[:-1]]

    fake, whole, chunks = _app_run(CALL_TEXT, go, tiny_model_dir)
    assert "get_weather" in fake.calls[0][0]  # the tools reached the prompt
    choice = whole["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == "On it."
    assert choice["message"]["tool_calls"][0]["function"] == {
        "name": "get_weather", "arguments": '{"city": "Rome"}'}
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert "".join(d.get("content") or "" for d in deltas) == "On it."
    calls = [d["tool_calls"] for d in deltas if "tool_calls" in d]
    assert len(calls) == 1 and calls[0][0]["index"] == 0
    assert calls[0][0]["function"]["name"] == "get_weather"
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_required_tool_call_through_the_app(tiny_model_dir):
    text = json.dumps([{"name": "get_weather", "parameters": {"city": "Rome"}}])

    async def go(http, fake):
        r = await http.post("/v1/chat/completions", json={
            "messages": USER, "tools": [WEATHER], "tool_choice": "required"})
        return fake, await r.json()

    fake, body = _app_run(text, go, tiny_model_dir)
    schema = fake.calls[0][1]["structured_outputs"]["json"]
    jsonschema.validate(json.loads(text), schema)
    call = body["choices"][0]["message"]["tool_calls"][0]
    jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER["function"]["parameters"])
    assert body["choices"][0]["finish_reason"] == "tool_calls"


def test_api_key_and_cors_preflight(tiny_model_dir):
    async def go(http, fake):
        out = {}
        r = await http.get("/v1/models")
        out["none"] = (r.status, await r.json())
        r = await http.get("/v1/models", headers={"Authorization": "Bearer nope"})
        out["wrong"] = r.status
        r = await http.get("/v1/models", headers={"Authorization": "Bearer k",
                                                  "Origin": "http://a.example"})
        out["right"] = (r.status, r.headers.get("Access-Control-Allow-Origin"))
        r = await http.options("/v1/completions", headers={
            "Origin": "http://a.example", "Access-Control-Request-Method": "POST"})
        out["preflight"] = (r.status, r.headers.get("Access-Control-Allow-Origin"))
        r = await http.options("/v1/completions", headers={
            "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
        out["evil"] = r.status
        r = await http.get("/health")
        out["health"] = r.status
        return out

    out = _app_run("x", go, tiny_model_dir, api_key="k", allowed_origins=("http://a.example",))
    assert out["none"][0] == 401 and out["none"][1]["error"]["type"] == "authentication_error"
    assert out["wrong"] == 401
    assert out["right"] == (200, "http://a.example")
    assert out["preflight"] == (204, "http://a.example")
    assert out["evil"] == 403
    assert out["health"] == 200


def test_chat_template_options(tiny_model_dir):
    """vLLM's add_generation_prompt / continue_final_message reach the template as
    transformers' apply_chat_template takes them."""
    from transformers import AutoTokenizer

    from paged_triton.client.chat_template import ChatTemplate

    template = ChatTemplate(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hel"}]
    for body, kwargs in (({}, {"add_generation_prompt": True}),
                         ({"add_generation_prompt": False}, {"add_generation_prompt": False}),
                         ({"continue_final_message": True},
                          {"add_generation_prompt": False, "continue_final_message": True})):
        plan = plan_chat({"messages": messages, **body}, template)
        assert plan.prompts[0] == tok.apply_chat_template(messages, tokenize=False, **kwargs)
    with pytest.raises(OpenAIError) as e:
        plan_chat({"messages": messages, "chat_template_kwargs": []}, template)
    assert e.value.param == "chat_template_kwargs"
