"""The CPU attention path (kernels/cpu_attention.py, batched SDPA over gathered blocks) vs. the
plain-torch references, and the CPU KV store vs. store_kvcache_ref; also that ops.py sends CPU
tensors there (and soft-capped attention to the reference).

Tolerances: fp32 atol = rtol = 1e-4 (summation order only); bf16 inputs: the references compute
in fp32 from the same bf16 values, SDPA's CPU kernel rounds the probabilities to bf16 before
P @ V and the output to bf16 (atol = rtol = 2e-2).
"""

import pytest
import torch

from paged_triton.kernels import ops
from paged_triton.kernels.paged_decode_attention import paged_decode_attention_ref
from paged_triton.kernels.paged_prefill_attention import paged_prefill_attention_ref
from paged_triton.kernels.store_kvcache import store_kvcache_ref
from paged_triton.kernels.cpu_attention import (
    paged_decode_attention_cpu,
    paged_prefill_attention_cpu,
    store_kvcache_cpu,
)

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}

# (dtype, group, head_dim, block_size, context_lens, sliding_window): lengths 1, block_size - 1,
# block_size, block_size + 1 and a few hundred; GQA groups 1/3/4/8; SmolLM2's 3 x 64.
DECODE_CASES = [
    (torch.float32, 1, 64, 16, [1, 15, 16, 17], None),
    (torch.float32, 4, 128, 16, [300, 5], None),
    (torch.float32, 8, 64, 16, [17, 300, 1], None),
    (torch.float32, 3, 64, 16, [250, 40, 2, 129], None),
    (torch.bfloat16, 3, 64, 16, [250, 40, 2, 129], None),
    (torch.bfloat16, 4, 128, 8, [7, 9, 250], None),
    (torch.float32, 2, 32, 4, [1, 5, 17, 40], 7),
    (torch.float32, 4, 64, 16, [300, 33], 100),
    (torch.float32, 1, 64, 16, [100, 3], 1),
    (torch.float32, 2, 8, 4, [5, 20], None),  # tiny test-model shapes
]


def _ids(c):
    return f"{str(c[0])[6:]}-g{c[1]}-d{c[2]}-bs{c[3]}-{'_'.join(map(str, c[4]))}-w{c[5]}"


@pytest.mark.parametrize("case", DECODE_CASES, ids=[_ids(c) for c in DECODE_CASES])
def test_cpu_decode_matches_ref(case, make_paged_kv):
    dtype, group, head_dim, block_size, lens, window = case
    num_kv_heads = 2
    kv = make_paged_kv(lens, num_kv_heads, head_dim, block_size, dtype)
    q = torch.randn(len(lens), group * num_kv_heads, head_dim).to(dtype)
    scale = head_dim**-0.5
    out = torch.full_like(q, float("nan"))  # poisoned: any element not written stays NaN

    paged_decode_attention_cpu(q, kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens, scale, out,
                               sliding_window=window)

    assert not out.isnan().any(), f"unwritten outputs (seed {kv.seed})"
    ref = paged_decode_attention_ref(q, kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens, scale,
                                     sliding_window=window)
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype], msg=lambda m: f"seed {kv.seed}: {m}")


