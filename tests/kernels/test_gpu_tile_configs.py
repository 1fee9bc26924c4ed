"""The attention kernels with the tile sizes they use on a GPU, run in the interpreter.

In the interpreter the launchers pick small tiles (prefill BLOCK_M 16 / BLOCK_N 32, decode BLOCK_N
32) to keep it fast, so the tile sizes a GPU compiles (prefill 64 or 128 queries by 64 keys, or
32 by 16 in fp32; decode 64 keys, 32 in fp32) would first run on the GPU. Here `interpreting()` is reported
False to the launchers only, so they choose the GPU tiles, and the interpreter runs them: key tiles
spanning several cache blocks, query tiles larger than the chunk, the causal diagonal inside a
tile, multi-tile contexts and splits. num_warps / num_stages are ignored by the interpreter.
"""


import pytest
import torch

from paged_triton.kernels import paged_decode_attention as decode_mod, paged_prefill_attention as prefill_mod
from paged_triton.kernels.paged_decode_attention import paged_decode_attention_ref
from paged_triton.kernels.paged_prefill_attention import paged_prefill_attention_ref

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=1e-2, rtol=1e-2)}


@pytest.fixture
def gpu_tiles(monkeypatch):
    monkeypatch.setattr(prefill_mod, "interpreting", lambda: False)
    monkeypatch.setattr(decode_mod, "interpreting", lambda: False)


@pytest.mark.parametrize(
    "dtype, seqs, expected_tiles",
    [
        # (context_len, chunk_len); max chunk <= 64 -> BLOCK_M 64, else 128; fp32 -> 32 x 16
        (torch.float16, [(70, 60), (150, 40), (16, 1)], (64, 64)),
        (torch.float16, [(200, 130), (65, 65)], (128, 64)),
        (torch.float32, [(70, 33), (40, 40)], (32, 16)),
    ],
)
def test_prefill_with_gpu_tiles_matches_ref(gpu_tiles, make_paged_kv, dtype, seqs, expected_tiles):
    group, num_kv_heads, head_dim, block_size = 4, 2, 64, 16
    max_chunk = max(n for _, n in seqs)
    assert prefill_mod._tile_config(head_dim, dtype, max_chunk, 90)[:2] == expected_tiles
    kv = make_paged_kv([c for c, _ in seqs], num_kv_heads, head_dim, block_size, dtype)
    cu = torch.tensor([0] + list(torch.tensor([n for _, n in seqs]).cumsum(0)), dtype=torch.int32)
    q = torch.randn(int(cu[-1]), group * num_kv_heads, head_dim).to(dtype)
    out = torch.full_like(q, float("nan"))
    args = (q, kv.k_cache, kv.v_cache, kv.block_tables, cu, kv.context_lens, head_dim**-0.5)
    prefill_mod.paged_prefill_attention(*args, out, max_seqlen_q=max_chunk)
    assert not out.isnan().any(), f"unwritten outputs (seed {kv.seed})"
    ref = paged_prefill_attention_ref(*args)
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype], msg=lambda m: f"seed {kv.seed}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_with_gpu_tiles_matches_ref(gpu_tiles, make_paged_kv, dtype, num_splits):
    group, num_kv_heads, head_dim, block_size = 4, 2, 128, 16
    lens = [1, 63, 64, 65, 200, 0]
    kv = make_paged_kv(lens, num_kv_heads, head_dim, block_size, dtype)
    q = torch.randn(len(lens), group * num_kv_heads, head_dim).to(dtype)
    out = torch.full_like(q, float("nan"))
    args = (q, kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens, head_dim**-0.5)
    decode_mod.paged_decode_attention(*args, out=out, num_splits=num_splits)
    ref = paged_decode_attention_ref(*args)
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype], msg=lambda m: f"seed {kv.seed}: {m}")
