"""A stand-in for `AsyncClient` in the OpenAI door's tests that need no Triton server: streams of
scripted `Chunk`s, folded into a completion as the real client does."""

import asyncio

from paged_triton.client.protocol import Chunk, CompletionBuilder


class FakeStream:
    def __init__(self, chunks, error=None):
        self._chunks, self._error = list(chunks), error
        self._builder = CompletionBuilder()
        self.cancelled = False

    @property
    def completion(self):
        return self._builder.completion

    def __aiter__(self):
        return self

    async def __anext__(self):
        await asyncio.sleep(0)
        if self._error is not None:
            raise self._error
        if not self._chunks:
            self._builder.finish()
            raise StopAsyncIteration
        c = self._chunks.pop(0)
        self._builder.add(c)
        return c

    def cancel(self):
        self.cancelled = True


class FakeClientBase:
    """Records each request in `calls`; subclasses say what a prompt streams back (`chunks_for`)."""

    model = "paged_llm"

    def __init__(self):
        self.calls = []

    def chunks_for(self, prompt, **sampling) -> FakeStream:
        raise NotImplementedError

    def stream_chunks(self, prompt, **sampling):
        self.calls.append((prompt, sampling))
        return self.chunks_for(prompt, **sampling)

    async def generate(self, prompt, **sampling):
        s = self.stream_chunks(prompt, **sampling)
        async for _ in s:
            pass
        return s.completion

    async def is_model_ready(self):
        return True

    async def close(self):
        pass


__all__ = ["Chunk", "FakeClientBase", "FakeStream"]
