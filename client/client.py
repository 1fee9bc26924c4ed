"""Synchronous client for the paged_llm engine model and the ensemble on a Triton server.

    from paged_triton.client import Client

    with Client("localhost:8001") as c:
        print(c.generate("Hello", max_tokens=16).text)
        with c.stream("Hello", max_tokens=16, temperature=0.7) as s:
            for delta in s:
                print(delta, end="", flush=True)
        print(s.completion.finish_reason)

Every request is a call of its own (a gRPC bidi stream, or an HTTP connection), so one `Client`
can run requests from many threads at once. Leaving a stream early (break, `close()`, leaving the
`with` block, or dropping the last reference) cancels the request on the server, which frees
its KV-cache blocks at once.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.parse
import uuid
from typing import Any

from paged_triton.client.errors import ClientError, ConnectionFailed, error_from_http
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


class ChunkStream:
    """Iterator over one request's responses as `Chunk` objects.

    `completion` holds what has arrived so far and is complete once iteration ends. Closing the
    stream before the end cancels the request on the server.
    """

    def __init__(self, call: "_SyncCall", start_s: float | None = None):
        self._call = call
        self._builder = CompletionBuilder() if start_s is None else CompletionBuilder(start_s)
        self._done = False

    @property
    def completion(self) -> Completion:
        return self._builder.completion

    def __iter__(self):
        return self

    def _next_chunk(self) -> Chunk:
        if self._done:
            raise StopIteration
        try:
            chunk = self._call.next_chunk()
        except BaseException:
            self._done = True
            self._call.cancel()
            self._builder.finish()
            raise
        if chunk is None:
            self._done = True
            self._builder.finish()
            raise StopIteration
        self._builder.add(chunk)
        return chunk

    def __next__(self) -> Chunk:
        return self._next_chunk()

    def close(self) -> None:
        """Cancel the request on the server if it has not finished."""
        if not self._done:
            self._done = True
            self._call.cancel()
            self._builder.finish()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class TextStream(ChunkStream):
    """Iterator over one request's text deltas (non-empty strings), as they arrive."""

    def __next__(self) -> str:
        while True:
            chunk = self._next_chunk()
            if chunk.text:
                return chunk.text


class _SyncCall:
    """One request in flight: `next_chunk()` until None, or `cancel()`."""

    def next_chunk(self) -> Chunk | None:
        raise NotImplementedError

    def cancel(self) -> None:
        raise NotImplementedError


class _GrpcCall(_SyncCall):
    def __init__(self, stub, request, url: str, timeout_s: float | None, headers: dict | None):
        import grpc

        self._grpc = grpc
        self._url = url
        metadata = GRPC_METADATA + tuple((headers or {}).items())
        self._responses = stub.ModelStreamInfer(iter([request]), metadata=metadata, timeout=timeout_s)
        self._final = False

    def next_chunk(self) -> Chunk | None:
        while not self._final:
            try:
                response = next(self._responses)
            except StopIteration:
                return None
            except self._grpc.RpcError as e:
                raise grpc_error(e, self._url) from None
            chunk, self._final = grpc_parse_response(response, self._url)
            if chunk is not None:
                return chunk
        return None

    def cancel(self) -> None:
        self._responses.cancel()