def test_cpu_decode_matches_a_plain_loop(make_paged_kv):
    """Independent of both vectorised gathers: softmax(q K^T) V per sequence and head, from K/V
    collected token by token."""
    lens, num_kv_heads, group, head_dim = [33, 1, 16, 70], 2, 3, 32
    kv = make_paged_kv(lens, num_kv_heads, head_dim, 16, torch.float32)
    q = torch.randn(len(lens), group * num_kv_heads, head_dim)
    out = torch.empty_like(q)
    paged_decode_attention_cpu(q, kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens, 0.3, out)
    for i in range(len(lens)):
        k, v = kv.gather(i)
        for h in range(group * num_kv_heads):
            p = torch.softmax(k[:, h // group] @ q[i, h] * 0.3, dim=0)
            torch.testing.assert_close(out[i, h], p @ v[:, h // group], atol=1e-5, rtol=1e-5)


def _cu_seqlens(chunk_lens):
    return torch.tensor([0] + list(torch.tensor(chunk_lens).cumsum(0)), dtype=torch.int32)


# (dtype, group, head_dim, block_size, [(context_len, chunk_len), ...], sliding_window)
PREFILL_CASES = [
    (torch.float32, 1, 64, 16, [(1, 1), (15, 15), (16, 16), (17, 17)], None),
    (torch.float32, 4, 128, 16, [(300, 37), (20, 4)], None),  # cached prefix / later chunk
    (torch.float32, 3, 64, 16, [(250, 250), (40, 40), (129, 1), (60, 2)], None),
    (torch.bfloat16, 3, 64, 16, [(250, 250), (40, 40), (129, 1), (60, 2)], None),
    (torch.float32, 8, 64, 8, [(33, 10), (8, 8)], None),
    (torch.float32, 2, 32, 4, [(1, 1), (20, 20), (45, 13), (9, 2)], 7),
    (torch.float32, 1, 64, 16, [(100, 100), (70, 30)], 1),
    (torch.float32, 2, 32, 4, [(30, 30)], 4096),
    (torch.float32, 2, 16, 4, [(20, 20), (9, 2)], None),  # tiny test-model shapes
]


def _pids(c):
    return f"{str(c[0])[6:]}-g{c[1]}-d{c[2]}-bs{c[3]}-" + "_".join(f"{a}q{b}" for a, b in c[4]) + f"-w{c[5]}"


@pytest.mark.parametrize("case", PREFILL_CASES, ids=[_pids(c) for c in PREFILL_CASES])
def test_cpu_prefill_matches_ref(case, make_paged_kv):
    dtype, group, head_dim, block_size, seqs, window = case
    num_kv_heads = 2
    kv = make_paged_kv([c for c, _ in seqs], num_kv_heads, head_dim, block_size, dtype)
    chunk_lens = [n for _, n in seqs]
    cu = _cu_seqlens(chunk_lens)
    q = torch.randn(int(cu[-1]), group * num_kv_heads, head_dim).to(dtype)
    scale = head_dim**-0.5
    out = torch.full_like(q, float("nan"))

    paged_prefill_attention_cpu(q, kv.k_cache, kv.v_cache, kv.block_tables, cu, kv.context_lens, scale, out,
                                max(chunk_lens), sliding_window=window)

    assert not out.isnan().any(), f"unwritten outputs (seed {kv.seed})"
    ref = paged_prefill_attention_ref(q, kv.k_cache, kv.v_cache, kv.block_tables, cu, kv.context_lens, scale,
                                      sliding_window=window)
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype], msg=lambda m: f"seed {kv.seed}: {m}")


def test_cpu_prefill_rejects_a_chunk_longer_than_its_context(make_paged_kv):
    kv = make_paged_kv([4], 1, 16, 4, torch.float32)
    q = torch.randn(6, 1, 16)
    with pytest.raises(ValueError, match="context_len 4 < chunk length 6"):
        paged_prefill_attention_cpu(q, kv.k_cache, kv.v_cache, kv.block_tables, _cu_seqlens([6]),
                                    kv.context_lens, 1.0, torch.empty_like(q), 6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_store_kvcache_matches_ref(dtype):
    gen = torch.Generator().manual_seed(0)
    num_blocks, block_size, num_kv_heads, head_dim = 9, 4, 2, 8
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:13]
    slots[[2, 7]] = -1  # skipped (padding)
    k = torch.randn(13, num_kv_heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(13, num_kv_heads, head_dim, generator=gen).to(dtype)
    caches = [torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
              for _ in range(2)]
    ref = [c.clone() for c in caches]
    store_kvcache_cpu(k, v, caches[0], caches[1], slots)
    store_kvcache_ref(k, v, ref[0], ref[1], slots)
    assert torch.equal(caches[0], ref[0]) and torch.equal(caches[1], ref[1])


def test_ops_send_cpu_attention_to_the_sdpa_path_and_softcap_to_the_ref(make_paged_kv, monkeypatch):
    kv = make_paged_kv([5, 9], 1, 16, 4, torch.float32)
    q = torch.randn(2, 2, 16)
    calls = []
    cpu_module = ops._cpu_attention
    monkeypatch.setattr(cpu_module, "paged_decode_attention_cpu",
                        lambda *a, **k: calls.append("cpu"))
    ops.paged_decode_attention(q, kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens, 0.25,
                               torch.empty_like(q))
    assert calls == ["cpu"]
    out = torch.empty_like(q)
    ops.paged_decode_attention(q, kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens, 0.25, out,
                               softcap=5.0)
    assert calls == ["cpu"]  # soft cap: the reference, not the SDPA path
    ref = paged_decode_attention_ref(q, kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens, 0.25,
                                     softcap=5.0)
    torch.testing.assert_close(out, ref)


def test_masks_built_once_per_forward_give_every_layer_the_same_result(make_paged_kv):
    """The forward's scratch dict: the second layer reuses the first layer's masks (same batch,
    other K/V) and still matches the reference."""
    seqs = [(40, 40), (17, 1), (33, 16)]
    kv = make_paged_kv([c for c, _ in seqs], 2, 32, 8, torch.float32)
    other = make_paged_kv([c for c, _ in seqs], 2, 32, 8, torch.float32)
    cu = _cu_seqlens([n for _, n in seqs])
    cache: dict = {}
    for layer_kv in (kv, other):
        layer_kv.block_tables = kv.block_tables  # one batch: the same tables in every layer
        q = torch.randn(int(cu[-1]), 4, 32)
        out = torch.empty_like(q)
        paged_prefill_attention_cpu(q, layer_kv.k_cache, layer_kv.v_cache, kv.block_tables, cu, kv.context_lens,
                                    0.2, out, 40, cache=cache)
        ref = paged_prefill_attention_ref(q, layer_kv.k_cache, layer_kv.v_cache, kv.block_tables, cu,
                                          kv.context_lens, 0.2)
        torch.testing.assert_close(out, ref, **TOL[torch.float32])
        qd = torch.randn(3, 4, 32)
        outd = torch.empty_like(qd)
        paged_decode_attention_cpu(qd, layer_kv.k_cache, layer_kv.v_cache, kv.block_tables, kv.context_lens,
                                   0.2, outd, cache=cache)
        refd = paged_decode_attention_ref(qd, layer_kv.k_cache, layer_kv.v_cache, kv.block_tables,
                                          kv.context_lens, 0.2)
        torch.testing.assert_close(outd, refd, **TOL[torch.float32])
    assert len(cache) == 2  # one decode plan, one prefill plan
