"""OpenAI requests planned as engine requests, and engine results shaped as OpenAI answers.

Transport-free (no aiohttp, no Triton): `plan_completion` / `plan_chat` validate a request body
and return a `GenerationPlan` (one engine request per choice, with the sampling keywords the
paged_llm model takes); `completion_logprobs` / `chat_logprobs` turn the engine's per-token
logprobs (`{token_id: {logprob, rank, decoded_token}}`, the sampled token first) into OpenAI's
two logprobs shapes; `usage` counts tokens. Every refusal is an `OpenAIError` naming the field.

Structured outputs travel as the engine's `structured_outputs` sampling key (vLLM's names:
`{"json": schema} | {"json_object": true} | {"regex": ..} | {"choice": [..]} | {"grammar": ..}`):
`response_format` maps onto it, vLLM's own `structured_outputs` (and older `guided_*`) extra
keys pass through, and tool_choice `required` / a named function sets it to the calls' schema.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable

from paged_triton.client import tool_calls
from paged_triton.client.openai_errors import bad_request, unsupported
from paged_triton.client.tool_calls import ToolPlan

# OpenAI / vLLM request fields passed to the engine unchanged (vLLM's extra sampling fields
# included, which the openai client sends through `extra_body`).
_PASSTHROUGH = ("temperature", "top_p", "presence_penalty", "frequency_penalty", "seed", "top_k",
                "min_p", "repetition_penalty", "min_tokens", "ignore_eos", "stop_token_ids",
                "include_stop_str_in_output", "skip_special_tokens", "bad_words")
# Fields handled by the planning below, or accepted and ignored (they do not change generation).
_HANDLED = ("model", "user", "stream", "stream_options", "n", "echo", "suffix", "prompt",
            "messages", "max_tokens", "max_completion_tokens", "stop", "logprobs", "top_logprobs",
            "best_of", "logit_bias", "response_format", "tools", "tool_choice",
            "parallel_tool_calls", "service_tier", "store", "metadata", "add_generation_prompt",
            "chat_template_kwargs", "structured_outputs", "guided_json", "guided_regex",
            "guided_choice", "guided_grammar", "guided_json_object", "prompt_logprobs",
            "continue_final_message")
# Most top logprobs per token (OpenAI's chat limit, vLLM's default max_logprobs).
MAX_LOGPROBS = 20
# What a -inf logprob is sent as (JSON has no infinity; vLLM sends the same).
_NEG_INF_LOGPROB = -9999.0
_STRUCTURED_KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclass
class GenerationPlan:
    """What one OpenAI request asks for: one engine request per choice.

    Choice i comes from prompt i // n (n = choices_per_prompt).
    """

    prompts: list[str | list[int]]   # per choice: text, or token ids
    sampling: list[dict[str, Any]]   # per choice
    stream: bool
    include_usage: bool = False
    echo_prompts: list[str] = field(default_factory=list)  # per choice, "" when not echoing
    choices_per_prompt: int = 1      # n
    logprobs: int | None = None      # top-N logprobs per token (None: no logprobs)
    echo: bool = False
    tools: ToolPlan | None = None


def _check_type(body: dict, key: str, types: tuple, what: str) -> None:
    value = body.get(key)
    if value is not None and (not isinstance(value, types) or isinstance(value, bool)):
        raise bad_request(f"'{key}' must be {what}", param=key)


def _structured_outputs(body: dict) -> dict | None:
    """The engine's structured_outputs from response_format / structured_outputs / guided_*."""
    found: list[tuple[str, dict]] = []
    rf = body.get("response_format")
    if rf is not None:
        if not isinstance(rf, dict) or not isinstance(rf.get("type"), str):
            raise bad_request("'response_format' must be an object with a 'type'",
                              param="response_format")
        kind = rf["type"]
        if kind == "json_object":
            found.append(("response_format", {"json_object": True}))
        elif kind == "json_schema":
            spec = rf.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if not isinstance(schema, dict):
                raise bad_request("'response_format' of type json_schema needs "
                                  "'json_schema': {'name': ..., 'schema': {...}}",
                                  param="response_format")
            found.append(("response_format", {"json": schema}))
        elif kind != "text":
            raise bad_request(f"'response_format' type {kind!r} is not one of 'text', "
                              "'json_object', 'json_schema'", param="response_format")
    so = body.get("structured_outputs")
    if so is not None:
        # Exactly one kind; other keys (disable_any_whitespace, ...) the engine checks.
        if (not isinstance(so, dict)
                or sum(so.get(k) not in (None, False) for k in _STRUCTURED_KINDS) != 1):
            raise bad_request("'structured_outputs' must hold exactly one of "
                              f"{', '.join(_STRUCTURED_KINDS)}", param="structured_outputs")
        found.append(("structured_outputs", dict(so)))
    for key in ("guided_json", "guided_regex", "guided_choice", "guided_grammar",
                "guided_json_object"):
        if body.get(key) not in (None, False):
            value = body[key]
            if key == "guided_json" and isinstance(value, str):
                try:
                    value = json.loads(value)
                except ValueError:
                    raise bad_request("'guided_json' is not valid JSON", param=key) from None
            found.append((key, {key[len("guided_"):]: value}))
    if len(found) > 1:
        raise bad_request(f"give one of {', '.join(k for k, _ in found)}, not several",
                          param=found[1][0])
    return found[0][1] if found else None


