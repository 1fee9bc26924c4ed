"""Scheduler and engine control flow with a fake runner (no model): budget, chunked prefill,
admission, preemption, FCFS, abort, n>1 forking, prefix caching."""

from __future__ import annotations

import random

import pytest

from engine_core_helpers import OutputTracker, check_block_invariants, make_engine, run_to_completion
from paged_engine import SamplingParams


def greedy(max_tokens=4, **kw):
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


def ids(n, seed=0):
    rng = random.Random(seed)
    return [rng.randrange(3, 300) for _ in range(n)]


def test_scheduler_module_is_torch_free():
    import subprocess
    import sys

    code = (
        "import sys; import paged_engine.core.scheduler, paged_engine.core.block_manager, paged_engine.core.sequence; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_chunked_prefill_respects_budget_and_mixes_decodes(tiny_model_dir):
    engine = make_engine(tiny_model_dir, num_kv_blocks=64, block_size=4, max_num_batched_tokens=8)
    engine.add_request("short", prompt_token_ids=ids(3), params=greedy(6))
    engine.step()  # "short" prefilled, now decoding
    engine.add_request("long", prompt_token_ids=ids(30, 1), params=greedy(2))
    finals = run_to_completion(engine, check=check_block_invariants)
    batches = engine.executor.batches
    assert all(total <= 8 for total, _ in batches)
    long_chunks = [(start, n) for _, rec in batches for sid, start, n, _ in rec if n > 1 and start > 0]
    assert long_chunks, "the long prompt was not chunked"
    # a step with a decode of "short" and a chunk of "long" together
    assert any(len(rec) == 2 and {n for _, _, n, _ in rec} - {1} for _, rec in batches)
    assert len(finals["long"].token_ids) == 2 and len(finals["short"].token_ids) == 6


def test_output_equal_whatever_the_cut(tiny_model_dir):
    """The fake runner samples from the context it reads back through the block tables, so equal
    outputs across configurations mean every configuration fed it the same KV."""
    prompts = [ids(n, n) for n in (1, 7, 23, 40, 12, 5)]

    def run(**kw):
        engine = make_engine(tiny_model_dir, **kw)
        for i, p in enumerate(prompts):
            engine.add_request(str(i), prompt_token_ids=p, params=greedy(9))
        finals = run_to_completion(engine, check=check_block_invariants)
        assert engine.scheduler.block_manager.num_free_blocks == kw["num_kv_blocks"]
        return [finals[str(i)].token_ids for i in range(len(prompts))], engine.stats()

    want, _ = run(num_kv_blocks=200, block_size=16)
    for kw in (
        dict(num_kv_blocks=200, block_size=1),
        dict(num_kv_blocks=100, block_size=3),
        dict(num_kv_blocks=200, block_size=4, max_num_batched_tokens=5),
        dict(num_kv_blocks=15, block_size=4),
        dict(num_kv_blocks=50, block_size=1, max_num_batched_tokens=3, max_num_seqs=2),
        dict(num_kv_blocks=14, block_size=4, enable_prefix_caching=False),
    ):
        got, stats = run(**kw)
        assert got == want, kw
        if kw["num_kv_blocks"] < 20:
            assert stats["preemptions"] > 0, kw


def test_preemption_picks_most_recently_admitted(tiny_model_dir):
    engine = make_engine(tiny_model_dir, num_kv_blocks=6, block_size=2)
    engine.add_request("a", prompt_token_ids=ids(3), params=greedy(6))
    engine.add_request("b", prompt_token_ids=ids(3, 1), params=greedy(6))
    tracker = OutputTracker(engine)
    preempted_order = []
    while engine.has_unfinished_requests():
        before = engine.stats()["preemptions"]
        tracker.step()
        if engine.stats()["preemptions"] > before:
            preempted_order.append([s.request.request_id for s in engine.scheduler.waiting])
        check_block_invariants(engine)
    assert preempted_order and preempted_order[0] == ["b"]
    assert tracker.finals["a"].finish_reason == tracker.finals["b"].finish_reason == "length"


def test_fcfs_head_is_not_skipped(tiny_model_dir):
    engine = make_engine(tiny_model_dir, num_kv_blocks=10, block_size=4)
    engine.add_request("big0", prompt_token_ids=ids(30), params=greedy(8))  # 8 blocks at the end
    engine.step()
    engine.add_request("big1", prompt_token_ids=ids(30, 1), params=greedy(2))  # cannot fit now
    engine.add_request("small", prompt_token_ids=ids(2, 2), params=greedy(2))  # could, but waits
    engine.step()
    waiting = [s.request.request_id for s in engine.scheduler.waiting]
    assert waiting == ["big1", "small"]
    finals = run_to_completion(engine, check=check_block_invariants)
    assert set(finals) == {"big0", "big1", "small"}


def test_max_num_seqs(tiny_model_dir):
    engine = make_engine(tiny_model_dir, num_kv_blocks=64, max_num_seqs=2)
    for i in range(5):
        engine.add_request(str(i), prompt_token_ids=ids(3, i), params=greedy(3))
    while engine.has_unfinished_requests():
        engine.step()
        assert len(engine.scheduler.running) <= 2
        assert engine.stats()["running"] <= 2


def test_abort_frees_everything_and_reports_once(tiny_model_dir):
    engine = make_engine(tiny_model_dir, num_kv_blocks=32, block_size=4, max_num_batched_tokens=8)
    tracker = OutputTracker(engine)
    engine.add_request("run", prompt_token_ids=ids(5), params=greedy(50))
    engine.add_request("prefill", prompt_token_ids=ids(40, 1), params=greedy(5))
    engine.add_request("wait", prompt_token_ids=ids(6, 2), params=greedy(5))
    engine.add_request("n3", prompt_token_ids=ids(9, 3), params=greedy(5, n=3))
    tracker.step()
    tracker.step()
    assert engine.abort("prefill")  # mid-prefill
    assert engine.abort("wait")
    assert not engine.abort("wait")  # already aborted
    assert not engine.abort("nope")
    check_block_invariants(engine)
    outs = {o.request_id: o for o in tracker.step()}
    assert outs["prefill"].finished and outs["prefill"].finish_reason == "abort"
    assert outs["wait"].finished and outs["wait"].token_ids == []
    while not engine.scheduler.block_manager.num_used_blocks or "n3" not in {
        s.request.request_id for s in engine.scheduler.running if s.index == 2
    }:
        tracker.step()
    assert engine.abort("n3")
    assert engine.abort("run")
    bm = engine.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_blocks  # freed at once, before the next step
    outs = tracker.step()
    assert {o.request_id for o in outs} == {"n3", "run"}
    assert all(c.finish_reason == "abort" for o in outs for c in o.outputs)
    assert not engine.has_unfinished_requests()
    assert tracker.step() == []


def test_abort_when_idle_still_delivers_final_output(tiny_model_dir):
    engine = make_engine(tiny_model_dir)
    engine.add_request("x", prompt_token_ids=ids(4), params=greedy(5))
    engine.abort("x")
    assert engine.has_unfinished_requests()
    outs = engine.step()
    assert [o.request_id for o in outs] == ["x"] and outs[0].finish_reason == "abort"
    assert not engine.has_unfinished_requests()


def test_n_children_share_prompt_blocks(tiny_model_dir):
    engine = make_engine(tiny_model_dir, num_kv_blocks=64, block_size=4, enable_prefix_caching=False)
    prompt = ids(14)
    engine.add_request("r", prompt_token_ids=prompt, params=SamplingParams(n=3, max_tokens=4, temperature=1.0, seed=5))
    engine.step()  # leader prefills 14 tokens (4 blocks), samples, children fork
    req = engine.requests["r"]
    leader, c1, c2 = req.seqs
    shared = leader.block_table[:3]  # (14 - 1) // 4 full prompt blocks
    assert c1.block_table == shared and c2.block_table == shared
    bm = engine.scheduler.block_manager
    assert [bm.blocks[b].ref_count for b in shared] == [3, 3, 3]
    assert bm.num_used_blocks == 4
    check_block_invariants(engine)
    engine.step()  # children compute their last prompt block (2 tokens) and sample
    assert bm.num_used_blocks == 4 + 2
    finals = run_to_completion(engine, check=check_block_invariants)
    out = finals["r"]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 4 for c in out.outputs)
    # seeds 5, 6, 7 -> different samples
    assert len({tuple(c.token_ids) for c in out.outputs}) == 3
    assert bm.num_free_blocks == 64


