"""Transport details shared by the sync and asyncio clients: gRPC messages, SSE, URLs.

gRPC: every request, streaming or not, goes over one `ModelStreamInfer` bidi call of its own
(the engine model is decoupled, and unary ModelInfer refuses decoupled models). The request asks
for an empty final response (`triton_enable_empty_final_response`) so the client always sees the
final flag, and the call carries the `triton_grpc_error: true` header so that an error ends the
call with its real gRPC status code (INVALID_ARGUMENT, ...) instead of a bare message string.
Cancelling the call is how a request is cancelled on the server.

HTTP: Triton's generate extension; `/generate_stream` answers with Server-Sent Events.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from paged_triton.client.errors import ClientError, error_from_http, error_from_message
from paged_triton.client.protocol import Chunk, ModelInfo, TensorValue, parse_outputs

GRPC_METADATA = (("triton_grpc_error", "true"),)
GRPC_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 2**31 - 1),
    ("grpc.max_receive_message_length", 2**31 - 1),
]

_CONTENTS_FIELD = {
    "BYTES": "bytes_contents", "BOOL": "bool_contents", "INT8": "int_contents",
    "INT16": "int_contents", "INT32": "int_contents", "INT64": "int64_contents",
    "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents",
}


def default_url(protocol: str) -> str:
    return "localhost:8001" if protocol == "grpc" else "localhost:8000"


def normalize_url(url: str | None, protocol: str) -> str:
    """host:port for gRPC; http(s)://host:port for HTTP (scheme added when missing)."""
    if protocol not in ("grpc", "http"):
        raise ValueError(f"protocol must be 'grpc' or 'http', got {protocol!r}")
    url = (url or default_url(protocol)).rstrip("/")
    if protocol == "grpc":
        for scheme in ("grpc://", "http://"):
            if url.startswith(scheme):
                url = url[len(scheme):]
        return url
    return url if url.startswith(("http://", "https://")) else "http://" + url


def grpc_request(model: ModelInfo, tensors: list[TensorValue], request_id: str = ""):
    """A `ModelInferRequest` protobuf for the tensors."""
    from tritonclient.grpc import service_pb2

    request = service_pb2.ModelInferRequest(model_name=model.name, id=request_id)
    for tensor in tensors:
        inp = request.inputs.add()
        inp.name = tensor.name
        inp.datatype = tensor.datatype
        inp.shape.extend(tensor.shape)
        values = tensor.values
        if tensor.datatype == "BYTES":
            values = [v if isinstance(v, bytes) else str(v).encode("utf-8") for v in values]
        getattr(inp.contents, _CONTENTS_FIELD[tensor.datatype]).extend(values)
    request.parameters["triton_enable_empty_final_response"].bool_param = True
    return request


def grpc_parse_response(response, url: str | None = None) -> tuple[Chunk | None, bool]:
    """(chunk or None for an empty response, is_final) from a `ModelStreamInferResponse`."""
    from tritonclient.grpc import InferResult

    if response.error_message:
        raise error_from_message(response.error_message, url)
    infer_response = response.infer_response
    final = infer_response.parameters["triton_final_response"].bool_param \
        if "triton_final_response" in infer_response.parameters else False
    if not infer_response.outputs:
        return None, final
    result = InferResult(infer_response)
    outputs = {out.name: result.as_numpy(out.name) for out in infer_response.outputs}
    return parse_outputs(outputs), final


def grpc_error(rpc_error, url: str) -> ClientError:
    """A typed error from a `grpc.RpcError` (sync or aio)."""
    from paged_triton.client.errors import error_from_grpc

    code = rpc_error.code()
    name = code.name if code is not None else "UNKNOWN"
    return error_from_grpc(name, rpc_error.details() or str(rpc_error), url)


def config_to_dict(config_proto) -> dict:
    """A gRPC `ModelConfig` as the JSON the HTTP `/config` endpoint returns."""
    from google.protobuf import json_format

    return json_format.MessageToDict(config_proto, preserving_proto_field_name=True)


class SSEParser:
    """Incremental Server-Sent Events parser: feed lines, get each event's data when it completes.

    Follows the SSE rules that matter here: `data:` lines of one event are joined with newlines,
    an empty line ends the event, lines starting with ':' are comments, and a single space after
    the colon is dropped.
    """

    def __init__(self):
        self._data: list[str] = []

    def feed_line(self, line: str | bytes) -> str | None:
        """One line (with or without its newline); returns the event's data when it ends."""
        if isinstance(line, bytes):
            line = line.decode("utf-8")
        line = line.rstrip("\r\n")
        if not line:
            return self.flush()
        if line.startswith(":"):
            return None
        field, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if field == "data":
            self._data.append(value)
        return None

    def flush(self) -> str | None:
        """The pending event, if any (call at end of stream)."""
        if not self._data:
            return None
        data = "\n".join(self._data)
        self._data = []
        return data


def http_event_chunk(data: str, url: str | None = None) -> Chunk:
    """A `Chunk` from one generate_stream event's data; raises the error an error event carries."""
    try:
        event = json.loads(data)
    except ValueError:
        raise error_from_message(f"malformed event from the server: {data[:200]!r}", url) from None
    if isinstance(event, dict) and "error" in event:
        raise error_from_message(str(event["error"]), url)
    return parse_outputs(event)


def http_error_body(status: int, body: bytes, url: str | None = None) -> ClientError:
    """The error for a non-200 generate / generate_stream answer (JSON or SSE body)."""
    text = body.decode("utf-8", errors="replace").strip()
    message = text
    candidates = [text] + [ln[5:].strip() for ln in text.splitlines() if ln.startswith("data:")]
    for candidate in candidates:
        try:
            parsed: Any = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(parsed, dict) and "error" in parsed:
            message = str(parsed["error"])
            break
    return error_from_http(status, message or f"HTTP {status}", url)


@dataclass
class GenerateTarget:
    """The HTTP paths of a model's generate endpoints."""

    base_url: str
    model: str

    @property
    def generate(self) -> str:
        return f"{self.base_url}/v2/models/{self.model}/generate"

    @property
    def generate_stream(self) -> str:
        return f"{self.base_url}/v2/models/{self.model}/generate_stream"
