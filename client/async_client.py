"""asyncio client: many concurrent streams from one event loop.

    async with AsyncClient("localhost:8001") as c:
        async with c.stream("Hello", max_tokens=32) as s:
            async for delta in s:
                print(delta, end="")
        results = await asyncio.gather(*(c.generate(p, max_tokens=16) for p in prompts))

gRPC uses `grpc.aio` (each request its own bidi call on one channel); HTTP uses aiohttp (the
client extra of tritonclient[http]). Cancelling the task that iterates a stream, leaving the
`async with` block, `aclose()`, or dropping the stream object cancels the request on the server.
"""

from __future__ import annotations

import asyncio
import json
import urllib.parse
import uuid
from typing import Any

from paged_triton.client.errors import ConnectionFailed
from paged_triton.client.protocol import (
    Chunk,
    Completion,
    CompletionBuilder,
    ModelInfo,
    build_http_body,
    build_inputs,
)
from paged_triton.client.wire import (
    GRPC_CHANNEL_OPTIONS,
    GRPC_METADATA,
    GenerateTarget,
    SSEParser,
    config_to_dict,
    grpc_error,
    grpc_parse_response,
    grpc_request,
    http_error_body,
    http_event_chunk,
    normalize_url,
)


class _AsyncCall:
    async def start(self) -> None:
        raise NotImplementedError

    async def next_chunk(self) -> Chunk | None:
        raise NotImplementedError

    def cancel(self) -> None:
        raise NotImplementedError


class _AioGrpcCall(_AsyncCall):
    def __init__(self, stub, request, url: str, timeout_s: float | None, headers: dict | None):
        self._stub, self._request, self._url = stub, request, url
        self._timeout_s = timeout_s
        self._metadata = GRPC_METADATA + tuple((headers or {}).items())
        self._call = None
        self._final = False

    async def start(self) -> None:
        self._call = self._stub.ModelStreamInfer(iter([self._request]), metadata=self._metadata,
                                                 timeout=self._timeout_s)

    async def next_chunk(self) -> Chunk | None:
        import grpc

        while not self._final:
            try:
                response = await self._call.read()
            except grpc.RpcError as e:
                raise grpc_error(e, self._url) from None
            if response is grpc.aio.EOF:
                return None
            chunk, self._final = grpc_parse_response(response, self._url)
            if chunk is not None:
                return chunk
        return None

    def cancel(self) -> None:
        if self._call is not None:
            self._call.cancel()


class _AioHttpCall(_AsyncCall):
    """generate (one JSON response) or generate_stream (SSE) over aiohttp; closing cancels."""

    def __init__(self, session, url: str, body: dict, stream: bool, timeout_s: float | None,
                 headers: dict | None, server_url: str):
        self._session, self._url, self._body, self._stream = session, url, body, stream
        self._timeout_s, self._headers, self._server_url = timeout_s, headers, server_url
        self._response = None
        self._parser = SSEParser()
        self._eof = False

    async def start(self) -> None:
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=None, sock_read=self._timeout_s)
        try:
            self._response = await self._session.post(
                self._url, json=self._body, headers=self._headers, timeout=timeout)
        except (aiohttp.ClientConnectionError, OSError) as e:
            raise ConnectionFailed(
                f"cannot connect to the Triton server at {self._server_url} (HTTP): {e}",
                url=self._server_url) from None
        if self._response.status != 200:
            body = await self._response.read()
            self._response.close()
            raise http_error_body(self._response.status, body, self._server_url)

    async def next_chunk(self) -> Chunk | None:
        import aiohttp

        try:
            if not self._stream:
                if self._eof:
                    return None
                self._eof = True
                data = await self._response.read()
                self._response.release()
                return http_event_chunk(data.decode("utf-8"), self._server_url)
            while not self._eof:
                line = await self._response.content.readline()
                if not line:
                    self._eof = True
                    data = self._parser.flush()
                else:
                    data = self._parser.feed_line(line)
                if data is not None:
                    return http_event_chunk(data, self._server_url)
        except (aiohttp.ClientError, OSError) as e:
            raise ConnectionFailed(
                f"lost the connection to the Triton server at {self._server_url}: {e}",
                url=self._server_url) from None
        self._response.release()
        return None

    def cancel(self) -> None:
        if self._response is not None:
            self._response.close()  # drops the connection: Triton cancels the request


