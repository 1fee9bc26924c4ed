"""How long a running stream stalls while oversized prompts arrive (issue 20).

    python -m benchmarks.stall --json stall.json
    python -m benchmarks.stall --prompt-mb 5.4 --num-oversized 10 --model paged_llm

A real tritonserver serves the tiny random Llama (CPU is fine: the question is whether one
request holds up the others, not speed). One paged_llm stream runs (ignore_eos); after a quiet
baseline window, `--num-oversized` requests with a prompt of `--prompt-mb` MB each arrive at once
(each on its own gRPC channel, to `--model`). Reported: the largest gap between two responses of
the running stream in the baseline window and in the window from the first oversized request
until the last one was answered (plus half a second), their ratio, and how each oversized request
was answered and how long that took. Target: the largest gap while they arrive < 50 ms.
`--model frontend` is the control: the same bytes sent where tritonserver refuses them itself.
"""

from __future__ import annotations

import argparse
import json
import queue
import statistics
import threading
import time

import numpy as np

from benchmarks.common import environment, tiny_triton_server, write_json


def _tensor(name, array):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    datatype = "BYTES" if array.dtype == np.object_ else np_to_triton_dtype(array.dtype)
    t = grpcclient.InferInput(name, list(array.shape), datatype)
    t.set_data_from_numpy(array)
    return t


def _one_request(url: str, model: str, tensors: list, timeout_s: float) -> tuple[str, float]:
    """(outcome, seconds) of one request on its own channel: "ok" or the error message."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        return _send(client, model, tensors, timeout_s)
    finally:
        client.close()


def _send(client, model: str, tensors: list, timeout_s: float) -> tuple[str, float]:
    """(outcome, seconds) of one streamed request on `client`'s channel until its final response."""
    done: queue.Queue = queue.Queue()
    start = time.monotonic()
    client.start_stream(callback=lambda result, error: done.put(error))
    client.async_stream_infer(model, tensors, enable_empty_final_response=True)
    try:
        error = done.get(timeout=timeout_s)
        outcome = "ok" if error is None else str(error)
    except queue.Empty:
        outcome = "timed out"
    elapsed = time.monotonic() - start
    client.stop_stream(cancel_requests=True)
    return outcome, elapsed


_PREPARED: dict = {}


def _prepare(url: str, model: str, prompt_mb: float) -> None:
    """Pool initializer: build the oversized request (and its channel) before the clock runs."""
    import tritonclient.grpc as grpcclient

    huge = ("The quick brown fox jumps. " * int(prompt_mb * 1e6 / 27)).encode()
    if model == "frontend":
        # The control: as many bytes to an input paged_llm does not have, refused by
        # tritonserver itself; what the transfer alone costs the stream on this machine.
        model, tensors = "paged_llm", [_tensor("not_an_input", np.array([huge], np.object_))]
    elif model == "paged_llm":
        tensors = [_tensor("text_input", np.array([huge], dtype=np.object_)),
                   _tensor("sampling_parameters",
                           np.array([b'{"max_tokens": 4}'], dtype=np.object_))]
    else:
        tensors = [_tensor("text_input", np.array([[huge]], dtype=np.object_)),
                   _tensor("max_tokens", np.array([[4]], np.int32))]
    client = grpcclient.InferenceServerClient(url)
    client.is_server_live()  # the channel is connected
    _PREPARED.update(client=client, model=model, tensors=tensors)


def _noop(_=None):
    return None


def _oversized_request(timeout_s: float):
    """Send the prepared oversized request (in a pool worker); (outcome, seconds)."""
    return _send(_PREPARED["client"], _PREPARED["model"], _PREPARED["tensors"], timeout_s)


