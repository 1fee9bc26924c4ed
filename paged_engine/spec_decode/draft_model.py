"""Draft-model proposer: a smaller model with the target's vocabulary drafts k tokens per step.

The draft runs in its own `ModelRunner` (same device and dtype as the target, eager) with its own
paged KV cache of as many blocks as the target's, addressed by the same block tables: a block id
means the same token positions in both caches, so the scheduler's one block manager serves both,
and whatever frees a sequence's blocks (finish, abort, preemption) frees them in the draft's cache
too. Prefix-cache hits and n>1 forks are valid for the draft as well, because the draft computes
its KV for exactly the positions the target computes, every step:

1. before the target runs, the draft applies the same `SchedulerOutput` to its copies of the
   sequences and computes the KV of the same tokens [start_pos, start_pos + num_tokens) of every
   scheduled sequence (prefill chunks included), sampling d_1 where draft slots were reserved;
2. then one decode step per draft: feeding d_j (KV at its position) gives d_{j+1}; the last
   feeds d_k for its KV only, as the target computes d_k's KV while verifying.

Rejected drafts leave KV in both caches at positions that are not counted as computed; both are
overwritten when those positions are computed again. Greedy requests draft greedily; the others
sample from the draft's distribution processed by the sampler's pipeline (temperature, top-k, ...)
and hand that distribution (q) to the rejection sampler.
"""

from __future__ import annotations

import gc
from types import SimpleNamespace
from typing import TYPE_CHECKING

import torch

from paged_engine.executor.model_runner import ModelRunner
from paged_engine.executor.sampler import SAMPLING_EPS, sample_categorical
from paged_engine.model_executor.forward_context import AttentionMetadata, forward_context
from paged_engine.spec_decode.rejection_sampler import DRAFT_SEED_SALT, DraftRow

if TYPE_CHECKING:
    from paged_engine.config import EngineConfig
    from paged_engine.core.batch import SchedulerOutput


def draft_kv_block_bytes(draft_hf_config, dtype: torch.dtype, block_size: int) -> int:
    """Bytes of one block of the draft's KV cache (all layers, K and V), from its config."""
    heads = draft_hf_config.num_attention_heads
    kv_heads = getattr(draft_hf_config, "num_key_value_heads", None) or heads
    head_dim = getattr(draft_hf_config, "head_dim", None) or draft_hf_config.hidden_size // heads
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * draft_hf_config.num_hidden_layers * block_size * kv_heads * head_dim * elem


