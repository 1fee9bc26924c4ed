"""The metric families without a server: per-token latencies binned on the engine thread come out
as the Prometheus histogram series a per-token `observe` would give; per-request observations and
the success counter; REPORT_CUSTOM_METRICS turns everything off."""

import random

import pytest

from paged_engine.serving.llm_model import metrics_enabled
from paged_engine.serving.metrics import (TOKEN_HISTOGRAMS, TPOT_BUCKETS_S, ServingMetrics,
                                          TokenLatencyBuckets, buckets_1_2_5)


class FakePb:
    """pb_utils.MetricFamily stand-in recording every metric's value."""

    class MetricFamily:
        COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"
        families = {}

        def __init__(self, name, description, kind):
            self.name, self.kind = name, kind
            FakePb.MetricFamily.families[name] = self
            self.metrics = []

        def Metric(self, labels, buckets=None):
            metric = FakeMetric(labels, buckets)
            self.metrics.append(metric)
            return metric


class FakeMetric:
    def __init__(self, labels, buckets):
        self.labels, self.buckets = dict(labels), buckets
        self.value, self.observed = 0.0, []

    def increment(self, v):
        assert v >= 0
        self.value += v

    def set(self, v):
        self.value = v

    def observe(self, v):
        self.observed.append(v)


@pytest.fixture
def metrics():
    FakePb.MetricFamily.families = {}
    return ServingMetrics(FakePb, {"model": "paged_llm", "version": "1"}, max_model_len=512)


def test_binned_token_latencies_equal_the_histogram_of_every_observation(metrics):
    rng = random.Random(0)
    values = [rng.choice([rng.uniform(0, 0.2), rng.uniform(0, 100), TPOT_BUCKETS_S[3]])
              for _ in range(1000)]
    bins = TokenLatencyBuckets()
    for i, v in enumerate(values):
        bins.add(v)
        if i % 97 == 0:  # published now and then, as the engine thread's stats do
            metrics.add_token_latencies(bins.take())
    metrics.add_token_latencies(bins.take())
    assert bins.take() is None
    families = FakePb.MetricFamily.families
    for name in TOKEN_HISTOGRAMS:
        buckets = {m.labels["le"]: m.value for m in families[f"{name}_bucket"].metrics}
        # The reference: Prometheus's cumulative `le` buckets of the raw values.
        for bound in TPOT_BUCKETS_S:
            assert buckets[repr(bound)] == sum(v <= bound for v in values)
        assert buckets["+Inf"] == len(values)
        assert families[f"{name}_count"].metrics[0].value == len(values)
        assert families[f"{name}_sum"].metrics[0].value == pytest.approx(sum(values))
        assert families[f"{name}_bucket"].kind == "counter"


def test_a_finished_request_is_observed_once_and_counted_by_reason(metrics):
    metrics.finished("length", {"vllm:request_params_n": 2, "vllm:request_prompt_tokens": 7})
    metrics.finished("abort", {"vllm:request_params_n": 1})
    families = FakePb.MetricFamily.families
    assert families["vllm:request_params_n"].metrics[0].observed == [2, 1]
    assert families["vllm:request_params_n"].metrics[0].buckets == [1, 2, 5, 10, 20]
    assert families["vllm:request_prompt_tokens"].metrics[0].buckets == buckets_1_2_5(512)
    success = {m.labels["finished_reason"]: m.value
               for m in families["vllm:request_success_total"].metrics}
    assert success == {"stop": 0.0, "length": 1.0, "abort": 1.0}


def test_buckets_1_2_5():
    assert buckets_1_2_5(512) == [1, 2, 5, 10, 20, 50, 100, 200, 500]


def test_report_custom_metrics_turns_them_off():
    assert metrics_enabled({})
    assert metrics_enabled({"REPORT_CUSTOM_METRICS": {"string_value": "true"}})
    assert not metrics_enabled({"REPORT_CUSTOM_METRICS": {"string_value": "false"}})
    assert not metrics_enabled({"REPORT_CUSTOM_METRICS": {"string_value": "no"}})
    assert not metrics_enabled({"enable_metrics": {"string_value": "false"}})
