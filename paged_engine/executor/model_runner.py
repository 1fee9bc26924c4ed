"""ModelRunner: owns the model, the paged KV cache and the sampler; runs one scheduled batch.

    runner = ModelRunner(config, hf_config)      # load, profile (CUDA), allocate KV, capture graphs
    out = runner.execute_model(scheduler_output) # -> ModelRunnerOutput (tokens per sequence)

Each step the runner applies the batch to its copies of the sequences (`SequenceStates`), turns
the scheduled work into flat `input_ids` / `positions`, a slot mapping (where each new token's
K/V goes) and per-sequence block tables and context lengths (AttentionMetadata), runs the model,
gathers the hidden state of every sequence that samples, and samples. Sequences with one query
token (decodes) are laid out first so that attention sends them to the decode op and the rest to
the prefill op.

On CUDA, batches made only of decodes replay a CUDA graph captured per batch-size bucket from
static input buffers (nano-vllm `model_runner.py`); mixed or prefill batches run eagerly.

Built inside a tensor-parallel group (executor/multiproc_executor.py), every rank runs the same
steps on its shard; only rank 0 (`is_driver`) gets logits and samples, the others return an
empty output. All ranks hold the same number of KV blocks (the smallest any rank can afford).
"""

from __future__ import annotations

import array
import bisect
import gc
import logging
import os
from contextlib import nullcontext

import torch

from paged_engine.core.batch import (
    ModelRunnerOutput,
    NewSequenceData,
    PromptLogprobs,
    ScheduledSequence,
    SchedulerOutput,
)
from paged_engine.distributed.parallel_state import get_tp_group, tensor_model_parallel_min
from paged_engine.executor.grammar_bitmask import apply_grammar_bitmask
from paged_engine.executor.sampler import Sampler
from paged_engine.executor.sequence_state import SequenceState, SequenceStates
from paged_engine.model_executor.forward_context import AttentionMetadata, forward_context
from paged_engine.model_executor.loader import load_model
from paged_engine.model_executor.quantization import get_quantization_config
from paged_engine.sampling_params import MAX_LOGPROBS, SamplingParams
from paged_engine.spec_decode.rejection_sampler import RejectionSampler

logger = logging.getLogger(__name__)

# KV cache size on CPU when num_kv_blocks is not given (no memory profiling there): vLLM-cpu's
# default VLLM_CPU_KVCACHE_SPACE (4 GiB), but at most an eighth of the machine's memory. The
# cache never exceeds what max_num_seqs sequences of max_model_len need, so small models and
# short contexts take far less.
CPU_KV_CACHE_BYTES = 4 << 30


