"""Engine metrics through Triton's custom metrics (`pb_utils.MetricFamily`), on the metrics port.

vllm_backend's and vLLM's names for what they have, plus gauges of scheduler and KV-cache state
that none of the peers exports. Every update is a message to the Triton process, so the engine
thread never calls these: it hands values to the sender thread, which does.

Per-request histograms (TTFT, e2e latency, prompt / generation tokens, n, max_tokens, the mean time
per output token) get one observation per request. Per-token latencies cannot: an observation per
token would cost a message to Triton per token, as much as sending the token. The engine thread
bins them itself (`TokenLatencyBuckets`), and the sender thread publishes the bins once a second
(and when the engine goes idle) as
Prometheus histogram series made of counters: `<name>_bucket{le=...}`, `<name>_sum`,
`<name>_count`, which is what `histogram_quantile` and vLLM's dashboards read (the `# TYPE` line
says counter, since Triton's Python backend cannot add to a histogram's buckets directly). Names:

| name | one observation per | vLLM / vllm_backend meaning |
|---|---|---|
| vllm:inter_token_latency_seconds | token after the first (engine step) | vLLM v1, same |
| vllm:time_per_output_token_seconds | token after the first (engine step) | vllm_backend / vLLM v0, same |
| vllm:request_time_per_output_token_seconds | request: (last - first token) / (tokens - 1) | vLLM v1, same |
"""

from __future__ import annotations

import bisect

# Buckets as vLLM's.
TTFT_BUCKETS_S = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                  5.0, 7.5, 10.0, 20.0, 40.0, 80.0]
TPOT_BUCKETS_S = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                  7.5, 10.0, 20.0, 40.0, 80.0]
E2E_BUCKETS_S = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]
N_BUCKETS = [1, 2, 5, 10, 20]


def buckets_1_2_5(max_value: int) -> list[float]:
    """1, 2, 5, 10, 20, 50, ... up to max_value (vLLM's build_1_2_5_buckets)."""
    out, exponent = [], 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10 ** exponent
            if value > max_value:
                return out
            out.append(float(value))
        exponent += 1


COUNTERS = {
    "vllm:prompt_tokens_total": "Number of prefill tokens processed.",
    "vllm:generation_tokens_total": "Number of generation tokens processed.",
    "vllm:num_preemptions_total": "Cumulative number of preempted requests.",
    "vllm:prefix_cache_queries_total": "Prompt tokens looked up in the prefix cache.",
    "vllm:prefix_cache_hits_total": "Prompt tokens found in the prefix cache.",
    "vllm:spec_decode_num_drafts_total": "Number of spec decoding drafts (sequence-steps with drafts).",
    "vllm:spec_decode_num_draft_tokens_total": "Number of draft tokens verified.",
    "vllm:spec_decode_num_accepted_tokens_total": "Number of accepted draft tokens.",
}
# Counter with a "position" label per draft position (created once the engine reports k).
SPEC_PER_POS = ("vllm:spec_decode_num_accepted_tokens_per_pos",
                "Accepted draft tokens at each draft position (0-based).")
