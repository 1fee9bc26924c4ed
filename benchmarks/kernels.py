"""Kernel benchmarks and GPU-only checks: ``python -m benchmarks.kernels [--quick] [--json PATH]``.

In one run, on one CUDA device, this measures (``triton.testing.do_bench`` medians, L2 flushed
between repetitions):
- a device-to-device copy, the bandwidth yardstick;
- every kernel against its torch ``*_ref`` and the best torch alternative
  (decode: gather through the block table + SDPA; prefill: SDPA's flash backend on contiguous
  K/V; small ops: the plain torch expression), at the shapes of issue 4, with achieved bandwidth
  as a fraction of the copy's (attention: bytes of K/V read);
- the fused MoE kernel against a per-expert loop (each picked expert's tokens gathered and run
  through bf16 ``F.linear``s, as transformers' Mixtral experts do) at Mixtral-8x7B and
  Qwen3-30B-A3B expert shapes, decode to prefill token counts (bandwidth: expert weights read);
- correctness of each kernel against its ref at those shapes (bf16, which the CPU interpreter
  cannot check);
- that a decode captured in a CUDA graph replays correctly for new context lengths;
- the int4 dequant-GEMM against the fp16 GEMM of the same layer at batch 1-256 (issue 15);
- that the number of compiled kernel variants does not grow with the batch size.
Nothing is printed that was not measured in this run. Exit status 0 when every check passes
(performance targets are reported, not enforced), 1 when a check fails, 2 without a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from paged_triton.kernels._utils import interpreting

GIB = 1024**3

# Shapes of issue 4: a Llama-3-8B-like attention layer (32 query heads, 8 KV heads, head_dim 128,
# GQA group 4), bf16, block_size 16.
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, DTYPE = 32, 8, 128, 16, torch.bfloat16
# (batch, context_len, target fraction of copy bandwidth)
DECODE_SHAPES = ((64, 2048, 0.75), (256, 1024, 0.75), (1, 8192, 0.50))
# (context_len, chunk_len): a whole 4096-token prompt (the target), and its last 1024-token chunk
# over a 3072-token cached prefix (chunked prefill / prefix-cache hit; reported, no target).
PREFILL_SHAPES = ((4096, 4096), (4096, 1024))
SMALL_OPS_TOKENS, SMALL_OPS_HIDDEN = 8192, 4096
# (name, experts, top_k, hidden, expert intermediate, tokens): fused MoE vs a per-expert loop.
MOE_SHAPES = (
    ("Mixtral-8x7B", 8, 2, 4096, 14336, (1, 32, 512, 4096)),
    ("Qwen3-30B-A3B", 128, 8, 2048, 768, (1, 32, 512, 4096)),
)
VARIANT_BATCH_SIZES = (1, 2, 3, 5, 8, 13, 31, 64, 100, 256)
# The dequant-GEMM of issue 15: Llama-3-8B's o_proj-like (4096 x 4096) and up-projection-like
# (4096 -> 14336) layers, int4 in groups of 128, against the fp16 GEMM of the same layer, at
# batch 1-256 (targets: >= 2.5x faster at batch 1, no slower at batch 64).
WNA16_SHAPES = ((4096, 4096), (14336, 4096))  # (N, K)
WNA16_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
WNA16_GROUP = 128


@dataclass
class Row:
    name: str
    shape: str
    kernel_ms: float
    bytes_moved: int
    ref_ms: float | None = None
    alt_name: str = ""
    alt_ms: float | None = None
    target: str = ""
    passed_target: bool | None = None
    extra: dict = field(default_factory=dict)

    def bandwidth_gbs(self) -> float:
        return self.bytes_moved / (self.kernel_ms * 1e-3) / 1e9


def _bench(fn, quick: bool) -> float:
    """Median milliseconds of ``fn``."""
    import triton.testing

    ms = triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=40 if quick else 100, quantiles=[0.5])
    return float(ms[0] if isinstance(ms, (list, tuple)) else ms)


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))


def _fmt_ms(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.4f}"


def _check_close(name: str, got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float, failures: list) -> float:
    err = (got.float() - want.float()).abs().max().item() if got.numel() else 0.0
    ok = torch.allclose(got.float(), want.float(), atol=atol, rtol=rtol) and not got.isnan().any()
    if not ok:
        failures.append(f"{name}: max abs error {err:.3g} exceeds atol={atol} rtol={rtol}")
    return err


def _paged_cache(batch: int, context_len: int, num_kv_heads: int, head_dim: int, block_size: int, dtype, device):
    """K/V cache holding ``batch`` sequences of ``context_len`` tokens in shuffled physical blocks."""
    blocks_per_seq = math.ceil(context_len / block_size)
    num_blocks = batch * blocks_per_seq + 1
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, device=device, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    perm = torch.randperm(num_blocks, device=device)[: batch * blocks_per_seq]
    block_tables = perm.view(batch, blocks_per_seq).to(torch.int32)
    context_lens = torch.full((batch,), context_len, dtype=torch.int32, device=device)
    return k_cache, v_cache, block_tables, context_lens


def _gather_kv(k_cache, v_cache, block_tables, context_len):
    """Contiguous ``[batch, num_kv_heads, context_len, head_dim]`` K and V (the torch way)."""
    batch = block_tables.shape[0]
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    k = k_cache[block_tables.long()].view(batch, -1, num_kv_heads, head_dim)[:, :context_len].transpose(1, 2)
    v = v_cache[block_tables.long()].view(batch, -1, num_kv_heads, head_dim)[:, :context_len].transpose(1, 2)
    return k, v


_GQA_SDPA: dict[str, bool] = {}


def _sdpa(q, k, v, *, is_causal: bool, scale: float, attn_mask=None):
    """SDPA with grouped K/V: native GQA (``enable_gqa``) when this torch build and the active
    backend take it, else K/V repeated per group. Probed once per backend setting, so timed
    calls never go through a failing attempt."""
    group = q.shape[1] // k.shape[1]
    if group == 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale)
    backends = torch.backends.cuda
    key = f"{backends.flash_sdp_enabled()}{backends.mem_efficient_sdp_enabled()}{attn_mask is None}"
    if _GQA_SDPA.get(key, True):
        try:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=True
            )
            _GQA_SDPA[key] = True
            return out
        except (TypeError, RuntimeError):
            _GQA_SDPA[key] = False
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale)


def _sdpa_on_contiguous(q, k, v, *, is_causal: bool, scale: float, attn_mask=None):
    """A zero-argument SDPA call for timing: native GQA if the active backend takes it, else with
    K/V repeated per group beforehand (outside the timed call)."""
    _sdpa(q, k, v, is_causal=is_causal, scale=scale, attn_mask=attn_mask)  # probes GQA support
    backends = torch.backends.cuda
    key = f"{backends.flash_sdp_enabled()}{backends.mem_efficient_sdp_enabled()}{attn_mask is None}"
    group = q.shape[1] // k.shape[1]
    if group > 1 and not _GQA_SDPA.get(key, True):
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    return lambda: _sdpa(q, k, v, is_causal=is_causal, scale=scale, attn_mask=attn_mask)


def bench_copy(device, quick: bool) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + bytes written)."""
    numel = (256 if quick else 1024) * 1024**2 // 2
    src = torch.empty(numel, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = _bench(lambda: dst.copy_(src), quick)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def bench_decode(device, quick: bool, copy_gbs: float, failures: list) -> list[Row]:
    from paged_triton.kernels.paged_decode_attention import choose_num_splits, paged_decode_attention, paged_decode_attention_ref

    num_heads, num_kv_heads, head_dim, block_size, dtype = NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, DTYPE
    scale = head_dim**-0.5
    heads = f"h{num_heads}/kv{num_kv_heads} d{head_dim} bs{block_size}"
    rows = []
    for batch, context_len, target in DECODE_SHAPES:
        k_cache, v_cache, block_tables, context_lens = _paged_cache(
            batch, context_len, num_kv_heads, head_dim, block_size, dtype, device
        )
        q = torch.randn(batch, num_heads, head_dim, device=device, dtype=dtype)
        out = torch.empty_like(q)
        args = (q, k_cache, v_cache, block_tables, context_lens, scale)
        num_splits = choose_num_splits(batch, num_kv_heads, block_tables.shape[1] * block_size, q.device)
        paged_decode_attention(*args, out=out)
        ref = paged_decode_attention_ref(*args)
        err = _check_close(f"decode b{batch} ctx{context_len}", out, ref, 2e-2, 2e-2, failures)
        del ref

        kernel_ms = _bench(lambda: paged_decode_attention(*args, out=out), quick)
        ref_ms = _bench(lambda: paged_decode_attention_ref(*args), quick)
        q4 = q[:, :, None, :]  # [batch, heads, 1, head_dim]

        def gather_sdpa():
            k, v = _gather_kv(k_cache, v_cache, block_tables, context_len)
            return _sdpa(q4, k, v, is_causal=False, scale=scale)

        alt_ms = _bench(gather_sdpa, quick)
        k_contig, v_contig = (t.contiguous() for t in _gather_kv(k_cache, v_cache, block_tables, context_len))
        sdpa_only_ms = _bench(_sdpa_on_contiguous(q4, k_contig, v_contig, is_causal=False, scale=scale), quick)
        del k_contig, v_contig

        kv_bytes = 2 * batch * context_len * num_kv_heads * head_dim * k_cache.element_size()
        row = Row(
            name="paged_decode_attention",
            shape=f"{_dtype_name(dtype)} b{batch} ctx{context_len} {heads}",
            kernel_ms=kernel_ms,
            bytes_moved=kv_bytes,
            ref_ms=ref_ms,
            alt_name="gather+SDPA",
            alt_ms=alt_ms,
            target=f">= {target:.0%} of copy",
            extra={"num_splits": num_splits, "max_abs_err": err, "sdpa_on_contiguous_kv_ms": sdpa_only_ms},
        )
        row.passed_target = row.bandwidth_gbs() >= target * copy_gbs
        rows.append(row)
        del k_cache, v_cache
        torch.cuda.empty_cache()
    return rows


def bench_prefill(device, quick: bool, failures: list) -> list[Row]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from paged_triton.kernels.paged_prefill_attention import paged_prefill_attention, paged_prefill_attention_ref

    num_heads, num_kv_heads, head_dim, block_size, dtype = NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, DTYPE
    scale = head_dim**-0.5
    heads = f"h{num_heads}/kv{num_kv_heads} d{head_dim} bs{block_size}"
    rows = []
    for context_len, chunk_len in PREFILL_SHAPES:
        k_cache, v_cache, block_tables, context_lens = _paged_cache(
            1, context_len, num_kv_heads, head_dim, block_size, dtype, device
        )
        q = torch.randn(chunk_len, num_heads, head_dim, device=device, dtype=dtype)
        cu = torch.tensor([0, chunk_len], dtype=torch.int32, device=device)
        out = torch.empty_like(q)
        args = (q, k_cache, v_cache, block_tables, cu, context_lens, scale)
        paged_prefill_attention(*args, out=out, max_seqlen_q=chunk_len)
        ref = paged_prefill_attention_ref(*args)
        err = _check_close(f"prefill ctx{context_len} chunk{chunk_len}", out, ref, 2e-2, 2e-2, failures)
        del ref
        kernel_ms = _bench(lambda: paged_prefill_attention(*args, out=out, max_seqlen_q=chunk_len), quick)
        ref_ms = _bench(lambda: paged_prefill_attention_ref(*args), quick)

        # SDPA flash on the same data, contiguous: [1, heads, tokens, head_dim].
        k, v = (t.contiguous() for t in _gather_kv(k_cache, v_cache, block_tables, context_len))
        q4 = q.transpose(0, 1)[None]
        if chunk_len == context_len:
            causal_mask = None
        else:  # bottom-right aligned causal mask; flash does not take masks, so no flash number here
            causal_mask = torch.ones(chunk_len, context_len, dtype=torch.bool, device=device).tril(
                context_len - chunk_len
            )
        alt_name, alt_ms = "SDPA flash", None
        try:
            if causal_mask is None:
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    alt_ms = _bench(_sdpa_on_contiguous(q4, k, v, is_causal=True, scale=scale), quick)
            else:
                alt_name = "SDPA (bool mask)"
                alt = _sdpa_on_contiguous(q4, k, v, is_causal=False, scale=scale, attn_mask=causal_mask)
                alt_ms = _bench(alt, quick)
        except RuntimeError as e:  # flash unavailable for this dtype/shape on this build
            alt_name = f"SDPA flash unavailable ({str(e).splitlines()[0][:60]})"
        # Causal FLOPs: QK^T and PV over the visible (query, key) pairs.
        visible_pairs = chunk_len * (context_len - chunk_len) + chunk_len * (chunk_len + 1) // 2
        flops = 4 * num_heads * head_dim * visible_pairs
        row = Row(
            name="paged_prefill_attention",
            shape=f"{_dtype_name(dtype)} ctx{context_len} chunk{chunk_len} {heads}",
            kernel_ms=kernel_ms,
            bytes_moved=(2 * context_len * num_kv_heads * head_dim + 2 * q.numel()) * q.element_size(),
            ref_ms=ref_ms,
            alt_name=alt_name,
            alt_ms=alt_ms,
            target=">= 0.8x SDPA flash" if chunk_len == context_len else "",
            extra={"tflops": flops / (kernel_ms * 1e-3) / 1e12, "max_abs_err": err},
        )
        if alt_ms is not None:
            row.extra["speed_vs_alt"] = alt_ms / kernel_ms
            if chunk_len == context_len:
                row.passed_target = alt_ms / kernel_ms >= 0.8
        rows.append(row)
        del k, v, k_cache, v_cache
        torch.cuda.empty_cache()
    return rows


def per_expert_loop(x, w13, w2, topk_weights, topk_ids):
    """The MoE MLP as a loop over the experts that were picked, in the model dtype (transformers'
    Mixtral experts): the baseline the fused kernel is measured against."""
    out = torch.zeros_like(x)
    intermediate = w2.shape[2]
    for expert in torch.unique(topk_ids).tolist():
        tokens, slots = torch.nonzero(topk_ids == expert, as_tuple=True)
        gate_up = F.linear(x[tokens], w13[expert])
        h = F.silu(gate_up[:, :intermediate]) * gate_up[:, intermediate:]
        y = F.linear(h, w2[expert]) * topk_weights[tokens, slots, None].to(x.dtype)
        out.index_add_(0, tokens, y)
    return out


def bench_fused_moe(device, quick: bool, failures: list) -> list[Row]:
    from paged_triton.kernels.fused_moe import fused_moe, fused_moe_ref

    dtype = DTYPE
    rows = []
    for name, num_experts, top_k, hidden, intermediate, token_counts in MOE_SHAPES:
        w13 = torch.randn(num_experts, 2 * intermediate, hidden, device=device, dtype=dtype) / hidden**0.5
        w2 = torch.randn(num_experts, hidden, intermediate, device=device, dtype=dtype) / intermediate**0.5
        for num_tokens in token_counts:
            x = torch.randn(num_tokens, hidden, device=device, dtype=dtype)
            probs = torch.randn(num_tokens, num_experts, device=device).softmax(-1)
            weights, ids = torch.topk(probs, top_k)
            weights = weights / weights.sum(-1, keepdim=True)
            args = (x, w13, w2, weights, ids)
            got = fused_moe(*args)
            err = _check_close(f"fused_moe {name} T{num_tokens}", got, fused_moe_ref(*args), 3e-2, 3e-2, failures)
            _check_close(f"per-expert loop {name} T{num_tokens}", per_expert_loop(*args), got, 1e-1, 1e-1, failures)
            experts_hit = int(torch.unique(ids).numel())
            weight_bytes = experts_hit * 3 * intermediate * hidden * w13.element_size()
            kernel_ms = _bench(lambda: fused_moe(*args), quick)
            loop_ms = _bench(lambda: per_expert_loop(*args), quick)
            flops = 2 * num_tokens * top_k * 3 * intermediate * hidden
            rows.append(Row(
                "fused_moe",
                f"{_dtype_name(dtype)} {name} E{num_experts} top{top_k} H{hidden} I{intermediate} T{num_tokens}",
                kernel_ms,
                weight_bytes,
                None,
                "per-expert loop",
                loop_ms,
                extra={"speedup_vs_loop": loop_ms / kernel_ms, "tflops": flops / (kernel_ms * 1e-3) / 1e12,
                       "experts_hit": experts_hit, "max_abs_err": err},
            ))
        del w13, w2
        torch.cuda.empty_cache()
    return rows


def bench_small_ops(device, quick: bool, copy_gbs: float, failures: list) -> list[Row]:
    from paged_triton.kernels.activation import silu_and_mul, silu_and_mul_ref
    from paged_triton.kernels.rms_norm import rms_norm, rms_norm_ref
    from paged_triton.kernels.rotary_embedding import compute_cos_sin_cache, rotary_embedding, rotary_embedding_ref
    from paged_triton.kernels.store_kvcache import store_kvcache, store_kvcache_ref

    num_tokens, hidden, dtype = SMALL_OPS_TOKENS, SMALL_OPS_HIDDEN, DTYPE
    num_heads, num_kv_heads, head_dim, block_size = NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE
    el = torch.empty((), dtype=dtype).element_size()
    target = ">= 80% of copy"
    rows = []

    # rms_norm with the fused residual add: reads x, residual; writes out, new residual.
    x = torch.randn(num_tokens, hidden, device=device, dtype=dtype)
    residual = torch.randn_like(x)
    weight = torch.randn(hidden, device=device, dtype=dtype)
    got, want = rms_norm(x, weight, 1e-5, residual), rms_norm_ref(x, weight, 1e-5, residual)
    err = _check_close("rms_norm", got[0], want[0], 2e-2, 2e-2, failures)
    _check_close("rms_norm residual", got[1], want[1], 2e-2, 2e-2, failures)
    alt = None
    if hasattr(F, "rms_norm"):
        def alt():
            r = x + residual
            return F.rms_norm(r, (hidden,), weight, 1e-5), r
    rows.append(
        Row(
            "rms_norm (+residual)",
            f"{_dtype_name(dtype)} {num_tokens}x{hidden}",
            _bench(lambda: rms_norm(x, weight, 1e-5, residual), quick),
            4 * num_tokens * hidden * el,
            _bench(lambda: rms_norm_ref(x, weight, 1e-5, residual), quick),
            "add + F.rms_norm" if alt else "",
            _bench(alt, quick) if alt else None,
            target,
            extra={"max_abs_err": err},
        )
    )

    # silu_and_mul: reads [T, 2 * hidden], writes [T, hidden].
    gate_up = torch.randn(num_tokens, 2 * hidden, device=device, dtype=dtype)
    err = _check_close("silu_and_mul", silu_and_mul(gate_up), silu_and_mul_ref(gate_up), 2e-2, 2e-2, failures)
    rows.append(
        Row(
            "silu_and_mul",
            f"{_dtype_name(dtype)} {num_tokens}x(2*{hidden})",
            _bench(lambda: silu_and_mul(gate_up), quick),
            3 * num_tokens * hidden * el,
            _bench(lambda: silu_and_mul_ref(gate_up), quick),
            "F.silu(g) * u",
            _bench(lambda: F.silu(gate_up[:, :hidden]) * gate_up[:, hidden:], quick),
            target,
            extra={"max_abs_err": err},
        )
    )
    del x, residual, gate_up

    # rotary on q/k views of a fused qkv output: reads and writes q and k, reads cos/sin rows.
    cache = compute_cos_sin_cache(head_dim, 8192, 500000.0, device=device)
    positions = torch.randint(0, 8192, (num_tokens,), device=device)
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    qkv = torch.randn(num_tokens, q_size + 2 * kv_size, device=device, dtype=dtype)
    q = qkv[:, :q_size].view(num_tokens, num_heads, head_dim)
    k = qkv[:, q_size : q_size + kv_size].view(num_tokens, num_kv_heads, head_dim)
    q_ref, k_ref = q.clone(), k.clone()
    rotary_embedding(positions, q, k, cache)
    rotary_embedding_ref(positions, q_ref, k_ref, cache)
    err = _check_close("rotary_embedding q", q, q_ref, 2e-2, 2e-2, failures)
    _check_close("rotary_embedding k", k, k_ref, 2e-2, 2e-2, failures)
    rows.append(
        Row(
            "rotary_embedding",
            f"{_dtype_name(dtype)} {num_tokens} tok h{num_heads}/kv{num_kv_heads} d{head_dim}",
            _bench(lambda: rotary_embedding(positions, q, k, cache), quick),
            2 * num_tokens * (q_size + kv_size) * el + num_tokens * head_dim * 4,
            _bench(lambda: rotary_embedding_ref(positions, q, k, cache), quick),
            "",
            None,
            target,
            extra={"max_abs_err": err},
        )
    )
    del qkv, q, k, q_ref, k_ref

    # store_kvcache: reads k, v; writes them into shuffled slots.
    num_blocks = num_tokens // block_size + 8
    k = torch.randn(num_tokens, num_kv_heads, head_dim, device=device, dtype=dtype)
    v = torch.randn_like(k)
    slots = torch.randperm(num_blocks * block_size, device=device)[:num_tokens]
    k_cache = torch.zeros(num_blocks, block_size, num_kv_heads, head_dim, device=device, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    k_cache_ref, v_cache_ref = k_cache.clone(), v_cache.clone()
    store_kvcache(k, v, k_cache, v_cache, slots)
    store_kvcache_ref(k, v, k_cache_ref, v_cache_ref, slots)
    if not (torch.equal(k_cache, k_cache_ref) and torch.equal(v_cache, v_cache_ref)):
        failures.append("store_kvcache: cache differs from store_kvcache_ref")
    flat_k, flat_v = k_cache.view(-1, num_kv_heads, head_dim), v_cache.view(-1, num_kv_heads, head_dim)
    rows.append(
        Row(
            "store_kvcache",
            f"{_dtype_name(dtype)} {num_tokens} tok kv{num_kv_heads} d{head_dim} bs{block_size}",
            _bench(lambda: store_kvcache(k, v, k_cache, v_cache, slots), quick),
            4 * num_tokens * kv_size * el,
            _bench(lambda: store_kvcache_ref(k, v, k_cache, v_cache, slots), quick),
            "index_copy_",
            _bench(lambda: (flat_k.index_copy_(0, slots, k), flat_v.index_copy_(0, slots, v)), quick),
            target,
        )
    )
    for row in rows:
        row.passed_target = row.bandwidth_gbs() >= 0.8 * copy_gbs
    return rows


def bench_wna16(device, quick: bool, failures: list) -> list[Row]:
    """int4 dequant-GEMM (symmetric, and act-order with zero points at batch 1) vs the fp16 GEMM."""
    from paged_triton.kernels.wna16_gemm import pack_wna16, wna16_gemm, wna16_gemm_ref

    dtype, rows = torch.float16, []
    for N, K in WNA16_SHAPES:
        groups = -(-K // WNA16_GROUP)
        qweight = pack_wna16(torch.randint(0, 16, (K, N), device=device, dtype=torch.int32), 4)
        scales = (torch.rand(groups, N, device=device) * 0.01 + 1e-3).to(dtype)
        zeros = torch.randint(0, 16, (groups, N), device=device, dtype=torch.int32).to(torch.uint8)
        g_idx = (torch.argsort(torch.randperm(K, device=device)) // WNA16_GROUP).to(torch.int32)
        dense = torch.randn(N, K, device=device, dtype=dtype) * 0.02
        packed_bytes = qweight.numel() * 4 + scales.numel() * scales.element_size()
        for M in WNA16_BATCHES:
            x = torch.randn(M, K, device=device, dtype=dtype)
            variants = [("wna16_gemm w4g128", None, None)]
            if M == 1:
                variants.append(("wna16_gemm w4g128 act-order+zeros", zeros, g_idx))
            for name, z, gi in variants:
                got = wna16_gemm(x, qweight, scales, z, gi, 4, WNA16_GROUP)
                want = wna16_gemm_ref(x, qweight, scales, z, gi, 4, WNA16_GROUP)
                err = _check_close(f"{name} M={M} N={N} K={K}", got, want, 2e-2 * (want.abs().max().item() + 1), 2e-2,
                                   failures)
                ms = _bench(lambda: wna16_gemm(x, qweight, scales, z, gi, 4, WNA16_GROUP), quick)
                fp16_ms = _bench(lambda: F.linear(x, dense), quick)
                speedup = fp16_ms / ms
                target, passed = "", None
                if M == 1 and gi is None:
                    target, passed = ">= 2.5x fp16", speedup >= 2.5
                elif M == 64:
                    target, passed = ">= 1.0x fp16", speedup >= 1.0
                rows.append(Row(name, f"M={M} N={N} K={K}", ms,
                                packed_bytes + (x.numel() + M * N) * x.element_size(), alt_name="fp16 F.linear",
                                alt_ms=fp16_ms, target=target, passed_target=passed,
                                extra={"speedup_vs_fp16": speedup, "max_err": err}))
    return rows


def check_cuda_graph_decode(device, failures: list) -> str:
    """Capture one decode launch (fixed num_splits, preallocated workspace and static buffers),
    then replay it for new lengths and queries, comparing with the ref each time."""
    from paged_triton.kernels.paged_decode_attention import (
        DecodeWorkspace,
        choose_num_splits,
        paged_decode_attention,
        paged_decode_attention_ref,
    )

    batch, max_len = 8, 4096
    num_heads, num_kv_heads, head_dim, block_size, dtype = NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, DTYPE
    k_cache, v_cache, block_tables, context_lens = _paged_cache(
        batch, max_len, num_kv_heads, head_dim, block_size, dtype, device
    )
    num_splits = choose_num_splits(batch, num_kv_heads, max_len, torch.device(device))
    workspace = DecodeWorkspace.allocate(batch, num_heads, head_dim, num_splits, device)
    q = torch.randn(batch, num_heads, head_dim, device=device, dtype=dtype)
    out = torch.empty_like(q)
    scale = head_dim**-0.5

    def step():
        paged_decode_attention(
            q, k_cache, v_cache, block_tables, context_lens, scale, out, num_splits, workspace=workspace
        )

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    cases = [
        [1, 2, 15, 16, 17, 100, 4095, 4096],
        [4096] * 8,
        [0, 0, 1, 3000, 0, 33, 64, 2048],  # 0 = padding slot of a graph batch
    ]
    worst = 0.0
    for lens in cases:
        context_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        q.copy_(torch.randn_like(q))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref = paged_decode_attention_ref(q, k_cache, v_cache, block_tables, context_lens, scale)
        worst = max(worst, _check_close(f"cuda graph decode lens={lens}", out, ref, 2e-2, 2e-2, failures))
    return f"CUDA-graph decode: {len(cases)} replays with new lengths, num_splits={num_splits}, max abs err {worst:.3g}"


def _num_variants(jit_fn) -> int:
    """Compiled variants in a Triton JITFunction's cache (layout differs across Triton versions)."""
    if hasattr(jit_fn, "device_caches"):
        return sum(len(entry[0]) for entry in jit_fn.device_caches.values())
    return sum(len(c) for c in getattr(jit_fn, "cache", {}).values())


def check_variants(device, failures: list) -> list[str]:
    """Run each launcher over many batch sizes; the compiled variant count must stop growing after
    the first (decode: at most one variant per split kernel mode, single vs split)."""
    from paged_triton.kernels import activation, rms_norm as rms, rotary_embedding as rope, store_kvcache as store
    from paged_triton.kernels import paged_decode_attention as dec, paged_prefill_attention as pre

    num_heads, num_kv_heads, head_dim, block_size, dtype = NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, DTYPE
    scale = head_dim**-0.5
    batch_sizes = list(VARIANT_BATCH_SIZES)
    lines = []

    def report(name, jit_fn, run, fixed_max: int | None = None):
        counts = []
        for b in batch_sizes:
            run(b)
            torch.cuda.synchronize()
            counts.append(_num_variants(jit_fn))
        # Strict: nothing compiled after the first batch size; or, where a launcher picks between a
        # few tile configurations by size, a fixed bound independent of the batch size.
        ok = counts[-1] == counts[0] if fixed_max is None else counts[-1] <= fixed_max
        lines.append(f"{name}: variants after batch sizes {batch_sizes}: {counts} -> {'OK' if ok else 'GROWS'}")
        if not ok:
            failures.append(f"{name}: compiled variants grow with batch size: {counts}")

    k_cache, v_cache, block_tables, _ = _paged_cache(256, 512, num_kv_heads, head_dim, block_size, dtype, device)

    def table(b, max_len):
        # As the engine builds them: as wide as this batch's longest sequence needs (the width,
        # i.e. the row stride, changes from batch to batch), copied into a fresh tensor.
        return block_tables[:b, : -(-max_len // block_size)].contiguous()

    def decode(b, num_splits):
        lens = torch.randint(1, 513, (b,), dtype=torch.int32, device=device)
        q = torch.randn(b, num_heads, head_dim, device=device, dtype=dtype)
        tables = table(b, int(lens.max()))
        dec.paged_decode_attention(q, k_cache, v_cache, tables, lens, scale, num_splits=num_splits)

    report("decode split kernel (num_splits=4)", dec._paged_decode_split_kernel, lambda b: decode(b, 4))
    report("decode merge kernel (num_splits=4)", dec._paged_decode_merge_kernel, lambda b: decode(b, 4))
    # Heuristic splits: single-split and split variants may both appear, nothing more.
    report("decode split kernel (auto splits)", dec._paged_decode_split_kernel, lambda b: decode(b, None), fixed_max=2)
    report("decode merge kernel (auto splits)", dec._paged_decode_merge_kernel, lambda b: decode(b, None), fixed_max=1)

    def prefill(b):
        chunk = torch.randint(1, 65, (b,), device=device)
        cu = torch.zeros(b + 1, dtype=torch.int32, device=device)
        cu[1:] = chunk.cumsum(0)
        lens = (chunk + torch.randint(0, 400, (b,), device=device)).to(torch.int32)
        q = torch.randn(int(cu[-1]), num_heads, head_dim, device=device, dtype=dtype)
        pre.paged_prefill_attention(q, k_cache, v_cache, table(b, int(lens.max())), cu, lens, scale)

    report("prefill kernel", pre._paged_prefill_kernel, prefill, fixed_max=2)  # BLOCK_M 64 / 128 by chunk size

    def small_ops(b):
        x = torch.randn(b, SMALL_OPS_HIDDEN, device=device, dtype=dtype)
        rms.rms_norm(x, torch.ones(SMALL_OPS_HIDDEN, device=device, dtype=dtype), 1e-5, x)
        activation.silu_and_mul(x)
        q = torch.randn(b, num_heads, head_dim, device=device, dtype=dtype)
        k = torch.randn(b, num_kv_heads, head_dim, device=device, dtype=dtype)
        rope.rotary_embedding(torch.arange(b, device=device), q, k, cos_sin)
        slots = torch.arange(b, device=device)
        store.store_kvcache(k, k, k_cache, v_cache, slots)

    cos_sin = rope.compute_cos_sin_cache(head_dim, 512, 10000.0, device=device)
    report("rms_norm kernel", rms._rms_norm_kernel, small_ops)
    report("silu_and_mul kernel", activation._silu_and_mul_kernel, small_ops)
    report("rotary kernel", rope._rotary_embedding_kernel, small_ops)
    report("store_kvcache kernel", store._store_kvcache_kernel, small_ops)

    from paged_triton.kernels import fused_moe as moe
    num_experts, top_k = 8, 2
    w13 = torch.randn(num_experts, 2 * 256, 128, device=device, dtype=dtype)
    w2 = torch.randn(num_experts, 128, 256, device=device, dtype=dtype)

    def fused_moe(b):
        x = torch.randn(b, 128, device=device, dtype=dtype)
        weights, ids = torch.topk(torch.rand(b, num_experts, device=device), top_k)
        moe.fused_moe(x, w13, w2, weights, ids)

    # Two tile configurations (few / many tokens) x the two GEMMs (gate_up, down).
    report("fused MoE GEMM kernel", moe._fused_moe_gemm_kernel, fused_moe, fixed_max=4)
    return lines


def _print_table(rows: list[Row], copy_gbs: float) -> None:
    header = (
        "| kernel | shape | kernel ms | GB/s | % copy | torch ref ms | alternative | alt ms | target | met | notes |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for r in rows:
        notes = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.extra.items())
        met = "-" if r.passed_target is None else ("yes" if r.passed_target else "NO")
        print(
            f"| {r.name} | {r.shape} | {_fmt_ms(r.kernel_ms)} | {r.bandwidth_gbs():.0f} | "
            f"{100 * r.bandwidth_gbs() / copy_gbs:.0f}% | {_fmt_ms(r.ref_ms)} | {r.alt_name or '-'} | "
            f"{_fmt_ms(r.alt_ms)} | {r.target or '-'} | {met} | {notes} |"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and a smaller copy buffer")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--skip-checks", action="store_true", help="skip the CUDA-graph and variant checks")
    args = parser.parse_args(argv)

    if interpreting():
        print("benchmarks.kernels: TRITON_INTERPRET is set; unset it to benchmark compiled kernels.", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print(
            "benchmarks.kernels: no CUDA GPU available (torch.cuda.is_available() is False); "
            "the benchmarks need one. Nothing was measured.",
            file=sys.stderr,
        )
        return 2

    import triton

    device = torch.device("cuda", torch.cuda.current_device())
    props = torch.cuda.get_device_properties(device)
    torch.manual_seed(0)
    failures: list[str] = []
    print(
        f"device: {props.name} ({props.multi_processor_count} SMs, {props.total_memory / GIB:.0f} GiB), "
        f"torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}"
    )
    copy_gbs = bench_copy(device, args.quick)
    print(f"device-to-device copy: {copy_gbs:.0f} GB/s (read + write bytes)\n")

    rows = bench_decode(device, args.quick, copy_gbs, failures)
    rows += bench_prefill(device, args.quick, failures)
    rows += bench_small_ops(device, args.quick, copy_gbs, failures)
    rows += bench_fused_moe(device, args.quick, failures)
    rows += bench_wna16(device, args.quick, failures)
    _print_table(rows, copy_gbs)

    check_lines = []
    if not args.skip_checks:
        check_lines.append(check_cuda_graph_decode(device, failures))
        check_lines += check_variants(device, failures)
        print()
        for line in check_lines:
            print(line)

    print()
    if failures:
        print("FAILED checks:")
        for f in failures:
            print(f"  - {f}")
    else:
        print("all correctness checks passed")
    missed = [f"{r.name} {r.shape}" for r in rows if r.passed_target is False]
    print("performance targets missed: " + ("; ".join(missed) if missed else "none"))

    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "device": props.name,
                    "torch": torch.__version__,
                    "triton": triton.__version__,
                    "copy_gbs": copy_gbs,
                    "rows": [asdict(r) | {"bandwidth_gbs": r.bandwidth_gbs()} for r in rows],
                    "checks": check_lines,
                    "failures": failures,
                },
                f,
                indent=2,
            )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
