"""OpenAI-compatible front door: `paged-client openai` (or `python -m client.openai_server`).

Serves `/v1/completions`, `/v1/chat/completions` (streaming as Server-Sent Events ending with
`data: [DONE]`, and not), `/v1/models` and `/health` by calling the Triton model through
`AsyncClient`. `finish_reason` and `usage` are the engine's own (the paged_llm model reports
them); errors use OpenAI's `{"error": {"message", "type", "param", "code"}}` shape with the
matching HTTP status. Chat prompts are rendered with the model's chat template: the tokenizer
directory comes from `--tokenizer`, else from the `tokenizer_dir` parameter the server's model
configs carry (the served model's, then `preprocessing`'s).

Built on aiohttp, which tritonclient[http] already depends on. A client that disconnects
mid-stream cancels its Triton requests (the handler is cancelled, which cancels the gRPC call).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from client.errors import (
    Cancelled,
    ClientError,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    Unavailable,
)

logger = logging.getLogger("paged_client.openai")

# OpenAI request fields passed to the engine unchanged (vLLM's extra sampling fields included,
# which the openai client sends through `extra_body`).
_PASSTHROUGH = ("temperature", "top_p", "presence_penalty", "frequency_penalty", "seed", "top_k",
                "min_p", "repetition_penalty", "min_tokens", "ignore_eos", "stop_token_ids",
                "include_stop_str_in_output", "skip_special_tokens", "bad_words")
# Fields we accept and ignore (they do not change generation).
_IGNORED = ("model", "user", "stream", "stream_options", "n", "echo", "suffix", "prompt",
            "messages", "max_tokens", "max_completion_tokens", "stop", "logprobs", "top_logprobs",
            "best_of", "logit_bias", "response_format", "tools", "tool_choice",
            "parallel_tool_calls", "service_tier", "store", "metadata", "add_generation_prompt",
            "chat_template_kwargs")


class OpenAIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def error_from_client(e: ClientError) -> OpenAIError:
    """Map a Triton client error to the OpenAI status and type."""
    if isinstance(e, NotFound):
        return OpenAIError(404, e.message, type_="not_found_error", code="model_not_found")
    if isinstance(e, InvalidArgument):
        return OpenAIError(400, e.message, type_="invalid_request_error")
    if isinstance(e, Unavailable):
        return OpenAIError(503, e.message, type_="service_unavailable", code="unavailable")
    if isinstance(e, DeadlineExceeded):
        return OpenAIError(504, e.message, type_="timeout", code="timeout")
    if isinstance(e, Cancelled):
        return OpenAIError(499, e.message, type_="cancelled", code="cancelled")
    return OpenAIError(500, e.message, type_="server_error", code="internal_error")


@dataclass
class GenerationPlan:
    """What one OpenAI request asks for: prompts (one per choice) and sampling."""

    prompts: list[str]            # one per choice, in choice-index order
    sampling: list[dict[str, Any]]  # per choice
    stream: bool
    include_usage: bool = False
    echo_prompts: list[str] = field(default_factory=list)  # per choice, "" when not echoing
    choices_per_prompt: int = 1  # n


def _check_type(body: dict, key: str, types: tuple, what: str) -> None:
    if key in body and body[key] is not None and not isinstance(body[key], types):
        raise OpenAIError(400, f"'{key}' must be {what}", param=key)


def _sampling_from_body(body: dict) -> dict[str, Any]:
    for key in body:
        if key not in _PASSTHROUGH and key not in _IGNORED:
            raise OpenAIError(400, f"unsupported parameter '{key}'", param=key,
                              code="unsupported_parameter")
    for key in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "min_p",
                "repetition_penalty"):
        _check_type(body, key, (int, float), "a number")
    for key in ("seed", "top_k", "min_tokens"):
        _check_type(body, key, (int,), "an integer")
    if body.get("logit_bias"):
        raise OpenAIError(400, "'logit_bias' is not supported", param="logit_bias",
                          code="unsupported_parameter")
    if body.get("logprobs") or body.get("top_logprobs"):
        raise OpenAIError(400, "'logprobs' is not supported by this server", param="logprobs",
                          code="unsupported_parameter")
    if body.get("best_of") not in (None, 1) and body.get("best_of") != body.get("n", 1):
        raise OpenAIError(400, "'best_of' other than n is not supported", param="best_of",
                          code="unsupported_parameter")
    if body.get("suffix"):
        raise OpenAIError(400, "'suffix' is not supported", param="suffix",
                          code="unsupported_parameter")
    sampling = {k: body[k] for k in _PASSTHROUGH if body.get(k) is not None}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise OpenAIError(400, "'max_tokens' must be a positive integer", param="max_tokens")
        sampling["max_tokens"] = max_tokens
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise OpenAIError(400, "'stop' must be a string or a list of strings", param="stop")
        if stop:
            sampling["stop"] = stop
    return sampling


def _choices(body: dict) -> int:
    n = body.get("n", 1)
    if n is None:
        n = 1
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 128:
        raise OpenAIError(400, "'n' must be an integer between 1 and 128", param="n")
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
        raise OpenAIError(400, "'stream_options' must be an object", param="stream_options")
    if not body.get("stream"):
        raise OpenAIError(400, "'stream_options' needs 'stream': true", param="stream_options")
    return bool(options.get("include_usage"))


def plan_completion(body: Any) -> GenerationPlan:
    """Validate a /v1/completions body and plan its generations."""
    if not isinstance(body, dict):
        raise OpenAIError(400, "the request body must be a JSON object")
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(p, (int, list)) for p in prompt):
        raise OpenAIError(400, "token-id prompts are not supported; send text", param="prompt",
                          code="unsupported_parameter")
    else:
        raise OpenAIError(400, "'prompt' must be a non-empty string or list of strings",
                          param="prompt")
    if any(not p for p in prompts):
        raise OpenAIError(400, "'prompt' must not be empty", param="prompt")
    n = _choices(body)
    sampling = _sampling_from_body(body)
    echo = bool(body.get("echo"))
    return GenerationPlan(
        prompts=[p for p in prompts for _ in range(n)],
        sampling=_per_choice_sampling(sampling, n, len(prompts)),
        stream=bool(body.get("stream")),
        include_usage=_stream_options(body),
        echo_prompts=[p if echo else "" for p in prompts for _ in range(n)],
        choices_per_prompt=n,
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
                raise OpenAIError(400, "only text content parts are supported", param="messages")
        return "".join(parts)
    raise OpenAIError(400, "message content must be a string or a list of parts", param="messages")


def plan_chat(body: Any, render) -> GenerationPlan:
    """Validate a /v1/chat/completions body; `render(messages) -> prompt` applies the template."""
    if not isinstance(body, dict):
        raise OpenAIError(400, "the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise OpenAIError(400, "'messages' must be a non-empty list", param="messages")
    clean = []
    for m in messages:
        if not isinstance(m, dict) or "role" not in m:
            raise OpenAIError(400, "each message needs a 'role'", param="messages")
        if m["role"] not in ("system", "user", "assistant", "developer", "tool"):
            raise OpenAIError(400, f"unknown message role {m['role']!r}", param="messages")
        role = "system" if m["role"] == "developer" else m["role"]
        clean.append({"role": role, "content": _message_text(m.get("content"))})
    if body.get("tools"):
        raise OpenAIError(400, "'tools' are not supported", param="tools",
                          code="unsupported_parameter")
    n = _choices(body)
    sampling = _sampling_from_body(body)
    prompt = render(clean)
    return GenerationPlan(prompts=[prompt] * n, sampling=_per_choice_sampling(sampling, n, 1),
                          stream=bool(body.get("stream")), include_usage=_stream_options(body),
                          echo_prompts=[""] * n, choices_per_prompt=n)


def _finish_reason(reason: str | None) -> str | None:
    # The engine says stop / length / abort; OpenAI has no "abort" (a cancelled request has no
    # reader), so it is passed as is.
    return reason


class ChatTemplate:
    """Renders messages with a Hugging Face tokenizer's chat template."""

    def __init__(self, tokenizer_dir: str):
        from transformers import AutoTokenizer

        self.tokenizer_dir = tokenizer_dir
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"the tokenizer at {tokenizer_dir} has no chat template")

    def __call__(self, messages: list[dict]) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=True)
        except Exception as e:  # jinja errors: e.g. the template rejects the role order
            raise OpenAIError(400, f"cannot apply the chat template: {e}", param="messages") from None