class DraftModelProposer:
    """Runs the draft model between the scheduler and the target.

    Args:
        config: the engine's EngineConfig (speculative_config.method == "draft_model"; its
            draft_hf_config was checked against the target at load).
    """

    def __init__(self, config: "EngineConfig"):
        spec = config.speculative_config
        self.num_speculative_tokens = spec.num_speculative_tokens
        runner_config = SimpleNamespace(
            model=spec.model, device=config.device, dtype=config.dtype,
            block_size=config.block_size,
            num_kv_blocks=1,  # placeholder: allocate_kv_cache() sizes it like the target's
            gpu_memory_utilization=config.gpu_memory_utilization,
            max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=config.max_model_len, seed=config.seed,
            enforce_eager=True, load_format=config.load_format,
            hf_config=config.draft_hf_config, speculative_config=None,
        )
        self.runner = ModelRunner(runner_config, config.draft_hf_config)
        self.device = self.runner.device
        self.block_size = config.block_size

    @property
    def vocab_size(self) -> int:
        return self.runner.vocab_size

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """Give the draft a cache of num_blocks blocks (the target's count)."""
        runner = self.runner
        for layer in runner.attention_layers:
            layer.k_cache = layer.v_cache = None
        runner.k_caches = runner.v_caches = []
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        runner._allocate_kv_cache(num_blocks)
        runner.num_kv_blocks = num_blocks

    def shutdown(self) -> None:
        runner, self.runner = self.runner, None
        if runner is not None:
            runner.shutdown()

    # ------------------------------------------------------------------ proposing

    @torch.inference_mode()
    def propose(self, batch: "SchedulerOutput", seqs_by_id=None) -> dict | None:
        """Compute the draft's KV for the batch's tokens and fill draft_token_ids where draft
        slots were reserved. Returns seq_id -> q [num drafts, vocab] for sequences whose
        drafts were sampled (not greedy), or None when there are none."""
        with self.runner._device_scope():
            return self._propose(batch)

    def _propose(self, batch: "SchedulerOutput") -> dict | None:
        runner = self.runner
        states = runner.states.update(batch)
        input_ids, positions, metadata, sample_indices, _ = runner._prepare(batch.seqs, states)
        with forward_context(metadata):
            hidden = runner.model(input_ids, positions)
        sampling = [i for i, s in enumerate(batch.seqs) if s.do_sample]
        flat_index = dict(zip(sampling, sample_indices))  # no drafts yet: one index each
        want = [i for i in sampling if batch.seqs[i].num_lookahead_tokens > 0]
        if not want:
            return None

        limit = {i: batch.seqs[i].num_lookahead_tokens for i in want}
        drafts: dict[int, list[int]] = {i: [] for i in want}
        q_rows: dict[int, list[torch.Tensor]] = {i: [] for i in want}
        outputs = {i: list(states[i].output_token_ids) for i in want}

        logits = runner.model.compute_logits(hidden[runner._to_device([flat_index[i] for i in want],
                                                                      torch.int64)])
        self._sample(logits, want, states, outputs, drafts, q_rows)
        # Decode steps: feed d_j at its position; it yields d_{j+1} while j < the sequence's
        # slots, and only its KV (which the target also computes) for the last one.
        j = 1
        while True:
            active = [i for i in want if limit[i] >= j]
            if not active:
                break
            tokens = [drafts[i][j - 1] for i in active]
            pos = [batch.seqs[i].start_pos + batch.seqs[i].num_tokens + j - 1 for i in active]
            hidden = self._decode(tokens, pos, [states[i].block_table for i in active])
            more = [n for n, i in enumerate(active) if limit[i] > j]
            if more:
                logits = runner.model.compute_logits(hidden[runner._to_device(more, torch.int64)])
                self._sample(logits, [active[n] for n in more], states, outputs, drafts, q_rows)
            j += 1

        draft_probs = {}
        for i in want:
            batch.seqs[i].draft_token_ids = drafts[i]
            if q_rows[i]:
                draft_probs[batch.seqs[i].seq_id] = torch.stack(q_rows[i])
        return draft_probs or None

    def _sample(self, logits, rows_of, states, outputs, drafts, q_rows) -> None:
        """One draft token for each sequence in rows_of (greedy, or sampled with its q)."""
        sampler = self.runner.sampler
        rows = [DraftRow(states[i].params, states[i].prompt_token_ids, outputs[i] + drafts[i])
                for i in rows_of]
        processed, _ = sampler.process_logits(logits, rows)
        greedy = [r.params.temperature < SAMPLING_EPS for r in rows]
        tokens = processed.argmax(dim=-1)
        q = None
        if not all(greedy):
            q, row_seeds = sampler.sampling_probs(processed, rows, greedy, seed_salt=DRAFT_SEED_SALT)
            sampled = sample_categorical(q, sampler.generator, row_seeds)
            tokens = torch.where(sampler._tensor(greedy, torch.bool), tokens, sampled)
        for n, (i, t) in enumerate(zip(rows_of, tokens.tolist())):
            drafts[i].append(t)
            if q is not None and not greedy[n]:
                q_rows[i].append(q[n])

    def _decode(self, tokens: list[int], positions: list[int], tables: list[list[int]]):
        """Hidden states of one decode token per sequence (KV stored at its position)."""
        runner = self.runner
        bs = self.block_size
        n = len(tokens)
        slots, context_lens, rows = [], [], []
        width = max(p // bs + 1 for p in positions)
        for p, table in zip(positions, tables):
            if len(table) <= p // bs:
                raise ValueError(f"draft position {p} has no block (table of {len(table)})")
            slots.append(table[p // bs] * bs + p % bs)
            context_lens.append(p + 1)
            rows += table[:width] + [0] * (width - min(len(table), width))
        metadata = AttentionMetadata(
            slot_mapping=runner._to_device(slots, torch.int64),
            block_tables=runner._to_device(rows, torch.int32).view(n, width),
            context_lens=runner._to_device(context_lens, torch.int32),
            cu_seqlens_q=runner._to_device(list(range(n + 1)), torch.int32),
            num_decode_seqs=n,
            max_seqlen_q=1,
            prefill_cu_seqlens_q=None,
        )
        with forward_context(metadata):
            return runner.model(runner._to_device(tokens, torch.int64),
                                runner._to_device(positions, torch.int64))
