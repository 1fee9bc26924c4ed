"""Smoke test of benchmarks/host_overhead.py: tiny vocabulary and batches, a few seconds.

Checks what the numbers count and that the breakdown adds up, never how fast anything is.
"""

from __future__ import annotations

import json
import math

from benchmarks import host_overhead
from benchmarks.workloads import get_workload


def test_host_overhead_tiny(tmp_path):
    out = tmp_path / "host.json"
    batches, steps = [3, 8], 4
    rc = host_overhead.main(["--tiny", "--batch", ",".join(map(str, batches)), "--steps", str(steps),
                             "--untimed-decode-steps", "2", "--full-sampler-reps", "1",
                             "--json", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert [r["batch"] for r in doc["results"]] == batches
    for r in doc["results"]:
        batch = r["batch"]
        requests = get_workload("W1", tiny=True).make_requests(batch)
        assert r["mean_prompt_tokens"] == sum(len(q.prompt_token_ids) for q in requests) / batch
        assert r["prefill_steps"] >= 1
        # every timed step decodes the whole batch, one token and one RequestOutput per request,
        # and nobody finishes
        assert r["timed_steps"] == steps
        assert r["generated_tokens"] == steps * batch
        assert r["outputs_per_step"] == [batch] * steps
        assert r["unfinished_requests"] == batch
        for clock in ("wall", "cpu"):
            ms = r["ms"][clock]
            assert all(ms[k]["n"] == steps for k in ms)
            # host time is exactly the stages (step by step, so their means add up too)
            stages_mean = sum(ms[s]["mean"] for s in host_overhead.STAGES)
            assert math.isclose(ms["host"]["mean"], stages_mean, rel_tol=1e-9)
            assert ms["host"]["mean"] <= ms["step"]["mean"]
            assert ms["update_from_output"]["mean"] <= ms["postprocess"]["mean"]
        assert all(r["ms"]["wall"][s]["min"] >= 0 for s in host_overhead.STAGES)
        host_mean_s = r["ms"]["cpu"]["host"]["mean"] / 1e3
        assert math.isclose(r["host_tokens_per_s_ceiling"], batch / host_mean_s, rel_tol=1e-9)
        assert r["gc"]["ms_per_step"] >= 0 and len(r["gc"]["collections_by_generation"]) == 3
    assert [(s["batch"], s["vocab"], s["reps"]) for s in doc["full_sampler"]] == [
        (b, doc["vocab_size"], 1) for b in batches
    ]
    assert doc["environment"]["device"] == "cpu"
