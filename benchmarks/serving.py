"""Serving through Triton, W4 (issue 7): W1's requests sent by `paged-client bench`.

    python -m benchmarks.serving --json results/w4.json
    python -m benchmarks.serving --tiny --device cpu --num-requests 4 --skip-baseline   # smoke

1. The offline reference: `python -m benchmarks.throughput --workload W1 --skip-baseline` runs in
   a subprocess first (same requests, same engine options), so its GPU memory is gone before the
   server starts; or pass `--offline-json` with an earlier W1 result.
2. The W1 prompts (random token ids) become text: the synthetic tokenizer decodes them to words
   that encode back to exactly the same ids (checked here; see model_dir.py), so the server's
   engine sees W1's tokens. They are written as a JSONL dataset with each request's max_tokens.
3. A real tritonserver (paged_engine.deploy.tritonserver.TritonServer) serves the repository from
   `prepare_model_repository` with the W1 model (load_format="dummy") on the device.
4. `paged-client bench` (client/cli.py, run as a subprocess: the load generator users run) sends
   a few untimed warm-up requests, then all requests at once (max concurrency), then at 3 Poisson
   request rates: 25/50/75 % of the request throughput reached at max concurrency, unless
   `--request-rates` names them. It streams, with ignore_eos, temperature 0.6.
5. Reported per run: output and total token throughput, TTFT / ITL / TPOT / E2E percentiles,
   failures; the ratio of max-concurrency output throughput to W1 offline (target >= 0.95), and
   the peak of the server's `vllm:kv_cache_blocks_used` gauge (polled from the metrics port).

--skip-baseline here skips step 1 (no ratio then).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from benchmarks.common import (
    REPO_ROOT,
    add_common_args,
    environment,
    format_table,
    resolve_device,
    resolve_dtype,
    setup_env,
    write_json,
)
from benchmarks.workloads import get_workload

TARGET_RATIO = 0.95
_ENGINE_OPTIONS = ("block_size", "num_kv_blocks", "gpu_memory_utilization", "max_num_seqs",
                   "max_num_batched_tokens", "enforce_eager")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serving", description=__doc__.split("\n")[0])
    p.add_argument("--request-rates", default=None,
                   help="comma list of Poisson rates (req/s); default 25,50,75%% of the max-concurrency rate")
    p.add_argument("--offline-json", default=None,
                   help="W1 result of benchmarks.throughput to compare with (default: run it now)")
    p.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    p.add_argument("--model-name", default="paged_llm", help="Triton model to send to (paged_llm or ensemble)")
    p.add_argument("--warmup-requests", type=int, default=4)
    p.add_argument("--client-workers", type=int, default=1,
                   help="paged-client bench --workers: client processes sharing the load (one "
                        "Python client parses a few thousand responses/s)")
    p.add_argument("--server-timeout", type=float, default=900.0, help="seconds to wait for the server")
    p.add_argument("--bench-timeout", type=float, default=1800.0, help="seconds per bench subprocess")
    p.add_argument("--work-dir", default=None, help="keep the repository, dataset and logs here")
    add_common_args(p)
    return p


# ----------------------------------------------------------------------------- pieces

def engine_args(args, device: str, dtype: str, max_model_len: int | None) -> dict:
    out = {"load_format": "dummy", "device": device, "dtype": dtype, "seed": 0}
    if max_model_len is not None:
        out["max_model_len"] = max_model_len
    for name in _ENGINE_OPTIONS:
        value = getattr(args, name, None)
        if value is not None:
            out[name] = value
    if not getattr(args, "prefix_caching", True):
        out["enable_prefix_caching"] = False
    return out


def engine_cli_flags(args) -> list[str]:
    flags = []
    for name in _ENGINE_OPTIONS:
        value = getattr(args, name, None)
        if value is True:
            flags.append("--" + name.replace("_", "-"))
        elif value is not None and value is not False:
            flags += ["--" + name.replace("_", "-"), str(value)]
    if not getattr(args, "prefix_caching", True):
        flags.append("--no-prefix-caching")
    return flags


def run_offline(args, device: str, work: Path, model_dir: str) -> dict:
    out = work / "offline_w1.json"
    cmd = [sys.executable, "-m", "benchmarks.throughput", "--workload", "W1", "--skip-baseline",
           "--device", device, "--dtype", args.dtype, "--json", str(out), "--model-dir", model_dir]
    if args.tiny:
        cmd.append("--tiny")
    if args.num_requests is not None:
        cmd += ["--num-requests", str(args.num_requests)]
    cmd += engine_cli_flags(args)
    print("offline reference:", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, cwd=REPO_ROOT, check=True)
    return json.loads(out.read_text())


def write_dataset(requests, tokenizer, path: Path) -> dict:
    """JSONL of {"prompt", "max_tokens"}; checks the text encodes back to the same ids."""
    mismatched = 0
    with open(path, "w", encoding="utf-8") as f:
        for r in requests:
            text = tokenizer.decode(r.prompt_token_ids)
            if tokenizer(text, add_special_tokens=True).input_ids != r.prompt_token_ids:
                mismatched += 1
            f.write(json.dumps({"prompt": text, "max_tokens": r.max_tokens}) + "\n")
    return {"path": str(path), "num_requests": len(requests), "prompts_not_round_tripping": mismatched}


class MetricsPoller:
    """Polls the server's Prometheus endpoint; keeps the peak of a few engine gauges."""

    GAUGES = ("vllm:kv_cache_blocks_used", "vllm:kv_cache_blocks_total", "vllm:num_requests_running",
              "vllm:num_requests_waiting", "vllm:num_preemptions_total")

    def __init__(self, url: str, interval_s: float = 0.5):
        self.url, self.interval_s = url, interval_s
        self.peak: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self.num_polls = 0
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    @staticmethod
    def parse(text: str) -> dict[str, float]:
        values: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            m = re.match(r"^([A-Za-z_:][A-Za-z0-9_:]*)(\{[^}]*\})?\s+(\S+)", line)
            if m and m.group(1) in MetricsPoller.GAUGES:
                try:
                    values[m.group(1)] = values.get(m.group(1), 0.0) + float(m.group(3))
                except ValueError:
                    pass
        return values

    def poll_once(self) -> None:
        try:
            with urllib.request.urlopen(self.url, timeout=2.0) as r:
                values = self.parse(r.read().decode("utf-8", "replace"))
        except OSError:
            self.errors += 1
            return
        self.num_polls += 1
        self.last = values
        for k, v in values.items():
            self.peak[k] = max(self.peak.get(k, v), v)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.poll_once()

    def __enter__(self):
        self.peak, self.num_polls = {}, 0
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.poll_once()

    def report(self) -> dict:
        total = self.peak.get("vllm:kv_cache_blocks_total")
        used = self.peak.get("vllm:kv_cache_blocks_used")
        return {"peak": dict(self.peak), "polls": self.num_polls, "poll_errors": self.errors,
                "peak_blocks_used_fraction": (used / total) if total and used is not None else None,
                "note": "the server exposes blocks, not tokens: slot utilisation (tokens per used "
                        "slot) is only measured offline (benchmarks.throughput)"}


