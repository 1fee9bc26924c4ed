"""Smoke test of benchmarks/tp.py: it runs TP=2 against TP=1 end to end on CPU with a tiny model
and its JSON is self-consistent (counts only, never speed)."""

from __future__ import annotations

import json

import torch
import torch.distributed as dist

from benchmarks import tp


def test_tp_bench_tiny_cpu(tmp_path):
    out = tmp_path / "tp.json"
    all_reduce, threads = dist.all_reduce, torch.get_num_threads()
    assert tp.main(["--rounds", "2", "--batch-sizes", "1,2", "--decode-steps", "3", "--prefill-tokens", "20",
                    "--hidden-size", "64", "--num-layers", "2", "--num-heads", "4", "--num-kv-heads", "2",
                    "--intermediate-size", "128", "--num-kv-blocks", "32", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert len(doc["rounds"]) == 2
    for row in doc["rounds"]:
        assert set(row) == {"1", "2"}
        assert set(row["1"]) == {"prefill_ms", "decode_b1_ms", "decode_b2_ms"}
        # Per step: the embedding's all-reduce, two per layer, the logits gather.
        assert row["2"]["collectives_per_step"] == 1 + 2 * 2 + 1
        assert 0 < row["2"]["broadcast_bytes_per_step"] < 16 << 10
    s = doc["summary"]
    for key in ("prefill_ms", "decode_b1_ms", "decode_b2_ms"):
        ratios = sorted(r["2"][key] / r["1"][key] for r in doc["rounds"])
        assert s[key]["ratio_median"] == sum(ratios) / 2
    assert dist.all_reduce is all_reduce and torch.get_num_threads() == threads  # left as found
    assert not dist.is_initialized()
