"""ModelRunner: KV cache allocation, batches of mixed prefill chunks and decodes, sampling output
order, parity of greedy generation with transformers, seeded sampling, and the CUDA-only paths
exercised on CPU with stand-ins: CUDA-graph replay bookkeeping and capture (graphs that rerun the
model on the static buffers; no host sync inside the captured region), the memory profile (faked
memory counters), the per-step device guard and the CUDA device/dtype resolution."""

from __future__ import annotations

import pytest
import torch

from _runner_helpers import BlockAllocator, batch, chunk, runner_config, sampled, sampled_logprobs
from paged_engine.model_executor.forward_context import forward_context
from paged_engine.core.batch import ModelRunnerOutput
from paged_engine.executor.model_runner import ModelRunner
from paged_engine.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=100)


def _prompts(vocab: int, lengths, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def _hf_greedy(model_dir: str, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation by transformers (argmax of each full forward; EOS does not stop it)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


class _Seq:
    def __init__(self, seq_id, prompt, params, block_size, alloc):
        self.seq_id, self.prompt, self.params = seq_id, prompt, params
        self.block_size, self.alloc = block_size, alloc
        self.output: list[int] = []
        self.num_computed = 0
        self.block_table: list[int] = []

    def next_chunk(self, max_tokens: int):
        tokens = (self.prompt + self.output)[self.num_computed:][:max_tokens]
        end = self.num_computed + len(tokens)
        need = -(-end // self.block_size) - len(self.block_table)
        if need > 0:
            self.block_table += self.alloc.take(need)
        done = end == len(self.prompt) + len(self.output)
        c = chunk(self.seq_id, tokens, self.num_computed, self.block_table, self.params, do_sample=done,
                  prompt_token_ids=self.prompt, output_token_ids=self.output)
        self.num_computed = end
        return c


def _generate(runner, seqs, steps: int, chunk_budget: int):
    """A toy scheduler: every sequence gets a chunk of up to chunk_budget tokens each step."""
    for _ in range(steps):
        chunks = [s.next_chunk(chunk_budget) for s in seqs]
        # decodes and prefills mixed in arbitrary order: the runner must keep chunk order
        chunks = chunks[::-1]
        out = runner.execute_model(batch(chunks))
        assert len(out.sampled_token_ids) == len(chunks)
        by_id = {s.seq_id: s for s in seqs}
        for c, tokens in zip(chunks, out.sampled_token_ids):
            assert len(tokens) == (1 if c.do_sample else 0)
            by_id[c.seq_id].output.extend(tokens)


@pytest.mark.parametrize("block_size", [1, 16])
def test_greedy_generation_matches_transformers(tiny_model_dir, block_size):
    runner = ModelRunner(runner_config(tiny_model_dir, block_size=block_size, num_kv_blocks=300))
    prompts = _prompts(runner.vocab_size, (3, 21, 9))
    alloc = BlockAllocator(runner.num_kv_blocks)
    seqs = [_Seq(i, p, GREEDY, block_size, alloc) for i, p in enumerate(prompts)]
    _generate(runner, seqs, steps=12, chunk_budget=8)  # the 21-token prompt takes 3 chunks
    for s in seqs:
        n = len(s.output)
        assert n >= 8
        assert s.output == _hf_greedy(tiny_model_dir, s.prompt, n), s.seq_id


def test_kv_cache_allocation(tiny_model_dir):
    runner = ModelRunner(runner_config(tiny_model_dir, block_size=4, num_kv_blocks=37))
    assert runner.num_kv_blocks == 37
    assert len(runner.k_caches) == len(runner.v_caches) == runner.hf_config.num_hidden_layers
    for layer, k, v in zip(runner.attention_layers, runner.k_caches, runner.v_caches):
        assert k.shape == v.shape == (37, 4, runner.hf_config.num_key_value_heads, 16)
        assert layer.k_cache is k and layer.v_cache is v
    assert runner.graphs == {}  # CPU: always eager


def test_default_cpu_kv_cache_covers_max_model_len(tiny_model_dir):
    runner = ModelRunner(runner_config(tiny_model_dir, num_kv_blocks=None, max_model_len=256, max_num_seqs=4))
    assert runner.num_kv_blocks >= 256 // 16
    assert runner.num_kv_blocks <= 4 * 256 // 16


def test_run_output_follows_chunk_order_and_do_sample(tiny_model_dir):
    runner = ModelRunner(runner_config(tiny_model_dir, block_size=4, num_kv_blocks=64))
    a, b, c = _prompts(runner.vocab_size, (10, 6, 5), seed=1)
    # step 1: all prefills; A only partly (no sample)
    out = runner.execute_model(batch([chunk(0, a[:7], 0, [0, 1, 2], do_sample=False),
                                      chunk(1, b, 0, [10, 11]), chunk(2, c, 0, [20, 21])]))
    assert [len(t) for t in out.sampled_token_ids] == [0, 1, 1]
    assert [len(lp) for lp in out.logprobs] == [0, 1, 1]
    tb, tc = sampled(out)
    # step 2: decodes listed after a prefill chunk; output must follow the chunk order
    out2 = runner.execute_model(batch([
        chunk(0, a[7:], 7, [0, 1, 2], prompt_token_ids=a),
        chunk(2, [tc], 5, [20, 21], prompt_token_ids=c, output_token_ids=[tc]),
        chunk(1, [tb], 6, [10, 11], prompt_token_ids=b, output_token_ids=[tb])]))
    assert isinstance(out2, ModelRunnerOutput) and [len(t) for t in out2.sampled_token_ids] == [1, 1, 1]
    # the same, each alone (fresh blocks): the same tokens
    alone = [
        sampled(runner.execute_model(batch([chunk(0, a, 0, [30, 31, 32])])))[0],
        sampled(runner.execute_model(batch([chunk(2, c + [tc], 0, [40, 41])])))[0],
        sampled(runner.execute_model(batch([chunk(1, b + [tb], 0, [50, 51])])))[0],
    ]
    assert sampled(out2) == alone
    assert runner.execute_model(batch([])).sampled_token_ids == []


def test_block_table_too_short_is_an_error(tiny_model_dir):
    runner = ModelRunner(runner_config(tiny_model_dir, block_size=4, num_kv_blocks=16))
    with pytest.raises(ValueError, match="block table"):
        runner.execute_model(batch([chunk(0, list(range(3, 12)), 0, [0, 1])]))


def test_seeded_sampling_same_alone_and_in_batch(tiny_model_dir):
    runner = ModelRunner(runner_config(tiny_model_dir, block_size=4, num_kv_blocks=200))
    prompts = _prompts(runner.vocab_size, (7, 12, 4, 9), seed=4)
    seeded = SamplingParams(temperature=1.0, top_p=0.95, seed=42, max_tokens=100)

    def generate(with_others: bool):
        alloc = BlockAllocator(runner.num_kv_blocks, seed=int(with_others))
        seqs = [_Seq(0, prompts[0], seeded, 4, alloc)]
        if with_others:
            seqs += [_Seq(i, p, SamplingParams(temperature=1.0, top_k=20), 4, alloc)
                     for i, p in enumerate(prompts[1:], start=1)]
        _generate(runner, seqs, steps=8, chunk_budget=5)
        return seqs[0].output

    first = generate(False)
    assert len(first) >= 6
    assert generate(True) == first
    assert generate(False) == first


def test_logprobs_through_the_runner(tiny_model_dir):
    runner = ModelRunner(runner_config(tiny_model_dir, block_size=4, num_kv_blocks=16))
    (prompt,) = _prompts(runner.vocab_size, (6,), seed=5)
    c = chunk(0, prompt, 0, [0, 1], SamplingParams(temperature=0.0, logprobs=3))
    (logits,) = runner.compute_logits(batch([chunk(0, prompt, 0, [2, 3])]))
    raw = torch.log_softmax(logits[-1], -1)
    out = runner.execute_model(batch([c]))
    ((lp,),) = out.logprobs
    assert out.sampled_token_ids == [[int(raw.argmax())]]
    assert lp.rank == 1 and lp.logprob == pytest.approx(raw.max().item(), abs=1e-5)
    assert [t for t, _ in lp.top] == raw.topk(3).indices.tolist()


def test_dummy_load_format_runs(tiny_model_dir):
    runner = ModelRunner(runner_config(tiny_model_dir, block_size=4, num_kv_blocks=16, load_format="dummy"))
    out = runner.execute_model(batch([chunk(0, [3, 4, 5], 0, [0])]))
    ((token,),) = out.sampled_token_ids
    assert 0 <= token < runner.vocab_size


class _EagerGraph:
    """Stands in for a captured CUDA graph: replay() runs the model on the static buffers, exactly
    what the captured graph does on the GPU."""

    def __init__(self, runner, bs):
        self.runner, self.bs = runner, bs

    def replay(self):
        r, bs = self.runner, self.bs
        with forward_context(r._graph_metadata(bs)):
            r._g_hidden[:bs] = r.model(r._g_input_ids[:bs], r._g_positions[:bs])


def test_graph_replay_bookkeeping_matches_eager(tiny_model_dir):
    """Pure-decode batches go through the static buffers (padding rows: slot -1, length 0) of the
    smallest bucket that fits; mixed batches and oversized ones run eagerly; results equal eager."""
    runner = ModelRunner(runner_config(tiny_model_dir, block_size=4, num_kv_blocks=200, max_num_seqs=6))
    buckets = runner.graph_batch_size_buckets()
    assert buckets == [1, 2, 4, 6]
    runner._allocate_graph_buffers(buckets[-1])
    replays = []

    class Recording(_EagerGraph):
        def replay(self):
            replays.append(self.bs)
            super().replay()

    graph_params = SamplingParams(temperature=0.0, logprobs=2)
    prompts = _prompts(runner.vocab_size, (5, 9, 3), seed=6)

    def decode_run(use_graphs: bool, alloc_seed: int):
        runner.graphs = {bs: Recording(runner, bs) for bs in buckets} if use_graphs else {}
        runner.graph_batch_sizes = sorted(runner.graphs)
        alloc = BlockAllocator(runner.num_kv_blocks, seed=alloc_seed)
        seqs = [_Seq(i, p, graph_params, 4, alloc) for i, p in enumerate(prompts)]
        results = []
        for _ in range(5):
            chunks = [s.next_chunk(16) for s in seqs]
            out = runner.execute_model(batch(chunks))
            results.append((sampled(out), [lp.logprob for lp in sampled_logprobs(out)]))
            for s, t in zip(seqs, sampled(out)):
                s.output.append(t)
        return results

    eager = decode_run(False, 0)
    graphed = decode_run(True, 1)
    assert replays == [4, 4, 4, 4]  # first step is a prefill (eager); 3 decodes -> bucket 4
    for (ids_e, lp_e), (ids_g, lp_g) in zip(eager, graphed):
        assert ids_e == ids_g
        assert lp_g == pytest.approx(lp_e, abs=1e-5)
    # the padding row stored nothing: slot -1 kept, context length 0
    assert runner._g_slot_mapping[3].item() == -1 and runner._g_context_lens[3].item() == 0


def _gpu_ready() -> bool:
    import os

    return torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"


def _fake_cuda_memory(monkeypatch, runner, *, total_bytes, used_bytes, activation_bytes):
    """Stand-ins for the torch.cuda memory calls of the profile, so it runs on CPU: `used_bytes`
    in use after the profile, a peak of scratch cache + `activation_bytes` above the baseline."""
    baseline = 12345
    profile = runner._profile_batch()
    blocks = sum(len(s.new.block_ids) for s in profile.seqs)
    elem = torch.empty((), dtype=runner.dtype).element_size()
    scratch = 2 * blocks * runner.block_size * runner.num_kv_heads * runner.head_dim * elem
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a, **k: baseline)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: baseline + scratch + activation_bytes)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a, **k: (total_bytes - used_bytes, total_bytes))
    return profile


