"""Bad requests raise ValueError naming the problem; nothing is queued and the engine keeps serving."""

from __future__ import annotations

import pytest

from engine_core_helpers import make_engine, run_to_completion
from paged_engine import LLM, SamplingParams


@pytest.fixture
def engine(tiny_model_dir):
    return make_engine(tiny_model_dir, num_kv_blocks=8, block_size=4, max_model_len=24, max_num_seqs=4)


def _serves(engine):
    engine.add_request("ok", prompt="Hello world", params=SamplingParams(max_tokens=3, ignore_eos=True))
    finals = run_to_completion(engine)
    assert finals["ok"].finish_reason == "length" and len(finals["ok"].token_ids) == 3
    bm = engine.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_blocks


@pytest.mark.parametrize("kwargs,match", [
    (dict(prompt=""), "prompt"),
    (dict(), "prompt"),
    (dict(prompt=123), "prompt"),
    (dict(prompt_token_ids=[]), "prompt_token_ids"),
    (dict(prompt_token_ids=[1, "a"]), "prompt_token_ids"),
    (dict(prompt_token_ids=[1, 10**6]), "prompt_token_ids"),
    (dict(prompt_token_ids=[-1]), "prompt_token_ids"),
    (dict(prompt_token_ids=[5] * 25), "max_model_len"),
    (dict(prompt="x", params="fast"), "params"),
    (dict(prompt="x", params={"temperature": -1}), "temperature"),
    (dict(prompt="x", params={"bogus": 1}), "bogus"),
    (dict(prompt="x", params=SamplingParams(n=5)), "n="),
])
def test_bad_requests(engine, kwargs, match):
    with pytest.raises(ValueError, match=match):
        engine.add_request("bad", **kwargs)
    assert not engine.has_unfinished_requests()
    _serves(engine)


def test_more_blocks_than_exist(tiny_model_dir):
    engine = make_engine(tiny_model_dir, num_kv_blocks=3, block_size=4)
    with pytest.raises(ValueError, match="blocks"):
        engine.add_request("big", prompt_token_ids=[5] * 13)
    engine.add_request("fits", prompt_token_ids=[5] * 12, params=SamplingParams(max_tokens=4, ignore_eos=True))
    out = run_to_completion(engine)["fits"]
    assert len(out.token_ids) == 1 and out.finish_reason == "length"  # the cache holds 12 tokens


def test_request_id(engine):
    with pytest.raises(ValueError, match="request_id"):
        engine.add_request("", prompt="x")
    with pytest.raises(ValueError, match="request_id"):
        engine.add_request(7, prompt="x")
    engine.add_request("dup", prompt="x", params=SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="request_id"):
        engine.add_request("dup", prompt="y")
    run_to_completion(engine)
    engine.add_request("dup", prompt="x", params=SamplingParams(max_tokens=2))  # free again once finished
    run_to_completion(engine)


def test_errors_while_others_run(engine):
    engine.add_request("a", prompt="Hello", params=SamplingParams(max_tokens=6, ignore_eos=True))
    engine.step()
    with pytest.raises(ValueError):
        engine.add_request("b", prompt="")
    finals = run_to_completion(engine)
    assert len(finals["a"].token_ids) == 6 and set(finals) == {"a"}


def test_llm_generate_validation(tiny_model_dir):
    llm = LLM(tiny_model_dir, device="cpu", num_kv_blocks=32)
    with pytest.raises(ValueError, match="params"):
        llm.generate(["a", "b"], [SamplingParams()])
    with pytest.raises(ValueError, match="prompt"):
        llm.generate(["fine", ""], SamplingParams(max_tokens=2))
    assert not llm.engine.has_unfinished_requests()
    outs = llm.generate("Hello", SamplingParams(max_tokens=2, ignore_eos=True))
    assert len(outs) == 1 and len(outs[0].token_ids) == 2
    outs = llm.generate([[5, 6, 7], [8]], [SamplingParams(max_tokens=1), SamplingParams(max_tokens=3, ignore_eos=True)])
    assert [len(o.token_ids) for o in outs] == [1, 3]
    assert outs[0].prompt_token_ids == [5, 6, 7] and outs[0].prompt is None
    assert llm.stats()["kv_blocks_free"] == 32


def test_engine_construction_forms(tiny_model_dir):
    from engine_core_helpers import TokenCacheRunner
    from paged_engine import EngineConfig, LLMEngine

    def runner():
        return TokenCacheRunner(16, 4, 400)

    e1 = LLMEngine(tiny_model_dir, device="cpu", block_size=4, executor=runner())
    e2 = LLMEngine(model=tiny_model_dir, block_size=4, executor=runner())
    e3 = LLMEngine.from_dict({"model": tiny_model_dir, "block_size": "4"}, executor=runner())
    e4 = LLMEngine(EngineConfig(model=tiny_model_dir, block_size=4), executor=runner())
    for e in (e1, e2, e3, e4):
        assert e.config.block_size == 4 and e.stats()["kv_blocks_total"] == 16
        assert e.tokenizer is not None and e.max_model_len == 64
    with pytest.raises(ValueError):
        LLMEngine(EngineConfig(model=tiny_model_dir), block_size=4, executor=runner())
    with pytest.raises(ValueError, match="bogus"):
        LLMEngine.from_dict({"model": tiny_model_dir, "bogus": 1}, executor=runner())
    with e1 as e:
        pass
    assert e.executor is None and e1 is e
