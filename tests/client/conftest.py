"""One real tritonserver (tiny model, CPU) shared by the tests/client modules that need it."""

from __future__ import annotations

import time

import pytest


@pytest.fixture(scope="session")
def llm_server(tmp_path_factory, tiny_model_dir, triton_server_factory):
    """A started TritonServer with paged_llm, preprocessing, postprocessing and ensemble."""
    from paged_engine.deploy.repository import prepare_model_repository

    repo = prepare_model_repository(tmp_path_factory.mktemp("client-repo"), tiny_model_dir,
                                    num_kv_blocks=128, max_num_seqs=16, max_model_len=1024)
    return triton_server_factory(repo)


class EngineMetrics:
    """The engine's vllm:* gauges on a server's metrics port."""

    def __init__(self, metrics_url: str):
        self.metrics_url = metrics_url

    def gauges(self) -> dict[str, float]:
        return engine_gauges(self.metrics_url)

    def wait(self, name: str, predicate, timeout_s: float = 20.0) -> float:
        return wait_for_gauge(self.metrics_url, name, predicate, timeout_s)

    def wait_idle(self) -> None:
        """No request running and no KV-cache block held by a live sequence."""
        self.wait("vllm:num_requests_running", lambda v: v == 0)
        self.wait("vllm:kv_cache_blocks_used", lambda v: v == 0)


@pytest.fixture(scope="session")
def engine_metrics(llm_server) -> EngineMetrics:
    return EngineMetrics(llm_server.metrics_url)


def engine_gauges(metrics_url: str) -> dict[str, float]:
    """The vllm:* counters and gauges now, summed over labels."""
    from paged_triton.client.metrics import HistogramSummary, fetch_metrics, parse_prometheus, summarize

    samples, types = parse_prometheus(fetch_metrics(metrics_url))
    out = {}
    for name, by_labels in summarize(samples, types).items():
        values = [v for v in by_labels.values() if not isinstance(v, HistogramSummary)]
        if values:
            out[name] = sum(values)
    return out


def wait_for_gauge(metrics_url: str, name: str, predicate, timeout_s: float = 20.0) -> float:
    """Poll the metrics until predicate(value of `name`) holds; returns the value."""
    deadline = time.monotonic() + timeout_s
    value = None
    while time.monotonic() < deadline:
        value = engine_gauges(metrics_url).get(name)
        if value is not None and predicate(value):
            return value
        time.sleep(0.1)
    raise AssertionError(f"{name} stayed at {value} for {timeout_s} s")
