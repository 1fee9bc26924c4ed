"""Smoke tests of benchmarks/: the scripts run end to end on CPU with tiny models and their JSON
is self-consistent. Never speed: these check counts and arithmetic only.

The W4 serving script starts a real tritonserver (about 40 s on CPU).
"""

from __future__ import annotations

import json
import math
import random

import pytest

from benchmarks import latency, serving, throughput
from benchmarks.common import KVTracker, percentile
from benchmarks.model_dir import LLAMA3_8B, QWEN3_0_6B, build_synthetic_tokenizer, num_word_tokens
from benchmarks.workloads import get_workload


def _close(a: float, b: float, rel: float = 1e-9) -> bool:
    return math.isclose(a, b, rel_tol=rel)


def test_throughput_tiny_cpu(tmp_path):
    out = tmp_path / "w1.json"
    rc = throughput.main(["--workload", "W1", "--tiny", "--device", "cpu", "--num-requests", "3",
                          "--baseline-batch-size", "2", "--json", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    requests = get_workload("W1", tiny=True).make_requests(3)
    requested_out = sum(r.max_tokens for r in requests)
    requested_in = sum(len(r.prompt_token_ids) for r in requests)
    eng = doc["engine"]
    assert doc["num_requests"] == 3
    assert doc["requested_output_tokens"] == requested_out
    # ignore_eos: every request generates exactly max_tokens
    assert eng["output_tokens"] == requested_out
    assert eng["prompt_tokens"] == requested_in
    assert eng["finish_reasons"] == {"length": 3}
    assert eng["all_outputs_full_length"] is True
    assert _close(eng["output_tokens_per_s"], eng["output_tokens"] / eng["elapsed_s"])
    assert _close(eng["total_tokens_per_s"], (requested_in + requested_out) / eng["elapsed_s"])
    assert _close(eng["requests_per_s"], 3 / eng["elapsed_s"])
    # the engine's own counters include the untimed warm-up
    warmup_tokens = doc["warmup_requests"] * doc["warmup_tokens_per_request"]
    assert eng["stats"]["generation_tokens_total"] == requested_out + warmup_tokens
    prof = eng["step_profile"]
    assert prof["steps"] == eng["num_steps"]
    # every generated token but each request's first comes from a decode chunk; prefill steps
    # may carry decodes too, so decode-only steps hold at most that many
    assert prof["decode_tokens"] <= requested_out - 3
    assert prof["prefill_tokens"] >= requested_in
    assert prof["prefill_tokens"] + prof["decode_tokens"] == requested_in + requested_out - 3
    assert sum(prof["totals_s"].values()) <= eng["elapsed_s"]
    assert eng["stats"]["running"] == 0 and eng["stats"]["waiting"] == 0
    kv = eng["kv_cache"]
    assert 0 < kv["peak_used_blocks"] <= kv["kv_blocks_total"]
    assert 0 < kv["slot_utilization_at_peak"] <= 1
    assert kv["tokens_at_peak"] <= kv["peak_used_blocks"] * kv["block_size"]
    # a sequence holds at most one partly filled block
    assert kv["peak_used_blocks"] * kv["block_size"] - kv["tokens_at_peak"] < 3 * kv["block_size"]
    base = doc["baseline"]
    assert base["batch_size"] == 2 and base["num_batches"] == 2
    assert base["output_tokens"] == requested_out
    assert base["batches_stopped_early"] == 0
    # a static batch runs until its longest request
    batches = [requests[:2], requests[2:]]
    assert base["decode_steps"] == sum(max(r.max_tokens for r in b) for b in batches)
    assert base["generated_tokens_incl_padding"] == sum(len(b) * max(r.max_tokens for r in b) for b in batches)
    assert _close(base["output_tokens_per_s"], requested_out / base["elapsed_s"])
    assert _close(doc["speedup_vs_transformers"], eng["output_tokens_per_s"] / base["output_tokens_per_s"])
    assert doc["environment"]["device"] == "cpu"


def test_latency_tiny_cpu(tmp_path):
    out = tmp_path / "w3.json"
    rc = latency.main(["--tiny", "--device", "cpu", "--warmup-runs", "1", "--runs", "3",
                       "--skip-baseline", "--json", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    eng = doc["engine"]
    n_out = doc["output_len"]
    assert doc["runs"] == 3 and len(eng["runs_e2e_s"]) == 3
    assert eng["output_tokens_per_run"] == [n_out] * 3
    assert _close(eng["e2e_s"]["median"], percentile(eng["runs_e2e_s"], 50))
    assert _close(eng["ms_per_output_token"], 1e3 * eng["e2e_s"]["median"] / n_out)
    assert 0 < eng["ttft_s"]["median"] <= eng["e2e_s"]["median"]
    assert eng["decode_s_per_token"]["n"] == 3
    b = doc["bytes"]
    total = b["prefill_bytes"] + b["decode_bytes"]
    bw = doc["copy_bandwidth"]["bytes_per_s"]
    assert _close(eng["mbu_e2e"], total / eng["e2e_s"]["median"] / bw)
    assert _close(eng["mbu_decode"], b["decode_bytes"] / (n_out - 1) / eng["decode_s_per_token"]["median"] / bw)
    assert doc["baseline"] is None


@pytest.mark.parametrize("spec", [QWEN3_0_6B, LLAMA3_8B], ids=lambda s: s.name)
def test_weight_bytes_match_model_parameters(spec):
    """The analytic bytes per forward equal the parameters transformers builds (meta device)."""
    import torch
    import transformers

    cls = {"qwen3": transformers.Qwen3Config, "llama": transformers.LlamaConfig}[spec.arch]
    config = cls(**spec.config)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())  # tied weights counted once
    embed = spec.config["vocab_size"] * spec.config["hidden_size"]
    expected = params if spec.config["tie_word_embeddings"] else params - embed + spec.config["hidden_size"]
    assert latency.weight_bytes_per_forward(config, 2) == 2 * expected
    if spec is LLAMA3_8B:
        assert 8.02e9 < params < 8.04e9


def test_synthetic_tokenizer_round_trips_word_ids():
    vocab_size = 3000
    tok = build_synthetic_tokenizer(vocab_size)
    assert tok.get_vocab_size() == vocab_size
    rng = random.Random(0)
    high = num_word_tokens(vocab_size)
    for _ in range(20):
        ids = [rng.randrange(high) for _ in range(rng.randint(1, 50))]
        assert tok.encode(tok.decode(ids), add_special_tokens=False).ids == ids
    # every id decodes (byte tokens and specials included)
    tok.decode(list(range(vocab_size)), skip_special_tokens=False)


def test_w1_requests_follow_nano_vllm():
    wl = get_workload("W1")
    reqs = wl.make_requests()
    assert len(reqs) == 256
    assert all(100 <= len(r.prompt_token_ids) <= 1024 and 100 <= r.max_tokens <= 1024 for r in reqs)
    assert all(0 <= t <= 10000 for r in reqs for t in r.prompt_token_ids)
    # nano-vllm bench.py: random.seed(0), ids then lengths drawn from the module-level generator
    random.seed(0)
    ids = [[random.randint(0, 10000) for _ in range(random.randint(100, 1024))] for _ in range(256)]
    max_tokens = [random.randint(100, 1024) for _ in range(256)]
    assert [r.prompt_token_ids for r in reqs] == ids
    assert [r.max_tokens for r in reqs] == max_tokens
    w2 = get_workload("W2").make_requests()
    assert len(w2) == 1000 and {(len(r.prompt_token_ids), r.max_tokens) for r in w2} == {(256, 256)}


def test_kv_tracker_counts_tokens_in_used_blocks():
    class Seq:
        def __init__(self, computed, blocks):
            self.num_computed_tokens, self.block_table = computed, list(range(blocks))

    class Engine:
        class scheduler:
            class block_manager:
                num_used_blocks = 0
            running = []

    tracker = KVTracker(block_size=16, num_blocks=10)
    Engine.scheduler.running = [Seq(17, 2), Seq(16, 1)]
    Engine.scheduler.block_manager.num_used_blocks = 3
    tracker.sample(Engine)
    Engine.scheduler.running = [Seq(20, 2)]
    Engine.scheduler.block_manager.num_used_blocks = 2
    tracker.sample(Engine)
    r = tracker.report()
    assert r["peak_used_blocks"] == 3 and r["tokens_at_peak"] == 33
    assert _close(r["slot_utilization_at_peak"], 33 / 48)
    assert _close(r["cache_fill_peak"], 33 / 160)


def test_serving_default_rates_and_metrics_parse():
    assert serving.default_rates(8.0) == ["2", "4", "6"]
    assert serving.default_rates(0.5) == ["0.12", "0.25", "0.38"]
    text = ('# HELP vllm:kv_cache_blocks_used x\nvllm:kv_cache_blocks_used{model="paged_llm",version="1"} 7\n'
            'vllm:kv_cache_blocks_total{model="paged_llm",version="1"} 10\nother 3\n')
    assert serving.MetricsPoller.parse(text) == {"vllm:kv_cache_blocks_used": 7.0,
                                                 "vllm:kv_cache_blocks_total": 10.0}


@pytest.mark.server
def test_serving_tiny_cpu(tmp_path):
    out = tmp_path / "w4.json"
    rc = serving.main(["--tiny", "--device", "cpu", "--num-requests", "3", "--warmup-requests", "1",
                       "--json", str(out)])
    doc = json.loads(out.read_text())
    assert rc == 0, doc.get("problems")
    assert doc["dataset"]["prompts_not_round_tripping"] == 0
    assert [r["mode"] for r in doc["runs"]] == ["max_concurrency"] + ["request_rate"] * 3
    for r in doc["runs"]:
        assert r["failed"] == 0 and r["completed"] == 3
        assert r["total_output_tokens"] == doc["requested_output_tokens"]
        assert r["total_input_tokens"] == doc["requested_prompt_tokens"]
    assert _close(doc["ratio_to_offline"],
                  doc["runs"][0]["output_throughput"] / doc["offline_output_tokens_per_s"])


def test_spec_decode_tiny_cpu(tmp_path, tiny_model_dir):
    """benchmarks/spec_decode.py end to end on the tiny model: every configuration's greedy
    output equals the one without speculation, and the acceptance arithmetic adds up."""
    from benchmarks import spec_decode

    out = tmp_path / "spec.json"
    rc = spec_decode.main(["--model", tiny_model_dir, "--cache-dir", str(tmp_path / "cache"),
                           "--repeats", "1", "--batch-sizes", "2", "--copy-max-tokens", "12",
                           "--chat-max-tokens", "8", "--throughput-max-tokens", "6",
                           "--draft-layers", "1", "--json", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["greedy_mismatches"] == []
    for section in list(doc["latency"].values()) + list(doc["throughput"].values()):
        assert set(section) == {"none", "ngram", "draft"}
        for name, entry in section.items():
            if name != "none" and entry["drafts"]:
                assert 0 <= entry["accepted_tokens"] <= entry["draft_tokens"]
                assert _close(entry["mean_accepted_length"], 1 + entry["accepted_tokens"] / entry["drafts"])
