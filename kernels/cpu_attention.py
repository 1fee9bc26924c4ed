"""Paged attention on CPU: the whole batch in one ``scaled_dot_product_attention`` call.

The Triton kernels do not run on CPU, and the plain-torch ``*_ref`` twins are references (fp32
einsums, a Python loop over the prefill sequences), too slow to serve from. Here each op gathers
the batch's K/V *by whole blocks* through the block tables (one indexed copy of
``[num_seqs, width * block_size]`` rows, no per-token index math), and hands the padded batch to
torch's SDPA, whose CPU kernel (flash attention in oneDNN-style tiles, fp32 accumulation, bf16
or fp32 inputs) does the masked softmax without materialising the scores in fp32 per head.

GQA without copying K/V per query head: a sequence's query heads of one KV head are stacked as
extra query rows (``[num_seqs, num_kv_heads, group * q_len, head_dim]``) against that KV head's
keys. For decodes (one query per sequence) every row of a group sees the same keys, so the mask
is one row per sequence; for prefill chunks the causal mask is repeated per group.

Masking: key ``j`` of sequence ``s`` is visible to its query at position ``p`` when
``j < context_len[s]`` and ``j <= p`` (and ``j > p - sliding_window`` with a window). The width
of the gather is the block-table width the runner padded to (the longest context of the step),
so nothing is read from the device to size it. Every query sees at least itself
(``context_len >= q_len >= 1``), so no softmax row is empty.

The masks (and the prefill's padding indices) depend only on the batch, so each op builds them
once per forward into the scratch dict the forward context carries (`cache`), and every later
layer reuses them; bool masks are turned into additive float masks there, once.

Soft-capped scores (Gemma 2) are not expressible in SDPA: those layers take the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._utils import check_window_softcap

_OP = "cpu_paged_attention"


def _gather_blocks(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """[num_seqs, num_kv_heads, width * block_size, head_dim]: each row's blocks, in order."""
    num_seqs, width = block_tables.shape
    _, block_size, num_kv_heads, head_dim = cache.shape
    gathered = cache.index_select(0, block_tables.reshape(-1).long())
    return gathered.view(num_seqs, width * block_size, num_kv_heads, head_dim).transpose(1, 2)


def _check(q, k_cache, v_cache, block_tables, context_lens, sliding_window, softcap) -> None:
    check_window_softcap(_OP, sliding_window, softcap)
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"{_OP}: q must be [tokens, heads, head_dim] and the caches "
                         f"[blocks, block_size, kv_heads, head_dim], got {tuple(q.shape)}, "
                         f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    if q.shape[1] % k_cache.shape[2] or q.shape[2] != k_cache.shape[3]:
        raise ValueError(f"{_OP}: {q.shape[1]} query heads of size {q.shape[2]} do not fit "
                         f"{k_cache.shape[2]} KV heads of size {k_cache.shape[3]}")
    if block_tables.dim() != 2 or block_tables.shape[0] != context_lens.shape[0]:
        raise ValueError(f"{_OP}: block_tables [num_seqs, width] and context_lens [num_seqs] disagree: "
                         f"{tuple(block_tables.shape)} vs {tuple(context_lens.shape)}")


def _plan(cache: dict | None, key, build):
    """``build()``, or what it returned for ``key`` earlier in this forward (``cache`` is the
    forward's scratch dict: every layer sees the same batch, so the masks and gather indices are
    built once per step instead of once per layer)."""
    if cache is None:
        return build()
    if key not in cache:
        cache[key] = build()
    return cache[key]


def _additive(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # A float mask is added to the scores as is; a bool one SDPA converts again at every call.
    return torch.zeros(visible.shape, dtype=dtype).masked_fill_(~visible, float("-inf"))


def paged_decode_attention_cpu(q, k_cache, v_cache, block_tables, context_lens, scale: float,
                               out: torch.Tensor, sliding_window: int | None = None,
                               cache: dict | None = None) -> None:
    """One query token per sequence, written into ``out`` [num_seqs, num_heads, head_dim].

    Args (as :func:`paged_decode_attention`): q [num_seqs, num_heads, head_dim]; k_cache /
    v_cache [num_blocks, block_size, num_kv_heads, head_dim]; block_tables int32
    [num_seqs, width] covering every context; context_lens int32 [num_seqs], each >= 1;
    cache: the forward's scratch dict (``AttentionMetadata.op_cache``), or None.
    """
    _check(q, k_cache, v_cache, block_tables, context_lens, sliding_window, None)
    num_seqs, num_heads, head_dim = q.shape
    if num_seqs == 0:
        return
    num_kv_heads = k_cache.shape[2]

    def build():
        keys = torch.arange(block_tables.shape[1] * k_cache.shape[1])
        lens = context_lens.long()[:, None]
        visible = keys[None, :] < lens  # the query sits at position len - 1
        if sliding_window is not None:
            visible &= keys[None, :] >= lens - sliding_window
        return _additive(visible[:, None, None, :], q.dtype)

    mask = _plan(cache, ("decode", sliding_window, q.dtype), build)
    k = _gather_blocks(k_cache, block_tables)
    v = _gather_blocks(v_cache, block_tables)
    qg = q.view(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)
    result = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)
    out.copy_(result.view(num_seqs, num_heads, head_dim))