def test_prefix_cache_hits_counted_and_lru(tiny_model_dir):
    engine = make_engine(tiny_model_dir, num_kv_blocks=12, block_size=4)
    prefix = ids(16)
    engine.add_request("a", prompt_token_ids=prefix + [7], params=greedy(2))
    run_to_completion(engine)
    engine.add_request("b", prompt_token_ids=prefix + [8, 9], params=greedy(2))
    out = run_to_completion(engine)["b"]
    assert out.num_cached_tokens == 16
    stats = engine.stats()
    assert stats["prefix_cache_hits"] == 16 and stats["prefix_cache_queries"] == 17 + 18
    # Fill the cache with other prompts: the old prefix gets evicted, no hit afterwards.
    for i in range(3):
        engine.add_request(f"f{i}", prompt_token_ids=ids(40, 10 + i), params=greedy(2))
        run_to_completion(engine)
    engine.add_request("c", prompt_token_ids=prefix + [5], params=greedy(2))
    assert run_to_completion(engine)["c"].num_cached_tokens == 0


def test_stats_keys(tiny_model_dir):
    engine = make_engine(tiny_model_dir, num_kv_blocks=20)
    engine.add_request("a", prompt_token_ids=ids(5), params=greedy(3))
    engine.add_request("b", prompt_token_ids=ids(5, 1), params=greedy(3))
    s = engine.stats()
    for key in ("running", "waiting", "kv_blocks_total", "kv_blocks_free", "prefix_cache_hits",
                "prefix_cache_queries", "preemptions", "prompt_tokens_total", "generation_tokens_total"):
        assert key in s
    assert s["waiting"] == 2 and s["running"] == 0 and s["kv_blocks_free"] == 20
    engine.step()
    s = engine.stats()
    assert s["running"] == 2 and s["waiting"] == 0 and s["kv_blocks_free"] < 20
    assert s["prompt_tokens_total"] == 10 and s["generation_tokens_total"] == 2
    run_to_completion(engine)
    s = engine.stats()
    assert s["generation_tokens_total"] == 6 and s["kv_blocks_free"] == 20 and s["running"] == 0


