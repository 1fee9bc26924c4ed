"""What the OpenAI front door adds: latency per request and per streamed token, vs direct gRPC.

    python -m benchmarks.openai_door --json door.json
    python -m benchmarks.openai_door --model smollm2 --num-pairs 20

A real tritonserver serves the model (default: the tiny random Llama, so that the engine's step
is short and the door's cost shows; `smollm2`: SmolLM2-135M-Instruct from its wheel). The door
runs as its own process, as `paged-triton serve --openai-port` runs it. One process measures,
one request at a time, alternating the two paths on the same request so drift hits both:

* direct: `AsyncClient` (paged_triton.client) over gRPC to paged_llm;
* door: an HTTP POST to the door's /v1/completions (aiohttp, no openai-library overhead),
  which makes the same gRPC call.

Per request: non-streaming, max_tokens=1 (the round trip). Per streamed token: streaming,
max_tokens=--stream-tokens with ignore_eos, (last token time - first token time) / (tokens - 1).
Reported: medians and p90 of each path, the door's added time (median of the per-pair
differences) and the door / direct ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time

from benchmarks.common import environment, write_json

PROMPT = "The quick brown fox jumps over the lazy dog. " * 4


def _p(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def _direct_request(client, max_tokens):
    start = time.perf_counter()
    c = await client.generate(PROMPT, max_tokens=max_tokens, temperature=0, ignore_eos=True)
    assert c.num_output_tokens == max_tokens, c
    return time.perf_counter() - start


async def _door_request(session, url, max_tokens):
    start = time.perf_counter()
    async with session.post(url + "/v1/completions", json={
            "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True}) as r:
        body = await r.json()
    assert body["usage"]["completion_tokens"] == max_tokens, body
    return time.perf_counter() - start


async def _direct_stream(client, max_tokens):
    """(time to first token, seconds per token after the first)."""
    start = time.perf_counter()
    first = last = None
    async for chunk in client.stream_chunks(PROMPT, max_tokens=max_tokens, temperature=0,
                                            ignore_eos=True):
        if chunk.text:
            last = time.perf_counter()
            first = first or last
    return first - start, (last - first) / (max_tokens - 1)


async def _door_stream(session, url, max_tokens):
    start = time.perf_counter()
    first = last = None
    async with session.post(url + "/v1/completions", json={
            "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}) as r:
        async for line in r.content:
            if line.startswith(b"data: {"):
                if json.loads(line[6:])["choices"][0]["text"]:
                    last = time.perf_counter()
                    first = first or last
    return first - start, (last - first) / (max_tokens - 1)


def _summary(direct, door) -> dict:
    added = [b - a for a, b in zip(direct, door)]
    return {"direct_median_ms": 1e3 * statistics.median(direct),
            "direct_p90_ms": 1e3 * _p(direct, 0.9),
            "door_median_ms": 1e3 * statistics.median(door), "door_p90_ms": 1e3 * _p(door, 0.9),
            "added_median_ms": 1e3 * statistics.median(added),
            "ratio_door_over_direct": statistics.median(door) / statistics.median(direct)}


async def measure(grpc_url: str, door_url: str, num_pairs: int, stream_tokens: int) -> dict:
    import aiohttp

    from paged_triton.client.async_client import AsyncClient

    client = AsyncClient(grpc_url)
    async with aiohttp.ClientSession() as session:
        for _ in range(3):  # warm-up: channels, model info, the door's first request
            await _direct_request(client, 1)
            await _door_request(session, door_url, 1)
            await _direct_stream(client, 4)
            await _door_stream(session, door_url, 4)
        req_direct, req_door = [], []
        ttft_direct, ttft_door, tok_direct, tok_door = [], [], [], []
        for i in range(num_pairs):
            # Alternate which path goes first, so neither always follows the other.
            order = [0, 1] if i % 2 == 0 else [1, 0]
            for which in order:
                if which == 0:
                    req_direct.append(await _direct_request(client, 1))
                else:
                    req_door.append(await _door_request(session, door_url, 1))
            for which in order:
                if which == 0:
                    ttft, per_token = await _direct_stream(client, stream_tokens)
                    ttft_direct.append(ttft)
                    tok_direct.append(per_token)
                else:
                    ttft, per_token = await _door_stream(session, door_url, stream_tokens)
                    ttft_door.append(ttft)
                    tok_door.append(per_token)
    await client.close()
    return {"per_request_max_tokens_1": _summary(req_direct, req_door),
            "stream_time_to_first_token": _summary(ttft_direct, ttft_door),
            "stream_per_token": _summary(tok_direct, tok_door)}


def run(args) -> dict:
    from paged_engine.deploy.openai_door import OpenAIDoor
    from paged_engine.deploy.repository import prepare_model_repository, tokenizer_dir_for
    from paged_engine.deploy.tritonserver import TritonServer, free_port

    work = tempfile.mkdtemp(prefix="openai-door-bench.")
    if args.model == "tiny":
        from paged_engine.deploy.tiny_model import make_tiny_model

        model = make_tiny_model(f"{work}/model", arch="llama", tokenizer="byte_level")
    elif args.model == "smollm2":
        from paged_engine.deploy.default_model import smollm2_gguf

        model = smollm2_gguf()
    else:
        model = args.model
    engine_args = dict(num_kv_blocks=256, max_model_len=2048, max_num_seqs=8)
    repo = prepare_model_repository(f"{work}/repo", model, **engine_args)
    server = TritonServer(repo, log_file=f"{work}/server.log",
                          extra_args=["--exit-timeout-secs=1"]).start(timeout_s=600)
    door = OpenAIDoor(free_port(), server.grpc_url, server.metrics_url, host="127.0.0.1",
                      tokenizer=tokenizer_dir_for(model, engine_args), log_requests=False)
    try:
        door.start()
        results = asyncio.run(measure(server.grpc_url, door.base_url[: -len("/v1")],
                                      args.num_pairs, args.stream_tokens))
    finally:
        door.stop()
        server.stop()
    return {"benchmark": "openai_door", "model": args.model, "num_pairs": args.num_pairs,
            "stream_tokens": args.stream_tokens, "environment": environment("cpu"), **results}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny", help="tiny | smollm2 | a model dir or .gguf")
    p.add_argument("--num-pairs", type=int, default=40)
    p.add_argument("--stream-tokens", type=int, default=64)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    doc = run(args)
    for key in ("per_request_max_tokens_1", "stream_time_to_first_token", "stream_per_token"):
        s = doc[key]
        print(f"{key:28s} direct {s['direct_median_ms']:8.2f} ms (p90 {s['direct_p90_ms']:.2f})"
              f"  door {s['door_median_ms']:8.2f} ms (p90 {s['door_p90_ms']:.2f})"
              f"  added {s['added_median_ms']:+.2f} ms  ratio {s['ratio_door_over_direct']:.2f}")
    write_json(args.json, doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
