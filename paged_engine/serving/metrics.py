"""Engine metrics through Triton's custom metrics (`pb_utils.MetricFamily`), on the metrics port.

vllm_backend's names for what it has (token counters, latency histograms; the Python backend of
Triton 2.51 supports COUNTER, GAUGE and HISTOGRAM families), plus gauges of scheduler and KV-cache
state that none of the peers exports. Every update is a message to the Triton process, so the
engine thread never calls these: it hands snapshots to the sender thread, which does.
"""

from __future__ import annotations

# Buckets as vLLM's.
TTFT_BUCKETS_S = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                  5.0, 7.5, 10.0, 20.0, 40.0, 80.0]
TPOT_BUCKETS_S = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                  7.5, 10.0, 20.0, 40.0, 80.0]
E2E_BUCKETS_S = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]

COUNTERS = {
    "vllm:prompt_tokens_total": "Number of prefill tokens processed.",
    "vllm:generation_tokens_total": "Number of generation tokens processed.",
    "vllm:num_preemptions_total": "Cumulative number of preempted requests.",
    "vllm:prefix_cache_queries_total": "Prompt tokens looked up in the prefix cache.",
    "vllm:prefix_cache_hits_total": "Prompt tokens found in the prefix cache.",
}
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
HISTOGRAMS = {
    "vllm:time_to_first_token_seconds": ("Histogram of time to first token in seconds.",
                                         TTFT_BUCKETS_S),
    "vllm:time_per_output_token_seconds": ("Histogram of time per output token in seconds.",
                                           TPOT_BUCKETS_S),
    "vllm:e2e_request_latency_seconds": ("Histogram of end to end request latency in seconds.",
                                         E2E_BUCKETS_S),
}


class ServingMetrics:
    """The metric families of one model instance.

    Args:
        pb_utils: the `triton_python_backend_utils` module.
        labels: e.g. {"model": "paged_llm", "version": "1"}.
    """

    def __init__(self, pb_utils, labels: dict[str, str]):
        self._families = []
        self._metrics = {}
        kinds = ((COUNTERS, pb_utils.MetricFamily.COUNTER), (GAUGES, pb_utils.MetricFamily.GAUGE))
        for table, kind in kinds:
            for name, description in table.items():
                family = pb_utils.MetricFamily(name=name, description=description, kind=kind)
                self._families.append(family)
                self._metrics[name] = family.Metric(labels=labels)
        for name, (description, buckets) in HISTOGRAMS.items():
            family = pb_utils.MetricFamily(name=name, description=description,
                                           kind=pb_utils.MetricFamily.HISTOGRAM)
            self._families.append(family)
            self._metrics[name] = family.Metric(labels=labels, buckets=buckets)
        self._last_counter_values: dict[str, float] = {}
        self._metrics["vllm:engine_healthy"].set(1.0)

    def observe(self, name: str, value_s: float) -> None:
        self._metrics[name].observe(float(value_s))

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
        }
        for name, value in counters.items():
            delta = float(value) - self._last_counter_values.get(name, 0.0)
            if delta > 0:
                self._metrics[name].increment(delta)
                self._last_counter_values[name] = float(value)

    def close(self) -> None:
        # Metrics must go before their families (the backend says so).
        self._metrics.clear()
        self._families.clear()
