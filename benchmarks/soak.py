"""Memory over a soak: tritonserver's and the backend stubs' RSS across many requests, by client
behaviour (issue 20).

    python -m benchmarks.soak --requests 500 --json soak.json

A real tritonserver serves the tiny random Llama. For each client behaviour, `--warmup` requests
first, then `--requests` short generate requests one after another, reading the resident memory
(VmRSS) of tritonserver and of each backend stub before and after:

- grpc-reuse: one gRPC channel and stream for every request (what our client does);
- grpc-new-channel: a new channel per request (what a careless client does);
- http-keepalive: one persistent HTTP connection, /generate;
- http-new-connection: a new HTTP connection per request.

Reported: KB of RSS growth per request for each process, per behaviour. Growth in tritonserver
with a new gRPC channel per request is Triton's (per-channel state), not paged_llm's.
"""

from __future__ import annotations

import argparse
import http.client
import json
import queue
from pathlib import Path

import numpy as np

from benchmarks.common import environment, tiny_triton_server, write_json


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _processes(server) -> dict[str, int]:
    from paged_engine.deploy.supervisor import stub_processes

    pid = server._proc.pid
    out = {"tritonserver": pid}
    for model, stubs in stub_processes(pid).items():
        for i, (stub_pid, _) in enumerate(stubs):
            out[f"stub:{model}" + (f":{i}" if i else "")] = stub_pid
    return out


class _Grpc:
    def __init__(self, url):
        import tritonclient.grpc as grpcclient

        self.client = grpcclient.InferenceServerClient(url)
        self.done: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.done.put(error)
                                 if error is not None or result.get_response().parameters.get(
                                     "triton_final_response").bool_param else None)

    def generate(self, tensors):
        self.client.async_stream_infer("paged_llm", tensors, enable_empty_final_response=True)
        error = self.done.get(timeout=120)
        if error is not None:
            raise RuntimeError(str(error))

    def close(self):
        self.client.stop_stream()
        self.client.close()


def _tensors():
    import tritonclient.grpc as grpcclient

    out = []
    for name, array, datatype in (
            ("text_input", np.array([b"Hello world"], dtype=np.object_), "BYTES"),
            ("stream", np.array([True]), "BOOL"),
            ("sampling_parameters", np.array([b'{"max_tokens": 4, "temperature": 0}'],
                                             dtype=np.object_), "BYTES")):
        t = grpcclient.InferInput(name, list(array.shape), datatype)
        t.set_data_from_numpy(array)
        out.append(t)
    return out


def _http_generate(conn):
    body = json.dumps({"text_input": "Hello world", "max_tokens": 4, "temperature": 0})
    conn.request("POST", "/v2/models/paged_llm/generate", body,
                 {"Content-Type": "application/json"})
    response = conn.getresponse()
    response.read()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}")


def _run_mode(server, mode: str, n: int):
    tensors = _tensors()
    host, port = server.http_url.split(":")
    if mode == "grpc-reuse":
        client = _Grpc(server.grpc_url)
        for _ in range(n):
            client.generate(tensors)
        client.close()
    elif mode == "grpc-new-channel":
        for _ in range(n):
            client = _Grpc(server.grpc_url)
            client.generate(tensors)
            client.close()
    elif mode == "http-keepalive":
        conn = http.client.HTTPConnection(host, int(port), timeout=120)
        for _ in range(n):
            _http_generate(conn)
        conn.close()
    elif mode == "http-new-connection":
        for _ in range(n):
            conn = http.client.HTTPConnection(host, int(port), timeout=120)
            _http_generate(conn)
            conn.close()
    else:
        raise ValueError(mode)


MODES = ("grpc-reuse", "grpc-new-channel", "http-keepalive", "http-new-connection")


def run(args) -> dict:
    server = tiny_triton_server("soak-bench.", num_kv_blocks=96, max_model_len=512,
                                max_num_seqs=32)
    results = {}
    try:
        procs = _processes(server)
        for mode in args.modes.split(","):
            _run_mode(server, mode, args.warmup)
            before = {name: _rss_kb(pid) for name, pid in procs.items()}
            _run_mode(server, mode, args.requests)
            after = {name: _rss_kb(pid) for name, pid in procs.items()}
            results[mode] = {
                name: {"rss_before_kb": before[name], "rss_after_kb": after[name],
                       "growth_kb_per_request": (after[name] - before[name]) / args.requests}
                for name in procs}
            print(mode, {k: round(v["growth_kb_per_request"], 2) for k, v in results[mode].items()},
                  flush=True)
    finally:
        server.stop()
    return {"benchmark": "soak", "requests_per_mode": args.requests, "warmup": args.warmup,
            "results": results, "environment": environment("cpu")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    doc = run(args)
    if args.json:
        write_json(args.json, doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
