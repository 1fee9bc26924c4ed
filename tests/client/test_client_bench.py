"""Bench statistics, workloads and report/plot output (no server)."""

import json
import math
import random

import pytest

from paged_triton.client.bench import (
    RequestResult,
    arrival_offsets,
    compute_metrics,
    format_report,
    load_jsonl,
    plot_runs,
    summary_stats,
    synthetic_requests,
)


def test_summary_stats_match_numpy_linear_percentiles():
    np = pytest.importorskip("numpy")
    rng = random.Random(0)
    values = [rng.expovariate(1.0) for _ in range(101)]
    s = summary_stats(values)
    for q in (50, 90, 99):
        assert s[f"p{q}"] == pytest.approx(float(np.percentile(values, q)))
    assert s["mean"] == pytest.approx(float(np.mean(values)))
    assert s["std"] == pytest.approx(float(np.std(values)))
    assert s["min"] <= s["p50"] <= s["p90"] <= s["p99"] <= s["max"]
    assert summary_stats([3.0])["p99"] == 3.0
    assert math.isnan(summary_stats([])["mean"])


def _result(ttft, latency, tokens, itl=None, ok=True, error=None, inputs=10):
    return RequestResult(success=ok, error=error, ttft_s=ttft, latency_s=latency,
                         itl_s=itl or [], num_input_tokens=inputs, num_output_tokens=tokens,
                         finish_reason="length" if ok else None)


def test_compute_metrics_counts_and_throughputs():
    results = [_result(0.1, 0.5, 5, [0.1] * 4), _result(0.2, 1.2, 11, [0.1] * 10),
               _result(None, None, 0, ok=False, error="InvalidArgument: bad"),
               _result(None, None, 0, ok=False, error="InvalidArgument: bad")]
    m = compute_metrics(results, duration_s=2.0)
    assert (m["num_requests"], m["completed"], m["failed"]) == (4, 2, 2)
    assert m["errors"] == {"InvalidArgument: bad": 2}
    assert m["total_output_tokens"] == 16 and m["total_input_tokens"] == 20
    assert m["output_throughput"] == pytest.approx(8.0)
    assert m["request_throughput"] == pytest.approx(1.0)
    assert m["total_token_throughput"] == pytest.approx(18.0)
    assert m["ttft_ms"]["mean"] == pytest.approx(150.0)
    assert m["e2el_ms"]["max"] == pytest.approx(1200.0)
    assert m["tpot_ms"]["min"] == pytest.approx(100.0) and m["tpot_ms"]["max"] == pytest.approx(100.0)
    assert m["itl_ms"]["p50"] == pytest.approx(100.0)
    assert m["finish_reasons"] == {"length": 2}
    report = format_report(m)
    assert "Successful requests:" in report and "failed x2: InvalidArgument: bad" in report


def test_arrival_offsets_poisson_and_burst():
    assert arrival_offsets(5, math.inf) == [0.0] * 5
    offsets = arrival_offsets(4000, 20.0, seed=1)
    gaps = [b - a for a, b in zip(offsets, offsets[1:])]
    assert offsets == sorted(offsets) and offsets[0] == 0.0
    assert sum(gaps) / len(gaps) == pytest.approx(1 / 20.0, rel=0.08)
    assert arrival_offsets(10, 5.0, seed=3) == arrival_offsets(10, 5.0, seed=3)
    with pytest.raises(ValueError):
        arrival_offsets(3, 0.0)


def test_synthetic_requests_lengths():
    reqs = synthetic_requests(50, 20, 8, input_len_range=0.5, output_len_range=0.25, seed=2)
    assert len(reqs) == 50
    assert all(10 <= len(r.prompt.split()) <= 30 for r in reqs)
    assert all(6 <= r.max_tokens <= 10 for r in reqs)
    assert len({r.max_tokens for r in reqs}) > 1
    fixed = synthetic_requests(3, 7, 4, prefix_len=5)
    assert all(len(r.prompt.split()) == 12 and r.max_tokens == 4 for r in fixed)
    assert len({" ".join(r.prompt.split()[:5]) for r in fixed}) == 1
    with pytest.raises(ValueError):
        synthetic_requests(3, 7, 4, input_len_range=1.5)


def test_synthetic_requests_with_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    reqs = synthetic_requests(5, 32, 4, tokenizer=tok)
    lengths = [len(tok(r.prompt, add_special_tokens=False).input_ids) for r in reqs]
    assert all(24 <= n <= 40 for n in lengths), lengths


def test_load_jsonl(tmp_path):
    path = tmp_path / "w.jsonl"
    path.write_text('{"prompt": "a", "max_tokens": 3}\n\n{"text": "b", "output_len": 5, '
                    '"sampling": {"temperature": 0}}\n"c"\n')
    reqs = load_jsonl(str(path), num_requests=5, default_output_len=9)
    assert [(r.prompt, r.max_tokens) for r in reqs] == [("a", 3), ("b", 5), ("c", 9), ("a", 3), ("b", 5)]
    assert reqs[1].sampling == {"temperature": 0}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": ""}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        load_jsonl(str(bad))


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    runs = []
    for rate, scale in (("1.0", 1.0), ("inf", 2.0)):
        m = compute_metrics([_result(0.1 * scale, 0.5 * scale, 5, [0.1 * scale] * 4)], 1.0 / scale)
        m["request_rate"], m["max_concurrency"] = rate, None
        runs.append(m)
    out = tmp_path / "p.png"
    plot_runs(runs, str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    json.dumps(runs)  # metrics are JSON-serialisable


def test_json_is_strict_and_plots_back(tmp_path):
    pytest.importorskip("matplotlib")
    from paged_triton.client.bench import BenchResult, results_to_json
    from paged_triton.client.cli import main

    m = compute_metrics([_result(0.1, 0.1, 1)], 0.5)  # one token: no TPOT/ITL -> NaN stats
    m["request_rate"], m["max_concurrency"] = "inf", 4
    doc = results_to_json([BenchResult(m, [_result(0.1, 0.1, 1)])], {"rate": math.inf})
    text = json.dumps(doc, allow_nan=False)  # no NaN / Infinity literals
    loaded = json.loads(text)
    assert loaded["runs"][0]["metrics"]["tpot_ms"]["p50"] is None and loaded["config"]["rate"] == "inf"
    path = tmp_path / "r.json"
    path.write_text(text)
    assert main(["plot", str(path), "--out", str(tmp_path / "r.png")]) == 0
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
