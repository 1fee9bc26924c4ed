"""Read the engine's metrics from Triton's metrics port (Prometheus text format).

`parse_prometheus(text)` gives every sample; `summarize(samples)` folds the `vllm:*` families into
a readable table: counters and gauges as values, histograms as count / mean / approximate
quantiles from their buckets.
"""

from __future__ import annotations

import math
import re
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from paged_triton.client.errors import ConnectionFailed, error_from_http

_SAMPLE_RE = re.compile(
    r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})?\s+(?P<value>\S+)(?:\s+\S+)?$')
_LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class Sample:
    name: str
    labels: tuple[tuple[str, str], ...]
    value: float

    def label(self, key: str, default: str | None = None) -> str | None:
        return dict(self.labels).get(key, default)


def parse_prometheus(text: str) -> tuple[list[Sample], dict[str, str]]:
    """(samples, {family name: type}) from Prometheus text exposition format."""
    samples: list[Sample] = []
    types: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("#"):
            parts = line.split(None, 3)
            if len(parts) >= 4 and parts[1] == "TYPE":
                types[parts[2]] = parts[3].strip()
            continue
        m = _SAMPLE_RE.match(line)
        if not m:
            continue
        labels = tuple(
            (k, v.encode().decode("unicode_escape")) for k, v in _LABEL_RE.findall(m["labels"] or ""))
        try:
            value = float(m["value"])
        except ValueError:
            continue
        samples.append(Sample(m["name"], labels, value))
    return samples, types


def fetch_metrics(url: str, timeout_s: float = 10.0) -> str:
    """The metrics text from `url` (e.g. http://localhost:8002/metrics)."""
    if not url.startswith(("http://", "https://")):
        url = "http://" + url
    if not url.rstrip("/").endswith("/metrics"):
        url = url.rstrip("/") + "/metrics"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.read().decode("utf-8", errors="replace")
    except urllib.error.HTTPError as e:
        raise error_from_http(e.code, e.read().decode(errors="replace"), url) from None
    except (urllib.error.URLError, OSError) as e:
        raise ConnectionFailed(f"cannot reach the metrics endpoint at {url}: {e}", url=url) from None


@dataclass
class HistogramSummary:
    count: float = 0.0
    sum: float = 0.0
    buckets: list[tuple[float, float]] = field(default_factory=list)  # (upper bound, cumulative)

    @property
    def mean(self) -> float:
        return self.sum / self.count if self.count else float("nan")

    def quantile(self, q: float) -> float:
        """Approximate quantile by linear interpolation inside the bucket (as PromQL does)."""
        if not self.count or not self.buckets:
            return float("nan")
        buckets = sorted(self.buckets)
        rank = q * buckets[-1][1]
        prev_bound, prev_count = 0.0, 0.0
        for bound, cumulative in buckets:
            if cumulative >= rank:
                if math.isinf(bound):
                    return prev_bound
                if cumulative == prev_count:
                    return bound
                return prev_bound + (bound - prev_bound) * (rank - prev_count) / (cumulative - prev_count)
            prev_bound, prev_count = bound, cumulative
        return buckets[-1][0]


def _labels_key(labels: tuple[tuple[str, str], ...], drop: str = "le") -> str:
    shown = [f"{k}={v}" for k, v in labels if k != drop]
    return ",".join(shown)


def summarize(samples: list[Sample], types: dict[str, str], prefix: str = "vllm:") -> dict[str, dict]:
    """{family: {labels: value or HistogramSummary}} for the families starting with `prefix`."""
    out: dict[str, dict] = {}
    histograms: dict[tuple[str, str], HistogramSummary] = {}
    # Histograms published as counter series (`<name>_bucket{le=...}`, `_sum`, `_count`; the
    # server's per-token latencies) are histograms too.
    bucketed = {s.name[: -len("_bucket")] for s in samples
                if s.name.endswith("_bucket") and s.label("le") is not None}
    for s in samples:
        if not s.name.startswith(prefix):
            continue
        base = None
        for suffix in ("_bucket", "_sum", "_count"):
            stem = s.name[: -len(suffix)]
            if s.name.endswith(suffix) and (types.get(stem) == "histogram" or stem in bucketed):
                base = stem
                break
        if base is None:
            out.setdefault(s.name, {})[_labels_key(s.labels)] = s.value
            continue
        key = (base, _labels_key(s.labels))
        h = histograms.setdefault(key, HistogramSummary())
        if s.name.endswith("_bucket"):
            le = s.label("le", "+Inf")
            h.buckets.append((float("inf") if le in ("+Inf", "Inf") else float(le), s.value))
        elif s.name.endswith("_sum"):
            h.sum = s.value
        else:
            h.count = s.value
    for (base, labels), h in histograms.items():
        out.setdefault(base, {})[labels] = h
    return out


def format_summary(summary: dict[str, dict], types: dict[str, str]) -> str:
    """A readable table of `summarize()`'s result."""
    if not summary:
        return "no vllm:* metrics found (is the engine model loaded, and metrics enabled?)"
    lines = []
    width = max(len(name) for name in summary) + 2
    for name in sorted(summary):
        kind = types.get(name, "")
        for labels, value in sorted(summary[name].items()):
            shown = f"{name}{{{labels}}}" if labels and len(summary[name]) > 1 else name
            if isinstance(value, HistogramSummary):
                lines.append(
                    f"{shown:<{width}} histogram  count={value.count:.0f} mean={_fmt(value.mean)} "
                    f"p50~{_fmt(value.quantile(0.5))} p90~{_fmt(value.quantile(0.9))} "
                    f"p99~{_fmt(value.quantile(0.99))}")
            else:
                lines.append(f"{shown:<{width}} {kind or 'value':<9}  {_fmt(value)}")
    return "\n".join(lines)


def _fmt(v: float) -> str:
    if isinstance(v, float) and math.isnan(v):
        return "-"
    if float(v).is_integer() and abs(v) < 1e15:
        return str(int(v))
    return f"{v:.4g}"