async def find_tokenizer_dir(client) -> str | None:
    """The `tokenizer_dir` parameter of the served model's config, else of `preprocessing`'s."""
    candidates = [client.model, "preprocessing"]
    for name in candidates:
        try:
            if name == client.model:
                config = await client.model_config()
            else:
                from client.async_client import AsyncClient

                other = AsyncClient(client.url, protocol=client.protocol, model=name)
                try:
                    config = await other.model_config()
                finally:
                    await other.close()
        except ClientError:
            continue
        params = config.get("parameters", {}) or {}
        for key in ("tokenizer_dir", "model_dir", "tokenizer"):
            value = (params.get(key) or {}).get("string_value")
            if value and "${" not in value:
                return value
    return None


class OpenAIServer:
    """The aiohttp application around an `AsyncClient`.

    Args:
        client: the AsyncClient to the Triton model.
        served_model_name: the id /v1/models lists and requests must name (default: the Triton
            model name); requests naming another model get 404.
        tokenizer: tokenizer dir for chat; None reads it from the server on first chat request.
    """

    def __init__(self, client, served_model_name: str | None = None, tokenizer: str | None = None):
        self.client = client
        self.served_model_name = served_model_name or client.model
        self._tokenizer_dir = tokenizer
        self._template: ChatTemplate | None = None
        self._template_lock = asyncio.Lock()
        self.created = int(time.time())

    def app(self):
        from aiohttp import web

        @web.middleware
        async def errors(request, handler):
            return await self._errors(request, handler)

        app = web.Application(middlewares=[errors])
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model_id}", self.model)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.on_cleanup.append(self._cleanup)
        return app

    async def _cleanup(self, app) -> None:
        await self.client.close()

    # -- middleware and helpers ------------------------------------------------------------
    @staticmethod
    def _json_error(err: OpenAIError):
        from aiohttp import web

        return web.json_response(err.body(), status=err.status)

    async def _errors(self, request, handler):
        """Middleware: every failure leaves as OpenAI's error JSON with its status."""
        from aiohttp import web

        try:
            return await handler(request)
        except OpenAIError as e:
            return self._json_error(e)
        except ClientError as e:
            return self._json_error(error_from_client(e))
        except web.HTTPException as e:
            if e.status >= 400:
                return self._json_error(OpenAIError(
                    e.status, e.reason or "error",
                    type_="not_found_error" if e.status == 404 else "invalid_request_error"))
            raise
        except asyncio.CancelledError:
            raise
        except Exception as e:
            logger.exception("internal error")
            return self._json_error(OpenAIError(500, f"internal error: {e}", type_="server_error"))

    async def _body(self, request) -> dict:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            raise OpenAIError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise OpenAIError(400, "the request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != self.served_model_name:
            raise OpenAIError(404, f"the model '{model}' does not exist; this server serves "
                                   f"'{self.served_model_name}'", type_="not_found_error",
                              param="model", code="model_not_found")
        return body

    async def _chat_template(self) -> ChatTemplate:
        async with self._template_lock:
            if self._template is None:
                tokenizer_dir = self._tokenizer_dir or await find_tokenizer_dir(self.client)
                if not tokenizer_dir:
                    raise OpenAIError(500, "no tokenizer for the chat template: start the front "
                                           "door with --tokenizer DIR", type_="server_error")
                try:
                    self._template = await asyncio.get_running_loop().run_in_executor(
                        None, ChatTemplate, tokenizer_dir)
                except (OSError, ValueError) as e:
                    raise OpenAIError(500, f"cannot load the chat template: {e}",
                                      type_="server_error") from None
            return self._template

    # -- routes ----------------------------------------------------------------------------
    async def health(self, request):
        from aiohttp import web

        try:
            ready = await self.client.is_model_ready()
        except ClientError:
            ready = False
        return web.Response(status=200 if ready else 503, text="" if ready else "model not ready")

    def _model_card(self) -> dict:
        return {"id": self.served_model_name, "object": "model", "created": self.created,
                "owned_by": "paged-triton"}

    async def models(self, request):
        from aiohttp import web

        return web.json_response({"object": "list", "data": [self._model_card()]})

    async def model(self, request):
        from aiohttp import web

        if request.match_info["model_id"] != self.served_model_name:
            raise OpenAIError(404, f"the model '{request.match_info['model_id']}' does not exist",
                              type_="not_found_error", param="model", code="model_not_found")
        return web.json_response(self._model_card())

    async def completions(self, request):
        plan = plan_completion(await self._body(request))
        return await self._respond(request, plan, chat=False)

    async def chat_completions(self, request):
        body = await self._body(request)
        template = await self._chat_template()
        plan = plan_chat(body, template)
        return await self._respond(request, plan, chat=True)

    # -- generation --------------------------------------------------------------------------
    async def _respond(self, request, plan: GenerationPlan, chat: bool):
        request_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        if plan.stream:
            return await self._stream(request, plan, chat, request_id, created)
        completions = await self._generate_all(plan)
        choices = []
        for i, c in enumerate(completions):
            if chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": c.text},
                                "logprobs": None, "finish_reason": _finish_reason(c.finish_reason)})
            else:
                choices.append({"index": i, "text": plan.echo_prompts[i] + c.text, "logprobs": None,
                                "finish_reason": _finish_reason(c.finish_reason)})
        from aiohttp import web

        return web.json_response({
            "id": request_id, "object": "chat.completion" if chat else "text_completion",
            "created": created, "model": self.served_model_name, "choices": choices,
            "usage": _usage(completions, plan),
        })

    async def _generate_all(self, plan: GenerationPlan):
        tasks = [asyncio.ensure_future(self.client.generate(p, **s))
                 for p, s in zip(plan.prompts, plan.sampling)]
        try:
            return await asyncio.gather(*tasks)
        finally:
            for t in tasks:  # one failed (or we were cancelled): cancel the others' requests
                t.cancel()

    async def _stream(self, request, plan: GenerationPlan, chat: bool, request_id: str, created: int):
        from aiohttp import web

        streams = [self.client.stream_chunks(p, **s) for p, s in zip(plan.prompts, plan.sampling)]

        async def first_chunk(stream):
            try:
                return await stream.__anext__()
            except StopAsyncIteration:
                return None

        # Wait for every request's first response before answering 200, so that a request the
        # server rejects gets its real status and not an error event inside a 200 stream.
        try:
            firsts = await asyncio.gather(*(first_chunk(s) for s in streams))
        except BaseException:
            for s in streams:
                s.cancel()
            raise
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
        await response.prepare(request)
        object_name = "chat.completion.chunk" if chat else "text_completion"

        async def send(payload: dict | str) -> None:
            data = payload if isinstance(payload, str) else json.dumps(payload)
            await response.write(f"data: {data}\n\n".encode())

        def chunk(index: int, text: str | None, finish_reason: str | None, role: bool = False) -> dict:
            if chat:
                delta: dict[str, Any] = {}
                if role:
                    delta = {"role": "assistant", "content": ""}
                elif text is not None:
                    delta = {"content": text}
                choice = {"index": index, "delta": delta, "logprobs": None,
                          "finish_reason": finish_reason}
            else:
                choice = {"index": index, "text": text or "", "logprobs": None,
                          "finish_reason": finish_reason}
            out = {"id": request_id, "object": object_name, "created": created,
                   "model": self.served_model_name, "choices": [choice]}
            if plan.include_usage:
                out["usage"] = None
            return out

        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, stream) -> None:
            try:
                if firsts[index] is None:  # ended without a response
                    await queue.put((index, None, None))
                    return
                await queue.put((index, firsts[index], None))
                async for c in stream:
                    await queue.put((index, c, None))
                await queue.put((index, None, None))
            except ClientError as e:
                await queue.put((index, None, e))

        for i in range(len(streams)):
            if chat:
                await send(chunk(i, None, None, role=True))
            elif plan.echo_prompts[i]:
                await send(chunk(i, plan.echo_prompts[i], None))
        tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
        try:
            remaining = len(streams)
            while remaining:
                index, c, error = await queue.get()
                if error is not None:
                    await send(error_from_client(error).body())
                    break
                if c is None:
                    remaining -= 1
                    completion = streams[index].completion
                    await send(chunk(index, "" if not chat else None,
                                     _finish_reason(completion.finish_reason) or "stop"))
                    continue
                if c.text:
                    await send(chunk(index, c.text, None))
            else:
                if plan.include_usage:
                    await send({"id": request_id, "object": object_name, "created": created,
                                "model": self.served_model_name, "choices": [],
                                "usage": _usage([s.completion for s in streams], plan)})
            await send("[DONE]")
        finally:  # also when the client went away: cancel the Triton requests still running
            for t in tasks:
                t.cancel()
            for s in streams:
                s.cancel()
        await response.write_eof()
        return response


