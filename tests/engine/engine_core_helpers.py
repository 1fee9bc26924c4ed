"""Fake executors for engine-core tests (no model, no torch work).

TokenCacheRunner keeps its own copy of each sequence from the plain-data batches, exactly as the
real runner does (`SequenceStates`), and checks that copy against the engine's sequence every
step, so a batch that leaves out a token or a block (or sends stale ones) fails here. It stores
*token ids* in a paged "KV cache" exactly where the real runner would store K/V (slot =
block_table[pos // block_size] * block_size + pos % block_size), and before sampling reads the
whole context back through the block table and checks it equals the sequence's tokens. So any
block-table, prefix-cache, fork or preemption bug that would make the real model attend to
wrong KV fails loudly here. Its "sampling" is a pure function of the context (or of
(seed, position) for seeded requests), like a deterministic model.

ScriptedRunner emits a predetermined token list per prompt (to test stops and text).
"""

from __future__ import annotations

import pickle
import random

from paged_engine.core.batch import ModelRunnerOutput, SampleLogprobs
from paged_engine.executor.sequence_state import SequenceStates


def _cdiv(a, b):
    return -(-a // b)


class TokenCacheRunner:
    def __init__(self, num_kv_blocks: int, block_size: int, vocab_size: int, avoid_ids=()):
        self.num_kv_blocks = num_kv_blocks
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.cache = [None] * (num_kv_blocks * block_size)
        self.avoid_ids = set(avoid_ids)
        self.engine = None  # set by the test to check that written blocks are private
        self.batches = []   # (num_batched_tokens, [(seq_id, start_pos, n, do_sample)])
        self.states = SequenceStates()
        self.shutdown_called = False

    def _slot(self, block_table, pos):
        return block_table[pos // self.block_size] * self.block_size + pos % self.block_size

    def next_token(self, chunk, context):
        p = chunk.params
        if p.seed is not None and p.temperature > 0:
            rng = random.Random(hash((p.seed, len(chunk.output_token_ids))))
        else:
            rng = random.Random(hash(tuple(context)))
        while True:
            t = rng.randrange(self.vocab_size)
            if t not in self.avoid_ids:
                return t

    def execute_model(self, batch):
        # The batch crosses a process boundary unchanged (what a tensor-parallel worker gets).
        batch = pickle.loads(pickle.dumps(batch))
        bs = self.block_size
        states = self.states.update(batch)
        sampled, logprobs = [], []
        total = 0
        record = []
        for chunk, state in zip(batch.seqs, states):
            full = list(state.prompt_token_ids) + list(state.output_token_ids)
            if self.engine is not None:
                seq = self.engine.scheduler.seqs_by_id[chunk.seq_id]
                assert full == seq.token_ids, f"runner copy of seq {chunk.seq_id} differs from the engine's"
                assert state.block_table == seq.block_table, f"runner block table of seq {chunk.seq_id}"
                assert state.params is seq.params or state.params == seq.params
            start, n = chunk.start_pos, chunk.num_tokens
            end = start + n
            total += n
            assert n > 0
            assert chunk.do_sample == (end == len(full))
            assert len(state.block_table) >= _cdiv(end, bs), "block table too short"
            assert len(state.block_table) <= _cdiv(end, bs), "more blocks than needed (waste)"
            if self.engine is not None:
                bm = self.engine.scheduler.block_manager
                for pos in range(start, end):
                    blk = bm.blocks[state.block_table[pos // bs]]
                    assert blk.ref_count == 1, f"writing into shared block {blk}"
                    assert blk.block_hash is None, f"writing into cached block {blk}"
            for pos in range(start, end):
                self.cache[self._slot(state.block_table, pos)] = full[pos]
            for pos in range(end):
                got = self.cache[self._slot(state.block_table, pos)]
                assert got == full[pos], f"seq {chunk.seq_id} pos {pos}: cache has {got}, want {full[pos]}"
            record.append((chunk.seq_id, start, n, chunk.do_sample))
            if chunk.do_sample:
                t = self.next_token(state, full)
                sampled.append([t])
                if state.params.logprobs is not None:
                    top = [(t, -0.5)] + [((t + k) % self.vocab_size, -1.0 - k) for k in range(1, state.params.logprobs)]
                    logprobs.append([SampleLogprobs(-0.5, 1, top[: state.params.logprobs])])
                else:
                    logprobs.append([SampleLogprobs(0.0, 1, [])])
            else:
                sampled.append([])
                logprobs.append([])
        assert total == batch.num_batched_tokens
        self.batches.append((total, record))
        return ModelRunnerOutput(sampled, logprobs)

    def shutdown(self):
        self.shutdown_called = True


class ScriptedRunner(TokenCacheRunner):
    """Emits scripts[tuple(prompt_token_ids)][len(output_token_ids)] (falls back to token 0)."""

    def __init__(self, num_kv_blocks, block_size, vocab_size, scripts=None):
        super().__init__(num_kv_blocks, block_size, vocab_size)
        self.scripts = scripts if scripts is not None else {}

    def next_token(self, chunk, context):
        script = self.scripts.get(tuple(chunk.prompt_token_ids), [])
        i = len(chunk.output_token_ids)
        return script[i] if i < len(script) else script[-1] if script else 0


def make_engine(model_dir, runner_cls=TokenCacheRunner, num_kv_blocks=64, block_size=4, runner_kwargs=None, **config_kwargs):
    """An LLMEngine on the tiny model's tokenizer/config with a fake executor."""
    from paged_engine import EngineConfig, LLMEngine

    config = EngineConfig(model=model_dir, device="cpu", block_size=block_size, num_kv_blocks=num_kv_blocks, **config_kwargs)
    runner = runner_cls(num_kv_blocks, block_size, config.hf_config.vocab_size, **(runner_kwargs or {}))
    engine = LLMEngine(config, executor=runner)
    runner.engine = engine
    return engine


class OutputTracker:
    """Steps an engine and checks every delta: new_text / new_token_ids concatenate to text / token_ids."""

    def __init__(self, engine):
        self.engine = engine
        self.texts = {}
        self.tokens = {}
        self.finals = {}
        self.all_outputs = []

    def step(self):
        outs = self.engine.step()
        for out in outs:
            self.all_outputs.append(out)
            assert out.request_id not in self.finals, "output after the final one"
            for c in out.outputs:
                key = (out.request_id, c.index)
                if key not in self.texts:  # tracking may start after the engine already stepped
                    assert c.text.endswith(c.new_text)
                    self.texts[key] = c.text[: len(c.text) - len(c.new_text)]
                    self.tokens[key] = c.token_ids[: len(c.token_ids) - len(c.new_token_ids)]
                self.texts[key] += c.new_text
                self.tokens[key].extend(c.new_token_ids)
                assert self.texts[key] == c.text, (key, self.texts[key], c.text)
                assert self.tokens[key] == c.token_ids, key
            if out.finished:
                assert all(c.finish_reason is not None for c in out.outputs)
                self.finals[out.request_id] = out
            else:
                assert any(c.finish_reason is None for c in out.outputs)
        return outs

    def run(self, max_steps=10_000, check=None):
        for _ in range(max_steps):
            if not self.engine.has_unfinished_requests():
                return self.finals
            self.step()
            if check is not None:
                check(self.engine)
        raise AssertionError("engine did not finish")


def run_to_completion(engine, max_steps=10_000, check=None):
    """Step until idle; returns {request_id: final RequestOutput}, checking delta consistency."""
    return OutputTracker(engine).run(max_steps, check)


def check_block_invariants(engine):
    sched = engine.scheduler
    bm = sched.block_manager
    live = []
    for req in engine.requests.values():
        live.extend(s for s in req.seqs if not s.is_finished)
    bm.check_invariants(live)
    for seq in sched.waiting:
        assert not seq.block_table, f"waiting {seq} holds blocks"
    for seq in live:
        if seq.status.value == "running":
            assert len(seq.block_table) == _cdiv(seq.num_computed_tokens, bm.block_size), seq
        elif seq.status.value == "finished":
            assert not seq.block_table
