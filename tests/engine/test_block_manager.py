"""BlockManager: allocation, refcounts, prefix caching, LRU eviction; hypothesis invariants."""

from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine_core_helpers import OutputTracker, check_block_invariants, make_engine
from paged_engine import SamplingParams
from paged_engine.core.block_manager import BlockManager
from paged_engine.sampling_params import SamplingParams as SP
from paged_engine.core.sequence import Request


def _seq(tokens, n=1):
    req = Request("r", None, list(tokens), SP(), [SP()] * n, 0)
    return req.leader


def _compute(bm, seq, num_tokens):
    assert bm.allocate(seq, num_tokens)
    seq.num_computed_tokens += num_tokens
    bm.register_full_blocks(seq)


def test_on_demand_allocation_and_free_tail_first():
    bm = BlockManager(8, 4)
    seq = _seq(range(10))
    assert bm.allocate(seq, 5)
    assert len(seq.block_table) == 2
    seq.num_computed_tokens = 5
    assert bm.allocate(seq, 5)
    assert len(seq.block_table) == 3  # 10 tokens -> 3 blocks, < 1 block waste
    seq.num_computed_tokens = 10
    bm.register_full_blocks(seq)
    table = list(seq.block_table)
    bm.free(seq)
    assert bm.num_free_blocks == 8 and seq.block_table == []
    # The partial (unhashed) tail block is handed out first, then never-used blocks, and the
    # cached full blocks last, tail first (LRU order).
    order = bm.free_block_order()
    assert order[0] == table[2]
    assert order[-2:] == [table[1], table[0]]


def test_allocation_fails_without_changes():
    bm = BlockManager(2, 4)
    seq = _seq(range(20))
    assert not bm.allocate(seq, 12)
    assert seq.block_table == [] and bm.num_free_blocks == 2
    assert bm.allocate(seq, 8)
    assert bm.num_free_blocks == 0


def test_prefix_hit_verifies_and_shares():
    bm = BlockManager(16, 4)
    a = _seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    _compute(bm, a, 9)
    b = _seq([1, 2, 3, 4, 5, 6, 7, 8, 100, 101])
    hit = bm.find_cached_prefix(b)
    assert hit == a.block_table[:2]
    assert bm.allocate(b, 2, hit)
    assert b.block_table[:2] == a.block_table[:2]
    assert bm.blocks[hit[0]].ref_count == 2
    # Never the block holding the last token: a prompt equal to a cached prefix recomputes it.
    c = _seq([1, 2, 3, 4, 5, 6, 7, 8])
    assert bm.find_cached_prefix(c) == a.block_table[:1]
    # A different first block breaks the chain even when the second block's tokens match.
    d = _seq([9, 2, 3, 4, 5, 6, 7, 8, 0])
    assert bm.find_cached_prefix(d) == []
    bm.check_invariants([a, b])


def test_hash_collision_is_detected(monkeypatch):
    import paged_engine.core.block_manager as bm_mod

    monkeypatch.setattr(bm_mod, "hash_block_tokens", lambda parent, tokens: 42)
    bm = BlockManager(8, 2)
    a = _seq([1, 2, 3])
    _compute(bm, a, 3)
    b = _seq([5, 6, 7])  # same (fake) hash, different tokens
    assert bm.find_cached_prefix(b) == []
    assert bm.find_cached_prefix(_seq([1, 2, 0])) == a.block_table[:1]


def test_cached_blocks_survive_free_and_evict_lru_only_when_reused():
    bm = BlockManager(4, 2)
    a = _seq([1, 2, 3, 4, 9])
    _compute(bm, a, 5)
    b0, b1, b2 = a.block_table
    bm.free(a)
    assert bm.num_free_blocks == 4
    # Unhashed tail first, then the never-used block, then cached blocks tail first (LRU).
    assert bm.free_block_order() == [b2, 3, b1, b0]
    again = _seq([1, 2, 3, 4, 7])
    assert bm.find_cached_prefix(again) == [b0, b1]
    other = _seq(list(range(20, 28)))
    assert bm.allocate(other, 4)  # takes b2 and block 3: the cache is untouched
    assert bm.find_cached_prefix(again) == [b0, b1]
    other.num_computed_tokens = 4
    assert bm.allocate(other, 2)  # must evict now: the least recently used cached block, b1
    assert other.block_table[-1] == b1
    assert bm.find_cached_prefix(again) == [b0]
    assert not bm.allocate(again, 3, [b0])  # b0 is free but cannot also be a new block
    bm.check_invariants([other, again])
    bm.free(other)
    # A hit on a free cached block takes it out of the free queue.
    assert bm.allocate(again, 3, [b0])
    assert b0 not in bm.free_queue and bm.blocks[b0].ref_count == 1
    assert len(again.block_table) == 3
    bm.check_invariants([again])