def run(args) -> dict:
    import tritonclient.grpc as grpcclient

    server = tiny_triton_server("stall-bench.", num_kv_blocks=160, max_model_len=2048,
                                max_num_seqs=32)
    try:
        url = server.grpc_url
        sampling = json.dumps({"max_tokens": 2000, "ignore_eos": True, "temperature": 0})
        stream_tensors = [
            _tensor("text_input", np.array([b"Hello world"], dtype=np.object_)),
            _tensor("stream", np.array([True])),
            _tensor("sampling_parameters", np.array([sampling.encode()], dtype=np.object_))]
        _one_request(url, "paged_llm", stream_tensors, 120)  # warm-up

        # The oversized requests come from other processes, prepared before the stream starts,
        # so that building and sending them costs the measuring process (which only receives
        # the stream) nothing.
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        pool = ctx.Pool(args.num_oversized, initializer=_prepare,
                        initargs=(url, args.model, args.prompt_mb))
        pool.map(_noop, range(4 * args.num_oversized))  # every worker is up and prepared
        time.sleep(1.0)

        times: list[float] = []
        finished = threading.Event()

        def on_response(result, error):
            times.append(time.monotonic())
            if error is not None or result.get_response().parameters.get(
                    "triton_final_response").bool_param:
                finished.set()

        client = grpcclient.InferenceServerClient(url)
        client.start_stream(callback=on_response)
        client.async_stream_infer("paged_llm", stream_tensors, enable_empty_final_response=True)
        while len(times) < 5:
            time.sleep(0.01)
        baseline_start = time.monotonic()
        time.sleep(args.baseline_s)
        baseline_end = burst_start = time.monotonic()
        try:
            results = pool.map(_oversized_request, [args.request_timeout_s] * args.num_oversized,
                               chunksize=1)
        finally:
            pool.close()
            pool.join()
        burst_end = time.monotonic() + 0.5
        time.sleep(0.5)
        stream_still_running = not finished.is_set()
        finished.wait(300)
        client.stop_stream(cancel_requests=True)
        client.close()
    finally:
        server.stop()

    def gaps(lo, hi):
        inside = [t for t in times if lo <= t <= hi]
        # the gap that spans the window's start counts too
        before = [t for t in times if t < lo]
        if before:
            inside = [before[-1]] + inside
        return [b - a for a, b in zip(inside, inside[1:])]

    base, burst = gaps(baseline_start, baseline_end), gaps(burst_start, burst_end)
    # a stall that outlasts the window: the gap from its last response to the next one
    after = [t for t in times if t > burst_end]
    if burst and after:
        last_inside = max(t for t in times if t <= burst_end)
        burst.append(after[0] - last_inside)
    outcomes = {}
    for outcome, _ in results:
        key = outcome if len(outcome) < 80 else outcome[:80] + "..."
        outcomes[key] = outcomes.get(key, 0) + 1
    doc = {
        "benchmark": "stall", "model": args.model, "prompt_mb": args.prompt_mb,
        "num_oversized": args.num_oversized,
        "baseline_window_s": baseline_end - baseline_start,
        "baseline_max_gap_ms": 1000 * max(base) if base else None,
        "baseline_median_gap_ms": 1000 * statistics.median(base) if base else None,
        "burst_window_s": burst_end - burst_start,
        "burst_max_gap_ms": 1000 * max(burst) if burst else None,
        "ratio_burst_to_baseline_max_gap": (max(burst) / max(base)) if base and burst else None,
        "oversized_answered_s": sorted(round(s, 3) for _, s in results),
        "oversized_outcomes": outcomes,
        "stream_still_running_after_burst": stream_still_running,
        "stream_responses": len(times),
        "target_ms": 50.0,
        "environment": environment("cpu"),
    }
    return doc


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.stall", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="paged_llm",
                   choices=["paged_llm", "ensemble", "tensorrt_llm_bls", "frontend"],
                   help="where the oversized requests go; 'frontend': to an input paged_llm "
                   "does not have, refused by tritonserver before any model sees it (the "
                   "control: what moving the bytes costs)")
    p.add_argument("--prompt-mb", type=float, default=5.4)
    p.add_argument("--num-oversized", type=int, default=10)
    p.add_argument("--baseline-s", type=float, default=1.0)
    p.add_argument("--request-timeout-s", type=float, default=300.0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    doc = run(args)
    print(json.dumps({k: v for k, v in doc.items() if k != "environment"}, indent=2))
    if args.json:
        write_json(args.json, doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