class _LazyCall(_AsyncCall):
    """Reads the model info (once per client) when the request starts, then runs the real call."""

    def __init__(self, client: "AsyncClient", prompt: str, stream: bool, sampling: dict):
        self._client, self._prompt, self._stream, self._sampling = client, prompt, stream, sampling
        self._inner: _AsyncCall | None = None

    async def start(self) -> None:
        info = await self._client.model_info()
        self._inner = self._client._call(info, self._prompt, self._stream, self._sampling)
        await self._inner.start()

    async def next_chunk(self) -> Chunk | None:
        return await self._inner.next_chunk()

    def cancel(self) -> None:
        if self._inner is not None:
            self._inner.cancel()


class AsyncChunkStream:
    """Async iterator over one request's `Chunk` objects; `completion` fills in as they arrive.

    The request starts on the first `__anext__` (or `async with`). Closing before the end, or
    cancelling the task that awaits it, cancels the request on the server.
    """

    def __init__(self, call: _AsyncCall):
        self._call = call
        self._builder: CompletionBuilder | None = None
        self._started = False
        self._done = False

    @property
    def completion(self) -> Completion:
        if self._builder is None:
            self._builder = CompletionBuilder()
        return self._builder.completion

    async def _ensure_started(self) -> None:
        if not self._started:
            self._started = True
            self._builder = CompletionBuilder()
            await self._call.start()

    def __aiter__(self):
        return self

    async def _next_chunk(self) -> Chunk:
        if self._done:
            raise StopAsyncIteration
        try:
            await self._ensure_started()
            chunk = await self._call.next_chunk()
        except BaseException:  # includes asyncio.CancelledError: the task was cancelled
            self._done = True
            self._call.cancel()
            if self._builder is None:  # the start itself failed
                self._builder = CompletionBuilder()
            self._builder.finish()
            raise
        if chunk is None:
            self._done = True
            self._builder.finish()
            raise StopAsyncIteration
        self._builder.add(chunk)
        return chunk

    async def __anext__(self) -> Chunk:
        return await self._next_chunk()

    def cancel(self) -> None:
        """Cancel the request on the server if it has not finished."""
        if not self._done:
            self._done = True
            self._call.cancel()
            if self._builder is not None:
                self._builder.finish()

    async def aclose(self) -> None:
        self.cancel()

    async def __aenter__(self):
        await self._ensure_started()
        return self

    async def __aexit__(self, *exc) -> None:
        self.cancel()

    def __del__(self):
        try:
            self.cancel()
        except Exception:
            pass


class AsyncTextStream(AsyncChunkStream):
    """Async iterator over one request's non-empty text deltas."""

    async def __anext__(self) -> str:
        while True:
            chunk = await self._next_chunk()
            if chunk.text:
                return chunk.text