def test_huge_pool_is_lazy():
    bm = BlockManager(50_000_000, 16)
    seq = _seq(range(100))
    assert bm.allocate(seq, 100)
    assert len(bm.blocks) == 7 and bm.num_free_blocks == 50_000_000 - 7
    bm.free(seq)
    assert bm.num_free_blocks == 50_000_000


def test_fork_shares_blocks():
    bm = BlockManager(8, 4)
    req = Request("r", None, list(range(10)), SP(n=3), [SP()] * 3, 0)
    leader, c1, c2 = req.seqs
    _compute(bm, leader, 10)
    for c in (c1, c2):
        bm.fork(leader, c, 2)
    assert bm.blocks[leader.block_table[0]].ref_count == 3
    assert bm.blocks[leader.block_table[2]].ref_count == 1
    bm.check_invariants([leader, c1, c2])
    for s in (leader, c1, c2):
        bm.free(s)
    assert bm.num_free_blocks == 8
    bm.check_invariants([])


# ---------------------------------------------------------------- whole-engine invariants

class _FakeChunk:
    """What TokenCacheRunner.next_token reads for an unseeded request."""

    def __init__(self, output_token_ids):
        self.params = SamplingParams()
        self.output_token_ids = output_token_ids


_ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("add"),
            st.integers(1, 14),            # prompt length
            st.integers(1, 8),             # max_tokens
            st.integers(1, 3),             # n
            st.booleans(),                 # shared prefix
        ),
        st.tuples(st.just("abort"), st.integers(0, 1000)),
        st.tuples(st.just("step"), st.integers(1, 3)),
    ),
    min_size=1,
    max_size=30,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=_ops, num_blocks=st.integers(6, 24), block_size=st.sampled_from([1, 2, 4]),
       budget=st.sampled_from([3, 8, 64]), prefix_caching=st.booleans())
def test_random_operations_keep_invariants(tiny_model_dir, ops, num_blocks, block_size, budget, prefix_caching):
    engine = make_engine(
        tiny_model_dir, num_kv_blocks=num_blocks, block_size=block_size,
        max_num_batched_tokens=budget, max_num_seqs=4, enable_prefix_caching=prefix_caching,
    )
    tracker = OutputTracker(engine)
    rng = random.Random(0)
    shared = [rng.randrange(3, 300) for _ in range(8)]
    next_id = 0
    prompts_max_tokens = {}
    for op in ops:
        if op[0] == "add":
            _, plen, max_tokens, n, use_shared = op
            prompt = (shared[:plen] if use_shared else []) + [rng.randrange(3, 300) for _ in range(plen)]
            prompt = prompt[: num_blocks * block_size]
            try:
                engine.add_request(f"r{next_id}", prompt_token_ids=prompt,
                                   params=SamplingParams(max_tokens=max_tokens, n=n, ignore_eos=True))
                prompts_max_tokens[f"r{next_id}"] = max_tokens
            except ValueError as e:
                assert "n=" in str(e) or "prompt" in str(e)
            next_id += 1
        elif op[0] == "abort":
            ids = sorted(engine.requests)
            if ids:
                engine.abort(ids[op[1] % len(ids)])
        else:
            for _ in range(op[1]):
                tracker.step()
                check_block_invariants(engine)
        check_block_invariants(engine)
    # Abort half, finish the rest: everything must come back.
    for i, rid in enumerate(sorted(engine.requests)):
        if i % 2:
            engine.abort(rid)
    tracker.run(check=check_block_invariants)
    bm = engine.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert not engine.scheduler.running and not engine.scheduler.waiting
    assert engine.stats()["running"] == 0 and engine.stats()["waiting"] == 0
    # Whatever the scheduling, every output is what the (deterministic) fake model gives alone.
    runner = engine.executor
    for out in tracker.finals.values():
        for c in out.outputs:
            context = list(out.prompt_token_ids)
            for tok in c.token_ids:
                assert tok == runner.next_token(_FakeChunk(c.token_ids), context)
                context.append(tok)
            if c.finish_reason == "length":
                total = len(out.prompt_token_ids) + len(c.token_ids)
                assert len(c.token_ids) == prompts_max_tokens[out.request_id] or (
                    total >= engine.max_model_len and (total - 1 < engine.max_model_len or len(c.token_ids) == 1))