def _sampling_from_body(body: dict, chat: bool) -> tuple[dict[str, Any], int | None]:
    """(engine sampling keywords, top-N logprobs or None)."""
    for key in body:
        if key not in _PASSTHROUGH and key not in _HANDLED:
            raise unsupported(key, f"unsupported parameter '{key}'")
    for key in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "min_p",
                "repetition_penalty"):
        _check_type(body, key, (int, float), "a number")
    for key in ("seed", "top_k", "min_tokens"):
        _check_type(body, key, (int,), "an integer")
    if body.get("best_of") not in (None, 1) and body.get("best_of") != body.get("n", 1):
        raise unsupported("best_of", "'best_of' other than n is not supported")
    if body.get("suffix"):
        raise unsupported("suffix", "'suffix' (insertion) is not supported by this server")
    sampling = {k: body[k] for k in _PASSTHROUGH if body.get(k) is not None}
    if body.get("logit_bias"):
        if not isinstance(body["logit_bias"], dict):
            raise bad_request("'logit_bias' must map token ids to numbers", param="logit_bias")
        sampling["logit_bias"] = body["logit_bias"]
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(key)
    if max_tokens is not None:
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise bad_request(f"'{key}' must be a positive integer", param=key)
        sampling["max_tokens"] = max_tokens
    elif chat:
        sampling["max_tokens"] = "null"  # chat answers run to the end, as OpenAI's and vLLM's
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise bad_request("'stop' must be a string or a list of strings", param="stop")
        if stop:
            sampling["stop"] = stop
    structured = _structured_outputs(body)
    if structured is not None:
        sampling["structured_outputs"] = structured
    return sampling, _logprobs_request(body, chat)


def _logprobs_request(body: dict, chat: bool) -> int | None:
    logprobs, top = body.get("logprobs"), body.get("top_logprobs")
    if chat:
        if logprobs is not None and not isinstance(logprobs, bool):
            raise bad_request("'logprobs' must be a boolean in chat completions", param="logprobs")
        if top is not None:
            if not isinstance(top, int) or isinstance(top, bool) or not 0 <= top <= MAX_LOGPROBS:
                raise bad_request(f"'top_logprobs' must be an integer in [0, {MAX_LOGPROBS}]",
                                  param="top_logprobs")
            if not logprobs:
                raise bad_request("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        return (top or 0) if logprobs else None
    if top is not None:
        raise unsupported("top_logprobs", "'top_logprobs' is a chat field; completions take "
                                          "'logprobs': N")
    if logprobs is None:
        return None
    if not isinstance(logprobs, int) or isinstance(logprobs, bool) or not 0 <= logprobs <= MAX_LOGPROBS:
        raise bad_request(f"'logprobs' must be an integer in [0, {MAX_LOGPROBS}]", param="logprobs")
    return logprobs


def _choices(body: dict) -> int:
    n = body.get("n", 1)
    if n is None:
        n = 1
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 128:
        raise bad_request("'n' must be an integer between 1 and 128", param="n")
    return n


def _per_choice_sampling(sampling: dict, n: int, num_prompts: int) -> list[dict]:
    """n samples of one prompt must differ: a seeded request gets seed + choice index."""
    out = []
    for _ in range(num_prompts):
        for j in range(n):
            s = dict(sampling)
            if "seed" in s and j:
                s["seed"] = s["seed"] + j
            out.append(s)
    return out


def _stream_options(body: dict) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise bad_request("'stream_options' must be an object", param="stream_options")
    if not body.get("stream"):
        raise bad_request("'stream_options' needs 'stream': true", param="stream_options")
    return bool(options.get("include_usage"))


def _is_token_ids(p: Any) -> bool:
    return isinstance(p, list) and bool(p) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in p)