def _usage(completions, plan: GenerationPlan) -> dict[str, int]:
    # Prompt tokens count once per prompt: its n choices share it (OpenAI counts it once).
    prompt_tokens = sum(c.num_input_tokens or 0 for i, c in enumerate(completions)
                        if i % plan.choices_per_prompt == 0)
    completion_tokens = sum(c.num_output_tokens or 0 for c in completions)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def make_app(triton_url: str | None = None, protocol: str = "grpc", model: str = "paged_llm",
             served_model_name: str | None = None, tokenizer: str | None = None):
    """The aiohttp application (for `aiohttp.web.run_app` or an AppRunner)."""
    from client.async_client import AsyncClient

    client = AsyncClient(triton_url, protocol=protocol, model=model)
    return OpenAIServer(client, served_model_name, tokenizer).app()


def serve(host: str = "127.0.0.1", port: int = 9000, triton_url: str | None = None,
          protocol: str = "grpc", model: str = "paged_llm", served_model_name: str | None = None,
          tokenizer: str | None = None) -> None:
    """Run the front door until interrupted."""
    from aiohttp import web

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    app = make_app(triton_url, protocol, model, served_model_name, tokenizer)
    # handler_cancellation: a client that disconnects cancels its handler, and with it the
    # Triton requests (aiohttp >= 3.9 leaves handlers running by default).
    web.run_app(app, host=host, port=port, handler_cancellation=True,
                print=lambda msg: logger.info("%s", msg))


class ServerThread:
    """The front door on a background thread (tests, notebooks): a context manager.

        with ServerThread(port=0, triton_url="localhost:8001") as door:
            openai.OpenAI(base_url=door.base_url, api_key="-")
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, **app_kwargs):
        self.host, self.port, self._app_kwargs = host, port, app_kwargs
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = None
        self._runner = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self, timeout_s: float = 30.0) -> "ServerThread":
        import threading

        from aiohttp import web

        started = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                self._runner = web.AppRunner(make_app(**self._app_kwargs), handler_cancellation=True)
                loop.run_until_complete(self._runner.setup())
                site = web.TCPSite(self._runner, self.host, self.port)
                loop.run_until_complete(site.start())
                self.port = site._server.sockets[0].getsockname()[1]
            except BaseException as e:  # reported to start()
                failure.append(e)
                started.set()
                return
            started.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=run, name="openai-front-door", daemon=True)
        self._thread.start()
        if not started.wait(timeout_s):
            raise RuntimeError("the OpenAI front door did not start")
        if failure:
            raise failure[0]
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":
    import sys

    from client.cli import main

    sys.exit(main(["openai", *sys.argv[1:]]))