def test_memory_profile_runs_the_largest_step_and_sizes_the_cache(tiny_model_dir, monkeypatch):
    """The CUDA memory profile, on CPU with faked memory counters: it runs the biggest step the
    scheduler can make (max_num_batched_tokens over max_num_seqs sampled sequences, with every
    sampler stage on) through model and sampler, and turns what is left into blocks."""
    runner = ModelRunner(runner_config(tiny_model_dir, block_size=4, num_kv_blocks=8, max_num_seqs=5,
                                       max_num_batched_tokens=47, gpu_memory_utilization=0.5))
    profile = _fake_cuda_memory(monkeypatch, runner, total_bytes=1 << 30, used_bytes=100 << 20,
                                activation_bytes=30 << 20)
    assert [s.num_tokens for s in profile.seqs] == [10, 10, 9, 9, 9]
    assert all(s.do_sample and len(s.new.block_ids) == -(-s.num_tokens // 4) for s in profile.seqs)
    seen = []
    execute = runner._execute

    def spy(batch, use_graph):
        out = execute(batch, use_graph)
        seen.append((len(batch.seqs), use_graph, len(sampled(out)), len(sampled_logprobs(out)[0].top)))
        return out

    monkeypatch.setattr(runner, "_execute", spy)
    num_blocks = runner._profile_num_kv_blocks()
    assert seen == [(5, False, 5, 20)]  # every sequence sampled, with the most logprobs
    assert len(runner.states) == 0  # the profile's sequences are forgotten
    assert num_blocks == int(((1 << 30) * 0.5 - (100 << 20) - (30 << 20)) // runner.kv_block_bytes)
    assert all(layer.k_cache is None and layer.v_cache is None for layer in runner.attention_layers)


def test_memory_profile_without_room_for_one_block_is_a_clear_error(tiny_model_dir, monkeypatch):
    runner = ModelRunner(runner_config(tiny_model_dir, block_size=4, num_kv_blocks=8, max_num_seqs=2,
                                       max_num_batched_tokens=16, gpu_memory_utilization=0.5))
    _fake_cuda_memory(monkeypatch, runner, total_bytes=1 << 30, used_bytes=(1 << 29) - 1000,
                      activation_bytes=0)
    with pytest.raises(RuntimeError, match="no GPU memory left for the KV cache.*gpu_memory_utilization"):
        runner._profile_num_kv_blocks()


@pytest.mark.skipif(not _gpu_ready(), reason="needs CUDA and TRITON_INTERPRET=0")
def test_cuda_profiling_and_graphs_match_eager(tiny_model_dir):
    """On a GPU: the KV cache is sized by profiling, decode batches replay CUDA graphs, and the
    graph path samples the same tokens (and logprobs) as the eager path.

    The runners are built one after the other: the profile counts memory already in use (other
    runners included) against gpu_memory_utilization, so a second runner built while the first
    holds its cache would find no room. The second profile finding as much room as the first
    also shows that shutdown() gave the memory back."""
    common = dict(device="cuda", dtype="float32", block_size=16, num_kv_blocks=None,
                  gpu_memory_utilization=0.3, max_num_seqs=8, max_model_len=512)
    params = SamplingParams(temperature=0.0, logprobs=2)
    results, num_kv_blocks = [], []
    for enforce_eager in (True, False):
        runner = ModelRunner(runner_config(tiny_model_dir, enforce_eager=enforce_eager, **common))
        num_kv_blocks.append(runner.num_kv_blocks)
        if enforce_eager:
            assert runner.num_kv_blocks > 100 and not runner.graphs
            prompts = _prompts(runner.vocab_size, (5, 30, 17), seed=7)
        else:
            assert runner.graph_batch_sizes == [1, 2, 4, 8]
        alloc = BlockAllocator(64)
        seqs = [_Seq(i, p, params, 16, alloc) for i, p in enumerate(prompts)]
        steps = []
        for _ in range(6):
            chunks = [s.next_chunk(64) for s in seqs]
            out = runner.execute_model(batch(chunks))
            steps.append((sampled(out), [lp.logprob for lp in sampled_logprobs(out)]))
            for s, t in zip(seqs, sampled(out)):
                s.output.append(t)
        results.append(steps)
        runner.shutdown()
        del runner
    assert num_kv_blocks[1] > 0.8 * num_kv_blocks[0]
    for (ids_e, lp_e), (ids_g, lp_g) in zip(*results):
        assert ids_e == ids_g
        assert lp_g == pytest.approx(lp_e, abs=1e-3)
    for s in seqs:
        assert s.output == _hf_greedy(tiny_model_dir, s.prompt, len(s.output))


def test_cuda_graph_capture_path_makes_no_host_sync(tiny_model_dir, monkeypatch, triton_kernels_on_cpu):
    """`_capture_cuda_graphs` on CPU, with stand-ins for torch.cuda.CUDAGraph / torch.cuda.graph
    and the Triton launchers in the interpreter (the calls made on CUDA): inside the captured
    region nothing may read a tensor on the host (.item(), .tolist(), bool(), ...), upload with
    torch.tensor or synchronize, since any of these breaks a real capture. The graphs share the
    first (largest) graph's pool, and replays (the model rerun on the static buffers) sample
    what the eager path samples."""
    import os
    from contextlib import contextmanager

    from triton.runtime.interpreter import InterpretedFunction

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 (set by tests/conftest.py)")
    runner = ModelRunner(runner_config(tiny_model_dir, block_size=4, num_kv_blocks=64, max_num_seqs=3))
    state = {"capturing": False, "in_kernel": 0}
    pools = []

    def forbidden(name, original):
        def check(*args, **kwargs):
            if state["capturing"] and not state["in_kernel"]:
                raise AssertionError(f"{name} inside CUDA-graph capture")
            return original(*args, **kwargs)
        return check

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, forbidden(f"Tensor.{name}", getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch, "tensor", forbidden("torch.tensor", torch.tensor))
    monkeypatch.setattr(torch.cuda, "synchronize", forbidden("torch.cuda.synchronize", lambda *a, **k: None))
    kernel_run = InterpretedFunction.run

    def run_kernel(self, *args, **kwargs):  # the interpreter itself reads values on the host
        state["in_kernel"] += 1
        try:
            return kernel_run(self, *args, **kwargs)
        finally:
            state["in_kernel"] -= 1

    monkeypatch.setattr(InterpretedFunction, "run", run_kernel)

    class FakeGraph(_EagerGraph):
        def __init__(self):
            self.runner = self.bs = None

        def pool(self):
            return ("pool of", id(self))

    @contextmanager
    def fake_capture(graph, pool=None):
        pools.append(pool)
        state["capturing"] = True
        try:
            yield
        finally:
            state["capturing"] = False

    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", fake_capture)
    runner._capture_cuda_graphs()
    assert runner.graph_batch_sizes == [1, 2, 3]
    first = runner.graphs[3]
    assert pools == [None, first.pool(), first.pool()]  # largest first, then its pool
    for bs, graph in runner.graphs.items():
        graph.runner, graph.bs = runner, bs

    params = SamplingParams(temperature=0.0, logprobs=1)
    prompts = _prompts(runner.vocab_size, (6, 3), seed=8)
    results = []
    for graphs in (dict(runner.graphs), {}):
        runner.graphs, runner.graph_batch_sizes = graphs, sorted(graphs)
        alloc = BlockAllocator(runner.num_kv_blocks, seed=len(graphs))
        seqs = [_Seq(i, p, params, 4, alloc) for i, p in enumerate(prompts)]
        _generate(runner, seqs, steps=3, chunk_budget=8)
        results.append([s.output for s in seqs])
    assert results[0] == results[1]


def test_run_makes_the_runner_gpu_current_on_the_calling_thread(tiny_model_dir, monkeypatch):
    """The serving engine steps on its own thread, whose current CUDA device is 0; Triton launches
    on the current device, so run() must make the runner's device current for the step."""
    from contextlib import contextmanager

    runner = ModelRunner(runner_config(tiny_model_dir, block_size=4, num_kv_blocks=16))
    current = {"device": None}

    @contextmanager
    def fake_device(device):
        previous, current["device"] = current["device"], device
        try:
            yield
        finally:
            current["device"] = previous

    seen = []
    monkeypatch.setattr(torch.cuda, "device", fake_device)
    monkeypatch.setattr(runner, "_execute", lambda batch, use_graph: seen.append(current["device"]))
    runner.device = torch.device("cuda", 1)  # only the guard looks at it here
    runner.execute_model(batch([chunk(0, [3, 4], 0, [0])]))
    assert seen == [torch.device("cuda", 1)] and current["device"] is None


def test_config_cuda_device_and_auto_dtype_resolution(tiny_model_dir, monkeypatch):
    """On CUDA (faked here): "auto" is bf16 from Ampere on and fp16 before (no bf16 dots there);
    a cuda:N beyond the visible devices is a clear error, not a failure deep in the runner."""
    from paged_engine.config import EngineConfig

    capability = {"value": (9, 0)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability["value"])
    assert EngineConfig(model=tiny_model_dir, device="cuda").dtype == "bfloat16"
    assert EngineConfig(model=tiny_model_dir, device="cuda:0").dtype == "bfloat16"
    capability["value"] = (7, 5)
    assert EngineConfig(model=tiny_model_dir, device="cuda").dtype == "float16"
    assert EngineConfig(model=tiny_model_dir, device="cuda", dtype="bf16").dtype == "bfloat16"  # explicit
    with pytest.raises(ValueError, match="only 1 CUDA device"):
        EngineConfig(model=tiny_model_dir, device="cuda:1")
