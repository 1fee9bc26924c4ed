"""paged_prefill_attention (Triton, interpreter) vs. its torch ref, the ref vs. SDPA on contiguous
K/V, and chunked prefill through store_kvcache vs. one causal SDPA over the whole sequence.

Tolerances as for decode: fp32 (ieee dots) atol = rtol = 1e-4; fp16 atol = rtol = 1e-2. bf16 is
checked on the GPU only (the Triton 3.6 interpreter's bf16 ``tl.dot`` is wrong).
"""

import pytest
import torch
import torch.nn.functional as F

from paged_triton.kernels.paged_prefill_attention import paged_prefill_attention, paged_prefill_attention_ref
from paged_triton.kernels.store_kvcache import store_kvcache

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=1e-2, rtol=1e-2)}

# (dtype, group_size, head_dim, block_size, [(context_len, chunk_len), ...]); prefix = context - chunk.
CASES = [
    (torch.float32, 1, 64, 16, [(1, 1), (15, 15), (16, 16), (17, 17)]),  # no prefix, edge lengths
    (torch.float32, 4, 128, 16, [(300, 37), (20, 4)]),  # cached prefix / later chunk
    (torch.float16, 8, 64, 16, [(40, 40), (17, 1), (33, 16)]),
    (torch.float32, 3, 80, 8, [(33, 10), (8, 8)]),  # group and head_dim not powers of two
    (torch.float16, 4, 128, 32, [(260, 130)]),  # a few hundred tokens
    (torch.float32, 2, 16, 4, [(20, 20), (9, 2)]),  # tiny test-model shapes: head_dim 16, block_size 4
]


def _ids(case):
    dtype, group, head_dim, block_size, seqs = case
    return f"{str(dtype)[6:]}-g{group}-d{head_dim}-bs{block_size}-" + "_".join(f"{c}q{n}" for c, n in seqs)


def _cu_seqlens(chunk_lens):
    return torch.tensor([0] + list(torch.tensor(chunk_lens).cumsum(0)), dtype=torch.int32)


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_prefill_kernel_matches_ref(case, make_paged_kv):
    dtype, group, head_dim, block_size, seqs = case
    num_kv_heads = 1 if group >= 4 else 2
    kv = make_paged_kv([c for c, _ in seqs], num_kv_heads, head_dim, block_size, dtype)
    cu = _cu_seqlens([n for _, n in seqs])
    q = torch.randn(int(cu[-1]), group * num_kv_heads, head_dim).to(dtype)
    scale = head_dim**-0.5
    out = torch.full_like(q, float("nan"))  # poisoned

    result = paged_prefill_attention(q, kv.k_cache, kv.v_cache, kv.block_tables, cu, kv.context_lens, scale, out)

    assert result is out
    assert not out.isnan().any(), f"unwritten outputs (seed {kv.seed})"
    ref = paged_prefill_attention_ref(q, kv.k_cache, kv.v_cache, kv.block_tables, cu, kv.context_lens, scale)
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype], msg=lambda m: f"seed {kv.seed}: {m}")


# (dtype, group, head_dim, block_size, [(context_len, chunk_len), ...], sliding_window, softcap):
# windows of one key, below one block, spanning the start/unmasked/diagonal tile ranges of long
# chunks, longer than the context; a later chunk whose window starts inside its cached prefix.
WINDOW_CASES = [
    (torch.float32, 2, 32, 4, [(1, 1), (20, 20), (45, 13), (9, 2)], 7, None),
    (torch.float32, 1, 64, 16, [(100, 100), (70, 30)], 33, None),
    (torch.float32, 1, 64, 16, [(100, 100), (70, 30)], 1, None),
    (torch.float32, 1, 64, 16, [(130, 130), (200, 17)], 60, 3.0),
    (torch.float32, 2, 256, 16, [(40, 40), (50, 9)], 20, 50.0),  # Gemma 2: head_dim 256
    (torch.float16, 4, 64, 8, [(64, 40), (9, 9)], 16, 10.0),
    (torch.float32, 2, 32, 4, [(30, 30)], 4096, None),  # window longer than the context
    (torch.float32, 2, 32, 4, [(30, 30), (12, 5)], None, 30.0),  # soft cap alone
]


