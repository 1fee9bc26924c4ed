"""paged_decode_attention (Triton, interpreter) vs. its torch ref, and the ref vs. SDPA.

Tolerances: fp32 uses ``input_precision="ieee"`` dots, so kernel and ref differ only in summation
order (atol = rtol = 1e-4). fp16 rounds the softmax weights to fp16 before the P @ V dot, as the
tensor-core path does, and rounds the output to fp16 (atol = rtol = 1e-2).
bf16 is not run here: Triton 3.6's interpreter computes ``tl.dot`` on bf16 operands wrongly
(it reinterprets the bits), so bf16 attention is checked on the GPU by ``python -m kernels.bench``.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from paged_triton.kernels.paged_decode_attention import DecodeWorkspace, choose_num_splits, paged_decode_attention, paged_decode_attention_ref

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=1e-2, rtol=1e-2)}

# (dtype, group_size, head_dim, block_size, context_lens, num_splits); block_size 16 lengths
# 1, 15, 16, 17 and a few hundred; num_splits None (heuristic), 1, several, more than tiles.
CASES = [
    (torch.float32, 1, 64, 16, [1, 15, 16, 17], None),
    (torch.float32, 4, 128, 16, [300, 5], 1),
    (torch.float32, 8, 64, 16, [17, 300], 4),
    (torch.float16, 4, 64, 16, [33, 1, 16], 8),  # 33 tokens = 2 key tiles < 8 splits
    (torch.float16, 8, 128, 8, [7, 9, 250], 3),
    (torch.float32, 3, 80, 16, [40], 2),  # group and head_dim not powers of two
    (torch.float16, 1, 128, 32, [31, 32, 33], None),
    (torch.float32, 1, 64, 16, [300, 2], 20),  # > 16 splits: the merge loops over chunks of splits
    (torch.float32, 2, 8, 4, [5, 20], 2),  # tiny test-model shapes: head_dim 8 (padded to 16), block_size 4
]


def _ids(case):
    dtype, group, head_dim, block_size, lens, splits = case
    return f"{str(dtype)[6:]}-g{group}-d{head_dim}-bs{block_size}-len{'_'.join(map(str, lens))}-splits{splits}"


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_decode_kernel_matches_ref(case, make_paged_kv):
    dtype, group, head_dim, block_size, lens, num_splits = case
    num_kv_heads = 1 if group == 8 else 2
    kv = make_paged_kv(lens, num_kv_heads, head_dim, block_size, dtype)
    q = torch.randn(len(lens), group * num_kv_heads, head_dim).to(dtype)
    scale = head_dim**-0.5
    out = torch.full_like(q, float("nan"))  # poisoned: any element the kernel skips stays NaN

    result = paged_decode_attention(q, kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens, scale, out, num_splits)

    assert result is out
    assert not out.isnan().any(), f"unwritten outputs (seed {kv.seed})"
    ref = paged_decode_attention_ref(q, kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens, scale)
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype], msg=lambda m: f"seed {kv.seed}: {m}")


# (dtype, group, head_dim, block_size, context_lens, num_splits, sliding_window, softcap): windows of
# one key, below one block, across key tiles and longer than the context; Gemma's head_dim 256.
WINDOW_CASES = [
    (torch.float32, 2, 32, 4, [1, 5, 17, 40], None, 7, None),
    (torch.float32, 4, 64, 16, [300, 33], 4, 100, None),  # the splits divide the window's tiles
    (torch.float32, 1, 64, 16, [100, 3], 1, 1, 5.0),
    (torch.float32, 2, 256, 16, [50, 16], 2, 20, 50.0),  # Gemma 2: head_dim 256, window + soft cap
    (torch.float16, 4, 64, 8, [70, 9], 2, 16, 10.0),
    (torch.float32, 1, 64, 16, [20, 2], None, 4096, None),  # window longer than every context
    (torch.float32, 2, 32, 4, [37, 1], 3, None, 30.0),  # soft cap alone
]


@pytest.mark.parametrize(
    "case", WINDOW_CASES,
    ids=[f"{_ids(c[:6])}-w{c[6]}-cap{c[7]}" for c in WINDOW_CASES],
)
def test_decode_kernel_sliding_window_and_softcap_match_ref(case, make_paged_kv):
    dtype, group, head_dim, block_size, lens, num_splits, window, softcap = case
    num_kv_heads = 2
    kv = make_paged_kv(lens, num_kv_heads, head_dim, block_size, dtype)
    q = torch.randn(len(lens), group * num_kv_heads, head_dim).to(dtype)
    out = torch.full_like(q, float("nan"))
    args = (q, kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens, head_dim**-0.5)
    paged_decode_attention(*args, out, num_splits, sliding_window=window, softcap=softcap)
    assert not out.isnan().any(), f"unwritten outputs (seed {kv.seed})"
    ref = paged_decode_attention_ref(*args, sliding_window=window, softcap=softcap)
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype], msg=lambda m: f"seed {kv.seed}: {m}")


@pytest.mark.parametrize("window, softcap", [(5, None), (1, None), (40, 20.0), (None, 2.0)])
def test_decode_ref_window_and_softcap_match_plain_math(window, softcap, make_paged_kv):
    """The ref against a per-sequence softmax written out by hand (transformers' eager attention:
    scores * scale, tanh soft cap, the last `window` keys)."""
    lens, num_kv_heads, group, head_dim = [1, 15, 17, 60], 2, 2, 32
    kv = make_paged_kv(lens, num_kv_heads, head_dim, 8, torch.float32)
    q = torch.randn(len(lens), group * num_kv_heads, head_dim)
    scale = head_dim**-0.5
    ref = paged_decode_attention_ref(q, kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens, scale,
                                     sliding_window=window, softcap=softcap)
    for i, n in enumerate(lens):
        k, v = kv.gather(i)
        first = 0 if window is None else max(0, n - window)
        k = k[first:].transpose(0, 1).repeat_interleave(group, dim=0)  # [heads, keys, d]
        v = v[first:].transpose(0, 1).repeat_interleave(group, dim=0)
        scores = (k @ q[i][:, :, None])[..., 0] * scale  # [heads, keys]
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        expected = (scores.softmax(-1)[:, None, :] @ v)[:, 0]
        torch.testing.assert_close(ref[i], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_decode_ref_matches_sdpa(group, head_dim, make_paged_kv):
    lens = [1, 15, 16, 17, 300]
    num_kv_heads = 2
    kv = make_paged_kv(lens, num_kv_heads, head_dim, 16, torch.float32)
    q = torch.randn(len(lens), group * num_kv_heads, head_dim)
    scale = 1.0 / math.sqrt(head_dim)
    ref = paged_decode_attention_ref(q, kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens, scale)
    for i in range(len(lens)):
        k, v = kv.gather(i)  # [len, kv_heads, d], gathered token by token
        k = k.transpose(0, 1).repeat_interleave(group, dim=0)  # [heads, len, d]
        v = v.transpose(0, 1).repeat_interleave(group, dim=0)
        expected = F.scaled_dot_product_attention(q[i][:, None, :], k, v, scale=scale)[:, 0]
        torch.testing.assert_close(ref[i], expected, atol=1e-5, rtol=1e-5)


def test_decode_fixed_grid_reuse_like_cuda_graph(make_paged_kv):
    """One launch configuration (fixed num_splits, a preallocated workspace bigger than needed,
    one output buffer, block table rewritten in place) replays correctly for new lengths,
    including padding slots with context length 0 (zeros)."""
    group, num_kv_heads, head_dim, block_size, num_splits = 4, 2, 64, 16, 4
    workspace = DecodeWorkspace.allocate(8, group * num_kv_heads, head_dim, 6, "cpu")
    workspace.partial_out.fill_(float("nan"))  # partials of splits >= num_splits must never be read
    workspace.partial_lse.fill_(float("nan"))
    kv = make_paged_kv([100, 100, 100], num_kv_heads, head_dim, block_size, torch.float32)
    out = torch.full((3, group * num_kv_heads, head_dim), float("nan"))
    for lens in ([100, 1, 0], [17, 64, 99], [0, 0, 5]):
        kv.context_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        q = torch.randn(3, group * num_kv_heads, head_dim)
        args = (q, kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens, head_dim**-0.5)
        paged_decode_attention(*args, out=out, num_splits=num_splits, workspace=workspace)
        ref = paged_decode_attention_ref(*args)
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
        for i, n in enumerate(lens):
            if n == 0:
                assert torch.equal(out[i], torch.zeros_like(out[i]))


def test_choose_num_splits():
    cpu = torch.device("cpu")  # stands for a 4-SM device
    assert choose_num_splits(64, 8, 2048, cpu) == 1  # many sequences fill the device already
    assert choose_num_splits(1, 1, 8192, cpu) == 8  # 2 waves of 4 SMs
    assert choose_num_splits(1, 1, 100, cpu) == 1  # too short to split
    assert 1 <= choose_num_splits(1, 1, 10**7, cpu) <= 64


def _valid_args(dtype=torch.float32):
    q = torch.randn(2, 4, 64, dtype=dtype)
    k_cache = torch.randn(6, 16, 2, 64, dtype=dtype)
    v_cache = torch.randn(6, 16, 2, 64, dtype=dtype)
    block_tables = torch.zeros(2, 3, dtype=torch.int32)
    context_lens = torch.tensor([5, 7], dtype=torch.int32)
    return dict(
        q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables, context_lens=context_lens, scale=0.125
    )


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(block_tables=torch.zeros(2, 3, dtype=torch.int64)), "block_tables must be one of"),
        (dict(context_lens=torch.tensor([5, 7, 9], dtype=torch.int32)), "context_lens has 3 entries"),
        (dict(q=torch.randn(2, 3, 64)), "not a multiple of num_kv_heads"),
        (dict(q=torch.randn(2, 4, 32)), "head_dim"),
        (dict(k_cache=torch.randn(6, 16, 2, 64, dtype=torch.float16)), "dtypes differ"),
        (dict(k_cache=torch.randn(6, 16, 2, 128)[..., ::2]), "contiguous last dim"),
        (dict(context_lens=torch.tensor([5, 0, 7, 0], dtype=torch.int32)[::2]), "context_lens must be contiguous"),
        (dict(out=torch.empty(2, 4, 63)), "out must be"),
        (dict(num_splits=0), "num_splits must be >= 1"),
        (dict(num_splits=4, workspace=DecodeWorkspace.allocate(2, 4, 64, 2, "cpu")), "workspace too small"),
        (dict(sliding_window=0), "sliding_window must be a positive integer"),
        (dict(sliding_window=2.5), "sliding_window must be a positive integer"),
        (dict(softcap=0.0), "softcap must be > 0"),
    ],
)
def test_decode_launcher_rejects_bad_input(change, message):
    args = _valid_args()
    args.update(change)
    with pytest.raises(ValueError, match=message):
        paged_decode_attention(**args)


def test_decode_launcher_needs_cuda_outside_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="paged_decode_attention_ref"):
        paged_decode_attention(**_valid_args())
