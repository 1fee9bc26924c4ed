"""Errors of the OpenAI front door in OpenAI's shape: `{"error": {message, type, param, code}}`.

The `param` names the request field at fault, as OpenAI's and vLLM's servers do, so a client
(and a person reading its exception) sees which argument to fix.
"""

from __future__ import annotations

from typing import Any

from paged_triton.client.errors import (
    Cancelled,
    ClientError,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    Unavailable,
)


class OpenAIError(Exception):
    """An error answered in OpenAI's shape with an HTTP status."""

    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


def unsupported(param: str, message: str | None = None) -> OpenAIError:
    return OpenAIError(400, message or f"'{param}' is not supported", param=param,
                       code="unsupported_parameter")


# Engine messages name the sampling field ("bad sampling parameters: temperature must be ...");
# the OpenAI name of the field it came from is the `param` a client expects.
_ENGINE_FIELDS = (
    ("max_tokens", "max_tokens"), ("min_tokens", "min_tokens"), ("temperature", "temperature"),
    ("top_p", "top_p"), ("top_k", "top_k"), ("min_p", "min_p"), ("seed", "seed"),
    ("repetition_penalty", "repetition_penalty"), ("presence_penalty", "presence_penalty"),
    ("frequency_penalty", "frequency_penalty"), ("prompt_logprobs", "logprobs"),
    ("logprobs", "logprobs"), ("logit_bias", "logit_bias"), ("stop_token_ids", "stop_token_ids"),
    ("bad_words", "bad_words"), ("structured_outputs", "response_format"),
)


def _param_of(message: str) -> str | None:
    for needle, param in _ENGINE_FIELDS:
        if needle in message:
            return param
    return None


def error_from_client(e: ClientError) -> OpenAIError:
    """Map a Triton client error to the OpenAI status and type (the field named where the
    engine's message names one)."""
    if isinstance(e, NotFound):
        return OpenAIError(404, e.message, type_="not_found_error", code="model_not_found")
    if isinstance(e, InvalidArgument):
        return OpenAIError(400, e.message, type_="invalid_request_error",
                           param=_param_of(e.message))
    if isinstance(e, Unavailable):
        return OpenAIError(503, e.message, type_="service_unavailable", code="unavailable")
    if isinstance(e, DeadlineExceeded):
        return OpenAIError(504, e.message, type_="timeout", code="timeout")
    if isinstance(e, Cancelled):
        return OpenAIError(499, e.message, type_="cancelled", code="cancelled")
    return OpenAIError(500, e.message, type_="server_error", code="internal_error")
