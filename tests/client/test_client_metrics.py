"""Prometheus parsing and the `paged-client metrics` summary (no server)."""

import pytest

from paged_triton.client.metrics import format_summary, parse_prometheus, summarize

TEXT = """\
# HELP vllm:num_requests_running Requests running
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model="paged_llm",version="1"} 3
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{model="paged_llm",version="1"} 120
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{model="paged_llm",le="0.1"} 2
vllm:time_to_first_token_seconds_bucket{model="paged_llm",le="0.5"} 8
vllm:time_to_first_token_seconds_bucket{model="paged_llm",le="+Inf"} 10
vllm:time_to_first_token_seconds_sum{model="paged_llm"} 3.0
vllm:time_to_first_token_seconds_count{model="paged_llm"} 10
# TYPE nv_inference_count counter
nv_inference_count{model="paged_llm",version="1"} 7
"""


def test_parse_and_summarize():
    samples, types = parse_prometheus(TEXT)
    assert types["vllm:time_to_first_token_seconds"] == "histogram"
    assert len(samples) == 8
    assert samples[0].label("model") == "paged_llm"
    summary = summarize(samples, types)
    assert set(summary) == {"vllm:num_requests_running", "vllm:prompt_tokens_total",
                            "vllm:time_to_first_token_seconds"}
    assert summary["vllm:num_requests_running"]["model=paged_llm,version=1"] == 3
    (hist,) = summary["vllm:time_to_first_token_seconds"].values()
    assert hist.count == 10 and hist.mean == pytest.approx(0.3)
    assert hist.quantile(0.5) == pytest.approx(0.1 + 0.4 * (5 - 2) / 6)
    assert hist.quantile(0.99) == pytest.approx(0.5)  # beyond the last finite bucket
    table = format_summary(summary, types)
    assert "vllm:prompt_tokens_total" in table and "counter" in table and "count=10" in table
    assert "nv_inference_count" in format_summary(summarize(samples, types, prefix=""), types)
    assert "no vllm:* metrics" in format_summary({}, {})
