"""ServingMetrics turns the engine's speculative-decoding counts into Triton counters (a fake
pb_utils records what a real Triton would get; the real server is tested in
test_serving_spec_decode.py)."""

from paged_engine.serving.metrics import ServingMetrics


class _Metric:
    def __init__(self, labels):
        self.labels, self.value = labels, 0.0

    def increment(self, v):
        self.value += v

    def set(self, v):
        self.value = v

    def observe(self, v):
        pass


class _Family:
    COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"

    def __init__(self, name, description, kind):
        self.name, self.kind, self.metrics = name, kind, []
        _Fake.families[name] = self

    def Metric(self, labels, buckets=None):
        m = _Metric(labels)
        self.metrics.append(m)
        return m


class _Fake:
    families: dict = {}
    MetricFamily = _Family


def test_spec_counters_and_per_position():
    _Fake.families = {}
    m = ServingMetrics(_Fake, {"model": "paged_llm", "version": "1"})
    m.update_from_stats({"spec_num_drafts": 3, "spec_num_draft_tokens": 12,
                         "spec_num_accepted_tokens": 7, "spec_accepted_per_pos": [3, 2, 1, 1]})
    m.update_from_stats({"spec_num_drafts": 5, "spec_num_draft_tokens": 20,
                         "spec_num_accepted_tokens": 9, "spec_accepted_per_pos": [4, 3, 1, 1]})
    f = _Fake.families
    assert f["vllm:spec_decode_num_drafts_total"].metrics[0].value == 5
    assert f["vllm:spec_decode_num_draft_tokens_total"].metrics[0].value == 20
    assert f["vllm:spec_decode_num_accepted_tokens_total"].metrics[0].value == 9
    per_pos = f["vllm:spec_decode_num_accepted_tokens_per_pos"]
    assert per_pos.kind == "counter"
    assert [(x.labels["position"], x.value) for x in per_pos.metrics] == [
        ("0", 4), ("1", 3), ("2", 1), ("3", 1)]
    assert per_pos.metrics[0].labels["model"] == "paged_llm"


def test_no_speculation_no_per_position_family():
    _Fake.families = {}
    m = ServingMetrics(_Fake, {"model": "paged_llm", "version": "1"})
    m.update_from_stats({"spec_num_drafts": 0, "spec_accepted_per_pos": []})
    assert "vllm:spec_decode_num_accepted_tokens_per_pos" not in _Fake.families
    assert _Fake.families["vllm:spec_decode_num_drafts_total"].metrics[0].value == 0
