"""Client and AsyncClient against a real tritonserver: gRPC and HTTP, paged_llm and ensemble,
streaming, counts, error mapping, and cancellation reaching the engine (KV blocks freed)."""

from __future__ import annotations

import asyncio
import time

import pytest

from paged_triton.client import (
    AsyncClient,
    Client,
    ConnectionFailed,
    InvalidArgument,
    NotFound,
)

pytestmark = pytest.mark.server

PROMPT = "The paged attention kernel reads"
GREEDY = {"temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def urls(llm_server):
    return {"grpc": llm_server.grpc_url, "http": llm_server.http_url}


@pytest.fixture(scope="module")
def reference(urls):
    """Greedy completion over gRPC, non-streaming: what every other path must reproduce."""
    with Client(urls["grpc"]) as c:
        return c.generate(PROMPT, max_tokens=12, **GREEDY)


def test_generate_reports_counts_and_finish_reason(reference, tiny_model_dir):
    from transformers import AutoTokenizer

    assert reference.text
    assert reference.finish_reason == "length"
    assert reference.num_output_tokens == 12
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert reference.num_input_tokens == len(tok(PROMPT).input_ids)
    assert 0 < reference.ttft_s <= reference.latency_s


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_stream_and_generate_agree_on_both_protocols(urls, reference, protocol):
    with Client(urls[protocol], protocol=protocol) as c:
        with c.stream(PROMPT, max_tokens=12, **GREEDY) as s:
            deltas = list(s)
        assert "".join(deltas) == reference.text
        assert len(deltas) > 1  # streamed, not one final blob
        assert s.completion.finish_reason == "length"
        assert s.completion.num_output_tokens == 12  # sum of per-response increments
        assert s.completion.num_input_tokens == reference.num_input_tokens
        again = c.generate(PROMPT, max_tokens=12, **GREEDY)
        assert (again.text, again.finish_reason, again.num_output_tokens) == \
            (reference.text, "length", 12)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_ensemble_matches_engine_model(urls, reference, protocol):
    with Client(urls[protocol], protocol=protocol, model="ensemble") as c:
        assert c.model_info().kind == "trtllm"
        text = "".join(c.stream(PROMPT, max_tokens=12, temperature=0.0))
        whole = c.generate(PROMPT, max_tokens=12, temperature=0.0)
    # No ignore_eos input on the ensemble: the greedy text may stop early at EOS.
    assert reference.text.startswith(text) and text
    assert whole.text == text


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("stream", [False, True])
def test_bad_sampling_parameter_is_invalid_argument_with_server_message(urls, protocol, stream):
    with Client(urls[protocol], protocol=protocol) as c:
        with pytest.raises(InvalidArgument) as e:
            if stream:
                list(c.stream(PROMPT, max_tokens=4, temperature=-1.0))
            else:
                c.generate(PROMPT, max_tokens=4, temperature=-1.0)
        assert "temperature" in e.value.message
        with pytest.raises(InvalidArgument) as e:
            c.generate(PROMPT, bogus_knob=3)
        assert "bogus_knob" in e.value.message
        # the server is fine afterwards
        assert c.generate(PROMPT, max_tokens=2, **GREEDY).num_output_tokens == 2


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_unknown_model_and_unreachable_server(urls, protocol):
    with pytest.raises(NotFound):
        Client(urls[protocol], protocol=protocol, model="no_such_model").generate("x")
    with pytest.raises(ConnectionFailed) as e:
        Client("127.0.0.1:9", protocol=protocol, timeout_s=5).generate("x")
    assert "127.0.0.1:9" in str(e.value)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_closing_a_stream_cancels_the_request_and_frees_blocks(engine_metrics, urls, protocol):
    engine_metrics.wait_idle()
    with Client(urls[protocol], protocol=protocol) as c:
        stream = c.stream(PROMPT * 4, max_tokens=900, **GREEDY)
        for i, _ in enumerate(stream):
            if i == 2:
                break
        assert engine_metrics.wait("vllm:kv_cache_blocks_used", lambda v: v > 0) > 0
        start = time.monotonic()
        stream.close()
        engine_metrics.wait_idle()
        # freed long before the 900 tokens could have been generated
        assert time.monotonic() - start < 10
        assert stream.completion.num_output_tokens < 900


def test_cancelling_an_async_task_cancels_the_request(engine_metrics, urls):
    engine_metrics.wait_idle()

    async def main():
        async with AsyncClient(urls["grpc"]) as c:
            got = []

            async def consume():
                async for delta in c.stream(PROMPT * 4, max_tokens=900, **GREEDY):
                    got.append(delta)

            task = asyncio.create_task(consume())
            while len(got) < 3:
                await asyncio.sleep(0.01)
            assert await asyncio.to_thread(
                engine_metrics.wait, "vllm:kv_cache_blocks_used", lambda v: v > 0) > 0
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return len(got)

    assert asyncio.run(main()) >= 3
    engine_metrics.wait_idle()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_async_client_many_concurrent_streams(urls, reference, protocol):
    async def main():
        async with AsyncClient(urls[protocol], protocol=protocol) as c:
            async def one(i):
                async with c.stream(PROMPT, max_tokens=12 - i % 3, **GREEDY) as s:
                    text = "".join([d async for d in s])
                return text, s.completion

            results = await asyncio.gather(*(one(i) for i in range(8)))
            whole = await c.generate(PROMPT, max_tokens=12, **GREEDY)
            return results, whole

    results, whole = asyncio.run(main())
    assert whole.text == reference.text
    for i, (text, completion) in enumerate(results):
        assert completion.num_output_tokens == 12 - i % 3
        assert completion.finish_reason == "length"
        assert reference.text.startswith(text)  # greedy: a shorter run is a prefix
    assert results[0][0] == reference.text


def test_async_errors_are_typed(urls):
    async def main():
        async with AsyncClient(urls["grpc"]) as c:
            with pytest.raises(InvalidArgument, match="temperature"):
                await c.generate(PROMPT, temperature=-1.0)
        async with AsyncClient(urls["http"], protocol="http") as c:
            with pytest.raises(InvalidArgument, match="temperature"):
                async for _ in c.stream(PROMPT, temperature=-1.0):
                    pass

    asyncio.run(main())


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_stop_list_reaches_the_engine(urls, reference, protocol):
    import re

    match = re.search(r"[A-Za-z0-9]{2}", reference.text)
    if match is None:
        pytest.skip("the reference text has no ASCII pair to stop on")
    stop = match.group(0)
    expected = reference.text[: reference.text.find(stop)]
    with Client(urls[protocol], protocol=protocol) as c:
        # a list (JSON inside sampling_parameters on gRPC, a JSON string parameter on HTTP)
        got = c.generate(PROMPT, max_tokens=12, stop=["\x00never", stop], **GREEDY)
        streamed = c.stream(PROMPT, max_tokens=12, stop=stop, **GREEDY)
        text = "".join(streamed)
    assert (got.text, got.finish_reason) == (expected, "stop")
    assert (text, streamed.completion.finish_reason) == (expected, "stop")
