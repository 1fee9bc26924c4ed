"""Tool calling for the OpenAI front door: `tools` and `tool_choice` in, `tool_calls` out.

* `tool_choice: "none"`: the tools are not shown to the model; plain text comes back.
* `"auto"`: the tools are described in the prompt (by the chat template when it renders tools,
  else in a system message in the Hermes format) and the model's `<tool_call>{"name": ...,
  "arguments": {...}}</tool_call>` blocks are parsed into `tool_calls` (finish_reason
  `tool_calls`); a block that is not valid JSON stays in the content, as vLLM's hermes parser
  leaves it.
* `"required"` and a named function: the output is forced by structured outputs: a JSON array
  of `{"name", "parameters"}` objects, one of the tools each (vLLM's schema for `required`), or
  the named function's arguments object. The arguments are then valid against the function's
  parameters schema by construction.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from paged_triton.client.openai_errors import bad_request

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
_EMPTY_PARAMETERS = {"type": "object", "properties": {}}


@dataclass
class ToolPlan:
    """The tools of one chat request and how they may be used."""

    tools: list[dict]          # OpenAI tool specs: {"type": "function", "function": {...}}
    choice: str                # "none" | "auto" | "required" | "named"
    name: str | None = None    # the function, for "named"
    parallel: bool = True      # parallel_tool_calls

    @property
    def forced(self) -> bool:
        return self.choice in ("required", "named")

    @property
    def shown(self) -> bool:
        """Whether the model sees the tools in its prompt."""
        return self.choice != "none" and bool(self.tools)

    def function(self, name: str) -> dict | None:
        for tool in self.tools:
            if tool["function"]["name"] == name:
                return tool["function"]
        return None


def _check_tools(tools: Any) -> list[dict]:
    if not isinstance(tools, list):
        raise bad_request("'tools' must be a list of tools", param="tools")
    out, names = [], set()
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise bad_request(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}",
                              param="tools")
        fn = tool.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise bad_request(f"tools[{i}].function needs a 'name'", param="tools")
        params = fn.get("parameters", _EMPTY_PARAMETERS)
        if params is None:
            params = _EMPTY_PARAMETERS
        if not isinstance(params, dict):
            raise bad_request(f"tools[{i}].function.parameters must be a JSON schema object",
                              param="tools")
        if fn["name"] in names:
            raise bad_request(f"tools[{i}]: the function name {fn['name']!r} is given twice",
                              param="tools")
        names.add(fn["name"])
        out.append({"type": "function", "function": {**fn, "parameters": params}})
    return out


def plan_tools(body: dict) -> ToolPlan | None:
    """The request's ToolPlan (None without tools); a bad spec raises naming the field."""
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if tools is None or tools == []:
        if choice not in (None, "none"):
            raise bad_request("'tool_choice' needs 'tools'", param="tool_choice")
        return None
    tools = _check_tools(tools)
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool) and parallel is not None:
        raise bad_request("'parallel_tool_calls' must be a boolean", param="parallel_tool_calls")
    plan = ToolPlan(tools, "auto", parallel=parallel is not False)
    if choice is None or choice == "auto":
        return plan
    if choice in ("none", "required"):
        plan.choice = choice
        return plan
    if isinstance(choice, dict) and choice.get("type", "function") == "function":
        name = (choice.get("function") or {}).get("name")
        if not isinstance(name, str):
            raise bad_request("'tool_choice' must name a function: {'type': 'function', "
                              "'function': {'name': ...}}", param="tool_choice")
        if plan.function(name) is None:
            raise bad_request(f"'tool_choice' names the function {name!r}, which is not in "
                              "'tools'", param="tool_choice")
        plan.choice, plan.name = "named", name
        return plan
    raise bad_request("'tool_choice' must be 'none', 'auto', 'required' or a named function",
                      param="tool_choice")


def forced_schema(plan: ToolPlan) -> dict:
    """The JSON schema the output must follow for `required` / a named function."""
    if plan.choice == "named":
        return plan.function(plan.name)["parameters"]
    calls = [{"type": "object",
              "properties": {"name": {"type": "string", "enum": [t["function"]["name"]]},
                             "parameters": t["function"]["parameters"]},
              "required": ["name", "parameters"]} for t in plan.tools]
    schema: dict[str, Any] = {"type": "array", "minItems": 1,
                              "items": calls[0] if len(calls) == 1 else {"anyOf": calls}}
    if not plan.parallel:
        schema["maxItems"] = 1
    return schema


