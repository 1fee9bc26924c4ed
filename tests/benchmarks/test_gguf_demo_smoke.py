"""Smoke test of benchmarks/gguf_demo.py on a tiny GGUF file: it runs end to end and its JSON is
self-consistent (counts and arithmetic only, never speed)."""

from __future__ import annotations

import json
import math

from benchmarks import gguf_demo
from gguf_files import write_tiny_llama_gguf


def test_gguf_demo_tiny(tmp_path, make_model):
    hf_dir = make_model("llama", "byte_level", hidden_size=256, num_heads=4, num_kv_heads=2,
                        intermediate_size=512, num_layers=2)
    path = tmp_path / "tiny.gguf"
    write_tiny_llama_gguf(path, hf_dir, "Q8_0")
    out = tmp_path / "demo.json"
    assert gguf_demo.main(["--model", str(path), "--max-tokens", "6", "--fixed-tokens", "5",
                           "--threads", "1", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["first_start"]["model_dir"] == doc["cached_start"]["model_dir"]
    assert doc["first_start"]["llm_init_s"] > 0 and doc["cached_start"]["llm_init_s"] > 0
    fixed = doc["engine_fixed"]
    assert fixed["output_tokens"] == 5 and fixed["finish_reason"] == "length"
    assert math.isclose(fixed["output_tokens_per_s"], 5 / fixed["e2e_s"])
    assert math.isclose(fixed["decode_tokens_per_s"], 4 / (fixed["e2e_s"] - fixed["ttft_s"]))
    assert 0 < fixed["ttft_s"] < fixed["e2e_s"]
    assert doc["hf_fixed"]["output_tokens"] == 5
    # greedy on the same file: the engine and transformers agree (random weights, no ties)
    assert doc["same_greedy_tokens"] == {"demo": True, "fixed": True}