def run_client_bench(url: str, args, dataset: Path, num_requests: int, rates: list[str],
                     json_path: Path, temperature: float, max_concurrency: int | None = None) -> dict:
    cmd = [sys.executable, "-m", "paged_triton.client.cli", "bench", "--url", url, "--protocol", args.protocol,
           "--model", args.model_name, "--dataset", str(dataset), "--num-requests", str(num_requests),
           "--request-rate", ",".join(rates), "--temperature", str(temperature), "--top-p", "1.0",
           "--json", str(json_path), "--no-progress", "--workers", str(args.client_workers)]
    if max_concurrency is not None:
        cmd += ["--max-concurrency", str(max_concurrency)]
    print("client:", " ".join(cmd), file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, cwd=REPO_ROOT, timeout=args.bench_timeout, capture_output=True, text=True)
    sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
    if not json_path.exists():
        raise RuntimeError(f"paged-client bench exited {proc.returncode} without writing {json_path}:\n"
                           f"{proc.stderr[-3000:]}")
    doc = json.loads(json_path.read_text())
    doc["returncode"] = proc.returncode
    return doc


def _run_summary(metrics: dict) -> dict:
    keep = ("request_rate", "max_concurrency", "num_requests", "completed", "failed", "errors",
            "finish_reasons", "duration_s", "total_input_tokens", "total_output_tokens",
            "request_throughput", "output_throughput", "total_token_throughput", "ttft_ms",
            "itl_ms", "tpot_ms", "e2el_ms")
    return {k: metrics.get(k) for k in keep}