def system_prompt(plan: ToolPlan) -> str:
    """The tools in the Hermes format, for chat templates that do not render tools."""
    specs = "\n".join(json.dumps(t, ensure_ascii=False) for t in plan.tools)
    return ("You can call functions to answer the user. Their signatures, as JSON schemas, "
            f"are inside <tools></tools>:\n<tools>\n{specs}\n</tools>\n"
            "To call a function, answer with one JSON object per call, holding the function's "
            "name and its arguments, each inside <tool_call></tool_call> tags:\n"
            '<tool_call>\n{"name": <function name>, "arguments": <arguments object>}\n'
            "</tool_call>")


def history_as_text(messages: list[dict]) -> list[dict]:
    """Earlier tool calls and tool results as Hermes text, for templates without tool support."""
    out = []
    for m in messages:
        m = dict(m)
        calls = m.pop("tool_calls", None)
        if m["role"] == "assistant" and calls:
            blocks = []
            for call in calls:
                fn = call.get("function") or {}
                args = fn.get("arguments", "{}")
                try:
                    args = json.loads(args) if isinstance(args, str) else args
                except ValueError:
                    pass
                blocks.append(TOOL_CALL_START + "\n" + json.dumps(
                    {"name": fn.get("name"), "arguments": args}, ensure_ascii=False)
                    + "\n" + TOOL_CALL_END)
            m["content"] = "\n".join(([m["content"]] if m.get("content") else []) + blocks)
        elif m["role"] == "tool":
            m.pop("tool_call_id", None)
            m["content"] = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
        out.append(m)
    return out


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def _call(name: str, arguments: Any) -> dict:
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return {"id": new_call_id(), "type": "function",
            "function": {"name": name, "arguments": arguments}}


@dataclass
class ParsedOutput:
    content: str | None
    tool_calls: list[dict] = field(default_factory=list)


def parse_hermes(text: str) -> ParsedOutput:
    """`<tool_call>` JSON blocks -> tool calls; the text before the first block is the content.
    When any block fails to parse, the whole text stays content (no partial calls)."""
    start = text.find(TOOL_CALL_START)
    if start < 0:
        return ParsedOutput(text)
    calls = []
    for block in _BLOCK.findall(text[start:]):
        try:
            obj = json.loads(block)
        except ValueError:
            return ParsedOutput(text)
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return ParsedOutput(text)
        calls.append(_call(obj["name"], obj.get("arguments", obj.get("parameters", {}))))
    if not calls:
        return ParsedOutput(text)
    content = text[:start].strip()
    return ParsedOutput(content or None, calls)


def parse_forced(text: str, plan: ToolPlan) -> ParsedOutput:
    """The output of a `required` / named request as tool calls (content if it is not the JSON
    asked for, e.g. cut short by max_tokens)."""
    try:
        obj = json.loads(text)
    except ValueError:
        return ParsedOutput(text)
    if plan.choice == "named":
        return ParsedOutput(None, [_call(plan.name, text.strip())])
    if not isinstance(obj, list) or not all(
            isinstance(c, dict) and isinstance(c.get("name"), str) for c in obj):
        return ParsedOutput(text)
    return ParsedOutput(None, [_call(c["name"], c.get("parameters", c.get("arguments", {})))
                               for c in obj])


class StreamSplitter:
    """Streams content until a tool call may begin, then holds the rest for the final parse.

    `feed(delta)` returns the text that can be sent as content now: everything before a
    `<tool_call>` (or before a tail that may still become one). `finish()` parses what was held.
    """

    def __init__(self, plan: ToolPlan):
        self._plan = plan
        self._text: list[str] = []
        self._sent = 0  # characters of the text sent as content
        self._held = plan.forced  # forced outputs are JSON, never content

    def feed(self, delta: str) -> str:
        self._text.append(delta)
        if self._held:
            return ""
        text = "".join(self._text)
        start = text.find(TOOL_CALL_START, self._sent)
        if start >= 0:
            self._held = True
            out, self._sent = text[self._sent:start], start
            return out
        safe = len(text)
        for k in range(min(len(TOOL_CALL_START) - 1, len(text)), 0, -1):
            if TOOL_CALL_START.startswith(text[-k:]):
                safe = len(text) - k
                break
        out, self._sent = text[self._sent:safe], max(self._sent, safe)
        return out

    def finish(self) -> ParsedOutput:
        """The calls, and the content not yet sent."""
        text = "".join(self._text)
        parsed = parse_forced(text, self._plan) if self._plan.forced else parse_hermes(text)
        if parsed.tool_calls:
            rest = text[self._sent:text.find(TOOL_CALL_START)] if not self._plan.forced else ""
            return ParsedOutput(rest.strip() or None, parsed.tool_calls)
        return ParsedOutput(text[self._sent:] or None)