def _open_http(url: str, body: dict, timeout_s: float | None, headers: dict | None,
               server_url: str) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """POST the JSON body; the open connection and its 200 response, or the typed error."""
    parts = urllib.parse.urlsplit(url)
    conn_cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = conn_cls(parts.hostname, parts.port, timeout=timeout_s)
    try:
        conn.request("POST", parts.path, body=json.dumps(body).encode(),
                     headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
    except (OSError, http.client.HTTPException) as e:
        conn.close()
        raise ConnectionFailed(
            f"cannot connect to the Triton server at {server_url} (HTTP): {e}", url=server_url
        ) from None
    if response.status != 200:
        error_body = response.read()
        conn.close()
        raise http_error_body(response.status, error_body, server_url)
    return conn, response


class _HttpStreamCall(_SyncCall):
    """generate_stream over one HTTP/1.1 connection; closing it cancels the request."""

    def __init__(self, url: str, body: dict, timeout_s: float | None, headers: dict | None,
                 server_url: str):
        self._server_url = server_url
        self._open_args = (url, body, timeout_s, headers, server_url)
        self._conn = self._response = None
        self._parser = SSEParser()
        self._eof = False

    def next_chunk(self) -> Chunk | None:
        if self._conn is None:  # opened on first use, so errors surface while iterating
            self._conn, self._response = _open_http(*self._open_args)
        while not self._eof:
            try:
                line = self._response.readline()
            except (OSError, http.client.HTTPException) as e:
                raise ConnectionFailed(
                    f"lost the connection to the Triton server at {self._server_url}: {e}",
                    url=self._server_url) from None
            if not line:
                self._eof = True
                data = self._parser.flush()
            else:
                data = self._parser.feed_line(line)
            if data is not None:
                return http_event_chunk(data, self._server_url)
        self._conn.close()
        return None

    def cancel(self) -> None:
        if self._conn is not None:
            self._conn.close()


class _HttpGenerateCall(_SyncCall):
    """Non-streaming `/generate`: exactly one response."""

    def __init__(self, url: str, body: dict, timeout_s: float | None, headers: dict | None,
                 server_url: str):
        self._server_url = server_url
        self._open_args = (url, body, timeout_s, headers, server_url)
        self._conn = self._response = None
        self._read = False

    def next_chunk(self) -> Chunk | None:
        if self._read:
            return None
        self._read = True
        self._conn, self._response = _open_http(*self._open_args)
        try:
            data = self._response.read()
        except (OSError, http.client.HTTPException) as e:
            raise ConnectionFailed(
                f"lost the connection to the Triton server at {self._server_url}: {e}",
                url=self._server_url) from None
        finally:
            self._conn.close()
        return http_event_chunk(data.decode("utf-8"), self._server_url)

    def cancel(self) -> None:
        if self._conn is not None:
            self._conn.close()


class Client:
    """Talks to one model on a Triton server.

    Args:
        url: "host:port" (default localhost:8001 for gRPC, localhost:8000 for HTTP).
        protocol: "grpc" or "http".
        model: the Triton model name: "paged_llm" (engine model, vllm_backend tensors) or
            "ensemble" (TensorRT-LLM style front door), or any model speaking one of those.
        model_kind: "vllm" or "trtllm"; read from the server's model config when None.
        timeout_s: per-request deadline (gRPC) or socket timeout (HTTP); None waits forever.
        headers: extra headers / gRPC metadata for every request.
    """

    def __init__(self, url: str | None = None, protocol: str = "grpc", model: str = "paged_llm",
                 *, model_kind: str | None = None, timeout_s: float | None = None,
                 headers: dict[str, str] | None = None):
        self.protocol = protocol
        self.url = normalize_url(url, protocol)
        self.model = model
        self.timeout_s = timeout_s
        self.headers = dict(headers or {})
        self._model_kind = model_kind
        self._model_info: ModelInfo | None = None
        self._lock = threading.Lock()
        self._channel = None
        self._stub = None

    # -- plumbing ---------------------------------------------------------------------------
    def _grpc_stub(self):
        with self._lock:
            if self._stub is None:
                import grpc
                from tritonclient.grpc import service_pb2_grpc

                self._channel = grpc.insecure_channel(self.url, options=GRPC_CHANNEL_OPTIONS)
                self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
            return self._stub

    def _grpc_unary(self, method: str, request):
        import grpc

        try:
            return getattr(self._grpc_stub(), method)(
                request, metadata=tuple(self.headers.items()), timeout=self.timeout_s or 30.0)
        except grpc.RpcError as e:
            raise grpc_error(e, self.url) from None

    def _http_get(self, path: str) -> tuple[int, bytes]:
        parts = urllib.parse.urlsplit(self.url)
        conn_cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        conn = conn_cls(parts.hostname, parts.port, timeout=self.timeout_s or 30.0)
        try:
            conn.request("GET", path, headers=self.headers)
            response = conn.getresponse()
            return response.status, response.read()
        except (OSError, http.client.HTTPException) as e:
            raise ConnectionFailed(
                f"cannot connect to the Triton server at {self.url} (HTTP): {e}", url=self.url
            ) from None
        finally:
            conn.close()

    def model_info(self) -> ModelInfo:
        """The model's kind and inputs, read once from its config on the server."""
        if self._model_info is None:
            self._model_info = ModelInfo.from_config(self.model_config(), self._model_kind)
        return self._model_info

    def model_config(self) -> dict:
        """The model's configuration, as JSON."""
        if self.protocol == "grpc":
            from tritonclient.grpc import service_pb2

            response = self._grpc_unary("ModelConfig", service_pb2.ModelConfigRequest(name=self.model))
            return config_to_dict(response.config)
        status, body = self._http_get(f"/v2/models/{urllib.parse.quote(self.model)}/config")
        if status != 200:
            raise http_error_body(status, body, self.url)
        return json.loads(body)

    def _start(self, prompt: str, stream: bool, sampling: dict[str, Any]) -> _SyncCall:
        info = self.model_info()
        if self.protocol == "grpc":
            request = grpc_request(info, build_inputs(info, prompt, stream, sampling),
                                   request_id=uuid.uuid4().hex)
            return _GrpcCall(self._grpc_stub(), request, self.url, self.timeout_s, self.headers)
        body = build_http_body(info, prompt, stream, sampling)
        target = GenerateTarget(self.url, urllib.parse.quote(self.model))
        if stream:
            return _HttpStreamCall(target.generate_stream, body, self.timeout_s, self.headers, self.url)
        return _HttpGenerateCall(target.generate, body, self.timeout_s, self.headers, self.url)

    # -- public API -------------------------------------------------------------------------
    def generate(self, prompt: str, **sampling: Any) -> Completion:
        """Generate a completion (one final response from the server).

        Args:
            prompt: the prompt text.
            **sampling: max_tokens, temperature, top_p, top_k, min_p, seed, stop, stop_token_ids,
                ignore_eos, repetition_penalty, presence_penalty, frequency_penalty, min_tokens,
                logprobs, ... (for the ensemble: the ensemble's inputs, `stop` -> stop_words).
        Returns:
            the `Completion`.
        Raises:
            ClientError subclasses: InvalidArgument (with the server's message), Unavailable,
            ConnectionFailed (naming the URL), Cancelled, ServerError.
        """
        self.model_info()  # read once, outside the timed request
        start_s = time.perf_counter()
        with ChunkStream(self._start(prompt, False, sampling), start_s) as chunks:
            for _ in chunks:
                pass
        return chunks.completion

    def stream(self, prompt: str, **sampling: Any) -> TextStream:
        """Stream text deltas as the server produces them; `.completion` has the rest at the end."""
        self.model_info()  # read once, outside the timed request
        start_s = time.perf_counter()
        return TextStream(self._start(prompt, True, sampling), start_s)

    def stream_chunks(self, prompt: str, **sampling: Any) -> ChunkStream:
        """Stream `Chunk` objects (delta text, finish reason, token count increments)."""
        self.model_info()  # read once, outside the timed request
        start_s = time.perf_counter()
        return ChunkStream(self._start(prompt, True, sampling), start_s)

    def is_server_ready(self) -> bool:
        """True when the server answers and says it is ready; False when it says not ready."""
        if self.protocol == "grpc":
            from tritonclient.grpc import service_pb2

            return self._grpc_unary("ServerReady", service_pb2.ServerReadyRequest()).ready
        return self._http_get("/v2/health/ready")[0] == 200

    def is_server_live(self) -> bool:
        if self.protocol == "grpc":
            from tritonclient.grpc import service_pb2

            return self._grpc_unary("ServerLive", service_pb2.ServerLiveRequest()).live
        return self._http_get("/v2/health/live")[0] == 200

    def is_model_ready(self, model: str | None = None) -> bool:
        model = model or self.model
        if self.protocol == "grpc":
            from tritonclient.grpc import service_pb2

            try:
                return self._grpc_unary("ModelReady", service_pb2.ModelReadyRequest(name=model)).ready
            except ClientError as e:
                if isinstance(e, ConnectionFailed):
                    raise
                return False
        return self._http_get(f"/v2/models/{urllib.parse.quote(model)}/ready")[0] == 200

    def model_names(self) -> list[dict]:
        """The repository index: [{"name", "version", "state", "reason"}]."""
        if self.protocol == "grpc":
            from google.protobuf import json_format
            from tritonclient.grpc import service_pb2

            response = self._grpc_unary("RepositoryIndex", service_pb2.RepositoryIndexRequest())
            return [json_format.MessageToDict(m, preserving_proto_field_name=True)
                    for m in response.models]
        parts = urllib.parse.urlsplit(self.url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=self.timeout_s or 30.0)
        try:
            conn.request("POST", "/v2/repository/index", body=b"{}")
            response = conn.getresponse()
            body = response.read()
        except OSError as e:
            raise ConnectionFailed(
                f"cannot connect to the Triton server at {self.url} (HTTP): {e}", url=self.url
            ) from None
        finally:
            conn.close()
        if response.status != 200:
            raise error_from_http(response.status, body.decode(errors="replace"), self.url)
        return json.loads(body)

    def close(self) -> None:
        with self._lock:
            if self._channel is not None:
                self._channel.close()
            self._channel = self._stub = None

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.url!r}, protocol={self.protocol!r}, model={self.model!r})"