def _prompts(prompt: Any) -> list[str | list[int]]:
    """A completions prompt: a string, a list of strings, token ids, or a list of those."""
    if isinstance(prompt, str):
        prompts: list = [prompt]
    elif _is_token_ids(prompt):
        prompts = [list(prompt)]
    elif isinstance(prompt, list) and prompt and all(
            isinstance(p, str) or _is_token_ids(p) for p in prompt):
        prompts = list(prompt)
    else:
        raise bad_request("'prompt' must be a non-empty string, a list of strings, a list of "
                          "token ids, or a list of token-id lists", param="prompt")
    for p in prompts:
        if not p:
            raise bad_request("'prompt' must not be empty", param="prompt")
        if isinstance(p, list) and any(t < 0 for t in p):
            raise bad_request("token ids in 'prompt' must be non-negative", param="prompt")
    return prompts


def plan_completion(body: Any, decode: Callable[[list[int]], str] | None = None) -> GenerationPlan:
    """Validate a /v1/completions body and plan its generations.

    Args:
        body: the request JSON.
        decode: token ids -> text, needed to echo a token-id prompt.
    """
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    prompts = _prompts(body.get("prompt"))
    n = _choices(body)
    sampling, logprobs = _sampling_from_body(body, chat=False)
    echo = body.get("echo") or False
    if not isinstance(echo, bool):
        raise bad_request("'echo' must be a boolean", param="echo")
    if logprobs is not None:
        sampling["logprobs"] = logprobs
        if echo:
            sampling["prompt_logprobs"] = logprobs
    echo_texts = []
    for p in prompts:
        if not echo:
            echo_texts.append("")
        elif isinstance(p, str):
            echo_texts.append(p)
        elif decode is None:
            raise bad_request("echo of a token-id prompt needs the tokenizer", param="echo")
        else:
            echo_texts.append(decode(p))
    return GenerationPlan(
        prompts=[p for p in prompts for _ in range(n)],
        sampling=_per_choice_sampling(sampling, n, len(prompts)),
        stream=bool(body.get("stream")),
        include_usage=_stream_options(body),
        echo_prompts=[t for t in echo_texts for _ in range(n)],
        choices_per_prompt=n,
        logprobs=logprobs,
        echo=echo,
    )


def _message_text(content: Any) -> str:
    """A message's content as text (string, or a list of text parts)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text":
                parts.append(str(part.get("text", "")))
            else:
                raise bad_request("only text content parts are supported", param="messages")
        return "".join(parts)
    raise bad_request("message content must be a string or a list of parts", param="messages")


def chat_messages(body: dict) -> list[dict]:
    """The request's messages, checked, as the chat template takes them."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list", param="messages")
    clean = []
    for m in messages:
        if not isinstance(m, dict) or "role" not in m:
            raise bad_request("each message needs a 'role'", param="messages")
        if m["role"] not in ("system", "user", "assistant", "developer", "tool"):
            raise bad_request(f"unknown message role {m['role']!r}", param="messages")
        role = "system" if m["role"] == "developer" else m["role"]
        message: dict[str, Any] = {"role": role, "content": _message_text(m.get("content"))}
        if role == "assistant" and m.get("tool_calls"):
            if not isinstance(m["tool_calls"], list):
                raise bad_request("'tool_calls' of a message must be a list", param="messages")
            message["tool_calls"] = m["tool_calls"]
        if role == "tool" and m.get("tool_call_id") is not None:
            message["tool_call_id"] = m["tool_call_id"]
        clean.append(message)
    return clean


def _template_options(body: dict) -> dict[str, Any]:
    """vLLM's chat-template extras: add_generation_prompt, continue_final_message,
    chat_template_kwargs (only those given)."""
    options: dict[str, Any] = {}
    for key in ("add_generation_prompt", "continue_final_message"):
        if body.get(key) is not None:
            if not isinstance(body[key], bool):
                raise bad_request(f"'{key}' must be a boolean", param=key)
            options[key] = body[key]
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None:
        if not isinstance(kwargs, dict):
            raise bad_request("'chat_template_kwargs' must be an object",
                              param="chat_template_kwargs")
        options["chat_template_kwargs"] = kwargs
    return options


