"""Client library for paged-triton: sync and asyncio clients, CLI, load generator, OpenAI front door."""

from paged_triton.client.async_client import AsyncClient
from paged_triton.client.client import ChunkStream, Client, TextStream
from paged_triton.client.errors import (
    Cancelled,
    ClientError,
    ConnectionFailed,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    ServerError,
    Unavailable,
)
from paged_triton.client.protocol import Chunk, Completion

__all__ = [
    "AsyncClient", "Cancelled", "Chunk", "ChunkStream", "Client", "ClientError", "Completion",
    "ConnectionFailed", "DeadlineExceeded", "InvalidArgument", "NotFound", "ServerError",
    "TextStream", "Unavailable",
]