def test_max_model_len_finishes_with_length(tiny_model_dir):
    engine = make_engine(tiny_model_dir, num_kv_blocks=64, max_model_len=10)
    engine.add_request("a", prompt_token_ids=ids(7), params=greedy(100))
    out = run_to_completion(engine)["a"]
    assert len(out.token_ids) == 3 and out.finish_reason == "length"
    # max_tokens=None: until max_model_len
    engine.add_request("b", prompt_token_ids=ids(4), params=SamplingParams(max_tokens=None, ignore_eos=True))
    out = run_to_completion(engine)["b"]
    assert len(out.token_ids) == 6 and out.finish_reason == "length"


def test_kv_capacity_caps_sequence_length(tiny_model_dir):
    # 4 blocks of 2 tokens: a sequence can never grow past 8 tokens, even alone.
    engine = make_engine(tiny_model_dir, num_kv_blocks=4, block_size=2)
    assert engine.max_model_len == 8
    engine.add_request("a", prompt_token_ids=ids(5), params=greedy(100))
    engine.add_request("b", prompt_token_ids=ids(5, 1), params=greedy(100))
    finals = run_to_completion(engine, check=check_block_invariants)
    assert [len(finals[r].token_ids) for r in "ab"] == [3, 3]


@pytest.mark.parametrize("n", [1, 2])
def test_engine_thread_safety_abort_while_stepping(tiny_model_dir, n):
    import threading

    engine = make_engine(tiny_model_dir, num_kv_blocks=64)
    for i in range(6):
        engine.add_request(str(i), prompt_token_ids=ids(5, i), params=greedy(40, n=n))
    done = threading.Event()

    def aborter():
        for i in range(6):
            engine.abort(str(i))
        done.set()

    t = threading.Thread(target=aborter)
    tracker = OutputTracker(engine)
    tracker.step()
    t.start()
    tracker.run(check=check_block_invariants)
    t.join()
    assert done.is_set()
    assert engine.scheduler.block_manager.num_free_blocks == 64
