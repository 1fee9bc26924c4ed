"""OpenAI-compatible front door: `paged-client openai` (or `python -m paged_triton.client.openai_server`).

Serves `/v1/completions` and `/v1/chat/completions` (streaming as Server-Sent Events ending with
`data: [DONE]`, and not), `/v1/models`, `/health`, `/tokenize`, `/detokenize` and `/metrics`
(Triton's, proxied) by calling the paged_llm model through `AsyncClient`. Logprobs, echo,
structured outputs (`response_format`) and tool calls are planned in openai_protocol.py and
tool_calls.py; this file is the HTTP side. `finish_reason` and `usage` are the engine's own
(paged_llm reports them; the ensemble does not report token counts, so the door calls paged_llm
by default). Errors use OpenAI's `{"error": {"message", "type", "param", "code"}}` shape with
the matching HTTP status. `--api-key` makes `/v1/*` require `Authorization: Bearer <key>`; CORS
headers are sent for the `--allowed-origins`.

Built on aiohttp, which tritonclient[http] already depends on. A client that disconnects
mid-stream cancels its Triton requests (the handler is cancelled, which cancels the gRPC call).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from typing import Any

from paged_triton.client import openai_protocol as proto
from paged_triton.client import tool_calls
from paged_triton.client.chat_template import ChatTemplate, find_tokenizer_dir
from paged_triton.client.errors import ClientError
from paged_triton.client.openai_errors import OpenAIError, bad_request, error_from_client
from paged_triton.client.openai_protocol import GenerationPlan, plan_chat, plan_completion

__all__ = ["OpenAIError", "OpenAIServer", "ServerThread", "error_from_client", "make_app",
           "plan_chat", "plan_completion", "serve"]

logger = logging.getLogger("paged_client.openai")

class OpenAIServer:
    """The aiohttp application around an `AsyncClient`.

    Args:
        client: the AsyncClient to the Triton model.
        served_model_name: the id /v1/models lists and requests must name (default: the Triton
            model name); requests naming another model get 404.
        tokenizer: tokenizer dir for chat, echo and /tokenize; None reads it from the server.
        api_key: when set, /v1/* requests need `Authorization: Bearer <api_key>` (else 401).
        metrics_url: Triton's metrics endpoint that /metrics proxies (None: /metrics is 404).
        allowed_origins: origins CORS headers are sent for ("*": any); empty: no CORS headers.
    """

    def __init__(self, client, served_model_name: str | None = None, tokenizer: str | None = None,
                 api_key: str | None = None, metrics_url: str | None = None,
                 allowed_origins: tuple[str, ...] = ("*",)):
        self.client = client
        self.served_model_name = served_model_name or client.model
        self._tokenizer_dir = tokenizer
        self._template: ChatTemplate | None = None
        self._template_lock = asyncio.Lock()
        self.api_key = api_key or None
        self.metrics_url = metrics_url
        self.allowed_origins = tuple(allowed_origins)
        self.created = int(time.time())
        self._kind_checked = False

    def app(self):
        from aiohttp import web

        @web.middleware
        async def middleware(request, handler):
            return await self._middleware(request, handler)

        app = web.Application(middlewares=[middleware])
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model_id}", self.model)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/tokenize", self.tokenize)
        app.router.add_post("/detokenize", self.detokenize)
        app.router.add_get("/metrics", self.metrics)
        app.on_response_prepare.append(self._cors_headers)
        app.on_cleanup.append(self._cleanup)
        return app

    async def _cleanup(self, app) -> None:
        await self.client.close()

    # -- middleware and helpers ------------------------------------------------------------
    @staticmethod
    def _json_error(err: OpenAIError):
        from aiohttp import web

        return web.json_response(err.body(), status=err.status)

    def _origin_allowed(self, origin: str | None) -> bool:
        return bool(origin) and ("*" in self.allowed_origins or origin in self.allowed_origins)

    async def _cors_headers(self, request, response) -> None:
        """Every response (streams too: this runs before the headers leave) gets CORS headers."""
        origin = request.headers.get("Origin")
        if self._origin_allowed(origin):
            response.headers["Access-Control-Allow-Origin"] = (
                "*" if "*" in self.allowed_origins else origin)
            if "*" not in self.allowed_origins:
                response.headers["Vary"] = "Origin"

    async def _middleware(self, request, handler):
        """CORS preflight, the API key, then every failure as OpenAI's error JSON."""
        from aiohttp import web

        if request.method == "OPTIONS" and request.headers.get("Access-Control-Request-Method"):
            if not self._origin_allowed(request.headers.get("Origin")):
                return web.Response(status=403, text="origin not allowed")
            return web.Response(status=204, headers={
                "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                "Access-Control-Allow-Headers": request.headers.get(
                    "Access-Control-Request-Headers", "Authorization, Content-Type"),
                "Access-Control-Max-Age": "600"})
        if self.api_key and request.path.startswith("/v1"):
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                return self._json_error(OpenAIError(
                    401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                    type_="authentication_error", code="invalid_api_key"))
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

    async def _json(self, request) -> dict:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            raise bad_request("the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise bad_request("the request body must be a JSON object")
        return body

    async def _body(self, request) -> dict:
        body = await self._json(request)
        model = body.get("model")
        if model is not None and model != self.served_model_name:
            raise OpenAIError(404, f"the model '{model}' does not exist; this server serves "
                                   f"'{self.served_model_name}'", type_="not_found_error",
                              param="model", code="model_not_found")
        return body

    async def _tokenizer(self) -> ChatTemplate:
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
                    raise OpenAIError(500, f"cannot load the tokenizer: {e}",
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

    async def tokenize(self, request):
        """vLLM's /tokenize: {"prompt": text} or {"messages": [...]} -> {"count", "tokens"}."""
        from aiohttp import web

        body = await self._body(request)
        tok = await self._tokenizer()
        if "messages" in body:
            text = tok(proto.chat_messages(body))
        elif isinstance(body.get("prompt"), str):
            text = body["prompt"]
        else:
            raise bad_request("give 'prompt' (a string) or 'messages'", param="prompt")
        tokens = tok.encode(text)
        return web.json_response({"count": len(tokens), "tokens": tokens})

    async def detokenize(self, request):
        from aiohttp import web

        body = await self._body(request)
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise bad_request("'tokens' must be a list of token ids", param="tokens")
        tok = await self._tokenizer()
        return web.json_response({"prompt": tok.decode(tokens)})

    async def metrics(self, request):
        from aiohttp import web

        if not self.metrics_url:
            raise OpenAIError(404, "no metrics endpoint: start the front door with --metrics-url",
                              type_="not_found_error")
        from paged_triton.client.metrics import fetch_metrics

        text = await asyncio.get_running_loop().run_in_executor(None, fetch_metrics,
                                                                self.metrics_url)
        return web.Response(text=text, content_type="text/plain",
                            headers={"X-Content-Type-Options": "nosniff"})

    async def completions(self, request):
        body = await self._body(request)
        decode = None
        prompt = body.get("prompt")
        token_ids = isinstance(prompt, list) and any(not isinstance(p, str) for p in prompt)
        if body.get("echo") and (token_ids or body.get("logprobs") is not None):
            # Echoed token-id prompts, and the first prompt token's text, are decoded here.
            decode = (await self._tokenizer()).decode
        plan = plan_completion(body, decode=decode)
        return await self._respond(request, plan, chat=False, decode=decode)

    async def chat_completions(self, request):
        body = await self._body(request)
        template = await self._tokenizer()
        plan = plan_chat(body, template)
        return await self._respond(request, plan, chat=True)

    # -- answers -----------------------------------------------------------------------------
    @staticmethod
    def _completion_logprobs(plan: GenerationPlan, logprobs, prompt_logprobs, decode) -> dict:
        entries = []
        if plan.echo and prompt_logprobs:
            entries.extend(prompt_logprobs)
        entries.extend(logprobs or [])
        return proto.completion_logprobs(entries, plan.logprobs,
                                         decode=(lambda t: decode([t])) if decode else None)

    @staticmethod
    def _chat_message(plan: GenerationPlan, text: str, finish_reason: str | None):
        """(message, finish_reason) with tool calls parsed out of the text."""
        tools = plan.tools
        if tools is None or not tools.shown and not tools.forced:
            return {"role": "assistant", "content": text}, finish_reason
        parsed = (tool_calls.parse_forced(text, tools) if tools.forced
                  else tool_calls.parse_hermes(text))
        message: dict[str, Any] = {"role": "assistant", "content": parsed.content}
        if parsed.tool_calls:
            message["tool_calls"] = parsed.tool_calls
            finish_reason = _tool_finish_reason(tools, finish_reason)
        return message, finish_reason

    async def _respond(self, request, plan: GenerationPlan, chat: bool, decode=None):
        from aiohttp import web

        await self._warn_if_not_the_engine()
        request_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        if plan.stream:
            return await self._stream(request, plan, chat, request_id, created, decode)
        completions = await self._generate_all(plan)
        choices = []
        for i, c in enumerate(completions):
            if chat:
                message, reason = self._chat_message(plan, c.text, c.finish_reason)
                logprobs = (proto.chat_logprobs(c.logprobs or [], plan.logprobs)
                            if plan.logprobs is not None else None)
                choices.append({"index": i, "message": message, "logprobs": logprobs,
                                "finish_reason": reason})
            else:
                logprobs = None
                if plan.logprobs is not None:
                    logprobs = self._completion_logprobs(plan, c.logprobs, c.prompt_logprobs,
                                                         decode)
                choices.append({"index": i, "text": plan.echo_prompts[i] + c.text,
                                "logprobs": logprobs, "finish_reason": c.finish_reason})
        return web.json_response({
            "id": request_id, "object": "chat.completion" if chat else "text_completion",
            "created": created, "model": self.served_model_name, "choices": choices,
            "usage": proto.usage(completions, plan.choices_per_prompt),
        })

    async def _warn_if_not_the_engine(self) -> None:
        """The ensemble reports no token counts or finish reasons and takes no logprobs or
        structured outputs: say so once, in the log (requests still go through)."""
        if self._kind_checked or not hasattr(self.client, "model_info"):
            return
        self._kind_checked = True
        info = await self.client.model_info()
        if info.kind != "vllm":
            logger.warning("model %r is not the engine model: usage will be 0, finish_reason "
                           "missing, logprobs and structured outputs refused; start the front "
                           "door with --model paged_llm", info.name)

    async def _generate_all(self, plan: GenerationPlan):
        tasks = [asyncio.ensure_future(self.client.generate(p, **s))
                 for p, s in zip(plan.prompts, plan.sampling)]
        try:
            return await asyncio.gather(*tasks)
        finally:
            for t in tasks:  # one failed (or we were cancelled): cancel the others' requests
                t.cancel()

    async def _stream(self, request, plan: GenerationPlan, chat: bool, request_id: str,
                      created: int, decode=None):
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
        writer = _ChunkWriter(response, plan, chat, request_id, created, self.served_model_name)
        choices = [_StreamedChoice(i, plan, chat, decode) for i in range(len(streams))]
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

        for choice in choices:
            await writer.send_all(choice.start())
        tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
        try:
            remaining = len(streams)
            while remaining:
                index, c, error = await queue.get()
                if error is not None:
                    await writer.send(error_from_client(error).body())
                    break
                if c is None:
                    remaining -= 1
                    await writer.send_all(choices[index].finish(streams[index].completion))
                    continue
                await writer.send_all(choices[index].delta(c))
            else:
                if plan.include_usage:
                    await writer.send(writer.envelope(
                        [], usage=proto.usage([s.completion for s in streams],
                                              plan.choices_per_prompt)))
            await writer.send("[DONE]")
        finally:  # also when the client went away: cancel the Triton requests still running
            for t in tasks:
                t.cancel()
            for s in streams:
                s.cancel()
        await response.write_eof()
        return response


def _tool_finish_reason(tools, finish_reason: str | None) -> str | None:
    # OpenAI answers a forced named call with "stop"; calls the model chose (auto) or had to
    # make (required) end with "tool_calls". A cut-off output stays "length".
    if finish_reason == "length" or tools.choice == "named":
        return finish_reason
    return "tool_calls"


class _ChunkWriter:
    """Frames streamed chunks as Server-Sent Events."""

    def __init__(self, response, plan: GenerationPlan, chat: bool, request_id: str, created: int,
                 model: str):
        self._response, self._plan, self._chat = response, plan, chat
        self._head = {"id": request_id,
                      "object": "chat.completion.chunk" if chat else "text_completion",
                      "created": created, "model": model}

    def envelope(self, choices: list[dict], usage: dict | None = None) -> dict:
        out = {**self._head, "choices": choices}
        if self._plan.include_usage:
            out["usage"] = usage
        return out

    async def send(self, payload: dict | str) -> None:
        data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
        await self._response.write(f"data: {data}\n\n".encode())

    async def send_all(self, choices: list[dict]) -> None:
        for choice in choices:
            await self.send(self.envelope([choice]))


class _StreamedChoice:
    """One choice of a stream: turns its engine chunks into OpenAI chunk choices."""

    def __init__(self, index: int, plan: GenerationPlan, chat: bool, decode):
        self.index, self.plan, self.chat, self.decode = index, plan, chat, decode
        tools = plan.tools
        self.splitter = (tool_calls.StreamSplitter(tools)
                         if chat and tools is not None and (tools.shown or tools.forced) else None)
        self.offset = 0  # completions: text offset of the next token
        self.echoed = not plan.echo_prompts or not plan.echo_prompts[index]

    def _choice(self, text: str | None = None, *, logprobs=None, finish_reason=None,
                role: bool = False, tool_calls_delta: list | None = None) -> dict:
        if self.chat:
            delta: dict[str, Any] = {}
            if role:
                delta = {"role": "assistant", "content": ""}
            elif tool_calls_delta:
                delta = {"tool_calls": tool_calls_delta}
            elif text is not None:
                delta = {"content": text}
            return {"index": self.index, "delta": delta, "logprobs": logprobs,
                    "finish_reason": finish_reason}
        return {"index": self.index, "text": text or "", "logprobs": logprobs,
                "finish_reason": finish_reason}

    def start(self) -> list[dict]:
        return [self._choice(role=True)] if self.chat else []

    def _completion_logprobs(self, entries: list, text: str) -> dict:
        lp = proto.completion_logprobs(entries, self.plan.logprobs, text_offset=self.offset,
                                       decode=(lambda t: self.decode([t])) if self.decode else None)
        self.offset += len(text)
        return lp

    def delta(self, c) -> list[dict]:
        out = []
        if not self.chat and not self.echoed:
            self.echoed = True
            echo = self.plan.echo_prompts[self.index]
            lp = None
            if self.plan.logprobs is not None:
                lp = proto.completion_logprobs(
                    c.prompt_logprobs or [], self.plan.logprobs, text_offset=0,
                    decode=(lambda t: self.decode([t])) if self.decode else None)
            self.offset = len(echo)
            out.append(self._choice(echo, logprobs=lp))
        wants_logprobs = self.plan.logprobs is not None and c.logprobs
        if not c.text and not wants_logprobs:
            return out
        if self.chat:
            text = c.text
            if self.splitter is not None:
                text = self.splitter.feed(c.text)
                if not text:
                    return out
            lp = proto.chat_logprobs(c.logprobs, self.plan.logprobs) if wants_logprobs else None
            out.append(self._choice(text, logprobs=lp))
        else:
            lp = self._completion_logprobs(c.logprobs, c.text) if wants_logprobs else None
            if not wants_logprobs:
                self.offset += len(c.text)
            out.append(self._choice(c.text, logprobs=lp))
        return out

    def finish(self, completion) -> list[dict]:
        reason = completion.finish_reason or "stop"
        out = []
        if self.splitter is not None:
            parsed = self.splitter.finish()
            if parsed.content:
                out.append(self._choice(parsed.content))
            if parsed.tool_calls:
                out.append(self._choice(tool_calls_delta=[
                    {"index": k, **call} for k, call in enumerate(parsed.tool_calls)]))
                reason = _tool_finish_reason(self.plan.tools, reason)
        out.append(self._choice(None if self.chat else "", finish_reason=reason))
        return out


def make_app(triton_url: str | None = None, protocol: str = "grpc", model: str = "paged_llm",
             served_model_name: str | None = None, tokenizer: str | None = None,
             api_key: str | None = None, metrics_url: str | None = None,
             allowed_origins: tuple[str, ...] = ("*",)):
    """The aiohttp application (for `aiohttp.web.run_app` or an AppRunner)."""
    from paged_triton.client.async_client import AsyncClient

    client = AsyncClient(triton_url, protocol=protocol, model=model)
    return OpenAIServer(client, served_model_name, tokenizer, api_key=api_key,
                        metrics_url=metrics_url, allowed_origins=allowed_origins).app()


def serve(host: str = "127.0.0.1", port: int = 9000, log_requests: bool = True,
          **app_kwargs) -> None:
    """Run the front door until interrupted (app_kwargs: as make_app's; log_requests: an
    access-log line per request)."""
    from aiohttp import web

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    app = make_app(**app_kwargs)
    extra = {} if log_requests else {"access_log": None}
    # handler_cancellation: a client that disconnects cancels its handler, and with it the
    # Triton requests (aiohttp >= 3.9 leaves handlers running by default).
    web.run_app(app, host=host, port=port, handler_cancellation=True,
                print=lambda msg: logger.info("%s", msg), **extra)


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

    from paged_triton.client.cli import main

    sys.exit(main(["openai", *sys.argv[1:]]))
