"""`paged-triton`: serve a model with a real tritonserver on this project's model repository.

    paged-triton serve                      # tiny random Llama, built and cached on first run
    paged-triton serve --model /models/Qwen3-0.6B --engine-arg gpu_memory_utilization=0.85
    paged-triton serve --repository-dir /srv/repo --prepare-only   # write a repository, don't serve

The launcher finds the tritonserver binary (the `server` extra, or PATH as in NGC images),
prepares the Python backend stub for this Python, writes the engine arguments for the chosen
model into a copy of `model_repository/`, starts the server, waits until it is ready, sends one
streaming request so you see text arrive, and stops the server cleanly on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import queue
import signal
import sys
import tempfile
import time
from pathlib import Path

from paged_engine.tritonserver import TritonServer, TritonServerError, find_tritonserver, port_in_use


class LaunchError(RuntimeError):
    """A problem the user can fix; printed without a traceback."""


def check_model_dir(model: str) -> str:
    """Fail early, with the reason, on a directory the engine could not load."""
    path = Path(model).expanduser().resolve()
    if not path.is_dir():
        raise LaunchError(f"model directory {path} does not exist")
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise LaunchError(f"{path} has no config.json: not a Hugging Face model directory")
    try:
        cfg = json.loads(cfg_file.read_text())
    except ValueError as e:
        raise LaunchError(f"{cfg_file} is not valid JSON: {e}") from None
    from paged_engine.models import MODEL_REGISTRY, supported_architectures

    archs = cfg.get("architectures") or []
    if not any(a in MODEL_REGISTRY for a in archs):
        raise LaunchError(
            f"{path}: architecture {', '.join(archs) or '(none given)'} is not supported; "
            f"supported: {', '.join(supported_architectures())}"
        )
    if not any(path.glob("*.safetensors")):
        raise LaunchError(f"{path} has no *.safetensors weights")
    return str(path)


def parse_engine_args(items: list[str]) -> dict:
    """`key=value` pairs; values are JSON where they parse as JSON (numbers, true, null)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise LaunchError(f"--engine-arg {item!r} is not key=value")
        key, value = item.split("=", 1)
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def demo_request(server: TritonServer, prompt: str, max_tokens: int, out=sys.stdout) -> str:
    """Send one streaming request to paged_llm over gRPC and print the text as it arrives."""
    import numpy as np
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.grpc_url)
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    inputs = []
    for name, dtype, value in (
        ("text_input", "BYTES", np.array([prompt.encode()], dtype=object)),
        ("stream", "BOOL", np.array([True])),
        ("sampling_parameters", "BYTES", np.array(
            [json.dumps({"max_tokens": max_tokens, "temperature": 0}).encode()], dtype=object)),
    ):
        t = grpcclient.InferInput(name, list(value.shape), dtype)
        t.set_data_from_numpy(value)
        inputs.append(t)
    client.async_stream_infer("paged_llm", inputs, request_id="demo",
                              enable_empty_final_response=True)
    text = []
    print(f"prompt: {prompt!r}\nstreamed: ", end="", file=out, flush=True)
    try:
        while True:
            result, error = responses.get(timeout=300)
            if error is not None:
                raise LaunchError(f"demo request failed: {error}")
            if result.as_numpy("text_output") is not None:
                for piece in result.as_numpy("text_output"):
                    delta = piece.decode() if isinstance(piece, bytes) else str(piece)
                    text.append(delta)
                    print(delta, end="", file=out, flush=True)
            if result.get_response().parameters.get("triton_final_response").bool_param:
                break
    finally:
        client.stop_stream()
        client.close()
    print(file=out, flush=True)
    return "".join(text)


def serve(args: argparse.Namespace) -> int:
    from paged_engine.serving.repository import prepare_model_repository

    if args.model:
        model = check_model_dir(args.model)
    else:
        from paged_engine.tiny_model import default_model_dir, ensure_default_model

        if not (default_model_dir() / "config.json").exists():
            print(f"building the default tiny random-weight Llama in {default_model_dir()} ...",
                  flush=True)
        model = ensure_default_model()
    engine_args = parse_engine_args(args.engine_arg)
    if not args.prepare_only:
        binary = find_tritonserver()  # before any work: the commonest first-run problem
        for name in ("grpc_port", "http_port", "metrics_port"):
            port = getattr(args, name)
            if port is not None and port_in_use(port):
                raise LaunchError(f"--{name.replace('_', '-')} {port} is already in use")
    repo = args.repository_dir or tempfile.mkdtemp(prefix="paged-triton-repo.")
    prepare_model_repository(repo, model, **engine_args)
    print(f"model repository: {repo}\nmodel: {model}", flush=True)
    if args.prepare_only:
        return 0

    server = TritonServer(repo, grpc_port=args.grpc_port, http_port=args.http_port,
                          metrics_port=args.metrics_port, log_file=args.log_file, binary=binary)
    stop = {"now": False}

    def on_signal(signum, frame):
        stop["now"] = True

    print(f"starting {binary} (log: {server.log_file}) ...", flush=True)
    server.start(timeout_s=args.startup_timeout_s)
    old_int = signal.signal(signal.SIGINT, on_signal)
    old_term = signal.signal(signal.SIGTERM, on_signal)
    try:
        print(f"ready: gRPC {server.grpc_url}  HTTP {server.http_url}  metrics {server.metrics_url}",
              flush=True)
        if not args.no_demo:
            demo_request(server, args.demo_prompt, args.demo_max_tokens)
        if args.exit_after_demo:
            return 0
        print("serving; Ctrl-C stops the server", flush=True)
        while not stop["now"]:
            if server._proc is not None and server._proc.poll() is not None:
                raise LaunchError(f"tritonserver exited; log tail:\n{server.log_tail()}")
            time.sleep(0.5)
        print("stopping ...", flush=True)
        return 0
    finally:
        server.stop()
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="paged-triton", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve a model with tritonserver")
    s.add_argument("--model", help="local Hugging Face model directory (default: a tiny random "
                   "Llama built and cached on first run)")
    s.add_argument("--repository-dir", help="where to write the model repository "
                   "(default: a new temporary directory)")
    s.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="engine argument for paged_llm/1/model.json, e.g. max_num_seqs=64 "
                   "(repeatable)")
    s.add_argument("--grpc-port", type=int, default=8001)
    s.add_argument("--http-port", type=int, default=8000)
    s.add_argument("--metrics-port", type=int, default=8002)
    s.add_argument("--log-file", help="tritonserver log (default: a temporary file)")
    s.add_argument("--startup-timeout-s", type=float, default=600.0)
    s.add_argument("--demo-prompt", default="Hello world! The quick brown fox")
    s.add_argument("--demo-max-tokens", type=int, default=32)
    s.add_argument("--no-demo", action="store_true", help="don't send the demo request")
    s.add_argument("--exit-after-demo", action="store_true",
                   help="stop the server after the demo request (for scripts and tests)")
    s.add_argument("--prepare-only", action="store_true",
                   help="write the model repository and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return serve(args)
    except (LaunchError, TritonServerError) as e:
        print(f"paged-triton: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