class AsyncClient:
    """asyncio twin of `client.Client`; same arguments.

    The gRPC channel / HTTP session is created on first use inside the running event loop, and
    belongs to that loop; `await close()` (or `async with`) releases it.
    """

    def __init__(self, url: str | None = None, protocol: str = "grpc", model: str = "paged_llm",
                 *, model_kind: str | None = None, timeout_s: float | None = None,
                 headers: dict[str, str] | None = None, max_connections: int = 0):
        self.protocol = protocol
        self.url = normalize_url(url, protocol)
        self.model = model
        self.timeout_s = timeout_s
        self.headers = dict(headers or {})
        self._model_kind = model_kind
        self._model_info: ModelInfo | None = None
        self._max_connections = max_connections
        self._channel = None
        self._stub = None
        self._session = None
        self._info_lock: asyncio.Lock | None = None

    def _grpc_stub(self):
        if self._stub is None:
            import grpc
            from tritonclient.grpc import service_pb2_grpc

            self._channel = grpc.aio.insecure_channel(self.url, options=GRPC_CHANNEL_OPTIONS)
            self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        return self._stub

    def _http_session(self):
        if self._session is None:
            import aiohttp

            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._max_connections))
        return self._session

    async def _grpc_unary(self, method: str, request):
        import grpc

        try:
            return await getattr(self._grpc_stub(), method)(
                request, metadata=tuple(self.headers.items()), timeout=self.timeout_s or 30.0)
        except grpc.RpcError as e:
            raise grpc_error(e, self.url) from None

    async def _http_get(self, path: str) -> tuple[int, bytes]:
        import aiohttp

        try:
            async with self._http_session().get(self.url + path, headers=self.headers) as r:
                return r.status, await r.read()
        except (aiohttp.ClientConnectionError, OSError) as e:
            raise ConnectionFailed(
                f"cannot connect to the Triton server at {self.url} (HTTP): {e}", url=self.url
            ) from None

    async def model_config(self) -> dict:
        if self.protocol == "grpc":
            from tritonclient.grpc import service_pb2

            response = await self._grpc_unary(
                "ModelConfig", service_pb2.ModelConfigRequest(name=self.model))
            return config_to_dict(response.config)
        status, body = await self._http_get(f"/v2/models/{urllib.parse.quote(self.model)}/config")
        if status != 200:
            raise http_error_body(status, body, self.url)
        return json.loads(body)

    async def model_info(self) -> ModelInfo:
        if self._model_info is None:
            if self._info_lock is None:
                self._info_lock = asyncio.Lock()
            async with self._info_lock:
                if self._model_info is None:
                    self._model_info = ModelInfo.from_config(await self.model_config(),
                                                             self._model_kind)
        return self._model_info

    def _call(self, info: ModelInfo, prompt: str, stream: bool, sampling: dict) -> _AsyncCall:
        if self.protocol == "grpc":
            request = grpc_request(info, build_inputs(info, prompt, stream, sampling),
                                   request_id=uuid.uuid4().hex)
            return _AioGrpcCall(self._grpc_stub(), request, self.url, self.timeout_s, self.headers)
        body = build_http_body(info, prompt, stream, sampling)
        target = GenerateTarget(self.url, urllib.parse.quote(self.model))
        return _AioHttpCall(self._http_session(), target.generate_stream if stream else target.generate,
                            body, stream, self.timeout_s, self.headers, self.url)

    async def generate(self, prompt: str, **sampling: Any) -> Completion:
        """Generate a completion; see `Client.generate`. Task cancellation cancels the request."""
        chunks = AsyncChunkStream(_LazyCall(self, prompt, False, sampling))
        try:
            async for _ in chunks:
                pass
        finally:
            chunks.cancel()
        return chunks.completion

    def stream(self, prompt: str, **sampling: Any) -> AsyncTextStream:
        """Async iterator of text deltas; `.completion` holds finish reason and counts at the end."""
        return AsyncTextStream(_LazyCall(self, prompt, True, sampling))

    def stream_chunks(self, prompt: str, **sampling: Any) -> AsyncChunkStream:
        return AsyncChunkStream(_LazyCall(self, prompt, True, sampling))

    async def is_server_ready(self) -> bool:
        if self.protocol == "grpc":
            from tritonclient.grpc import service_pb2

            return (await self._grpc_unary("ServerReady", service_pb2.ServerReadyRequest())).ready
        return (await self._http_get("/v2/health/ready"))[0] == 200

    async def is_model_ready(self, model: str | None = None) -> bool:
        model = model or self.model
        if self.protocol == "grpc":
            from tritonclient.grpc import service_pb2

            try:
                return (await self._grpc_unary(
                    "ModelReady", service_pb2.ModelReadyRequest(name=model))).ready
            except ConnectionFailed:
                raise
            except Exception:
                return False
        return (await self._http_get(f"/v2/models/{urllib.parse.quote(model)}/ready"))[0] == 200

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
        if self._session is not None:
            await self._session.close()
        self._channel = self._stub = self._session = None

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"AsyncClient({self.url!r}, protocol={self.protocol!r}, model={self.model!r})"