def cpu_kv_cache_bytes() -> int:
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return CPU_KV_CACHE_BYTES
    return min(CPU_KV_CACHE_BYTES, total // 8)


def cpu_threads() -> int:
    """The CPUs this process may run on (its affinity mask: a container's or taskset's share),
    which is what torch's intra-op pool should use; torch's own default counts the machine."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)
# Largest decode batch captured in a CUDA graph; bigger decode batches run eagerly.
MAX_GRAPH_BATCH_SIZE = 512
# array.array type codes of the integer dtypes of the model inputs.
_ARRAY_TYPECODES = {torch.int32: "i", torch.int64: "q"}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _decode_first_order(seqs: list[ScheduledSequence]) -> tuple[list[int], int]:
    """Indices with the one-query-token sequences first (stable), and how many those are."""
    order = [i for i, s in enumerate(seqs) if s.num_tokens + len(s.draft_token_ids) == 1]
    num_decode = len(order)
    order += [i for i, s in enumerate(seqs) if s.num_tokens + len(s.draft_token_ids) != 1]
    return order, num_decode


def _torch_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in names:
        raise ValueError(f"dtype must be one of {list(names)} (engine config resolves 'auto'), got {dtype!r}")
    return names[dtype]


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
        elif torch.get_num_threads() > cpu_threads() and "OMP_NUM_THREADS" not in os.environ:
            # More OpenMP threads than CPUs we may use: every parallel op waits at its barrier
            # for a thread that is not running.
            torch.set_num_threads(cpu_threads())
        self.dtype = _torch_dtype(config.dtype)
        self.block_size = config.block_size
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.max_model_len = config.max_model_len or hf_config.max_position_embeddings
        self.max_blocks_per_seq = _cdiv(self.max_model_len, self.block_size)
        self.gpu_memory_utilization = config.gpu_memory_utilization
        self.enforce_eager = config.enforce_eager
        self._pin = self.device.type == "cuda"
        self.tp_group = get_tp_group()
        self.is_driver = self.tp_group.rank == 0  # the sampling rank

        self.model = load_model(
            config.model,
            hf_config,
            self.dtype,
            self.device,
            load_format=getattr(config, "load_format", "auto"),
            seed=config.seed,
            max_model_len=self.max_model_len,
            quant_config=get_quantization_config(hf_config, config.model, getattr(config, "quantization", None)),
        )
        self.attention_layers = self.model.attention_layers()
        first = self.attention_layers[0]
        self.num_kv_heads, self.head_dim = first.num_kv_heads, first.head_dim
        self.vocab_size = hf_config.vocab_size
        self.sampler = Sampler(self.vocab_size, self.device, seed=config.seed)
        self.rejection_sampler = RejectionSampler(self.sampler)
        self.states = SequenceStates()

        # A draft model (speculative decoding) gets a cache of as many blocks as this one: size
        # this cache for both.
        self.extra_kv_block_bytes = 0
        spec = getattr(config, "speculative_config", None)
        if spec is not None and spec.method == "draft_model":
            from paged_engine.spec_decode.draft_model import draft_kv_block_bytes

            self.extra_kv_block_bytes = draft_kv_block_bytes(config.draft_hf_config, self.dtype,
                                                             self.block_size)
        if config.num_kv_blocks is not None:
            self.num_kv_blocks = int(config.num_kv_blocks)
        elif self.device.type == "cuda":
            self.num_kv_blocks = self._profile_num_kv_blocks()
        else:
            per_seq = self.max_blocks_per_seq
            budget = max(cpu_kv_cache_bytes() // (self.kv_block_bytes + self.extra_kv_block_bytes),
                         per_seq)
            self.num_kv_blocks = min(budget, per_seq * self.max_num_seqs)
        # One block table serves every rank: each must hold as many blocks as the smallest.
        self.num_kv_blocks = tensor_model_parallel_min(self.num_kv_blocks, self.device, self.tp_group)
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
        batch = self._profile_batch()
        # A scratch cache, one K and one V shared by every layer, holds this step's tokens.
        num_scratch_blocks = sum(len(s.new.block_ids) for s in batch.seqs)
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
        self._execute(batch, use_graph=False)
        self.states = SequenceStates()  # forget the profile's sequences
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
        num_blocks = int(budget // (self.kv_block_bytes + self.extra_kv_block_bytes))
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

    def _profile_batch(self) -> SchedulerOutput:
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
        seqs, next_block = [], 0
        for seq_id, n in enumerate(lens):
            num_blocks = _cdiv(n, self.block_size)
            blocks = list(range(next_block, next_block + num_blocks))
            seqs.append(ScheduledSequence(
                seq_id=seq_id, start_pos=0, num_tokens=n, do_sample=True,
                new=NewSequenceData([seq_id % self.vocab_size] * n, [], blocks, params),
            ))
            next_block += num_blocks
        return SchedulerOutput(seqs, num_tokens, [])

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

    def _prepare(self, seqs: list[ScheduledSequence], states: list[SequenceState]):
        """Flatten the scheduled work (decodes first) into model inputs and AttentionMetadata.

        Each sequence's query tokens are its tokens [start_pos, start_pos + num_tokens) followed
        by its draft tokens. Returns (input_ids, positions, metadata, sample_token_indices,
        query_starts) where sample_token_indices lists, in batch order, the flat indices whose
        logits are sampled: the last query token of each sequence with do_sample, and with k
        draft tokens the last k + 1 (each draft is checked against the logits of the token
        before it); query_starts[i] is the flat index of sequence i's first query token.
        """
        bs = self.block_size
        order, num_decode = _decode_first_order(seqs)
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        context_lens: list[int] = []
        cu_seqlens_q = [0]
        tables: list[tuple[list[int], int]] = []  # (block table, blocks this step uses)
        last_token_index = [0] * len(seqs)
        query_starts = [0] * len(seqs)
        num_tokens = max_seqlen_q = width = 0
        for i in order:
            s, state = seqs[i], states[i]
            start, table, drafts = s.start_pos, state.block_table, s.draft_token_ids
            n = s.num_tokens + len(drafts)
            if s.num_tokens <= 0:
                raise ValueError(f"sequence {s.seq_id} is scheduled with no tokens")
            end = start + n
            num_blocks = _cdiv(end, bs)
            if len(table) < num_blocks:
                raise ValueError(
                    f"sequence {s.seq_id}: block table has {len(table)} blocks, "
                    f"{end} tokens need {num_blocks}"
                )
            if n == 1:  # a decode: one slot, no ranges to build
                input_ids.append(state.token_slice(start, end)[0])
                positions.append(start)
                slot_mapping.append(table[start // bs] * bs + start % bs)
            else:
                input_ids.extend(state.token_slice(start, start + s.num_tokens))
                input_ids.extend(drafts)
                positions.extend(range(start, end))
                pos = start
                while pos < end:  # one range per block touched
                    block, offset = divmod(pos, bs)
                    upto = min(end, (block + 1) * bs)
                    base = table[block] * bs
                    slot_mapping.extend(range(base + offset, base + offset + (upto - pos)))
                    pos = upto
            context_lens.append(end)
            query_starts[i] = num_tokens
            num_tokens += n
            cu_seqlens_q.append(num_tokens)
            tables.append((table, num_blocks))
            last_token_index[i] = num_tokens - 1
            max_seqlen_q = max(max_seqlen_q, n)
            width = max(width, num_blocks)
        padded_tables: list[int] = []  # [len(seqs) * width], row-major
        for table, num_blocks in tables:
            padded_tables += table[:num_blocks] if len(table) > num_blocks else table
            padded_tables += [0] * (width - num_blocks)
        sample_indices: list[int] = []
        for i, s in enumerate(seqs):
            if s.do_sample:
                last = last_token_index[i]
                sample_indices.extend(range(last - len(s.draft_token_ids), last + 1))

        prefill_cu = None
        if num_decode < len(seqs):
            prefill_cu = self._to_device([x - num_decode for x in cu_seqlens_q[num_decode:]], torch.int32)
        metadata = AttentionMetadata(
            slot_mapping=self._to_device(slot_mapping, torch.int64),
            block_tables=self._to_device(padded_tables, torch.int32).view(len(seqs), width),
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
            query_starts,
        )

    # ------------------------------------------------------------------ run

    @torch.inference_mode()
    def execute_model(self, batch: SchedulerOutput, draft_probs: dict | None = None) -> ModelRunnerOutput:
        """Run one SchedulerOutput: compute the KV of every scheduled token, sample where do_sample.

        Sequences with draft tokens get them verified (spec_decode/rejection_sampler.py);
        draft_probs maps seq_id to the draft model's probabilities [len(drafts), vocab] where the
        drafts were sampled from them (absent: one-hot, as n-gram drafts).
        """
        if not batch.seqs:
            self.states.update(batch)  # still drop the finished copies
            return ModelRunnerOutput.empty()
        with self._device_scope():
            if draft_probs:
                return self._execute(batch, use_graph=True, draft_probs=draft_probs)
            return self._execute(batch, use_graph=True)

    @torch.inference_mode()
    def compute_logits(self, batch: SchedulerOutput) -> list[torch.Tensor]:
        """Run a batch eagerly (its K/V is stored as by `execute_model`, nothing is sampled) and
        return, per scheduled sequence in order, the float32 logits of all its query tokens
        [num_tokens + len(draft_token_ids), vocab]. For tests and debugging."""
        with self._device_scope():
            states = self.states.update(batch)
            input_ids, positions, metadata, _, _ = self._prepare(batch.seqs, states)
            with forward_context(metadata):
                hidden = self.model(input_ids, positions)
            logits = self.model.compute_logits(hidden)
        if logits is None:  # not the sampling rank
            return [None] * len(batch.seqs)
        logits = logits.float()
        order, _ = _decode_first_order(batch.seqs)
        per_seq: list[torch.Tensor | None] = [None] * len(batch.seqs)
        offset = 0
        for i in order:
            s = batch.seqs[i]
            n = s.num_tokens + len(s.draft_token_ids)
            per_seq[i] = logits[offset : offset + n]
            offset += n
        return per_seq

    def _execute(self, batch: SchedulerOutput, use_graph: bool, draft_probs: dict | None = None
                 ) -> ModelRunnerOutput:
        states = self.states.update(batch)
        drafted = False
        for s in batch.seqs:
            if s.draft_token_ids:
                drafted = True
                if not s.do_sample:
                    raise ValueError(f"sequence {s.seq_id} has draft tokens but does not sample")
                if not all(0 <= t < self.vocab_size for t in s.draft_token_ids):
                    raise ValueError(f"sequence {s.seq_id}: draft token ids outside the vocabulary")
        input_ids, positions, metadata, sample_indices, query_starts = self._prepare(batch.seqs, states)
        graph_bs = self._graph_batch_size(metadata) if use_graph else None
        if graph_bs is not None:
            hidden = self._replay_graph(graph_bs, input_ids, positions, metadata)
        else:
            with forward_context(metadata):
                hidden = self.model(input_ids, positions)
        output = ModelRunnerOutput.empty(len(batch.seqs))
        if any(state.params.prompt_logprobs is not None for state in states):
            output.prompt_logprobs = self._prompt_logprobs(batch.seqs, states, hidden, query_starts)
        if not sample_indices:
            return output
        hidden = hidden[self._to_device(sample_indices, torch.int64)]
        logits = self.model.compute_logits(hidden)
        if logits is None:  # not the sampling rank: rank 0 samples
            return output
        rows = [i for i, s in enumerate(batch.seqs) if s.do_sample]
        if any(batch.seqs[i].grammar_bitmask is not None for i in rows):
            self._apply_grammar_bitmasks(logits, [batch.seqs[i] for i in rows])
        if drafted:
            draft_probs = draft_probs or {}
            seqs = [batch.seqs[i] for i in rows]
            tokens, logprobs = self.rejection_sampler(
                logits, [states[i] for i in rows], [s.draft_token_ids for s in seqs],
                [draft_probs.get(s.seq_id) for s in seqs])
            for j, i in enumerate(rows):
                output.sampled_token_ids[i] = tokens[j]
                output.logprobs[i] = logprobs[j]
            return output
        sampled = self.sampler(logits, [states[i] for i in rows])
        for j, i in enumerate(rows):
            output.sampled_token_ids[i].append(sampled.token_ids[j])
            output.logprobs[i].append(sampled.logprobs[j])
        return output

    @staticmethod
    def _apply_grammar_bitmasks(logits: torch.Tensor, sampled: list[ScheduledSequence]) -> None:
        """Structured outputs: mask each constrained sequence's logits rows (its k + 1 sampled
        positions, in the order of `sample_indices`) before sampling or verification."""
        rows, masks, row = [], [], 0
        for s in sampled:
            n = len(s.draft_token_ids) + 1
            if s.grammar_bitmask is not None:
                if len(s.grammar_bitmask) != n:
                    raise ValueError(f"sequence {s.seq_id}: grammar bitmask has "
                                     f"{len(s.grammar_bitmask)} rows for {n} sampled positions")
                rows.extend(range(row, row + n))
                masks.append(s.grammar_bitmask)
            row += n
        apply_grammar_bitmask(logits, rows, masks)

    def _prompt_logprobs(self, seqs, states, hidden, query_starts) -> list[PromptLogprobs | None]:
        """Logprobs of the prompt tokens this step's positions predict, for the sequences whose
        params ask for them: position p's logits give prompt token p + 1's logprob."""
        result: list[PromptLogprobs | None] = [None] * len(seqs)
        for i, (s, state) in enumerate(zip(seqs, states)):
            num_top = state.params.prompt_logprobs
            if num_top is None:
                continue
            first, stop = s.start_pos, min(s.start_pos + s.num_tokens, len(state.prompt_token_ids) - 1)
            if stop <= first:
                continue
            rows = hidden[query_starts[i]: query_starts[i] + stop - first]
            logits = self.model.compute_logits(rows)
            if logits is None:  # not the sampling rank
                continue
            targets = state.prompt_token_ids[first + 1: stop + 1]
            result[i] = PromptLogprobs(first + 1, self.sampler.token_logprobs(logits, targets, num_top))
        return result

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
