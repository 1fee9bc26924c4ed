"""Typed exceptions for everything the client can fail with.

Each carries the server's own message (`.message`), the transport's status (`.status`: the gRPC
code name such as "INVALID_ARGUMENT", or the HTTP status as a string) and the URL it talked to.
Catch `ClientError` for all of them; `ConnectionFailed` is an `Unavailable`, so code that retries
on an unavailable server also retries on one it cannot reach.
"""

from __future__ import annotations


class ClientError(Exception):
    """Base class: a request to the Triton server failed.

    Attributes:
        message: the server's message (or ours, for client-side failures).
        status: gRPC status code name or HTTP status code, as a string; None when local.
        url: the server URL the client talked to.
    """

    def __init__(self, message: str, *, status: str | None = None, url: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.url = url

    def __str__(self) -> str:
        return self.message


class InvalidArgument(ClientError):
    """The server (or the client, before sending) rejected the request's inputs."""


class NotFound(InvalidArgument):
    """The model (or version) does not exist on the server."""


class Cancelled(ClientError):
    """The request was cancelled, by this client or by the server."""


class Unavailable(ClientError):
    """The server or the model is not ready (e.g. the engine died)."""


class ConnectionFailed(Unavailable):
    """No connection to the server: the message names the URL."""


class DeadlineExceeded(ClientError):
    """The request ran past its deadline."""


class ServerError(ClientError):
    """Any other failure inside the server (INTERNAL, UNKNOWN, ...)."""


# gRPC status code names (grpc.StatusCode.X.name) -> exception class.
_GRPC_CODE_TO_ERROR: dict[str, type[ClientError]] = {
    "INVALID_ARGUMENT": InvalidArgument,
    "OUT_OF_RANGE": InvalidArgument,
    "FAILED_PRECONDITION": InvalidArgument,
    "NOT_FOUND": NotFound,
    "CANCELLED": Cancelled,
    "UNAVAILABLE": Unavailable,
    "DEADLINE_EXCEEDED": DeadlineExceeded,
}

_HTTP_STATUS_TO_ERROR: dict[int, type[ClientError]] = {
    400: InvalidArgument,
    404: NotFound,
    408: DeadlineExceeded,
    499: Cancelled,
    503: Unavailable,
    504: DeadlineExceeded,
}


def error_from_grpc(code_name: str, message: str, url: str | None = None) -> ClientError:
    """The exception for a gRPC status (code name as in `grpc.StatusCode.INVALID_ARGUMENT.name`)."""
    code_name = code_name.rsplit(".", 1)[-1].upper()
    cls = _GRPC_CODE_TO_ERROR.get(code_name, ServerError)
    if cls is Unavailable and _looks_like_connection_failure(message):
        return ConnectionFailed(
            f"cannot connect to the Triton server at {url} (gRPC): {message}", status=code_name, url=url
        )
    return cls(message, status=code_name, url=url)


def error_from_http(status: int, message: str, url: str | None = None) -> ClientError:
    """The exception for an HTTP error status with the server's message."""
    cls = _HTTP_STATUS_TO_ERROR.get(status)
    if cls is None:
        cls = InvalidArgument if 400 <= status < 500 else ServerError
    return cls(message, status=str(status), url=url)


def error_from_message(message: str, url: str | None = None) -> ClientError:
    """The exception for an error that arrives without a status code.

    Triton's HTTP generate_stream reports an error after the stream has started as a
    `data: {"error": ...}` event with no status; classify it by its text.
    """
    lowered = message.lower()
    if "cancel" in lowered:
        return Cancelled(message, url=url)
    if "unavailable" in lowered or "not ready" in lowered:
        return Unavailable(message, url=url)
    return ServerError(message, url=url)


def _looks_like_connection_failure(message: str) -> bool:
    lowered = message.lower()
    return any(
        marker in lowered
        for marker in ("failed to connect", "connection refused", "connect failed", "dns resolution",
                       "name resolution", "socket closed", "connection reset", "no route")
    )