def default_rates(max_concurrency_rps: float) -> list[str]:
    out = []
    for frac in (0.25, 0.5, 0.75):
        r = max_concurrency_rps * frac
        digits = max(0, 1 - int(math.floor(math.log10(r)))) if r > 0 else 2
        out.append(f"{round(r, digits):g}")
    return out


# ----------------------------------------------------------------------------- main flow

def run(args) -> dict:
    setup_env()
    from paged_engine.deploy.repository import prepare_model_repository
    from paged_engine.deploy.tritonserver import TritonServer

    from benchmarks.model_dir import load_hf_tokenizer, write_model_dir

    wl = get_workload("W4", tiny=args.tiny)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    requests = wl.make_requests(args.num_requests)
    tmp = None
    if args.work_dir:
        work = Path(args.work_dir).resolve()
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bench-w4-")
        work = Path(tmp.name)
    doc: dict = {
        "benchmark": "serving", "workload": "W4", "requests_from": wl.name, "model": wl.model.name,
        "tiny": args.tiny, "dtype": dtype, "temperature": wl.temperature,
        "num_requests": len(requests),
        "requested_prompt_tokens": sum(len(r.prompt_token_ids) for r in requests),
        "requested_output_tokens": sum(r.max_tokens for r in requests),
        "environment": environment(device), "target_ratio_to_offline": TARGET_RATIO,
        "client": f"paged-client bench (client/cli.py), subprocess, {args.client_workers} worker process(es)",
    }
    server = None
    try:
        model_dir = write_model_dir(wl.model, args.model_dir or (work / "model"), dtype)
        if args.offline_json:
            doc["offline"] = json.loads(Path(args.offline_json).read_text())
        elif not args.skip_baseline:
            doc["offline"] = run_offline(args, device, work, model_dir)
        else:
            doc["offline"] = None

        tokenizer = load_hf_tokenizer(model_dir)
        dataset = work / "w1_requests.jsonl"
        doc["dataset"] = write_dataset(requests, tokenizer, dataset)
        warm_dataset = work / "warmup.jsonl"
        warm_reqs = [type(r)(r.prompt_token_ids, min(r.max_tokens, 8)) for r in requests[: args.warmup_requests]]
        write_dataset(warm_reqs or requests[:1], tokenizer, warm_dataset)

        repo = prepare_model_repository(work / "repository", model_dir,
                                        **engine_args(args, device, dtype, wl.max_model_len))
        doc["model_json"] = json.loads((Path(repo) / "paged_llm" / "1" / "model.json").read_text())
        log_file = work / "tritonserver.log"
        t0 = time.perf_counter()
        server = TritonServer(repo, log_file=log_file)
        server.start(timeout_s=args.server_timeout)
        doc["server_start_s"] = time.perf_counter() - t0
        url = server.grpc_url if args.protocol == "grpc" else server.http_url

        if args.warmup_requests > 0:
            run_client_bench(url, args, warm_dataset, max(1, len(warm_reqs)), ["inf"],
                             work / "warmup.json", wl.temperature)

        runs = []
        with MetricsPoller(server.metrics_url) as poller:
            first = run_client_bench(url, args, dataset, len(requests), ["inf"], work / "max_conc.json",
                                     wl.temperature, max_concurrency=len(requests))
        runs.append({"mode": "max_concurrency", **_run_summary(first["runs"][0]["metrics"]),
                     "server_metrics": poller.report()})
        rps = first["runs"][0]["metrics"]["request_throughput"]
        rates = args.request_rates.split(",") if args.request_rates else default_rates(rps)
        sweep = run_client_bench(url, args, dataset, len(requests), rates, work / "rates.json",
                                 wl.temperature)
        for r in sweep["runs"]:
            runs.append({"mode": "request_rate", **_run_summary(r["metrics"])})
        doc["runs"] = runs
        doc["client_returncodes"] = [first["returncode"], sweep["returncode"]]
        off = doc.get("offline")
        if off and off.get("engine"):
            doc["offline_output_tokens_per_s"] = off["engine"]["output_tokens_per_s"]
            doc["ratio_to_offline"] = runs[0]["output_throughput"] / off["engine"]["output_tokens_per_s"]
        doc["server_log_tail"] = server.log_tail(20)
    finally:
        if server is not None:
            server.stop()
        if tmp is not None:
            tmp.cleanup()
    return doc


