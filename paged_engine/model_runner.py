"""ModelRunner: owns the model, the paged KV cache and the sampler; runs one scheduled batch.

    runner = ModelRunner(config, hf_config)      # load, profile (CUDA), allocate KV, capture graphs
    out = runner.run(scheduler_output)           # -> RunnerOutput(sampled_token_ids, logprobs)

Each step the runner turns the scheduler's chunks into flat `input_ids` / `positions`, a slot
mapping (where each new token's K/V goes) and per-sequence block tables and context lengths
(AttentionMetadata), runs the model, gathers the hidden state of every chunk that ends at its
sequence's last token, and samples. Chunks with one token (decodes) are laid out first so that
attention can send them to the decode kernel and the rest to the prefill kernel.

On CUDA, batches made only of decodes replay a CUDA graph captured per batch-size bucket from
static input buffers (nano-vllm `model_runner.py`); mixed or prefill batches run eagerly. The
runner keeps no per-sequence state: every chunk carries its block table and token history.
"""

from __future__ import annotations

import array
import bisect
import gc
import json
import logging
import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from paged_engine.attention import AttentionMetadata, forward_context
from paged_engine.loader import load_model
from paged_engine.sampler import SampleLogprobs, Sampler
from paged_engine.sampling_params import MAX_LOGPROBS, SamplingParams
from paged_engine.scheduler import ScheduledChunk

logger = logging.getLogger(__name__)

# KV cache size on CPU when num_kv_blocks is not given (no memory profiling there).
CPU_KV_CACHE_BYTES = 64 << 20
# Largest decode batch captured in a CUDA graph; bigger decode batches run eagerly.
MAX_GRAPH_BATCH_SIZE = 512
# array.array type codes of the integer dtypes of the model inputs.
_ARRAY_TYPECODES = {torch.int32: "i", torch.int64: "q"}


@dataclass
class RunnerOutput:
    sampled_token_ids: list[int]  # one per chunk with do_sample, in chunk order
    # per sampled token: its raw logprob and rank always (cumulative_logprob needs them), and
    # the top-N alternatives when params.logprobs = N (else an empty list)
    logprobs: list[SampleLogprobs | None]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _decode_first_order(chunks) -> tuple[list[int], int]:
    """Chunk indices with the one-token chunks first (stable), and how many those are."""
    order = [i for i, c in enumerate(chunks) if len(c.token_ids) == 1]
    num_decode = len(order)
    order += [i for i, c in enumerate(chunks) if len(c.token_ids) != 1]
    return order, num_decode


def _torch_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in names:
        raise ValueError(f"dtype must be one of {list(names)} (engine config resolves 'auto'), got {dtype!r}")
    return names[dtype]


def eos_token_ids(model_dir: str | None, hf_config) -> list[int]:
    """EOS ids of the model: config.json's plus generation_config.json's (Llama 3 lists several)."""
    ids: set[int] = set()

    def add(value) -> None:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))

    add(getattr(hf_config, "eos_token_id", None))
    if model_dir:
        path = os.path.join(model_dir, "generation_config.json")
        if os.path.isfile(path):
            with open(path) as f:
                add(json.load(f).get("eos_token_id"))
    return sorted(ids)


