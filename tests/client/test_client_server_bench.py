"""`paged-client bench`, `metrics` and `health` against a real tritonserver.

The bench numbers come from real timings, so the checks are about counts and consistency,
never speed."""

from __future__ import annotations

import json

import pytest

from paged_triton.client.cli import main

pytestmark = pytest.mark.server


def _check_run(run, num_requests, output_len):
    m = run["metrics"]
    requests = run["requests"]
    assert (m["num_requests"], m["completed"], m["failed"]) == (num_requests, num_requests, 0)
    assert len(requests) == num_requests and all(r["success"] for r in requests)
    # ignore_eos: every request generates exactly its max_tokens
    assert all(r["num_output_tokens"] == output_len for r in requests)
    assert all(r["finish_reason"] == "length" for r in requests)
    assert m["total_output_tokens"] == num_requests * output_len == \
        sum(r["num_output_tokens"] for r in requests)
    assert m["total_input_tokens"] == sum(r["num_input_tokens"] for r in requests) > 0
    assert m["output_throughput"] == pytest.approx(m["total_output_tokens"] / m["duration_s"])
    assert m["request_throughput"] == pytest.approx(num_requests / m["duration_s"])
    for key in ("ttft_ms", "itl_ms", "tpot_ms", "e2el_ms"):
        s = m[key]
        assert 0 <= s["min"] <= s["p50"] <= s["p90"] <= s["p99"] <= s["max"], key
    for r in requests:
        assert 0 < r["ttft_s"] <= r["latency_s"]
        assert len(r["itl_s"]) <= output_len - 1
        assert r["start_s"] + r["latency_s"] <= m["duration_s"] + 1e-6
    assert m["e2el_ms"]["max"] <= m["duration_s"] * 1000 + 1e-3


def test_bench_concurrency_and_rate_sweep(llm_server, tmp_path, capsys):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    rc = main(["bench", "--url", llm_server.grpc_url, "-n", "6", "--input-len", "12",
               "--output-len", "5", "--max-concurrency", "3", "--request-rate", "20,inf",
               "--json", str(out), "--plot", str(png), "--no-progress"])
    assert rc == 0
    report = capsys.readouterr().out
    assert report.count("Serving Benchmark Result") == 2 and "Successful requests:" in report
    doc = json.loads(out.read_text())
    assert len(doc["runs"]) == 2
    for run in doc["runs"]:
        _check_run(run, 6, 5)
    assert doc["runs"][0]["metrics"]["max_concurrency"] == 3
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_bench_http_jsonl_dataset(llm_server, tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"request number {i} says", "max_tokens": 4})
                              for i in range(3)))
    out = tmp_path / "bench.json"
    rc = main(["bench", "--url", llm_server.http_url, "--protocol", "http", "-n", "4",
               "--dataset", str(data), "--json", str(out), "--no-progress"])
    assert rc == 0
    _check_run(json.loads(out.read_text())["runs"][0], 4, 4)


def test_bench_counts_failures(llm_server, tmp_path):
    out = tmp_path / "bench.json"
    rc = main(["bench", "--url", llm_server.grpc_url, "-n", "3", "--output-len", "3",
               "--temperature", "-1", "--json", str(out), "--no-progress"])
    assert rc == 2  # some requests failed
    m = json.loads(out.read_text())["runs"][0]["metrics"]
    assert (m["completed"], m["failed"]) == (0, 3)
    (error,) = m["errors"]
    assert error.startswith("InvalidArgument") and "temperature" in error


def test_metrics_and_health_commands(llm_server, capsys):
    assert main(["metrics", "--metrics-url", llm_server.metrics_url]) == 0
    table = capsys.readouterr().out
    for name in ("vllm:kv_cache_blocks_total", "vllm:num_requests_running",
                 "vllm:generation_tokens_total", "vllm:time_to_first_token_seconds"):
        assert name in table
    assert main(["health", "--url", llm_server.grpc_url]) == 0
    health = capsys.readouterr().out
    assert "ready=True" in health and "paged_llm: READY" in health and "ensemble: READY" in health
    assert main(["health", "--url", llm_server.http_url, "--protocol", "http",
                 "--model", "missing_model"]) == 1
    assert main(["generate", "Hello", "--url", llm_server.grpc_url, "--max-tokens", "3",
                 "--stream", "--ignore-eos"]) == 0
    assert "finish_reason=length" in capsys.readouterr().err


def test_bench_workers_share_one_workload(llm_server, tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["bench", "--url", llm_server.grpc_url, "-n", "7", "--input-len", "10",
               "--output-len", "4", "--request-rate", "50", "--workers", "2",
               "--json", str(out), "--no-progress"])
    assert rc == 0
    (run,) = json.loads(out.read_text())["runs"]
    _check_run(run, 7, 4)
    assert run["metrics"]["workers"] == 2
    # Poisson arrivals at 50/s: the workers keep the single-process schedule, so requests start
    # in workload order (to within scheduling noise) on one clock.
    starts = [r["start_s"] for r in run["requests"]]
    assert all(b >= a - 0.05 for a, b in zip(starts, starts[1:])), starts
    assert min(starts) >= 0

    assert main(["bench", "--url", llm_server.grpc_url, "-n", "2", "--max-concurrency", "1",
                 "--workers", "2", "--no-progress"]) == 2
    assert "below --workers" in capsys.readouterr().err


def test_concurrency_is_split_among_workers():
    from paged_triton.client.bench_workers import split_concurrency

    assert split_concurrency(7, 3) == [3, 2, 2] and sum(split_concurrency(256, 5)) == 256
    assert split_concurrency(None, 2) == [None, None]
    with pytest.raises(ValueError, match="below --workers"):
        split_concurrency(1, 2)
