"""`paged-client`: generate, health, metrics, bench, plot, openai.

    paged-client generate "Hello" --stream --max-tokens 64 --temperature 0.7
    paged-client health
    paged-client metrics --metrics-url localhost:8002
    paged-client bench --num-requests 200 --request-rate 8 --input-len 512 --output-len 128
    paged-client plot bench.json other.json --out bench.png
    paged-client openai --port 9000 --triton-url localhost:8001
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from paged_triton.client.errors import ClientError

# CLI flag -> sampling keyword, with its type. Flags left unset are not sent (server defaults).
_SAMPLING_FLAGS: list[tuple[str, str, Any, str]] = [
    ("--max-tokens", "max_tokens", int, "maximum tokens to generate"),
    ("--min-tokens", "min_tokens", int, "minimum tokens before EOS / stop tokens count"),
    ("--temperature", "temperature", float, "sampling temperature (0 = greedy)"),
    ("--top-p", "top_p", float, "nucleus sampling mass"),
    ("--top-k", "top_k", int, "top-k sampling (-1 = off)"),
    ("--min-p", "min_p", float, "min-p sampling"),
    ("--seed", "seed", int, "per-request sampling seed"),
    ("--repetition-penalty", "repetition_penalty", float, "repetition penalty"),
    ("--presence-penalty", "presence_penalty", float, "presence penalty"),
    ("--frequency-penalty", "frequency_penalty", float, "frequency penalty"),
    ("--logprobs", "logprobs", int, "return the top-N logprobs per token"),
]


def _add_connection_args(p: argparse.ArgumentParser, model: bool = True) -> None:
    p.add_argument("--url", default=None,
                   help="Triton server host:port (default localhost:8001 for gRPC, :8000 for HTTP)")
    p.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    if model:
        p.add_argument("--model", default="paged_llm",
                       help="Triton model: paged_llm (engine) or ensemble (default %(default)s)")
    p.add_argument("--timeout", type=float, default=None, help="per-request timeout in seconds")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    for flag, _, typ, help_text in _SAMPLING_FLAGS:
        g.add_argument(flag, type=typ, default=None, help=help_text)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--stop-token-ids", type=lambda s: [int(x) for x in s.split(",") if x],
                   default=None, help="comma-separated stop token ids")
    g.add_argument("--ignore-eos", action="store_true", default=None,
                   help="keep generating past EOS")
    g.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="any other sampling parameter (value parsed as JSON when it parses)")


def _sampling_from_args(args: argparse.Namespace) -> dict[str, Any]:
    sampling: dict[str, Any] = {}
    for _, key, _, _ in _SAMPLING_FLAGS:
        value = getattr(args, key, None)
        if value is not None:
            sampling[key] = value
    if getattr(args, "stop", None):
        sampling["stop"] = args.stop
    if getattr(args, "stop_token_ids", None):
        sampling["stop_token_ids"] = args.stop_token_ids
    if getattr(args, "ignore_eos", None):
        sampling["ignore_eos"] = True
    for item in getattr(args, "param", []) or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--param expects KEY=VALUE, got {item!r}")
        try:
            sampling[key] = json.loads(raw)
        except ValueError:
            sampling[key] = raw
    return sampling


def _cmd_generate(args: argparse.Namespace) -> int:
    from paged_triton.client.client import Client

    prompt = args.prompt if args.prompt != "-" else sys.stdin.read()
    sampling = _sampling_from_args(args)
    with Client(args.url, protocol=args.protocol, model=args.model, timeout_s=args.timeout) as c:
        if args.stream:
            with c.stream(prompt, **sampling) as s:
                for delta in s:
                    sys.stdout.write(delta)
                    sys.stdout.flush()
            completion = s.completion
            sys.stdout.write("\n")
        else:
            completion = c.generate(prompt, **sampling)
            if not args.json:
                sys.stdout.write(completion.text + "\n")
    if args.json:
        from dataclasses import asdict

        print(json.dumps(asdict(completion), indent=2))
    else:
        print(f"[finish_reason={completion.finish_reason} input_tokens={completion.num_input_tokens} "
              f"output_tokens={completion.num_output_tokens} ttft={_ms(completion.ttft_s)} "
              f"latency={_ms(completion.latency_s)}]", file=sys.stderr)
    return 0


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}ms"


def _cmd_health(args: argparse.Namespace) -> int:
    from paged_triton.client.client import Client

    with Client(args.url, protocol=args.protocol, timeout_s=args.timeout or 10.0) as c:
        live = c.is_server_live()
        ready = c.is_server_ready()
        print(f"server {c.url} ({args.protocol}): live={live} ready={ready}")
        models = args.model or [m["name"] for m in c.model_names()]
        all_ready = live and ready
        for name in models:
            model_ready = c.is_model_ready(name)
            all_ready = all_ready and model_ready
            print(f"  model {name}: {'READY' if model_ready else 'NOT READY'}")
    return 0 if all_ready else 1


def _cmd_metrics(args: argparse.Namespace) -> int:
    from paged_triton.client.metrics import fetch_metrics, format_summary, parse_prometheus, summarize

    text = fetch_metrics(args.metrics_url)
    if args.raw:
        sys.stdout.write("".join(ln + "\n" for ln in text.splitlines() if args.all or "vllm:" in ln))
        return 0
    samples, types = parse_prometheus(text)
    print(format_summary(summarize(samples, types, prefix="" if args.all else "vllm:"), types))
    return 0


def _parse_list(text: str, cast) -> list:
    return [cast(x) for x in str(text).split(",") if x.strip()]


def _cmd_bench(args: argparse.Namespace) -> int:
    from paged_triton.client.async_client import AsyncClient
    from paged_triton.client.protocol import VLLM
    from paged_triton.client.bench import (
        Progress,
        format_report,
        load_jsonl,
        plot_runs,
        results_to_json,
        run_benchmark,
        synthetic_requests,
    )
    from paged_triton.client.bench_workers import run_benchmark_workers, split_concurrency

    sampling = _sampling_from_args(args)
    if "max_tokens" in sampling:  # --max-tokens is an alias of --output-len here
        args.output_len = sampling.pop("max_tokens")
    if args.dataset:
        requests = load_jsonl(args.dataset, args.num_requests, default_output_len=args.output_len)
    else:
        tokenizer = None
        if args.tokenizer:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        requests = synthetic_requests(
            args.num_requests, args.input_len, args.output_len, input_len_range=args.input_len_range,
            output_len_range=args.output_len_range, seed=args.workload_seed, tokenizer=tokenizer,
            prefix_len=args.prefix_len)
    rates = [float(x) for x in _parse_list(args.request_rate, str)]
    concurrencies = _parse_list(args.max_concurrency, int) if args.max_concurrency else [None]
    if args.workers < 1:
        print("error: --workers must be >= 1", file=sys.stderr)
        return 2
    try:
        for concurrency in concurrencies:
            split_concurrency(concurrency, args.workers)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    runs = []

    async def sweep():
        async with AsyncClient(args.url, protocol=args.protocol, model=args.model,
                               timeout_s=args.timeout) as client:
            info = await client.model_info()
            if info.kind == VLLM and not args.no_ignore_eos:
                # exact output lengths, as vLLM's benchmark does; the ensemble has no such input
                sampling.setdefault("ignore_eos", True)
            for rate in rates:
                for concurrency in concurrencies:
                    if args.workers > 1:  # blocks this loop: its client is idle meanwhile
                        result = run_benchmark_workers(
                            {"url": args.url, "protocol": args.protocol, "model": args.model,
                             "timeout_s": args.timeout},
                            requests, workers=args.workers, request_rate=rate,
                            max_concurrency=concurrency, sampling=sampling, seed=args.workload_seed)
                        runs.append(result)
                        print(format_report(result.metrics), flush=True)
                        continue
                    progress = Progress(len(requests), enabled=not args.no_progress,
                                        desc=f"rate={rate} conc={concurrency}")
                    try:
                        result = await run_benchmark(client, requests, request_rate=rate,
                                                     max_concurrency=concurrency, sampling=sampling,
                                                     seed=args.workload_seed, progress=progress)
                    finally:
                        progress.close()
                    runs.append(result)
                    print(format_report(result.metrics), flush=True)

    asyncio.run(sweep())
    config = {k: v for k, v in vars(args).items() if k != "func"}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results_to_json(runs, config), f, indent=1, default=str, allow_nan=False)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        plot_runs([r.metrics for r in runs], args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0 if all(r.metrics["failed"] == 0 for r in runs) else 2


def _cmd_plot(args: argparse.Namespace) -> int:
    from paged_triton.client.bench import plot_runs

    runs = []
    for path in args.results:
        with open(path) as f:
            runs.extend(run["metrics"] for run in json.load(f)["runs"])
    plot_runs(runs, args.out)
    print(f"wrote {args.out} ({len(runs)} runs)", file=sys.stderr)
    return 0


def _default_metrics_url(triton_url: str | None) -> str:
    """Triton's metrics port (8002) on the host of the Triton URL."""
    host = (triton_url or "localhost").split("://")[-1].rsplit(":", 1)[0] or "localhost"
    return f"{host}:8002"