def print_report(doc: dict) -> None:
    env = doc["environment"]
    print(f"\n== serving W4 (W1 requests through tritonserver, {doc['model']}, {doc['dtype']}, "
          f"{doc['num_requests']} requests) on {env.get('device_name')} [{env['device']}], "
          f"{env['date_utc']} UTC ==")
    if doc["tiny"]:
        print("   (--tiny: scaled-down model for smoke runs; these numbers say nothing about speed)")
    headers = ["run", "ok", "failed", "out tok", "time s", "out tok/s", "total tok/s",
               "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms", "TPOT p50 ms"]
    rows = []
    for r in doc["runs"]:
        name = "max concurrency" if r["mode"] == "max_concurrency" else f"rate {r['request_rate']}/s"
        rows.append([name, r["completed"], r["failed"], r["total_output_tokens"], r["duration_s"],
                     r["output_throughput"], r["total_token_throughput"], r["ttft_ms"]["p50"],
                     r["ttft_ms"]["p99"], r["itl_ms"]["p50"], r["itl_ms"]["p99"], r["tpot_ms"]["p50"]])
    print(format_table(rows, headers))
    if doc.get("ratio_to_offline") is not None:
        ratio = doc["ratio_to_offline"]
        status = "meets" if ratio >= TARGET_RATIO else f"misses by {100 * (TARGET_RATIO - ratio):.1f} points"
        print(f"W1 offline {doc['offline_output_tokens_per_s']:,.1f} out tok/s; max-concurrency "
              f"serving / offline = {ratio:.3f} (target >= {TARGET_RATIO}{'' if doc['tiny'] else ': ' + status})")
    km = doc["runs"][0].get("server_metrics", {})
    if km.get("peak_blocks_used_fraction") is not None:
        print(f"server KV blocks used at peak: {km['peak_blocks_used_fraction']:.4f} of the cache "
              f"({km['polls']} metric polls)")
    ds = doc["dataset"]
    if ds["prompts_not_round_tripping"]:
        print(f"WARNING: {ds['prompts_not_round_tripping']} prompts do not encode back to W1's ids")


def check(doc: dict) -> list[str]:
    problems = []
    for r in doc["runs"]:
        if r["failed"]:
            problems.append(f"{r['mode']} {r['request_rate']}: {r['failed']} failed requests: {r['errors']}")
        elif r["total_output_tokens"] != doc["requested_output_tokens"]:
            problems.append(f"{r['mode']} {r['request_rate']}: {r['total_output_tokens']} output tokens, "
                            f"requested {doc['requested_output_tokens']}")
        if r["total_input_tokens"] and r["total_input_tokens"] != doc["requested_prompt_tokens"]:
            problems.append(f"{r['mode']} {r['request_rate']}: server saw {r['total_input_tokens']} "
                            f"prompt tokens, W1 has {doc['requested_prompt_tokens']}")
    return problems


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    doc = run(args)
    doc["problems"] = check(doc)
    print_report(doc)
    for p in doc["problems"]:
        print("ERROR:", p, file=sys.stderr)
    write_json(args.json, doc)
    return 1 if doc["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