class ModelRunner:
    """Runs scheduled batches on one device.

    Args:
        config: EngineConfig (fields used: model, device, dtype, block_size, num_kv_blocks,
            gpu_memory_utilization, max_num_seqs, max_num_batched_tokens, max_model_len, seed,
            enforce_eager, load_format).
        hf_config: the model's transformers config.
    Attributes:
        num_kv_blocks: blocks allocated per layer (what the block manager may hand out).
    """

    def __init__(self, config, hf_config=None):
        if hf_config is None:
            hf_config = getattr(config, "hf_config", None)
        if hf_config is None:
            from transformers import AutoConfig

            hf_config = AutoConfig.from_pretrained(config.model)
        self.hf_config = hf_config
        self.device = torch.device(config.device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.dtype = _torch_dtype(config.dtype)
        self.block_size = config.block_size
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.max_model_len = config.max_model_len or hf_config.max_position_embeddings
        self.max_blocks_per_seq = _cdiv(self.max_model_len, self.block_size)
        self.gpu_memory_utilization = config.gpu_memory_utilization
        self.enforce_eager = config.enforce_eager
        self._pin = self.device.type == "cuda"

        self.model = load_model(
            config.model,
            hf_config,
            self.dtype,
            self.device,
            load_format=getattr(config, "load_format", "auto"),
            seed=config.seed,
        )
        self.attention_layers = self.model.attention_layers()
        first = self.attention_layers[0]
        self.num_kv_heads, self.head_dim = first.num_kv_heads, first.head_dim
        self.vocab_size = hf_config.vocab_size
        self.sampler = Sampler(
            self.vocab_size, self.device, seed=config.seed,
            eos_token_ids=eos_token_ids(config.model, hf_config),
        )

        if config.num_kv_blocks is not None:
            self.num_kv_blocks = int(config.num_kv_blocks)
        elif self.device.type == "cuda":
            self.num_kv_blocks = self._profile_num_kv_blocks()
        else:
            per_seq = self.max_blocks_per_seq
            budget = max(CPU_KV_CACHE_BYTES // self.kv_block_bytes, per_seq)
            self.num_kv_blocks = min(budget, per_seq * self.max_num_seqs)
        self._allocate_kv_cache(self.num_kv_blocks)

        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.graph_batch_sizes: list[int] = []
        if self.device.type == "cuda" and not self.enforce_eager:
            self._capture_cuda_graphs()

    # ------------------------------------------------------------------ KV cache

    @property
    def kv_block_bytes(self) -> int:
        """Bytes of one block across all layers, K and V."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        per_layer = self.block_size * self.num_kv_heads * self.head_dim * elem
        return 2 * len(self.attention_layers) * per_layer

    def _allocate_kv_cache(self, num_blocks: int) -> None:
        shape = (num_blocks, self.block_size, self.num_kv_heads, self.head_dim)
        # Zeroed: attention may read (and mask) unwritten slots; garbage NaNs would leak through 0*NaN.
        self.k_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.attention_layers]
        self.v_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.attention_layers]
        for layer, k, v in zip(self.attention_layers, self.k_caches, self.v_caches):
            layer.k_cache, layer.v_cache = k, v

    @torch.inference_mode()
    def _profile_num_kv_blocks(self) -> int:
        """Run the largest step the scheduler can produce, then size the KV cache from what is left.

        blocks = (total * gpu_memory_utilization - used now - peak activation memory) / block bytes,
        where "used now" includes the weights, the CUDA context and other processes (nano-vllm).
        """
        device = self.device
        chunks = self._profile_chunks()
        # A scratch cache, one K and one V shared by every layer, holds this step's tokens.
        num_scratch_blocks = sum(len(c.block_table) for c in chunks)
        shape = (num_scratch_blocks, self.block_size, self.num_kv_heads, self.head_dim)
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        baseline_bytes = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        scratch_k = torch.zeros(shape, dtype=self.dtype, device=device)
        scratch_v = torch.zeros(shape, dtype=self.dtype, device=device)
        scratch_bytes = 2 * scratch_k.numel() * scratch_k.element_size()
        for layer in self.attention_layers:
            layer.k_cache, layer.v_cache = scratch_k, scratch_v
        self._run_chunks(chunks, use_graph=False)
        torch.cuda.synchronize(device)
        activation_bytes = torch.cuda.max_memory_allocated(device) - baseline_bytes - scratch_bytes
        for layer in self.attention_layers:
            layer.k_cache = layer.v_cache = None
        del scratch_k, scratch_v
        gc.collect()
        torch.cuda.empty_cache()
        free_bytes, total_bytes = torch.cuda.mem_get_info(device)
        used_bytes = total_bytes - free_bytes
        budget = total_bytes * self.gpu_memory_utilization - used_bytes - max(activation_bytes, 0)
        num_blocks = int(budget // self.kv_block_bytes)
        logger.info(
            "memory profile: total %.2f GiB, used %.2f GiB, activation peak %.2f GiB -> %d KV blocks",
            total_bytes / 2**30, used_bytes / 2**30, activation_bytes / 2**30, num_blocks,
        )
        if num_blocks < 1:
            raise RuntimeError(
                f"no GPU memory left for the KV cache (gpu_memory_utilization="
                f"{self.gpu_memory_utilization}, {used_bytes / 2**30:.2f} GiB in use, activation peak "
                f"{activation_bytes / 2**30:.2f} GiB); raise gpu_memory_utilization or lower "
                "max_num_batched_tokens / max_num_seqs"
            )
        return num_blocks

    def _profile_chunks(self) -> list[ScheduledChunk]:
        """The largest step the scheduler can produce: max_num_batched_tokens prefill tokens over
        as many sequences as may run (each sampled), with blocks 0.. of a scratch cache.

        The sampling parameters are real SamplingParams (whatever field the sampler reads exists)
        and switch on every optional stage with big temporaries: penalties ([rows, vocab] counts),
        min_p, top-k/top-p (the sort) and the most logprobs.
        """
        num_tokens = min(self.max_num_batched_tokens, self.max_num_seqs * self.max_model_len)
        num_seqs = max(1, min(self.max_num_seqs, num_tokens))
        lens = [num_tokens // num_seqs + (1 if i < num_tokens % num_seqs else 0) for i in range(num_seqs)]
        params = SamplingParams(
            temperature=1.0, top_p=0.9, top_k=50, min_p=0.05, logprobs=MAX_LOGPROBS,
            repetition_penalty=1.1, presence_penalty=0.1, frequency_penalty=0.1, max_tokens=None,
        )
        chunks, next_block = [], 0
        for seq_id, n in enumerate(lens):
            num_blocks = _cdiv(n, self.block_size)
            prompt = [seq_id % self.vocab_size] * n
            chunks.append(ScheduledChunk(
                seq_id=seq_id, token_ids=prompt, start_pos=0,
                block_table=list(range(next_block, next_block + num_blocks)), do_sample=True,
                params=params, prompt_token_ids=prompt, output_token_ids=[],
            ))
            next_block += num_blocks
        return chunks

    def _device_scope(self):
        """Make this runner's GPU the current device of the calling thread for one step.

        The engine steps on its own thread, whose current device is cuda:0 whatever
        `torch.cuda.set_device` did on the thread that built the runner. Torch ops follow their
        tensors, but Triton launches on the current device's stream: a runner on cuda:1 would
        launch its kernels on GPU 0 with GPU 1 pointers.
        """
        return torch.cuda.device(self.device) if self.device.type == "cuda" else nullcontext()

    # ------------------------------------------------------------------ inputs

    def _to_device(self, data, dtype) -> torch.Tensor:
        """A flat list of ints as a 1-D tensor on the device.

        Through array.array: converting a list element by element costs torch.tensor about four
        times what it costs array (a decode batch of 256 has ~10^4 block-table entries).
        """
        if not data:
            host = torch.empty(0, dtype=dtype)
        else:
            host = torch.frombuffer(array.array(_ARRAY_TYPECODES[dtype], data), dtype=dtype)
            if self._pin:
                host = host.pin_memory()
        return host.to(self.device, non_blocking=True)

    def _prepare(self, chunks):
        """Flatten chunks (decodes first) into model inputs and AttentionMetadata.

        Returns (input_ids, positions, metadata, sample_token_indices) where sample_token_indices
        lists, in the original chunk order, the flat index of the last token of each chunk with
        do_sample.
        """
        bs = self.block_size
        order, num_decode = _decode_first_order(chunks)
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        context_lens: list[int] = []
        cu_seqlens_q = [0]
        tables: list[tuple[list[int], int]] = []  # (block table, blocks this step uses)
        last_token_index = [0] * len(chunks)
        num_tokens = max_seqlen_q = width = 0
        for i in order:
            c = chunks[i]
            token_ids, start, table = c.token_ids, c.start_pos, c.block_table
            n = len(token_ids)
            if n == 0:
                raise ValueError(f"chunk of sequence {c.seq_id} has no tokens")
            end = start + n
            num_blocks = _cdiv(end, bs)
            if len(table) < num_blocks:
                raise ValueError(
                    f"sequence {c.seq_id}: block table has {len(table)} blocks, "
                    f"{end} tokens need {num_blocks}"
                )
            if n == 1:  # a decode: one slot, no ranges to build
                input_ids.append(token_ids[0])
                positions.append(start)
                slot_mapping.append(table[start // bs] * bs + start % bs)
            else:
                input_ids.extend(token_ids)
                positions.extend(range(start, end))
                pos = start
                while pos < end:  # one range per block touched
                    block, offset = divmod(pos, bs)
                    upto = min(end, (block + 1) * bs)
                    base = table[block] * bs
                    slot_mapping.extend(range(base + offset, base + offset + (upto - pos)))
                    pos = upto
            context_lens.append(end)
            num_tokens += n
            cu_seqlens_q.append(num_tokens)
            tables.append((table, num_blocks))
            last_token_index[i] = num_tokens - 1
            max_seqlen_q = max(max_seqlen_q, n)
            width = max(width, num_blocks)
        padded_tables: list[int] = []  # [len(chunks) * width], row-major
        for table, num_blocks in tables:
            padded_tables += table[:num_blocks] if len(table) > num_blocks else table
            padded_tables += [0] * (width - num_blocks)
        sample_indices = [last_token_index[i] for i, c in enumerate(chunks) if c.do_sample]

        prefill_cu = None
        if num_decode < len(chunks):
            prefill_cu = self._to_device([x - num_decode for x in cu_seqlens_q[num_decode:]], torch.int32)
        metadata = AttentionMetadata(
            slot_mapping=self._to_device(slot_mapping, torch.int64),
            block_tables=self._to_device(padded_tables, torch.int32).view(len(chunks), width),
            context_lens=self._to_device(context_lens, torch.int32),
            cu_seqlens_q=self._to_device(cu_seqlens_q, torch.int32),
            num_decode_seqs=num_decode,
            max_seqlen_q=max_seqlen_q,
            prefill_cu_seqlens_q=prefill_cu,
        )
        return (
            self._to_device(input_ids, torch.int64),
            self._to_device(positions, torch.int64),
            metadata,
            sample_indices,
        )

    # ------------------------------------------------------------------ run

    @torch.inference_mode()
    def run(self, batch) -> RunnerOutput:
        """Run one SchedulerOutput: compute the KV of every chunk and sample where do_sample."""
        if not batch.chunks:
            return RunnerOutput([], [])
        with self._device_scope():
            return self._run_chunks(batch.chunks, use_graph=True)

    @torch.inference_mode()
    def compute_chunk_logits(self, chunks) -> list[torch.Tensor]:
        """Run chunks eagerly (their K/V is stored like in `run`) and return, per chunk in order,
        the float32 logits of all its tokens [len(token_ids), vocab]. For tests and debugging."""
        with self._device_scope():
            input_ids, positions, metadata, _ = self._prepare(chunks)
            with forward_context(metadata):
                hidden = self.model(input_ids, positions)
            logits = self.model.compute_logits(hidden).float()
        order, _ = _decode_first_order(chunks)
        per_chunk: list[torch.Tensor | None] = [None] * len(chunks)
        offset = 0
        for i in order:
            n = len(chunks[i].token_ids)
            per_chunk[i] = logits[offset : offset + n]
            offset += n
        return per_chunk

    def _run_chunks(self, chunks, use_graph: bool) -> RunnerOutput:
        input_ids, positions, metadata, sample_indices = self._prepare(chunks)
        graph_bs = self._graph_batch_size(metadata) if use_graph else None
        if graph_bs is not None:
            hidden = self._replay_graph(graph_bs, input_ids, positions, metadata)
        else:
            with forward_context(metadata):
                hidden = self.model(input_ids, positions)
        if not sample_indices:
            return RunnerOutput([], [])
        hidden = hidden[self._to_device(sample_indices, torch.int64)]
        logits = self.model.compute_logits(hidden)
        sampled = self.sampler(logits, [c for c in chunks if c.do_sample])
        return RunnerOutput(sampled.token_ids, sampled.logprobs)

    # ------------------------------------------------------------------ CUDA graphs

    def _graph_batch_size(self, metadata: AttentionMetadata) -> int | None:
        """The captured bucket for this batch, or None to run eagerly."""
        if not self.graphs or not metadata.is_decode:
            return None
        num_seqs = metadata.num_seqs
        if num_seqs > self.graph_batch_sizes[-1] or metadata.block_tables.shape[1] > self.max_blocks_per_seq:
            return None
        return self.graph_batch_sizes[bisect.bisect_left(self.graph_batch_sizes, num_seqs)]

    def _allocate_graph_buffers(self, max_bs: int) -> None:
        """Static inputs/outputs the decode graphs read and write; replays copy a batch into them."""
        device = self.device
        self._g_input_ids = torch.zeros(max_bs, dtype=torch.int64, device=device)
        self._g_positions = torch.zeros(max_bs, dtype=torch.int64, device=device)
        self._g_slot_mapping = torch.full((max_bs,), -1, dtype=torch.int64, device=device)
        # Padding rows: context length 0 (attention reads nothing) and slot -1 (nothing stored).
        self._g_context_lens = torch.zeros(max_bs, dtype=torch.int32, device=device)
        self._g_block_tables = torch.zeros(max_bs, self.max_blocks_per_seq, dtype=torch.int32, device=device)
        self._g_cu_seqlens_q = torch.arange(max_bs + 1, dtype=torch.int32, device=device)
        self._g_hidden = torch.zeros(max_bs, self.hf_config.hidden_size, dtype=self.dtype, device=device)

    def graph_batch_size_buckets(self) -> list[int]:
        max_bs = min(self.max_num_seqs, MAX_GRAPH_BATCH_SIZE)
        sizes = [b for b in (1, 2, 4, 8) if b <= max_bs] + list(range(16, max_bs + 1, 16))
        if sizes[-1] != max_bs:
            sizes.append(max_bs)
        return sizes

    @torch.inference_mode()
    def _capture_cuda_graphs(self) -> None:
        sizes = self.graph_batch_size_buckets()
        self._allocate_graph_buffers(sizes[-1])
        device = self.device
        pool = None
        for bs in reversed(sizes):  # largest first: the smaller graphs reuse its memory pool
            metadata = self._graph_metadata(bs)
            graph = torch.cuda.CUDAGraph()
            with forward_context(metadata):
                # Warm-up outside capture: Triton compiles here, and the decode launcher picks its
                # split count from the static block-table width, the same at every replay.
                self._g_hidden[:bs] = self.model(self._g_input_ids[:bs], self._g_positions[:bs])
                torch.cuda.synchronize(device)
                with torch.cuda.graph(graph, pool=pool):
                    self._g_hidden[:bs] = self.model(self._g_input_ids[:bs], self._g_positions[:bs])
            if pool is None:
                pool = graph.pool()
            self.graphs[bs] = graph
            torch.cuda.synchronize(device)
        self.graph_batch_sizes = sorted(self.graphs)
        self._graph_pool = pool

    def _graph_metadata(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self._g_slot_mapping[:bs],
            block_tables=self._g_block_tables[:bs],
            context_lens=self._g_context_lens[:bs],
            cu_seqlens_q=self._g_cu_seqlens_q[: bs + 1],
            num_decode_seqs=bs,
            max_seqlen_q=1,
            prefill_cu_seqlens_q=None,
        )

    def _replay_graph(self, graph_bs: int, input_ids, positions, metadata: AttentionMetadata):
        n = metadata.num_seqs
        width = metadata.block_tables.shape[1]
        self._g_input_ids[:n].copy_(input_ids)
        self._g_positions[:n].copy_(positions)
        self._g_slot_mapping[:n].copy_(metadata.slot_mapping)
        self._g_slot_mapping[n:graph_bs].fill_(-1)
        self._g_context_lens[:n].copy_(metadata.context_lens)
        self._g_context_lens[n:graph_bs].fill_(0)
        # Entries past a row's context length are never read, so stale ones need no clearing.
        self._g_block_tables[:n, :width].copy_(metadata.block_tables)
        self.graphs[graph_bs].replay()
        return self._g_hidden[:n]

    # ------------------------------------------------------------------ teardown

    def shutdown(self) -> None:
        """Drop the graphs, KV cache and weights, and give the GPU memory back."""
        self.graphs.clear()
        self._graph_pool = None
        for layer in getattr(self, "attention_layers", []):
            layer.k_cache = layer.v_cache = None
        self.k_caches = self.v_caches = []
        for name in ("_g_input_ids", "_g_positions", "_g_slot_mapping", "_g_context_lens",
                     "_g_block_tables", "_g_cu_seqlens_q", "_g_hidden"):
            self.__dict__.pop(name, None)
        self.model = None
        self.attention_layers = []
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