@pytest.mark.parametrize("case", WINDOW_CASES, ids=[f"{_ids(c[:5])}-w{c[5]}-cap{c[6]}" for c in WINDOW_CASES])
def test_prefill_kernel_sliding_window_and_softcap_match_ref(case, make_paged_kv):
    dtype, group, head_dim, block_size, seqs, window, softcap = case
    num_kv_heads = 2
    kv = make_paged_kv([c for c, _ in seqs], num_kv_heads, head_dim, block_size, dtype)
    cu = _cu_seqlens([n for _, n in seqs])
    q = torch.randn(int(cu[-1]), group * num_kv_heads, head_dim).to(dtype)
    out = torch.full_like(q, float("nan"))
    args = (q, kv.k_cache, kv.v_cache, kv.block_tables, cu, kv.context_lens, head_dim**-0.5)
    paged_prefill_attention(*args, out, sliding_window=window, softcap=softcap)
    assert not out.isnan().any(), f"unwritten outputs (seed {kv.seed})"
    ref = paged_prefill_attention_ref(*args, sliding_window=window, softcap=softcap)
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype], msg=lambda m: f"seed {kv.seed}: {m}")


@pytest.mark.parametrize("window", [1, 6, 40])
def test_prefill_ref_sliding_window_matches_sdpa(window, make_paged_kv):
    """The ref against SDPA with transformers' sliding-window mask: key j visible to query i when
    i - window < j <= i (positions in the sequence)."""
    seqs = [(1, 1), (17, 17), (60, 25)]
    num_kv_heads, group, head_dim = 2, 2, 32
    kv = make_paged_kv([c for c, _ in seqs], num_kv_heads, head_dim, 8, torch.float32)
    cu = _cu_seqlens([n for _, n in seqs])
    q = torch.randn(int(cu[-1]), group * num_kv_heads, head_dim)
    ref = paged_prefill_attention_ref(q, kv.k_cache, kv.v_cache, kv.block_tables, cu, kv.context_lens, 0.2,
                                      sliding_window=window)
    for i, (context_len, chunk_len) in enumerate(seqs):
        k, v = kv.gather(i)
        k = k.transpose(0, 1).repeat_interleave(group, dim=0)
        v = v.transpose(0, 1).repeat_interleave(group, dim=0)
        qi = q[cu[i] : cu[i + 1]].transpose(0, 1)
        q_pos = torch.arange(context_len - chunk_len, context_len)[:, None]
        keys = torch.arange(context_len)[None, :]
        visible = (keys <= q_pos) & (keys > q_pos - window)
        expected = F.scaled_dot_product_attention(qi, k, v, attn_mask=visible, scale=0.2).transpose(0, 1)
        torch.testing.assert_close(ref[cu[i] : cu[i + 1]], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("group, head_dim", [(1, 64), (4, 128), (8, 64)])
def test_prefill_ref_matches_sdpa(group, head_dim, make_paged_kv):
    seqs = [(1, 1), (16, 16), (17, 5), (300, 300), (300, 44)]
    num_kv_heads = 2
    kv = make_paged_kv([c for c, _ in seqs], num_kv_heads, head_dim, 16, torch.float32)
    cu = _cu_seqlens([n for _, n in seqs])
    q = torch.randn(int(cu[-1]), group * num_kv_heads, head_dim)
    scale = head_dim**-0.5
    ref = paged_prefill_attention_ref(q, kv.k_cache, kv.v_cache, kv.block_tables, cu, kv.context_lens, scale)
    for i, (context_len, chunk_len) in enumerate(seqs):
        k, v = kv.gather(i)
        k = k.transpose(0, 1).repeat_interleave(group, dim=0)  # [heads, context, d]
        v = v.transpose(0, 1).repeat_interleave(group, dim=0)
        qi = q[cu[i] : cu[i + 1]].transpose(0, 1)  # [heads, chunk, d]
        # Causal, aligned to the bottom right: query j sits at position context_len - chunk_len + j.
        visible = torch.ones(chunk_len, context_len, dtype=torch.bool).tril(diagonal=context_len - chunk_len)
        expected = F.scaled_dot_product_attention(qi, k, v, attn_mask=visible, scale=scale).transpose(0, 1)
        torch.testing.assert_close(ref[cu[i] : cu[i + 1]], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["kernel", "ref"])
def test_chunked_prefill_through_store_matches_full_causal_sdpa(impl):
    """Two sequences prefilled in chunks of different sizes; each chunk's K/V is written by
    store_kvcache into shuffled blocks before attention, as the engine does."""
    torch.manual_seed(torch.seed() % 2**31)
    attention = paged_prefill_attention if impl == "kernel" else paged_prefill_attention_ref
    group, num_kv_heads, head_dim, block_size = 2, 2, 64, 16
    seq_lens, chunk_size = [45, 23], 20
    num_heads = group * num_kv_heads
    num_blocks = sum(-(-n // block_size) for n in seq_lens) + 2
    k_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan"))
    v_cache = torch.full_like(k_cache, float("nan"))
    perm = torch.randperm(num_blocks).int()
    block_tables = torch.zeros(2, 4, dtype=torch.int32)
    block_tables[0, :3], block_tables[1, :2] = perm[:3], perm[3:5]
    q = [torch.randn(n, num_heads, head_dim) for n in seq_lens]
    k = [torch.randn(n, num_kv_heads, head_dim) for n in seq_lens]
    v = [torch.randn(n, num_kv_heads, head_dim) for n in seq_lens]
    outs = [[], []]
    for start in range(0, max(seq_lens), chunk_size):
        chunks = [(i, start, min(start + chunk_size, n)) for i, n in enumerate(seq_lens) if start < n]
        positions = torch.cat([torch.arange(s, e) for _, s, e in chunks])
        seq_of = torch.cat([torch.full((e - s,), i) for i, s, e in chunks])
        slots = block_tables[seq_of, positions // block_size].long() * block_size + positions % block_size
        k_step = torch.cat([k[i][s:e] for i, s, e in chunks])
        v_step = torch.cat([v[i][s:e] for i, s, e in chunks])
        store_kvcache(k_step, v_step, k_cache, v_cache, slots)
        q_step = torch.cat([q[i][s:e] for i, s, e in chunks])
        cu = _cu_seqlens([e - s for _, s, e in chunks])
        context_lens = torch.tensor([e for _, _, e in chunks], dtype=torch.int32)
        out = attention(q_step, k_cache, v_cache, block_tables[[i for i, _, _ in chunks]], cu, context_lens, 0.125)
        for j, (i, _, _) in enumerate(chunks):
            outs[i].append(out[cu[j] : cu[j + 1]])
    for i in range(2):
        expected = F.scaled_dot_product_attention(
            q[i].transpose(0, 1),
            k[i].transpose(0, 1).repeat_interleave(group, dim=0),
            v[i].transpose(0, 1).repeat_interleave(group, dim=0),
            is_causal=True,
            scale=0.125,
        ).transpose(0, 1)
        torch.testing.assert_close(torch.cat(outs[i]), expected, atol=1e-4, rtol=1e-4)


def _valid_args():
    return dict(
        q=torch.randn(5, 4, 64),
        k_cache=torch.randn(6, 16, 2, 64),
        v_cache=torch.randn(6, 16, 2, 64),
        block_tables=torch.zeros(2, 3, dtype=torch.int32),
        cu_seqlens_q=torch.tensor([0, 2, 5], dtype=torch.int32),
        context_lens=torch.tensor([2, 9], dtype=torch.int32),
        scale=0.125,
    )


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(cu_seqlens_q=torch.tensor([0, 5], dtype=torch.int32)), "cu_seqlens_q has 2 entries"),
        (dict(cu_seqlens_q=torch.tensor([0, 2, 5])), "cu_seqlens_q must be one of"),
        (dict(block_tables=torch.zeros(3, 3, dtype=torch.int32)), "block_tables has 3 rows"),
        (dict(q=torch.randn(5, 4, 64, dtype=torch.float16)), "dtypes differ"),
        (dict(v_cache=torch.randn(6, 16, 1, 64)), "v_cache shape"),
        (dict(q=torch.randn(5, 4, 128)[..., ::2]), "contiguous last dim"),
        (dict(cu_seqlens_q=torch.tensor([0, 0, 2, 0, 5, 0], dtype=torch.int32)[::2]), "cu_seqlens_q must be contiguous"),
        (dict(context_lens=torch.tensor([2, 0, 9, 0], dtype=torch.int32)[::2]), "context_lens must be contiguous"),
        (dict(out=torch.empty(5, 4, 64, dtype=torch.float16)), "out must be"),
        (dict(sliding_window=-3), "sliding_window must be a positive integer"),
        (dict(softcap=-1.0), "softcap must be > 0"),
    ],
)
def test_prefill_launcher_rejects_bad_input(change, message):
    args = _valid_args()
    args.update(change)
    with pytest.raises(ValueError, match=message):
        paged_prefill_attention(**args)
