"""Paged decode attention: one query token per sequence over its block table (flash-decoding).

Design
- GQA packing: one program serves every query head of one KV head (the "group"), so each K/V
  tile is read once per group and the scores are a ``tl.dot`` of a ``[BLOCK_G, head_dim]`` query
  tile (the group padded to at least 16 rows, the minimum for tensor-core dots) with the K tile.
- Split-KV: the grid is ``(num_seqs, num_kv_heads, num_splits)``. Each sequence's tiles are
  divided evenly over the splits *inside the kernel*, from its own context length; splits left
  without work write an empty partial (lse = -inf). A second kernel merges the partials by their
  log-sum-exp. With ``num_splits == 1`` the first kernel writes the output directly.
- CUDA graphs: nothing on the host reads tensor values. The grid depends only on ``num_seqs``,
  ``num_kv_heads`` and ``num_splits``; pass a fixed ``num_splits`` and a preallocated
  :class:`DecodeWorkspace` and a captured launch replays correctly for any context lengths
  (a context length of 0, e.g. a padding slot, gives a zero output and reads nothing).
- Sliding window (Mistral, Gemma's local layers, Phi-3): the query at position ``p`` sees keys
  ``p - window < key <= p``; the tiles before the window are never visited (the splits divide the
  window's tiles) and the first tile masks the keys before it.
- Soft-capping (Gemma 2): scores become ``cap * tanh(score / cap)`` before the softmax.
- No recompiles for new batch sizes: batch size and lengths are never kernel arguments
  (they are the grid and tensor contents); ``num_splits``, the block-table width (row stride)
  and the workspace strides are marked ``do_not_specialize``, and
  the merge walks the splits in fixed-size chunks, so only the model's shape (head_dim, group
  size, block_size, dtype) and ``num_splits == 1`` vs ``> 1`` select a variant.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._utils import (
    cdiv,
    check_dim,
    check_kernel_tensors,
    check_paged_attention,
    check_window_softcap,
    dot_precision,
    interpreting,
    next_power_of_2,
    num_sms,
    score_scales,
    tanh,
)

_OP = "paged_decode_attention"
# Below this many tokens per split, splitting costs more (partials + merge) than it gains.
_MIN_TOKENS_PER_SPLIT = 256
_MAX_SPLITS = 64
_MERGE_CHUNK = 16  # splits merged per step of the merge kernel's loop


# Arguments that change with the batch (split count, block-table width, workspace strides) are not
# specialised, so Triton's "== 1" / "divisible by 16" specialisation cannot add variants.
@triton.jit(do_not_specialize=["num_splits", "window", "stride_bt", "stride_ps", "stride_ph", "stride_ls", "stride_lh"])
def _paged_decode_split_kernel(
    q_ptr,  # [num_seqs, num_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables_ptr,  # [num_seqs, max_blocks_per_seq] int32
    context_lens_ptr,  # [num_seqs] int32
    out_ptr,  # [num_seqs, num_heads, head_dim]; written when SINGLE_SPLIT
    partial_out_ptr,  # [>= num_seqs, num_heads, >= num_splits, head_dim] fp32; written unless SINGLE_SPLIT
    partial_lse_ptr,  # [>= num_seqs, num_heads, >= num_splits] fp32 (log2 domain); unless SINGLE_SPLIT
    qk_scale,  # softmax scale * log2(e); softmax scale / cap with SOFTCAP
    cap_log2,  # soft cap * log2(e) (SOFTCAP only)
    window,  # keys per query in the sliding window (SLIDING only)
    num_splits,
    stride_qs,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_bt,
    stride_os,
    stride_oh,
    stride_ps,
    stride_ph,
    stride_pp,
    stride_ls,
    stride_lh,
    GROUP_SIZE: tl.constexpr,  # query heads per KV head
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # tokens per KV-cache block
    BLOCK_G: tl.constexpr,  # GROUP_SIZE padded to a power of 2 >= 16
    BLOCK_D: tl.constexpr,  # HEAD_DIM padded to a power of 2
    BLOCK_N: tl.constexpr,  # keys per tile
    SINGLE_SPLIT: tl.constexpr,
    SLIDING: tl.constexpr,
    SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    context_len = tl.load(context_lens_ptr + seq)
    num_tiles = tl.cdiv(context_len, BLOCK_N)
    if SLIDING:  # the query sits at context_len - 1 and sees the last `window` keys
        first_key = tl.maximum(context_len - window, 0)
        first_tile = first_key // BLOCK_N
    else:
        first_key = 0
        first_tile = 0
    tiles_per_split = tl.cdiv(num_tiles - first_tile, num_splits)
    tile_start = first_tile + split * tiles_per_split
    tile_end = tl.minimum(tile_start + tiles_per_split, num_tiles)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    heads = kv_head * GROUP_SIZE + offs_g
    g_mask = offs_g < GROUP_SIZE
    d_mask = offs_d < HEAD_DIM

    q = tl.load(
        q_ptr + seq * stride_qs + heads[:, None] * stride_qh + offs_d[None, :],
        mask=g_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    block_table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    k_head_ptr = k_cache_ptr + kv_head * stride_kh
    v_head_ptr = v_cache_ptr + kv_head * stride_vh

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for tile in range(tile_start, tile_end):
        tokens = tile * BLOCK_N + offs_n
        t_mask = tokens < context_len
        if SLIDING:
            t_mask = t_mask & (tokens >= first_key)
        blocks = tl.load(block_table_row + tokens // BLOCK_SIZE, mask=t_mask, other=0).to(tl.int64)
        slots = tokens % BLOCK_SIZE
        kv_mask = t_mask[:, None] & d_mask[None, :]
        k = tl.load(
            k_head_ptr + blocks[:, None] * stride_kb + slots[:, None] * stride_kt + offs_d[None, :],
            mask=kv_mask,
            other=0.0,
        )
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [BLOCK_G, BLOCK_N]
        if SOFTCAP:
            scores = tanh(qk * qk_scale) * cap_log2
        else:
            scores = qk * qk_scale
        scores = tl.where(t_mask[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(
            v_head_ptr + blocks[:, None] * stride_vb + slots[:, None] * stride_vt + offs_d[None, :],
            mask=kv_mask,
            other=0.0,
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    has_keys = l_i > 0.0  # False for an empty split or a zero-length context
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    out_mask = g_mask[:, None] & d_mask[None, :]
    if SINGLE_SPLIT:
        tl.store(
            out_ptr + seq * stride_os + heads[:, None] * stride_oh + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=out_mask,
        )
    else:
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        tl.store(
            partial_out_ptr + seq * stride_ps + heads[:, None] * stride_ph + split * stride_pp + offs_d[None, :],
            out,
            mask=out_mask,
        )
        tl.store(partial_lse_ptr + seq * stride_ls + heads * stride_lh + split, lse, mask=g_mask)


@triton.jit(do_not_specialize=["num_splits", "stride_ps", "stride_ph", "stride_ls", "stride_lh"])
def _paged_decode_merge_kernel(
    partial_out_ptr,  # [>= num_seqs, num_heads, >= num_splits, head_dim] fp32
    partial_lse_ptr,  # [>= num_seqs, num_heads, >= num_splits] fp32 (log2 domain)
    out_ptr,  # [num_seqs, num_heads, head_dim]
    num_splits,
    stride_ps,
    stride_ph,
    stride_pp,
    stride_ls,
    stride_lh,
    stride_os,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CHUNK: tl.constexpr,  # splits per loop step
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    offs_c = tl.arange(0, CHUNK)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    lse_row = partial_lse_ptr + seq * stride_ls + head * stride_lh
    out_row = partial_out_ptr + seq * stride_ps + head * stride_ph

    # Online log-sum-exp over the splits, CHUNK at a time (fixed tile size for any num_splits).
    m_run = tl.full([1], float("-inf"), dtype=tl.float32)
    den = tl.zeros([1], dtype=tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(0, num_splits, CHUNK):
        splits = start + offs_c
        s_mask = splits < num_splits
        lse = tl.load(lse_row + splits, mask=s_mask, other=float("-inf"))
        m_new = tl.maximum(m_run, tl.max(lse, axis=0))
        finite = m_new > float("-inf")
        m_safe = tl.where(finite, m_new, 0.0)
        alpha = tl.where(finite, tl.exp2(m_run - m_safe), 0.0)
        w = tl.where(lse > float("-inf"), tl.exp2(lse - m_safe), 0.0)  # [CHUNK]
        o = tl.load(
            out_row + splits[:, None] * stride_pp + offs_d[None, :],
            mask=(w > 0.0)[:, None] & d_mask[None, :],
            other=0.0,
        )
        den = den * alpha + tl.sum(w, axis=0)
        acc = acc * alpha + tl.sum(o * w[:, None], axis=0)
        m_run = m_new
    out = acc / tl.where(den > 0.0, den, 1.0)
    tl.store(out_ptr + seq * stride_os + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty), mask=d_mask)


@dataclass
class DecodeWorkspace:
    """Preallocated split-KV partials, so a decode can be captured in a CUDA graph.

    partial_out: fp32 ``[max_num_seqs, num_heads, max_num_splits, head_dim]``
    partial_lse: fp32 ``[max_num_seqs, num_heads, max_num_splits]``
    """

    partial_out: torch.Tensor
    partial_lse: torch.Tensor

    @classmethod
    def allocate(
        cls, max_num_seqs: int, num_heads: int, head_dim: int, max_num_splits: int, device: torch.device | str
    ) -> "DecodeWorkspace":
        return cls(
            torch.empty(max_num_seqs, num_heads, max_num_splits, head_dim, dtype=torch.float32, device=device),
            torch.empty(max_num_seqs, num_heads, max_num_splits, dtype=torch.float32, device=device),
        )


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_context_len: int, device: torch.device) -> int:
    """Split count for flash-decoding: enough (seq, kv_head, split) programs to fill the GPU about
    twice, but at least ``_MIN_TOKENS_PER_SPLIT`` tokens per split.

    ``max_context_len`` is an upper bound known on the host (the block table width times the block
    size), so choosing needs no device sync; each sequence's own length then divides its tiles
    over the splits inside the kernel.
    """
    work_items = max(num_seqs * num_kv_heads, 1)
    wanted = cdiv(2 * num_sms(device), work_items)
    useful = cdiv(max(max_context_len, 1), _MIN_TOKENS_PER_SPLIT)
    return int(max(1, min(wanted, useful, _MAX_SPLITS)))


def _check(q, k_cache, v_cache, block_tables, context_lens, out) -> None:
    check_dim(_OP, "q", q, 3, "[num_seqs, num_heads, head_dim]")
    check_dim(_OP, "context_lens", context_lens, 1, "[num_seqs]")
    if context_lens.shape[0] != q.shape[0]:
        raise ValueError(f"{_OP}: context_lens has {context_lens.shape[0]} entries for {q.shape[0]} sequences")
    check_paged_attention(_OP, q, "[num_seqs, num_heads, head_dim]", k_cache, v_cache,
                          block_tables, context_lens, out)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    *,
    workspace: DecodeWorkspace | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention of one new query token per sequence over its paged K/V.

    Args:
        q: ``[num_seqs, num_heads, head_dim]`` fp16/bf16/fp32, last dim contiguous.
        k_cache, v_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]``, q's dtype.
        block_tables: int32 ``[num_seqs, max_blocks_per_seq]``; physical block of each logical block.
        context_lens: int32 ``[num_seqs]``; tokens in the cache, the current one included (0 = empty
            slot: output zeros).
        scale: softmax scale, usually ``head_dim ** -0.5``.
        out: optional ``[num_seqs, num_heads, head_dim]`` output (q's dtype).
        num_splits: KV splits per sequence (grid dim); None chooses from the block table width and
            the SM count (:func:`choose_num_splits`). Pass a fixed value under CUDA graphs.
        workspace: preallocated partial buffers for ``num_splits > 1`` (needed for graph capture);
            must cover ``num_seqs`` rows, ``num_heads`` and ``num_splits``.
        sliding_window: attend to the last ``sliding_window`` keys only (the query's own included),
            as transformers' ``sliding_window``; None: the whole context.
        softcap: soft-cap the scaled scores at ``softcap`` (``cap * tanh(s / cap)``); None: off.
    Returns:
        ``out``.
    """
    _check(q, k_cache, v_cache, block_tables, context_lens, out)
    check_window_softcap(_OP, sliding_window, softcap)
    tensors = {"q": q, "k_cache": k_cache, "v_cache": v_cache, "block_tables": block_tables}
    tensors["context_lens"] = context_lens
    if out is not None:
        tensors["out"] = out
    device = check_kernel_tensors(_OP, tensors, vectors=("context_lens",))
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group_size = num_heads // num_kv_heads
    if out is None:
        out = torch.empty_like(q)
    if num_seqs == 0:
        return out
    if num_splits is None:
        max_keys = block_tables.shape[1] * block_size
        if sliding_window is not None:
            max_keys = min(max_keys, int(sliding_window))
        num_splits = choose_num_splits(num_seqs, num_kv_heads, max_keys, device)
    num_splits = int(num_splits)
    if num_splits < 1:
        raise ValueError(f"{_OP}: num_splits must be >= 1, got {num_splits}")

    single = num_splits == 1
    if single:
        partial_out = partial_lse = out  # unused (SINGLE_SPLIT=True)
    elif workspace is None:
        partial_out = torch.empty(num_seqs, num_heads, num_splits, head_dim, dtype=torch.float32, device=device)
        partial_lse = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=device)
    else:
        partial_out, partial_lse = workspace.partial_out, workspace.partial_lse
        ws_out = (num_seqs, num_heads, num_splits, head_dim)
        if (
            partial_out.dim() != 4
            or partial_lse.dim() != 3
            or partial_out.shape[0] < num_seqs
            or partial_out.shape[1] != num_heads
            or partial_out.shape[2] < num_splits
            or partial_out.shape[3] != head_dim
            or partial_lse.shape[0] < num_seqs
            or partial_lse.shape[1] != num_heads
            or partial_lse.shape[2] < num_splits
        ):
            raise ValueError(
                f"{_OP}: workspace too small: partial_out {tuple(partial_out.shape)} and partial_lse "
                f"{tuple(partial_lse.shape)} must cover {ws_out} and {ws_out[:3]}"
            )
        if partial_out.dtype != torch.float32 or partial_lse.dtype != torch.float32:
            raise ValueError(f"{_OP}: workspace tensors must be float32")
        if partial_out.device != device or partial_lse.device != device:
            raise ValueError(f"{_OP}: workspace is on {partial_out.device}, q on {device}")
        if partial_out.stride(-1) != 1 or partial_lse.stride(-1) != 1:
            raise ValueError(f"{_OP}: workspace tensors need a contiguous last dim")

    block_g = max(16, next_power_of_2(group_size))
    block_d = max(16, next_power_of_2(head_dim))  # tl.dot needs K >= 16
    if interpreting():
        block_n, num_warps = 32, 4
    elif q.dtype == torch.float32:  # ieee fp32 dots run on FMA units: smaller tiles, no register spills
        block_n, num_warps = 32, 8
    else:
        block_n, num_warps = 64, 4
    grid = (num_seqs, num_kv_heads, num_splits)
    qk_scale, cap_log2 = score_scales(scale, softcap)
    _paged_decode_split_kernel[grid](
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        out,
        partial_out,
        partial_lse,
        qk_scale,
        cap_log2,
        int(sliding_window or 0),
        num_splits,
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
        partial_out.stride(0),
        partial_out.stride(1),
        partial_out.stride(2),
        partial_lse.stride(0),
        partial_lse.stride(1),
        GROUP_SIZE=group_size,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_G=block_g,
        BLOCK_D=block_d,
        BLOCK_N=block_n,
        SINGLE_SPLIT=single,
        SLIDING=sliding_window is not None,
        SOFTCAP=softcap is not None,
        DOT_PRECISION=dot_precision(q.dtype),
        num_warps=num_warps,
        num_stages=2,
    )
    if not single:
        _paged_decode_merge_kernel[(num_seqs, num_heads)](
            partial_out,
            partial_lse,
            out,
            num_splits,
            partial_out.stride(0),
            partial_out.stride(1),
            partial_out.stride(2),
            partial_lse.stride(0),
            partial_lse.stride(1),
            out.stride(0),
            out.stride(1),
            HEAD_DIM=head_dim,
            BLOCK_D=block_d,
            CHUNK=_MERGE_CHUNK,
            num_warps=1 if block_d <= 64 else 2,
        )
    return out


