"""Structured outputs and forced tool calls through the OpenAI door, end to end: the official
`openai` client, a real tritonserver, SmolLM2. Outputs are checked with `jsonschema` (an
independent validator), tool-call arguments against the function's parameters schema."""

from __future__ import annotations

import json
import re

import pytest

pytestmark = pytest.mark.server

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

MODEL = "paged_llm"
PERSON = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 24},
                         "age": {"type": "integer", "minimum": 0, "maximum": 150}},
          "required": ["name", "age"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object",
                   "properties": {"city": {"type": "string", "maxLength": 20},
                                  "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a time zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 20}},
                   "required": ["zone"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def oai(smollm2_server):
    from paged_triton.client.openai_server import ServerThread

    with ServerThread(triton_url=smollm2_server.grpc_url) as d:
        yield openai.OpenAI(base_url=d.base_url, api_key="unused", max_retries=0, timeout=300)


def test_json_schema_response_validates(oai):
    r = oai.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=80,
        messages=[{"role": "user", "content": "Describe a person as JSON with name and age."}],
        response_format={"type": "json_schema",
                         "json_schema": {"name": "person", "schema": PERSON, "strict": True}})
    choice = r.choices[0]
    jsonschema.validate(json.loads(choice.message.content), PERSON)
    assert choice.finish_reason == "stop"


def test_json_object_and_choice(oai):
    r = oai.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=200, response_format={"type": "json_object"},
        messages=[{"role": "user", "content": 'Give me a JSON object with a "color" key.'}])
    assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    choices = ["yes", "no", "maybe"]
    r = oai.completions.create(model=MODEL, prompt="Is the sky blue? Answer:", max_tokens=5,
                               temperature=1.0, seed=3, extra_body={
                                   "structured_outputs": {"choice": choices}})
    assert r.choices[0].text in choices


def test_required_tool_call_is_schema_valid(oai):
    r = oai.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME],
                                    tool_choice="required", temperature=0, max_tokens=120)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    by_name = {"get_weather": WEATHER, "get_time": TIME}
    for call in choice.message.tool_calls:
        assert call.type == "function" and call.id
        jsonschema.validate(json.loads(call.function.arguments),
                            by_name[call.function.name]["function"]["parameters"])


def test_named_tool_call_streamed_is_schema_valid(oai):
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = oai.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME],
                                    tool_choice=named, temperature=0, max_tokens=80)
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    chunks = list(oai.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME],
                                              tool_choice=named, temperature=0, max_tokens=80,
                                              stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    streamed = [tc for d in deltas for tc in (d.tool_calls or [])]
    assert len(streamed) == 1 and streamed[0].function.name == "get_weather"
    assert json.loads(streamed[0].function.arguments) == json.loads(call.function.arguments)
    assert not "".join(d.content or "" for d in deltas)


def test_auto_parses_a_hermes_call_the_model_writes(oai):
    """`auto` end to end: the model's output is held to a Hermes block (a regex, vLLM's
    structured_outputs extra key), which the door must parse into tool_calls."""
    pattern = (r'<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "[A-Z][a-z]{1,10}", '
               r'"unit": "(celsius|fahrenheit)"\}\}\n</tool_call>')
    r = oai.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], temperature=0,
                                    max_tokens=80, extra_body={"structured_outputs": {
                                        "regex": pattern}})
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and choice.message.content is None
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, WEATHER["function"]["parameters"])
    assert re.fullmatch(r"[A-Z][a-z]{1,10}", args["city"])


def test_bad_schema_is_a_400_naming_response_format(oai):
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(
            model=MODEL, messages=ASK, max_tokens=5,
            response_format={"type": "json_schema",
                             "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}})
    assert e.value.body["param"] == "response_format"