GAUGES = {
    "vllm:num_requests_running": "Number of requests in the running batch.",
    "vllm:num_requests_waiting": "Number of requests waiting to be scheduled.",
    "vllm:kv_cache_blocks_total": "KV-cache blocks allocated.",
    "vllm:kv_cache_blocks_used": "KV-cache blocks holding live sequences.",
    "vllm:kv_cache_blocks_free": "KV-cache blocks free (cached prefix blocks included).",
    "vllm:gpu_cache_usage_perc": "KV-cache usage, 1 = full.",
    "vllm:prefix_cache_hit_rate": "Prefix-cache hit rate over all prompt tokens looked up.",
    "vllm:engine_healthy": "1 while the engine thread runs, 0 after it died.",
}
# Histograms observed once per request: name -> (description, buckets, or None for token counts
# bucketed 1-2-5 up to max_model_len).
HISTOGRAMS = {
    "vllm:time_to_first_token_seconds": ("Histogram of time to first token in seconds.",
                                         TTFT_BUCKETS_S),
    "vllm:e2e_request_latency_seconds": ("Histogram of end to end request latency in seconds.",
                                         E2E_BUCKETS_S),
    "vllm:request_time_per_output_token_seconds": (
        "Histogram of time_per_output_token_seconds per request.", TPOT_BUCKETS_S),
    "vllm:request_prompt_tokens": ("Number of prefill tokens processed.", None),
    "vllm:request_generation_tokens": ("Number of generation tokens processed.", None),
    "vllm:request_max_num_generation_tokens": (
        "Histogram of maximum number of generation tokens among a request's sequences.", None),
    "vllm:request_params_n": ("Histogram of the n request parameter.", N_BUCKETS),
    "vllm:request_params_max_tokens": ("Histogram of the max_tokens request parameter.", None),
}
# Per-token histograms, published from the engine thread's own bins (see the module docstring).
TOKEN_HISTOGRAMS = {
    "vllm:inter_token_latency_seconds": "Histogram of inter-token latency in seconds.",
    "vllm:time_per_output_token_seconds": "Histogram of time per output token in seconds.",
}
FINISH_REASONS = ("stop", "length", "abort")


class TokenLatencyBuckets:
    """Per-token latencies binned where they happen (the engine thread), without messages.

    `add` is a bisect and three additions; `take` hands the counts gathered since the last
    `take` to whoever publishes them.
    """

    def __init__(self, bounds_s: list[float] = TPOT_BUCKETS_S):
        self.bounds_s = list(bounds_s)
        self._counts = [0] * (len(self.bounds_s) + 1)  # per bucket, not cumulative; last: +Inf
        self._sum_s = 0.0
        self._n = 0

    def add(self, value_s: float) -> None:
        self._counts[bisect.bisect_left(self.bounds_s, value_s)] += 1
        self._sum_s += value_s
        self._n += 1

    def take(self) -> tuple[list[int], float, int] | None:
        """(per-bucket counts, sum, count) since the last take, or None when nothing came."""
        if not self._n:
            return None
        taken = (self._counts, self._sum_s, self._n)
        self._counts = [0] * (len(self.bounds_s) + 1)
        self._sum_s, self._n = 0.0, 0
        return taken


