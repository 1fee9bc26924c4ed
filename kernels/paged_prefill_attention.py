"""Paged prefill attention: variable-length causal attention of query chunks over the paged cache.

Sequence ``i`` contributes the queries ``q[cu_seqlens_q[i]:cu_seqlens_q[i+1]]``; they are the last
``q_len_i`` positions of a sequence with ``context_lens[i]`` tokens in the cache (its cached prefix,
earlier chunks of a chunked prefill, and this chunk, whose K/V ``store_kvcache`` has already
written). Query ``j`` of the chunk sits at position ``context_lens[i] - q_len_i + j`` and attends to
every cached position up to and including its own.

One program handles ``BLOCK_M`` queries of one head of one sequence (FlashAttention-2 style online
softmax). Key tiles wholly below the causal diagonal of the tile's first query run without the
causal mask; only the few tiles on the diagonal pay for it. K/V rows are addressed per token
through the block table, so any block size works with any key tile size.

With a sliding window (query ``p`` sees keys ``p - window < key <= p``) the tiles before the
tile's first query's window are skipped, the tiles that some query of the tile cannot see are
masked, and those every query sees run unmasked. Soft-capping (Gemma 2) turns scores into
``cap * tanh(score / cap)`` before the softmax.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import (
    capability,
    check_dim,
    check_dtype,
    check_kernel_tensors,
    check_paged_attention,
    check_window_softcap,
    dot_precision,
    interpreting,
    next_power_of_2,
    score_scales,
    tanh,
)

_OP = "paged_prefill_attention"


@triton.jit
def _attend_tile(
    acc,
    m_i,
    l_i,
    q,  # [BLOCK_M, BLOCK_D]
    q_pos,  # [BLOCK_M] position of each query in its sequence
    start_n,
    context_len,
    block_table_row,  # block_tables_ptr + seq * stride_bt
    k_head_ptr,  # k_cache_ptr + kv_head * stride_kh
    v_head_ptr,
    stride_kb,
    stride_kt,
    stride_vb,
    stride_vt,
    qk_scale,
    cap_log2,
    window,
    offs_n,
    offs_d,
    d_mask,
    BLOCK_SIZE: tl.constexpr,
    CAUSAL_MASK: tl.constexpr,  # also masks the keys before each query's window when SLIDING
    SLIDING: tl.constexpr,
    SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    keys = start_n + offs_n
    k_valid = keys < context_len
    blocks = tl.load(block_table_row + keys // BLOCK_SIZE, mask=k_valid, other=0).to(tl.int64)
    slots = keys % BLOCK_SIZE
    kv_mask = k_valid[:, None] & d_mask[None, :]
    k = tl.load(
        k_head_ptr + blocks[:, None] * stride_kb + slots[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0
    )
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
    if SOFTCAP:
        scores = tanh(qk * qk_scale) * cap_log2
    else:
        scores = qk * qk_scale
    if CAUSAL_MASK:
        visible = (keys[None, :] <= q_pos[:, None]) & k_valid[None, :]
        if SLIDING:
            visible = visible & (keys[None, :] > q_pos[:, None] - window)
        scores = tl.where(visible, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    if SLIDING:
        # A row can see no key of a tile at the window's edge: keep -inf - -inf from making NaN.
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(scores - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = tl.load(
        v_head_ptr + blocks[:, None] * stride_vb + slots[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0
    )
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit(do_not_specialize=["window", "stride_bt"])  # the block-table width changes from batch to batch
def _paged_prefill_kernel(
    q_ptr,  # [total_q_tokens, num_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables_ptr,  # [num_seqs, max_blocks_per_seq] int32
    cu_seqlens_q_ptr,  # [num_seqs + 1] int32
    context_lens_ptr,  # [num_seqs] int32, tokens in cache after this chunk was stored
    out_ptr,  # [total_q_tokens, num_heads, head_dim]
    qk_scale,  # softmax scale * log2(e); softmax scale / cap with SOFTCAP
    cap_log2,  # soft cap * log2(e) (SOFTCAP only)
    window,  # keys per query in the sliding window (SLIDING only)
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_bt,
    stride_ot,
    stride_oh,
    GROUP_SIZE: tl.constexpr,  # query heads per KV head
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # tokens per KV-cache block
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_N: tl.constexpr,  # keys per tile
    BLOCK_D: tl.constexpr,  # HEAD_DIM padded to a power of 2
    SLIDING: tl.constexpr,
    SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # Heads vary fastest, so the query heads sharing a KV head run side by side (K/V reuse in L2),
    # and the query tiles go last-first: the longest causal rows start first, balancing the tail.
    head = tl.program_id(0)
    q_tile = tl.num_programs(1) - 1 - tl.program_id(1)
    seq = tl.program_id(2)
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    if q_tile * BLOCK_M >= q_len:
        return
    context_len = tl.load(context_lens_ptr + seq)
    first_pos = context_len - q_len  # position of the chunk's first query

    offs_m = q_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < q_len
    d_mask = offs_d < HEAD_DIM
    q_rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(
        q_ptr + q_rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
        mask=m_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    q_pos = first_pos + offs_m
    kv_head = head // GROUP_SIZE
    block_table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    k_head_ptr = k_cache_ptr + kv_head * stride_kh
    v_head_ptr = v_cache_ptr + kv_head * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # Keys < tile_first_pos + 1 are visible to every query of the tile (causally): no mask there.
    tile_first_pos = first_pos + q_tile * BLOCK_M
    num_full_tiles = (tile_first_pos + 1) // BLOCK_N
    kv_end = tl.minimum(tile_first_pos + BLOCK_M, context_len)  # past the tile's last query
    if SLIDING:
        # Keys before the first query's window are seen by nobody; keys >= kv_end - window are in
        # the last query's window, so in every query's: tiles from there to the diagonal run unmasked.
        start_tile = tl.maximum(tile_first_pos - window + 1, 0) // BLOCK_N
        unmasked_from = tl.maximum(tl.cdiv(tl.maximum(kv_end - window, 0), BLOCK_N), start_tile)
        unmasked_from = tl.minimum(unmasked_from, num_full_tiles)
        for t in range(start_tile, unmasked_from):
            acc, m_i, l_i = _attend_tile(
                acc, m_i, l_i, q, q_pos, t * BLOCK_N, context_len, block_table_row, k_head_ptr, v_head_ptr,
                stride_kb, stride_kt, stride_vb, stride_vt, qk_scale, cap_log2, window, offs_n, offs_d, d_mask,
                BLOCK_SIZE=BLOCK_SIZE, CAUSAL_MASK=True, SLIDING=SLIDING, SOFTCAP=SOFTCAP,
                DOT_PRECISION=DOT_PRECISION,
            )
    else:
        unmasked_from = 0
    for t in range(unmasked_from, num_full_tiles):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, q_pos, t * BLOCK_N, context_len, block_table_row, k_head_ptr, v_head_ptr,
            stride_kb, stride_kt, stride_vb, stride_vt, qk_scale, cap_log2, window, offs_n, offs_d, d_mask,
            BLOCK_SIZE=BLOCK_SIZE, CAUSAL_MASK=False, SLIDING=SLIDING, SOFTCAP=SOFTCAP,
            DOT_PRECISION=DOT_PRECISION,
        )
    for t in range(num_full_tiles, tl.cdiv(kv_end, BLOCK_N)):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, q_pos, t * BLOCK_N, context_len, block_table_row, k_head_ptr, v_head_ptr,
            stride_kb, stride_kt, stride_vb, stride_vt, qk_scale, cap_log2, window, offs_n, offs_d, d_mask,
            BLOCK_SIZE=BLOCK_SIZE, CAUSAL_MASK=True, SLIDING=SLIDING, SOFTCAP=SOFTCAP,
            DOT_PRECISION=DOT_PRECISION,
        )

    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(
        out_ptr + q_rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=m_mask[:, None] & d_mask[None, :],
    )


def _check(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, out) -> None:
    check_paged_attention(_OP, q, "[total_q_tokens, num_heads, head_dim]", k_cache, v_cache,
                          block_tables, context_lens, out)
    check_dim(_OP, "cu_seqlens_q", cu_seqlens_q, 1, "[num_seqs + 1]")
    num_seqs = context_lens.shape[0]
    if cu_seqlens_q.shape[0] != num_seqs + 1:
        raise ValueError(
            f"{_OP}: cu_seqlens_q has {cu_seqlens_q.shape[0]} entries, expected num_seqs + 1 = {num_seqs + 1}"
        )
    check_dtype(_OP, "cu_seqlens_q", cu_seqlens_q, (torch.int32,))


def _tile_config(head_dim: int, dtype: torch.dtype, max_seqlen_q: int, arch: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages); register use checked by ``python -m kernels.aot``."""
    if interpreting():
        return 16, 32, 4, 1
    if dtype == torch.float32:  # ieee fp32 dots: registers, not tensor cores, are the limit
        return 32, 16, 8, 2
    # Before Hopper, a 128-row tile of 256-wide heads (Gemma) holds more accumulator and query than
    # 8 warps' registers: 64 rows there.
    block_m = 128 if max_seqlen_q > 64 and (head_dim <= 128 or arch >= 90) else 64
    block_n = 64 if head_dim <= 128 else 32
    # Hopper's wgmma takes 64 query rows per warpgroup of 4 warps; before it, 4 warps on a 64-row
    # tile spill registers (mma.sync keeps more of the tile in registers); so do 256-wide heads
    # on Hopper.
    num_warps = 8 if block_m == 128 or arch < 90 or head_dim > 128 else 4
    return block_m, block_n, num_warps, 3


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    *,
    max_seqlen_q: int | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's query chunk over its paged K/V (prefix + the chunk).

    Args:
        q: ``[total_q_tokens, num_heads, head_dim]`` fp16/bf16/fp32, last dim contiguous.
        k_cache, v_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]``, holding the chunk's K/V.
        block_tables: int32 ``[num_seqs, max_blocks_per_seq]``.
        cu_seqlens_q: int32 ``[num_seqs + 1]``, prefix sums of the chunk lengths (starts at 0).
        context_lens: int32 ``[num_seqs]``, tokens in the cache after the chunk; must be >= the
            chunk length (not checked on the device: that would need a host sync).
        scale: softmax scale.
        out: optional output like ``q``.
        max_seqlen_q: the longest chunk, if the caller knows it; otherwise it is read from
            ``cu_seqlens_q`` (one device-to-host sync; prefill runs eagerly, so that is allowed).
        sliding_window: each query attends to the last ``sliding_window`` keys up to itself (its
            own included), as transformers' ``sliding_window``; None: the whole causal prefix.
        softcap: soft-cap the scaled scores at ``softcap`` (``cap * tanh(s / cap)``); None: off.
    Returns:
        ``out``.
    """
    _check(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, out)
    check_window_softcap(_OP, sliding_window, softcap)
    tensors = {"q": q, "k_cache": k_cache, "v_cache": v_cache, "block_tables": block_tables}
    tensors.update(cu_seqlens_q=cu_seqlens_q, context_lens=context_lens)
    if out is not None:
        tensors["out"] = out
    device = check_kernel_tensors(_OP, tensors, vectors=("cu_seqlens_q", "context_lens"))
    total_q, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    num_seqs = context_lens.shape[0]
    if out is None:
        out = torch.empty_like(q)
    if num_seqs == 0 or total_q == 0:
        return out
    if max_seqlen_q is None:
        max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    if max_seqlen_q <= 0:
        return out
    block_m, block_n, num_warps, num_stages = _tile_config(head_dim, q.dtype, max_seqlen_q, capability(device))
    grid = (num_heads, triton.cdiv(max_seqlen_q, block_m), num_seqs)
    qk_scale, cap_log2 = score_scales(scale, softcap)
    _paged_prefill_kernel[grid](
        q,
        k_cache,
        v_cache,
        block_tables,
        cu_seqlens_q,
        context_lens,
        out,
        qk_scale,
        cap_log2,
        int(sliding_window or 0),
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        GROUP_SIZE=num_heads // num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=max(16, next_power_of_2(head_dim)),  # tl.dot needs K >= 16
        SLIDING=sliding_window is not None,
        SOFTCAP=softcap is not None,
        DOT_PRECISION=dot_precision(q.dtype),
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out


def paged_prefill_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    *,
    max_seqlen_q: int | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Plain-torch :func:`paged_prefill_attention` (same arguments). Per sequence: gather its K/V
    through the block table, mask causally with the chunk's offset, softmax in fp32."""
    _check(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, out)
    check_window_softcap(_OP, sliding_window, softcap)
    total_q, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group_size = num_heads // num_kv_heads
    cu = cu_seqlens_q.tolist()
    lens = context_lens.tolist()
    result = torch.zeros(total_q, num_heads, head_dim, dtype=torch.float32, device=q.device)
    for i, context_len in enumerate(lens):
        q_len = cu[i + 1] - cu[i]
        if q_len <= 0:
            continue
        if context_len < q_len:
            raise ValueError(f"{_OP}: sequence {i} has context_len {context_len} < chunk length {q_len}")
        num_blocks = -(-context_len // block_size)
        blocks = block_tables[i, :num_blocks].long()
        k = k_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:context_len].float()
        v = v_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:context_len].float()
        qs = q[cu[i] : cu[i + 1]].float().view(q_len, num_kv_heads, group_size, head_dim)
        scores = torch.einsum("qhgd,khd->hgqk", qs, k) * scale  # [kv_heads, group, q_len, context_len]
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        q_pos = torch.arange(context_len - q_len, context_len, device=q.device)
        keys = torch.arange(context_len, device=q.device)[None, :]
        hidden = keys > q_pos[:, None]
        if sliding_window is not None:
            hidden |= keys <= q_pos[:, None] - int(sliding_window)
        probs = torch.softmax(scores.masked_fill(hidden, float("-inf")), dim=-1)
        result[cu[i] : cu[i + 1]] = torch.einsum("hgqk,khd->qhgd", probs, v).reshape(q_len, num_heads, head_dim)
    if out is None:
        return result.to(q.dtype)
    out.copy_(result)
    return out