def paged_prefill_attention_cpu(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens,
                                scale: float, out: torch.Tensor, max_seqlen_q: int,
                                sliding_window: int | None = None, cache: dict | None = None) -> None:
    """Causal attention of query chunks (each chunk the last tokens of its context), into ``out``.

    Args (as :func:`paged_prefill_attention`): q [total_q, num_heads, head_dim]; cu_seqlens_q
    int32 [num_seqs + 1]; context_lens int32 [num_seqs] (>= the chunk's length); max_seqlen_q
    the longest chunk; cache: the forward's scratch dict, or None.
    """
    _check(q, k_cache, v_cache, block_tables, context_lens, sliding_window, None)
    total_q, num_heads, head_dim = q.shape
    num_seqs = context_lens.shape[0]
    if total_q == 0 or num_seqs == 0:
        return
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    num_keys = block_tables.shape[1] * k_cache.shape[1]

    def build():
        # CPU tensors: reading the offsets costs no device sync.
        cu = cu_seqlens_q.tolist()
        q_lens = [cu[i + 1] - cu[i] for i in range(num_seqs)]
        lens = context_lens.tolist()
        for i, (n, c) in enumerate(zip(q_lens, lens)):
            if c < n:
                raise ValueError(f"{_OP}: sequence {i} has context_len {c} < chunk length {n}")
        # Flat token t of sequence s goes to padded row (s, t - cu[s]).
        q_lens_t = torch.tensor(q_lens)
        rows = torch.repeat_interleave(torch.arange(num_seqs), q_lens_t)
        cols = torch.arange(total_q) - torch.tensor(cu[:-1]).repeat_interleave(q_lens_t)
        keys = torch.arange(num_keys)
        lens_t = torch.tensor(lens)
        # Query row r of sequence s is at position len - q_len + r; padding rows see key 0 only.
        q_pos = (lens_t - q_lens_t)[:, None] + torch.arange(max_seqlen_q)[None, :]
        q_pos = torch.minimum(q_pos, lens_t[:, None] - 1)
        visible = keys[None, None, :] <= q_pos[:, :, None]  # [seq, q_row, key]; also < context_len
        if sliding_window is not None:
            visible &= keys[None, None, :] > q_pos[:, :, None] - sliding_window
        mask = visible[:, None, None, :, :].expand(-1, 1, group, -1, -1).reshape(
            num_seqs, 1, group * max_seqlen_q, num_keys)
        return rows, cols, _additive(mask, q.dtype)

    rows, cols, mask = _plan(cache, ("prefill", sliding_window, q.dtype, group), build)
    padded = q.new_zeros(num_seqs, max_seqlen_q, num_heads, head_dim)
    padded[rows, cols] = q
    # [seq, kv_head, group * q_len, head_dim]: the group's query heads stacked as query rows.
    qg = padded.view(num_seqs, max_seqlen_q, num_kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)
    qg = qg.reshape(num_seqs, num_kv_heads, group * max_seqlen_q, head_dim)
    k = _gather_blocks(k_cache, block_tables)
    v = _gather_blocks(v_cache, block_tables)
    result = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)
    result = result.view(num_seqs, num_kv_heads, group, max_seqlen_q, head_dim).permute(0, 3, 1, 2, 4)
    out.copy_(result.reshape(num_seqs, max_seqlen_q, num_heads, head_dim)[rows, cols])


def store_kvcache_cpu(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slot_mapping: torch.Tensor) -> None:
    """:func:`store_kvcache` on CPU: one ``index_copy_`` per cache into its flat slot view (the
    runner's CPU caches are contiguous); slots of -1 are skipped as by the reference."""
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError(f"{_OP}: the CPU KV caches must be contiguous")
    slots = slot_mapping.long()
    keep = slots >= 0
    if not bool(keep.all()):
        slots, k, v = slots[keep], k[keep], v[keep]
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, v.to(v_cache.dtype))
