"""Serving load generator: `paged-client bench`.

Sends a fixed number of streaming requests to a running server, at a request rate (Poisson
arrivals) and/or a maximum concurrency, and reports what the client saw: request and token
throughput, time to first token (TTFT), inter-token latency (ITL: the gaps between streamed
responses), time per output token (TPOT), end-to-end latency (E2E), and failures. Every number
comes from the per-request timings in `RequestResult`, so a report can be recomputed from the
JSON it writes. Several rates or concurrencies make a sweep, which `--plot` draws as
latency-vs-throughput curves.

    results = asyncio.run(run_benchmark(AsyncClient(url), requests, request_rate=4.0))
    print(format_report(results.metrics))
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

# Words for synthetic prompts when no tokenizer is given; the server reports the true token count.
_WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which "
    "but have an they you were her she there all one their we can has more would been if will "
    "time when who no its also after system model server token cache block memory request queue "
    "stream batch layer kernel value key attention prefix paged engine river mountain window "
    "garden music paper light water stone city north south east west green blue silver"
).split()


@dataclass
class BenchRequest:
    """One request of the workload."""

    prompt: str
    max_tokens: int
    sampling: dict[str, Any] = field(default_factory=dict)


@dataclass
class RequestResult:
    """What the client measured for one request (times in seconds)."""

    success: bool
    error: str | None = None
    start_s: float = 0.0           # send time, relative to the benchmark start
    ttft_s: float | None = None    # send -> first non-empty response
    latency_s: float | None = None  # send -> final response (E2E)
    itl_s: list[float] = field(default_factory=list)  # gaps between consecutive responses after the first
    num_input_tokens: int | None = None
    num_output_tokens: int = 0
    num_responses: int = 0
    finish_reason: str | None = None
    output_text_chars: int = 0


@dataclass
class BenchResult:
    metrics: dict[str, Any]
    results: list[RequestResult]


def synthetic_requests(num_requests: int, input_len: int, output_len: int, *,
                       input_len_range: float = 0.0, output_len_range: float = 0.0,
                       seed: int = 0, tokenizer=None, prefix_len: int = 0) -> list[BenchRequest]:
    """Random prompts of about `input_len` tokens and `max_tokens` about `output_len`.

    Lengths are drawn uniformly from [len * (1 - range), len * (1 + range)]. With a tokenizer
    the prompt is decoded from random token ids (its true length is then close to the target);
    without one it is random words. `prefix_len` shares a common prefix of that many words/tokens
    across all prompts (to exercise prefix caching).
    """
    if num_requests < 0 or input_len < 1 or output_len < 1:
        raise ValueError("num_requests >= 0, input_len >= 1 and output_len >= 1 are required")
    for name, r in (("input_len_range", input_len_range), ("output_len_range", output_len_range)):
        if not 0.0 <= r < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {r}")
    rng = random.Random(seed)

    def draw(center: int, spread: float) -> int:
        lo, hi = max(1, int(center * (1 - spread))), max(1, int(center * (1 + spread)))
        return rng.randint(lo, hi)

    if tokenizer is not None:
        vocab = tokenizer.vocab_size
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        def piece(n: int) -> str:
            ids = [i for i in (rng.randrange(vocab) for _ in range(n * 2)) if i not in special][:n]
            # Decoding random ids and encoding again need not give the same ids: trim the
            # re-encoded text back to n tokens so the prompt's true length is close to n.
            for _ in range(3):
                text = tokenizer.decode(ids)
                ids = tokenizer.encode(text, add_special_tokens=False)
                if len(ids) <= n:
                    break
                ids = ids[:n]
            return text
    else:
        def piece(n: int) -> str:
            return " ".join(rng.choice(_WORDS) for _ in range(n))

    prefix = piece(prefix_len) + " " if prefix_len else ""
    return [BenchRequest(prefix + piece(draw(input_len, input_len_range)), draw(output_len, output_len_range))
            for _ in range(num_requests)]


def load_jsonl(path: str, num_requests: int | None = None, default_output_len: int = 128) -> list[BenchRequest]:
    """Requests from a JSONL file: one object per line with `prompt` (or `text`), optional
    `max_tokens` (or `output_len`) and optional `sampling` (a dict). Cycles when the file has
    fewer lines than `num_requests`."""
    requests = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: not JSON: {e}") from None
            if isinstance(obj, str):
                obj = {"prompt": obj}
            prompt = obj.get("prompt", obj.get("text"))
            if not isinstance(prompt, str) or not prompt:
                raise ValueError(f"{path}:{lineno}: needs a non-empty 'prompt' string")
            max_tokens = int(obj.get("max_tokens", obj.get("output_len", default_output_len)))
            requests.append(BenchRequest(prompt, max_tokens, dict(obj.get("sampling", {}))))
    if not requests:
        raise ValueError(f"{path}: no requests")
    if num_requests is not None:
        requests = [requests[i % len(requests)] for i in range(num_requests)]
    return requests


def arrival_offsets(num_requests: int, request_rate: float, seed: int = 0) -> list[float]:
    """Send times (s, from start) for Poisson arrivals at `request_rate` req/s (all 0 for inf)."""
    if request_rate <= 0:
        raise ValueError(f"request_rate must be > 0, got {request_rate}")
    if math.isinf(request_rate):
        return [0.0] * num_requests
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(num_requests):
        out.append(t)
        t += rng.expovariate(request_rate)
    return out


def summary_stats(values: Iterable[float]) -> dict[str, float]:
    """mean, std, min, p50, p90, p99, max (linear-interpolated percentiles, as numpy's default)."""
    v = sorted(values)
    if not v:
        return {k: float("nan") for k in ("mean", "std", "min", "p50", "p90", "p99", "max")}
    mean = sum(v) / len(v)
    std = math.sqrt(sum((x - mean) ** 2 for x in v) / len(v))
    return {"mean": mean, "std": std, "min": v[0], "p50": _percentile(v, 50),
            "p90": _percentile(v, 90), "p99": _percentile(v, 99), "max": v[-1]}


def _percentile(sorted_values: list[float], q: float) -> float:
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def compute_metrics(results: list[RequestResult], duration_s: float) -> dict[str, Any]:
    """The report's numbers from per-request results and the benchmark's wall time.

    Throughputs divide by `duration_s`; latency statistics are in milliseconds over successful
    requests. TPOT is (E2E - TTFT) / (output tokens - 1) for requests with more than one token.
    """
    ok = [r for r in results if r.success]
    failed = [r for r in results if not r.success]
    total_output = sum(r.num_output_tokens for r in ok)
    total_input = sum(r.num_input_tokens or 0 for r in ok)
    ms = 1000.0
    tpot = [(r.latency_s - r.ttft_s) / (r.num_output_tokens - 1) * ms
            for r in ok if r.num_output_tokens > 1 and r.ttft_s is not None and r.latency_s is not None]
    errors: dict[str, int] = {}
    for r in failed:
        key = (r.error or "unknown error")[:200]
        errors[key] = errors.get(key, 0) + 1
    finish: dict[str, int] = {}
    for r in ok:
        finish[str(r.finish_reason)] = finish.get(str(r.finish_reason), 0) + 1
    return {
        "num_requests": len(results),
        "completed": len(ok),
        "failed": len(failed),
        "errors": errors,
        "finish_reasons": finish,
        "duration_s": duration_s,
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": len(ok) / duration_s if duration_s > 0 else float("nan"),
        "output_throughput": total_output / duration_s if duration_s > 0 else float("nan"),
        "total_token_throughput": (total_input + total_output) / duration_s if duration_s > 0 else float("nan"),
        "ttft_ms": summary_stats(r.ttft_s * ms for r in ok if r.ttft_s is not None),
        "tpot_ms": summary_stats(tpot),
        "itl_ms": summary_stats(x * ms for r in ok for x in r.itl_s),
        "e2el_ms": summary_stats(r.latency_s * ms for r in ok if r.latency_s is not None),
    }


async def _one_request(client, request: BenchRequest, base_sampling: dict[str, Any],
                       bench_start_s: float) -> RequestResult:
    from paged_triton.client.errors import ClientError

    sampling = {**base_sampling, "max_tokens": request.max_tokens, **request.sampling}
    start = time.perf_counter()
    result = RequestResult(success=False, start_s=start - bench_start_s)
    last = None
    stream = client.stream_chunks(request.prompt, **sampling)
    try:
        async for chunk in stream:
            now = time.perf_counter()
            result.num_responses += 1
            if chunk.text or chunk.num_output_tokens:
                if result.ttft_s is None:
                    result.ttft_s = now - start
                elif last is not None:
                    result.itl_s.append(now - last)
                last = now
        result.latency_s = time.perf_counter() - start
        c = stream.completion
        result.num_input_tokens = c.num_input_tokens
        # The engine model reports token counts; for a model that does not, count the streamed
        # responses carrying text (one token each when streaming token by token).
        result.num_output_tokens = c.num_output_tokens if c.num_output_tokens is not None else \
            len(result.itl_s) + (1 if result.ttft_s is not None else 0)
        result.finish_reason = c.finish_reason
        result.output_text_chars = len(c.text)
        if result.ttft_s is None:
            result.ttft_s = result.latency_s
        result.success = True
    except ClientError as e:
        result.error = f"{type(e).__name__}: {e}"
    except Exception as e:  # a bug or a broken connection must not stop the whole run
        result.error = f"{type(e).__name__}: {e}"
    finally:
        stream.cancel()
    return result


async def run_benchmark(client, requests: list[BenchRequest], *, request_rate: float = math.inf,
                        max_concurrency: int | None = None, sampling: dict[str, Any] | None = None,
                        seed: int = 0, progress: Callable[[RequestResult], None] | None = None,
                        indices: list[int] | None = None, start_at: float | None = None) -> BenchResult:
    """Run the workload against `client` (an `AsyncClient`) and compute the metrics.

    Args:
        requests: the workload, sent in order.
        request_rate: Poisson arrival rate in requests/s; inf sends them all at once.
        max_concurrency: at most this many requests in flight (None: unbounded).
        sampling: sampling keywords for every request (max_tokens comes from each request).
        seed: seeds the arrival times.
        progress: called with each finished request's result.
        indices: send only these requests of the workload, each at its own arrival time (one
            worker's share, see `client.bench_workers`); results come in this order.
        start_at: `time.perf_counter()` reading at which arrival time 0 falls (default: now).
    """
    if max_concurrency is not None and max_concurrency < 1:
        raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
    await client.model_info()  # outside the timed region
    offsets = arrival_offsets(len(requests), request_rate, seed)
    semaphore = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    base = dict(sampling or {})
    if indices is None:
        indices = list(range(len(requests)))
    if start_at is not None and start_at > time.perf_counter():
        await asyncio.sleep(start_at - time.perf_counter())
    start = time.perf_counter() if start_at is None else start_at

    async def send(i: int) -> RequestResult:
        delay = offsets[i] - (time.perf_counter() - start)
        if delay > 0:
            await asyncio.sleep(delay)
        if semaphore is None:
            result = await _one_request(client, requests[i], base, start)
        else:
            async with semaphore:
                result = await _one_request(client, requests[i], base, start)
        if progress is not None:
            progress(result)
        return result

    results = await asyncio.gather(*(send(i) for i in indices))
    duration = time.perf_counter() - start
    metrics = compute_metrics(list(results), duration)
    metrics["request_rate"] = request_rate if not math.isinf(request_rate) else "inf"
    metrics["max_concurrency"] = max_concurrency
    return BenchResult(metrics, list(results))


def format_report(metrics: dict[str, Any]) -> str:
    """The human-readable report of one run."""
    def f(x: float, digits: int = 2) -> str:
        return "-" if isinstance(x, float) and math.isnan(x) else f"{x:.{digits}f}"

    lines = [
        "============ Serving Benchmark Result ============",
        f"{'Request rate (req/s):':<40}{metrics.get('request_rate')}",
        f"{'Max concurrency:':<40}{metrics.get('max_concurrency')}",
        f"{'Successful requests:':<40}{metrics['completed']}",
        f"{'Failed requests:':<40}{metrics['failed']}",
        f"{'Benchmark duration (s):':<40}{f(metrics['duration_s'])}",
        f"{'Total input tokens:':<40}{metrics['total_input_tokens']}",
        f"{'Total generated tokens:':<40}{metrics['total_output_tokens']}",
        f"{'Request throughput (req/s):':<40}{f(metrics['request_throughput'])}",
        f"{'Output token throughput (tok/s):':<40}{f(metrics['output_throughput'])}",
        f"{'Total token throughput (tok/s):':<40}{f(metrics['total_token_throughput'])}",
    ]
    for key, title in (("ttft_ms", "Time to First Token"), ("tpot_ms", "Time per Output Token (excl. 1st token)"),
                       ("itl_ms", "Inter-token Latency"), ("e2el_ms", "End-to-end Latency")):
        s = metrics[key]
        lines.append(f"{'-' * 15}{title}{'-' * max(0, 35 - len(title))}")
        lines.append(f"{'Mean (ms):':<40}{f(s['mean'])}")
        for p in ("p50", "p90", "p99"):
            lines.append(f"{p.upper() + ' (ms):':<40}{f(s[p])}")
    if metrics.get("finish_reasons"):
        lines.append(f"{'Finish reasons:':<40}{metrics['finish_reasons']}")
    for error, count in metrics.get("errors", {}).items():
        lines.append(f"  failed x{count}: {error}")
    lines.append("=" * 50)
    return "\n".join(lines)


def results_to_json(runs: list[BenchResult], config: dict[str, Any]) -> dict[str, Any]:
    """The JSON document `--json` writes: config, and per run its metrics and per-request results."""
    return _strict_json({
        "config": config,
        "runs": [{"metrics": r.metrics, "requests": [asdict(x) for x in r.results]} for r in runs]})


def _strict_json(value: Any) -> Any:
    """NaN -> None and +-inf -> "inf"/"-inf", so the file is strict JSON."""
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, dict):
        return {k: _strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(v) for v in value]
    return value


