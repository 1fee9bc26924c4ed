"""SSE parsing, error mapping and URL handling (no server)."""

import pytest

from paged_triton.client.errors import (
    Cancelled,
    ClientError,
    ConnectionFailed,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    ServerError,
    Unavailable,
    error_from_grpc,
    error_from_http,
    error_from_message,
)
from paged_triton.client.protocol import ModelInfo, build_inputs
from paged_triton.client.wire import SSEParser, grpc_parse_response, grpc_request, http_error_body, http_event_chunk, normalize_url


def test_sse_parser_events_comments_multiline_and_crlf():
    p = SSEParser()
    lines = [b": keep-alive\n", b"data: {\"a\": 1}\r\n", b"\r\n", b"data:x\n", b"data: y\n", b"\n",
             b"event: ignored\n", b"data: tail"]
    events = [e for e in (p.feed_line(ln) for ln in lines) if e is not None]
    assert events == ['{"a": 1}', "x\ny"]
    assert p.flush() == "tail" and p.flush() is None


def test_http_events_to_chunks_and_errors():
    c = http_event_chunk('{"model_name": "m", "text_output": "hi", "num_output_tokens": 1}')
    assert c.text == "hi" and c.num_output_tokens == 1
    with pytest.raises(Cancelled):
        http_event_chunk('{"error": "request was cancelled"}')
    with pytest.raises(ServerError, match="boom"):
        http_event_chunk('{"error": "boom"}')
    with pytest.raises(ServerError, match="malformed"):
        http_event_chunk("not json")


@pytest.mark.parametrize("status,cls", [(400, InvalidArgument), (404, NotFound), (503, Unavailable),
                                        (500, ServerError), (504, DeadlineExceeded), (499, Cancelled),
                                        (422, InvalidArgument)])
def test_http_status_mapping(status, cls):
    err = http_error_body(status, b'{"error": "the server says no"}', "http://h:1")
    assert type(err) is cls and err.message == "the server says no" and err.status == str(status)
    assert err.url == "http://h:1"
    sse = http_error_body(status, b'data: {"error": "in sse"}\n\n')
    assert sse.message == "in sse" and type(sse) is cls


@pytest.mark.parametrize("code,cls", [("INVALID_ARGUMENT", InvalidArgument), ("NOT_FOUND", NotFound),
                                      ("CANCELLED", Cancelled), ("UNAVAILABLE", Unavailable),
                                      ("DEADLINE_EXCEEDED", DeadlineExceeded), ("INTERNAL", ServerError),
                                      ("StatusCode.UNKNOWN", ServerError)])
def test_grpc_code_mapping(code, cls):
    err = error_from_grpc(code, "msg", "h:1")
    assert type(err) is cls and str(err) == "msg" and isinstance(err, ClientError)


def test_connection_failure_names_the_url():
    err = error_from_grpc("UNAVAILABLE", "failed to connect to all addresses", "myhost:8001")
    assert isinstance(err, ConnectionFailed) and isinstance(err, Unavailable)
    assert "myhost:8001" in str(err)
    assert type(error_from_http(503, "model not ready")) is Unavailable
    assert type(error_from_message("model is not ready")) is Unavailable


def test_normalize_url():
    assert normalize_url(None, "grpc") == "localhost:8001"
    assert normalize_url(None, "http") == "http://localhost:8000"
    assert normalize_url("http://h:9/", "grpc") == "h:9"
    assert normalize_url("h:9", "http") == "http://h:9"
    with pytest.raises(ValueError):
        normalize_url("h:1", "tcp")


def test_grpc_request_and_response_roundtrip():
    from tritonclient.grpc import service_pb2

    info = ModelInfo.default("ensemble")
    req = grpc_request(info, build_inputs(info, "héllo", True, {"max_tokens": 3, "temperature": 0.5,
                                                                "stop": ["x"]}), "rid")
    assert req.model_name == "ensemble" and req.id == "rid"
    assert req.parameters["triton_enable_empty_final_response"].bool_param
    inputs = {i.name: i for i in req.inputs}
    assert inputs["text_input"].contents.bytes_contents[0].decode() == "héllo"
    assert list(inputs["max_tokens"].contents.int_contents) == [3]
    assert inputs["temperature"].contents.fp32_contents[0] == pytest.approx(0.5)

    resp = service_pb2.ModelStreamInferResponse()
    out = resp.infer_response.outputs.add()
    out.name, out.datatype = "text_output", "BYTES"
    out.shape.append(1)
    text = "é".encode()
    resp.infer_response.raw_output_contents.append(len(text).to_bytes(4, "little") + text)
    chunk, final = grpc_parse_response(resp)
    assert chunk.text == "é" and final is False

    empty = service_pb2.ModelStreamInferResponse()
    empty.infer_response.parameters["triton_final_response"].bool_param = True
    assert grpc_parse_response(empty) == (None, True)
    err = service_pb2.ModelStreamInferResponse(error_message="cancelled by the engine")
    with pytest.raises(Cancelled):
        grpc_parse_response(err)