def plan_chat(body: Any, render: Callable[..., str]) -> GenerationPlan:
    """Validate a /v1/chat/completions body.

    Args:
        body: the request JSON.
        render: `render(messages, tools=None, **template_options) -> prompt` applies the chat
            template (tools: the ToolPlan when the model is to see the tools; options only
            when the request gives add_generation_prompt, continue_final_message or
            chat_template_kwargs).
    """
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    messages = chat_messages(body)
    if body.get("echo"):
        raise unsupported("echo", "'echo' is a completions field")
    tools = tool_calls.plan_tools(body)
    n = _choices(body)
    sampling, logprobs = _sampling_from_body(body, chat=True)
    if tools is not None and tools.forced:
        if "structured_outputs" in sampling:
            raise bad_request("a forced tool call ('tool_choice' required or a named function) "
                              "cannot take a 'response_format' too", param="response_format")
        sampling["structured_outputs"] = {"json": tool_calls.forced_schema(tools)}
    if logprobs is not None:
        sampling["logprobs"] = logprobs
    prompt = render(messages, tools if tools is not None and tools.shown else None,
                    **_template_options(body))
    return GenerationPlan(prompts=[prompt] * n, sampling=_per_choice_sampling(sampling, n, 1),
                          stream=bool(body.get("stream")), include_usage=_stream_options(body),
                          echo_prompts=[""] * n, choices_per_prompt=n, logprobs=logprobs,
                          tools=tools)


# -- logprobs ---------------------------------------------------------------------------------

def _value(lp: Any) -> float:
    v = float(lp)
    return _NEG_INF_LOGPROB if math.isinf(v) and v < 0 else v


def _position(entry: dict) -> tuple[str, float, list[tuple[str, float, int]]]:
    """(token text, logprob, [(text, logprob, rank)...] by rank) of one position's entry."""
    items = list(entry.values())
    chosen = items[0]  # the engine puts the actual token first
    ranked = sorted(items, key=lambda e: (e.get("rank") or 0))
    return (chosen.get("decoded_token") or "", _value(chosen["logprob"]),
            [(e.get("decoded_token") or "", _value(e["logprob"]), e.get("rank") or 0)
             for e in ranked])


def _token_bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def chat_logprobs(entries: list[dict] | None, num_top: int) -> dict | None:
    """Chat's `logprobs`: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    if entries is None:
        return None
    content = []
    for entry in entries:
        if not entry:
            continue
        token, logprob, ranked = _position(entry)
        content.append({
            "token": token, "logprob": logprob, "bytes": _token_bytes(token),
            "top_logprobs": [{"token": t, "logprob": lp, "bytes": _token_bytes(t)}
                             for t, lp, _ in ranked[:num_top]],
        })
    return {"content": content, "refusal": None}


def completion_logprobs(entries: list[dict], num_top: int, text_offset: int = 0,
                        decode: Callable[[int], str] | None = None) -> dict:
    """Completions' `logprobs`: parallel lists tokens / token_logprobs / top_logprobs /
    text_offset (from `text_offset`). An entry whose logprob is null (a prompt's first token,
    with echo) gives None logprobs; its text comes from `decode(token_id)`."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                            "text_offset": []}
    offset = text_offset
    for entry in entries:
        if not entry:
            continue
        token_id, first = next(iter(entry.items()))
        if first.get("logprob") is None:
            token = first.get("decoded_token")
            if token is None:
                token = decode(int(token_id)) if decode is not None else ""
            out["tokens"].append(token)
            out["text_offset"].append(offset)
            offset += len(token)
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        token, logprob, ranked = _position(entry)
        out["tokens"].append(token)
        out["text_offset"].append(offset)
        offset += len(token)
        out["token_logprobs"].append(logprob)
        top: dict[str, float] = {}
        for t, lp, rank in ranked:
            if rank <= num_top or t == token:
                top.setdefault(t, lp)
        out["top_logprobs"].append(top)
    return out


def usage(completions, choices_per_prompt: int) -> dict[str, int]:
    """Prompt tokens count once per prompt: its n choices share it (as OpenAI counts)."""
    prompt_tokens = sum(c.num_input_tokens or 0 for i, c in enumerate(completions)
                        if i % choices_per_prompt == 0)
    completion_tokens = sum(c.num_output_tokens or 0 for c in completions)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
