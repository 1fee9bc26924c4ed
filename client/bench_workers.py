"""`paged-client bench --workers N`: the same workload sent from N client processes.

One Python process parses a few thousand streamed responses per second (gRPC and the tensor
decoding cost a fraction of a millisecond each), which is less than a fast server streams. Each
worker process sends every N-th request of the workload at that request's own arrival time, so
together they keep exactly the single-process schedule; a concurrency limit is divided among
them. They start on one clock: `time.perf_counter()` is CLOCK_MONOTONIC, shared by every process
on Linux. The parent collects the per-request results and computes the metrics as one run.
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import queue
import time
import traceback
from typing import Any

from paged_triton.client.bench import BenchRequest, BenchResult, compute_metrics, run_benchmark


def split_concurrency(max_concurrency: int | None, workers: int) -> list[int | None]:
    """Each worker's share of the concurrency limit (None: unbounded)."""
    if max_concurrency is None:
        return [None] * workers
    if max_concurrency < workers:
        raise ValueError(f"--max-concurrency {max_concurrency} is below --workers {workers}: "
                         "every worker needs at least one request in flight")
    base, extra = divmod(max_concurrency, workers)
    return [base + (1 if w < extra else 0) for w in range(workers)]


def _worker(w: int, client_kwargs: dict, requests: list[BenchRequest], indices: list[int],
            run_kwargs: dict, events, go) -> None:
    from paged_triton.client.async_client import AsyncClient

    async def main():
        async with AsyncClient(**client_kwargs) as client:
            await client.model_info()
            events.put(("ready", w, None))
            start_at = await asyncio.get_running_loop().run_in_executor(None, go.get)
            result = await run_benchmark(client, requests, indices=indices, start_at=start_at,
                                         **run_kwargs)
            return result.results, time.perf_counter()

    try:
        events.put(("done", w, asyncio.run(main())))
    except BaseException:  # the parent reports it; a worker never hangs the run
        events.put(("error", w, traceback.format_exc()))


def run_benchmark_workers(client_kwargs: dict[str, Any], requests: list[BenchRequest], *,
                          workers: int, request_rate: float = math.inf,
                          max_concurrency: int | None = None, sampling: dict[str, Any] | None = None,
                          seed: int = 0, timeout_s: float = 3600.0) -> BenchResult:
    """`run_benchmark` spread over `workers` processes.

    Args:
        client_kwargs: `AsyncClient` keyword arguments (url, protocol, model, timeout_s, ...).
        timeout_s: give up (and stop the workers) after this long.
    Returns:
        One BenchResult over all requests, results in workload order.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    shares = split_concurrency(max_concurrency, workers)
    ctx = multiprocessing.get_context("spawn")  # the parent may hold gRPC state: no fork
    events, gos = ctx.Queue(), [ctx.Queue() for _ in range(workers)]
    parts = [list(range(w, len(requests), workers)) for w in range(workers)]
    procs = [ctx.Process(target=_worker, daemon=True, name=f"bench-worker-{w}", args=(
        w, client_kwargs, requests, parts[w],
        {"request_rate": request_rate, "max_concurrency": shares[w], "sampling": sampling,
         "seed": seed}, events, gos[w])) for w in range(workers)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    try:
        def next_event():
            while True:
                try:
                    kind, w, payload = events.get(timeout=1.0)
                except queue.Empty:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"bench workers did not finish in {timeout_s:.0f} s") from None
                    dead = [p.name for p in procs if p.exitcode not in (None, 0)]
                    if dead:
                        raise RuntimeError(f"bench worker process died: {', '.join(dead)}")
                    continue
                if kind == "error":
                    raise RuntimeError(f"bench worker {w} failed:\n{payload}")
                return kind, w, payload

        for _ in procs:
            next_event()  # "ready": connected, model info fetched
        start_at = time.perf_counter() + 0.05
        for go in gos:
            go.put(start_at)
        results: list = [None] * len(requests)
        end = start_at
        for _ in procs:
            _, w, (worker_results, worker_end) = next_event()
            for i, r in zip(parts[w], worker_results):
                results[i] = r
            end = max(end, worker_end)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join(5)
    metrics = compute_metrics(results, end - start_at)
    metrics["request_rate"] = request_rate if not math.isinf(request_rate) else "inf"
    metrics["max_concurrency"] = max_concurrency
    metrics["workers"] = workers
    return BenchResult(metrics, results)
