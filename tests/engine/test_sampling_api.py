"""SamplingParams and EngineConfig: defaults, validation naming the field, from_dict coercion."""

from __future__ import annotations

import pytest

from paged_engine import EngineConfig, SamplingParams


def test_defaults():
    p = SamplingParams()
    assert (p.n, p.max_tokens, p.min_tokens, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 16, 0, 1.0, 1.0, -1, 0.0)
    assert p.stop == [] and p.stop_token_ids == [] and p.logprobs is None and p.seed is None
    assert p.skip_special_tokens and not p.ignore_eos and not p.include_stop_str_in_output
    assert SamplingParams(temperature=0).greedy and not p.greedy
    assert SamplingParams(stop="x").stop == ["x"]
    assert SamplingParams(top_k=0).top_k == -1


@pytest.mark.parametrize("field,value", [
    ("n", 0), ("n", 1.5), ("max_tokens", 0), ("max_tokens", -3), ("min_tokens", -1),
    ("temperature", -0.1), ("temperature", float("nan")), ("temperature", "hot"),
    ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2), ("min_p", 1.5), ("min_p", -0.1),
    ("seed", "abc"), ("seed", 1.5), ("stop", 5), ("stop", [""]), ("stop", ["a", 3]),
    ("stop_token_ids", [-1]), ("stop_token_ids", ["x"]), ("stop_token_ids", 3.5),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1), ("presence_penalty", 2.5),
    ("frequency_penalty", -2.5), ("logprobs", -1), ("logprobs", 21), ("ignore_eos", "maybe"),
    ("include_stop_str_in_output", 2), ("skip_special_tokens", "nah"), ("max_tokens", True),
])
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})
    with pytest.raises(ValueError, match=field):
        SamplingParams.from_dict({field: value})


def test_min_tokens_above_max_tokens():
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=5, max_tokens=4)


def test_from_dict_coerces_strings():
    p = SamplingParams.from_dict({
        "n": "2", "max_tokens": "32", "temperature": "0.7", "top_p": "0.9", "top_k": "40",
        "min_p": "0.05", "seed": "123", "stop": '["a", "b"]', "stop_token_ids": "[1, 2]",
        "ignore_eos": "true", "include_stop_str_in_output": "False", "repetition_penalty": "1.1",
        "presence_penalty": "0.5", "frequency_penalty": "-0.5", "logprobs": "3",
        "skip_special_tokens": "0", "min_tokens": "1",
    })
    assert (p.n, p.max_tokens, p.temperature, p.top_p, p.top_k, p.min_p, p.seed) == (2, 32, 0.7, 0.9, 40, 0.05, 123)
    assert p.stop == ["a", "b"] and p.stop_token_ids == [1, 2]
    assert p.ignore_eos is True and p.include_stop_str_in_output is False and p.skip_special_tokens is False
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty, p.logprobs, p.min_tokens) == (1.1, 0.5, -0.5, 3, 1)
    # a plain string stays one stop string, even if it looks like a number
    assert SamplingParams.from_dict({"stop": "123"}).stop == ["123"]
    assert SamplingParams.from_dict({"stop": "END"}).stop == ["END"]
    assert SamplingParams.from_dict({"max_tokens": None}).max_tokens is None
    assert SamplingParams.from_dict({"seed": None}).seed is None
    assert SamplingParams.from_dict('{"max_tokens": 5}').max_tokens == 5
    assert SamplingParams.from_dict({}) == SamplingParams()


def test_from_dict_unknown_key_is_named():
    with pytest.raises(ValueError, match="best_of"):
        SamplingParams.from_dict({"max_tokens": 3, "best_of": 2})
    with pytest.raises(ValueError, match="sampling_parameters"):
        SamplingParams.from_dict("{not json")


def test_engine_copy_adds_eos_and_child_seeds():
    p = SamplingParams(n=3, seed=10, stop_token_ids=[7])
    c0, c2 = p._for_engine(frozenset({1}), 0), p._for_engine(frozenset({1}), 2)
    assert c0.seed == 10 and c2.seed == 12 and c0.n == 1
    assert c0.all_stop_token_ids == {1, 7}
    assert SamplingParams(ignore_eos=True)._for_engine(frozenset({1})).all_stop_token_ids == frozenset()
    assert p.n == 3 and p.seed == 10  # the user's object is unchanged


# ------------------------------------------------------------------ EngineConfig

def test_engine_config_defaults_and_resolution(tiny_model_dir):
    c = EngineConfig(model=tiny_model_dir)
    assert c.device == "cpu"  # no CUDA here
    assert c.dtype == "float32"  # auto on CPU
    # the CPU scheduling defaults (GPU: 256 sequences, 8192 tokens)
    assert c.block_size == 16 and c.num_kv_blocks is None and c.max_num_seqs == 128
    assert c.max_num_batched_tokens == 2048 and c.enable_prefix_caching and c.seed == 0
    explicit = EngineConfig(model=tiny_model_dir, max_num_seqs=300, max_num_batched_tokens="9000")
    assert explicit.max_num_seqs == 300 and explicit.max_num_batched_tokens == 9000
    assert c.max_model_len == c.hf_config.max_position_embeddings
    assert c.tokenizer == tiny_model_dir
    assert EngineConfig(model=tiny_model_dir, dtype="bf16").dtype == "bfloat16"
    assert EngineConfig(model=tiny_model_dir, dtype="half").dtype == "float16"


@pytest.mark.parametrize("field,value", [
    ("block_size", 0), ("block_size", "x"), ("num_kv_blocks", 0), ("gpu_memory_utilization", 0.0),
    ("gpu_memory_utilization", 1.5), ("max_num_seqs", 0), ("max_num_batched_tokens", 0),
    ("max_model_len", 0), ("max_model_len", 10**9), ("enable_prefix_caching", "perhaps"),
    ("seed", "s"), ("enforce_eager", 3), ("dtype", "int8"), ("device", "tpu"), ("device", "cuda"),
    ("load_format", "pickle"), ("tokenizer", "/nonexistent/tok"),
])
def test_engine_config_bad_values_name_the_field(tiny_model_dir, field, value):
    with pytest.raises(ValueError, match=field):
        EngineConfig(model=tiny_model_dir, **{field: value})


def test_engine_config_model_must_exist(tmp_path):
    with pytest.raises(ValueError, match="model"):
        EngineConfig(model=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="model"):
        EngineConfig(model=str(tmp_path))  # no config.json


def test_engine_config_from_dict(tiny_model_dir):
    c = EngineConfig.from_dict({"model": tiny_model_dir, "block_size": "8", "enable_prefix_caching": "false",
                                "gpu_memory_utilization": "0.5", "num_kv_blocks": "12"})
    assert (c.block_size, c.enable_prefix_caching, c.gpu_memory_utilization, c.num_kv_blocks) == (8, False, 0.5, 12)
    with pytest.raises(ValueError, match="pipeline_parallel_size"):
        EngineConfig.from_dict({"model": tiny_model_dir, "pipeline_parallel_size": 2})
    with pytest.raises(ValueError, match="model"):
        EngineConfig.from_dict({"block_size": 8})