def _cmd_openai(args: argparse.Namespace) -> int:
    import os

    from paged_triton.client.openai_server import serve

    origins = tuple(o.strip() for o in args.allowed_origins.split(",") if o.strip())
    serve(host=args.host, port=args.port, triton_url=args.triton_url, protocol=args.protocol,
          model=args.model, served_model_name=args.served_model_name, tokenizer=args.tokenizer,
          api_key=args.api_key or os.environ.get("PAGED_TRITON_API_KEY") or None,
          metrics_url=args.metrics_url or _default_metrics_url(args.triton_url),
          allowed_origins=origins, log_requests=not args.disable_log_requests)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="paged-client", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="generate text for a prompt")
    p.add_argument("prompt", help="the prompt ('-' reads stdin)")
    p.add_argument("--stream", action="store_true", help="print text as it streams")
    p.add_argument("--json", action="store_true", help="print the completion as JSON")
    _add_connection_args(p)
    _add_sampling_args(p)
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("health", help="server liveness/readiness and model readiness")
    _add_connection_args(p, model=False)
    p.add_argument("--model", action="append", default=None,
                   help="model to check (repeatable; default: every model in the repository)")
    p.set_defaults(func=_cmd_health)

    p = sub.add_parser("metrics", help="summary of the engine metrics (vllm:*)")
    p.add_argument("--metrics-url", default="localhost:8002",
                   help="metrics endpoint host:port or URL (default %(default)s)")
    p.add_argument("--all", action="store_true", help="all metric families, not only vllm:*")
    p.add_argument("--raw", action="store_true", help="print the raw Prometheus lines")
    p.set_defaults(func=_cmd_metrics)

    p = sub.add_parser("bench", help="serving load generator")
    _add_connection_args(p)
    p.add_argument("--num-requests", "-n", type=int, default=100)
    p.add_argument("--request-rate", default="inf",
                   help="Poisson arrival rate in req/s; comma list for a sweep (default inf)")
    p.add_argument("--max-concurrency", default=None,
                   help="max requests in flight; comma list for a sweep")
    p.add_argument("--input-len", type=int, default=128, help="synthetic prompt length (tokens/words)")
    p.add_argument("--output-len", type=int, default=64, help="max_tokens per request")
    p.add_argument("--input-len-range", type=float, default=0.0,
                   help="uniform spread of input lengths as a fraction of --input-len")
    p.add_argument("--output-len-range", type=float, default=0.0,
                   help="uniform spread of output lengths as a fraction of --output-len")
    p.add_argument("--prefix-len", type=int, default=0, help="shared prompt prefix length")
    p.add_argument("--dataset", default=None,
                   help="JSONL file of {\"prompt\": ..., \"max_tokens\": ...} instead of synthetic prompts")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer dir for synthetic prompts of exact token lengths")
    p.add_argument("--no-ignore-eos", action="store_true",
                   help="let requests stop at EOS (default: ignore_eos, so lengths are exact)")
    p.add_argument("--json", default=None, metavar="PATH", help="write results as JSON")
    p.add_argument("--plot", default=None, metavar="PNG", help="draw latency-vs-throughput chart")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--workers", type=int, default=1,
                   help="client processes sharing the workload (one Python process parses a few "
                        "thousand streamed responses/s; use more against a fast server)")
    _add_sampling_args(p)
    p.add_argument("--workload-seed", type=int, default=0,
                   help="seed of the synthetic prompts and arrival times (--seed is the sampling seed)")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("plot", help="latency-vs-throughput chart from bench --json files")
    p.add_argument("results", nargs="+", help="bench --json output files (their runs are merged)")
    p.add_argument("--out", default="bench.png", help="PNG to write (default %(default)s)")
    p.set_defaults(func=_cmd_plot)

    p = sub.add_parser("openai", help="OpenAI-compatible HTTP front door")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9000)
    p.add_argument("--triton-url", default=None, help="Triton host:port (default per protocol)")
    p.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    p.add_argument("--model", default="paged_llm", help="Triton model to call")
    p.add_argument("--served-model-name", default=None,
                   help="model id shown by /v1/models (default: the Triton model name)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer dir for the chat template (default: read from the server's "
                        "model config, tokenizer_dir parameter)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: "
                        "$PAGED_TRITON_API_KEY; unset: no key)")
    p.add_argument("--metrics-url", default=None,
                   help="Triton metrics endpoint that /metrics proxies (default: the Triton "
                        "host, port 8002)")
    p.add_argument("--allowed-origins", default="*",
                   help="comma-separated CORS origins ('*': any, '': no CORS headers)")
    p.add_argument("--disable-log-requests", action="store_true",
                   help="no access-log line per request")
    p.set_defaults(func=_cmd_openai)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except ClientError as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