def plot_runs(runs: list[dict[str, Any]], path: str) -> None:
    """Latency-vs-throughput chart (PNG): TTFT, ITL and E2E (p50 and p99) against output tok/s,
    one point per run of a sweep. `runs` are metrics dicts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def num(v) -> float:  # metrics read back from JSON hold None for "no data"
        return float("nan") if v is None else float(v)

    runs = sorted(runs, key=lambda m: num(m["output_throughput"]))
    x = [num(m["output_throughput"]) for m in runs]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (key, title) in zip(axes, (("ttft_ms", "Time to first token"),
                                       ("itl_ms", "Inter-token latency"),
                                       ("e2el_ms", "End-to-end latency"))):
        for stat, style in (("p50", "o-"), ("p99", "s--")):
            ax.plot(x, [num(m[key][stat]) for m in runs], style, label=stat)
        for m, xi in zip(runs, x):
            yi = num(m[key]["p50"])
            if not (math.isfinite(xi) and math.isfinite(yi)):
                continue
            label = (f"c={m['max_concurrency']}" if m.get("max_concurrency")
                     else f"r={m.get('request_rate')}")
            ax.annotate(label, (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_title(title)
        ax.set_xlabel("output throughput (tok/s)")
        ax.set_ylabel("ms")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class Progress:
    """A progress bar on stderr (tqdm when installed, else a plain counter)."""

    def __init__(self, total: int, enabled: bool = True, desc: str = "requests"):
        self._bar = None
        self._done = self._failed = 0
        self._total = total
        self._enabled = enabled
        if enabled:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True)
            except ImportError:
                self._bar = None

    def __call__(self, result: RequestResult) -> None:
        self._done += 1
        self._failed += 0 if result.success else 1
        if not self._enabled:
            return
        if self._bar is not None:
            self._bar.update(1)
            if self._failed:
                self._bar.set_postfix(failed=self._failed)
        elif self._done == self._total or self._done % max(1, self._total // 20) == 0:
            print(f"\r{self._done}/{self._total} done, {self._failed} failed", end="", file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self._enabled:
            print(file=sys.stderr)