class ServingMetrics:
    """The metric families of one model instance.

    Args:
        pb_utils: the `triton_python_backend_utils` module.
        labels: e.g. {"model": "paged_llm", "version": "1"}.
    """

    def __init__(self, pb_utils, labels: dict[str, str], max_model_len: int = 8192):
        self._families = []
        self._metrics = {}
        counter, gauge = pb_utils.MetricFamily.COUNTER, pb_utils.MetricFamily.GAUGE

        def family(name, description, kind):
            fam = pb_utils.MetricFamily(name=name, description=description, kind=kind)
            self._families.append(fam)
            return fam

        for table, kind in ((COUNTERS, counter), (GAUGES, gauge)):
            for name, description in table.items():
                self._metrics[name] = family(name, description, kind).Metric(labels=labels)
        token_buckets = buckets_1_2_5(max(1, int(max_model_len)))
        for name, (description, buckets) in HISTOGRAMS.items():
            fam = family(name, description, pb_utils.MetricFamily.HISTOGRAM)
            self._metrics[name] = fam.Metric(labels=labels, buckets=buckets or token_buckets)
        success = family("vllm:request_success_total", "Count of successfully processed requests.",
                         counter)
        self._success = {reason: success.Metric(labels={**labels, "finished_reason": reason})
                         for reason in FINISH_REASONS}
        # Per-token histograms as counters: name -> (bucket counters by upper bound, sum, count).
        self._token_series = {}
        for name, description in TOKEN_HISTOGRAMS.items():
            bucket_family = family(f"{name}_bucket", description, counter)
            le = [*(_le(b) for b in TPOT_BUCKETS_S), "+Inf"]
            self._token_series[name] = (
                [bucket_family.Metric(labels={**labels, "le": v}) for v in le],
                family(f"{name}_sum", description, counter).Metric(labels=labels),
                family(f"{name}_count", description, counter).Metric(labels=labels),
            )
        self._last_counter_values: dict[str, float] = {}
        self._metrics["vllm:engine_healthy"].set(1.0)
        self._pb_utils = pb_utils
        self._labels = labels
        self._per_pos: list = []

    def observe(self, name: str, value: float) -> None:
        self._metrics[name].observe(float(value))

    def finished(self, finish_reason: str | None, observations: dict[str, float]) -> None:
        """One finished request: its per-request observations and its success count."""
        for name, value in observations.items():
            self._metrics[name].observe(float(value))
        success = self._success.get(str(finish_reason))
        if success is not None:
            success.increment(1.0)

    def add_token_latencies(self, taken: tuple[list[int], float, int]) -> None:
        """Publish `TokenLatencyBuckets.take()` into every per-token histogram."""
        counts, total_s, n = taken
        for buckets, sum_metric, count_metric in self._token_series.values():
            cumulative = 0
            for metric, count in zip(buckets, counts):
                cumulative += count
                if cumulative:
                    metric.increment(float(cumulative))
            sum_metric.increment(float(total_s))
            count_metric.increment(float(n))

    def set_healthy(self, healthy: bool) -> None:
        self._metrics["vllm:engine_healthy"].set(1.0 if healthy else 0.0)

    def update_from_stats(self, stats: dict) -> None:
        """Counters and gauges from `LLMEngine.stats()` (cumulative counts become increments)."""
        total = int(stats.get("kv_blocks_total", 0))
        free = int(stats.get("kv_blocks_free", 0))
        queries = float(stats.get("prefix_cache_queries", 0))
        hits = float(stats.get("prefix_cache_hits", 0))
        used = int(stats.get("kv_blocks_used", total - free))
        gauges = {
            "vllm:num_requests_running": stats.get("running", 0),
            "vllm:num_requests_waiting": stats.get("waiting", 0),
            "vllm:kv_cache_blocks_total": total,
            "vllm:kv_cache_blocks_used": used,
            "vllm:kv_cache_blocks_free": free,
            "vllm:gpu_cache_usage_perc": used / total if total else 0.0,
            "vllm:prefix_cache_hit_rate": stats.get("prefix_cache_hit_rate",
                                                    hits / queries if queries else 0.0),
        }
        for name, value in gauges.items():
            self._metrics[name].set(float(value))
        counters = {
            "vllm:prompt_tokens_total": stats.get("prompt_tokens_total", 0),
            "vllm:generation_tokens_total": stats.get("generation_tokens_total", 0),
            "vllm:num_preemptions_total": stats.get("preemptions", 0),
            "vllm:prefix_cache_queries_total": queries,
            "vllm:prefix_cache_hits_total": hits,
            "vllm:spec_decode_num_drafts_total": stats.get("spec_num_drafts", 0),
            "vllm:spec_decode_num_draft_tokens_total": stats.get("spec_num_draft_tokens", 0),
            "vllm:spec_decode_num_accepted_tokens_total": stats.get("spec_num_accepted_tokens", 0),
        }
        per_pos = list(stats.get("spec_accepted_per_pos") or ())
        if per_pos and not self._per_pos:
            name, description = SPEC_PER_POS
            family = self._pb_utils.MetricFamily(name=name, description=description,
                                                 kind=self._pb_utils.MetricFamily.COUNTER)
            self._families.append(family)
            self._per_pos = [family.Metric(labels={**self._labels, "position": str(j)})
                             for j in range(len(per_pos))]
        for j, value in enumerate(per_pos[:len(self._per_pos)]):
            counters[(SPEC_PER_POS[0], j)] = value
        for name, value in counters.items():
            delta = float(value) - self._last_counter_values.get(name, 0.0)
            if delta > 0:
                metric = self._per_pos[name[1]] if isinstance(name, tuple) else self._metrics[name]
                metric.increment(delta)
                self._last_counter_values[name] = float(value)

    def close(self) -> None:
        # Metrics must go before their families (the backend says so).
        self._metrics.clear()
        self._per_pos = []
        self._success.clear()
        self._token_series.clear()
        self._families.clear()


def _le(bound: float) -> str:
    """A bucket bound as Prometheus clients write `le`: "0.01", "1.0", "+Inf"."""
    return repr(float(bound))