def paged_decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    *,
    workspace: DecodeWorkspace | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Plain-torch :func:`paged_decode_attention` (same arguments; ``num_splits`` and ``workspace``
    are ignored). Gathers each sequence's K/V through its block table (the whole batch at once,
    padded to the longest context) and takes a masked softmax in fp32."""
    _check(q, k_cache, v_cache, block_tables, context_lens, out)
    check_window_softcap(_OP, sliding_window, softcap)
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group_size = num_heads // num_kv_heads
    lens = context_lens.long()
    max_len = int(lens.max()) if num_seqs > 0 else 0
    result = torch.zeros(num_seqs, num_heads, head_dim, dtype=torch.float32, device=q.device)
    if max_len > 0:
        positions = torch.arange(max_len, device=q.device)
        valid = positions[None, :] < lens[:, None]  # [num_seqs, max_len]
        if sliding_window is not None:
            valid &= positions[None, :] >= lens[:, None] - int(sliding_window)
        logical = (positions // block_size).clamp(max=block_tables.shape[1] - 1)
        blocks = torch.where(valid, block_tables[:, logical].long(), 0)
        slots = (positions % block_size)[None, :].expand(num_seqs, -1)
        k = k_cache[blocks, slots].float()  # [num_seqs, max_len, num_kv_heads, head_dim]
        v = v_cache[blocks, slots].float()
        qg = q.float().view(num_seqs, num_kv_heads, group_size, head_dim)
        scores = torch.einsum("shgd,sthd->shgt", qg, k) * scale
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # an empty context gives zeros
        result = torch.einsum("shgt,sthd->shgd", probs, v).reshape(num_seqs, num_heads, head_dim)
    if out is None:
        return result.to(q.dtype)
    out.copy_(result)
    return out
