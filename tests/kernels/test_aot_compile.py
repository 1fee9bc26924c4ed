"""Every kernel variant the engine launches compiles for H100 (sm_90) and A100 (sm_80), no GPU needed.

`python -m kernels.aot` records the launchers' calls for real model shapes over a sweep of batch
sizes, context and chunk lengths, computes each launch's compile key with Triton's own binder for
the target, and compiles every distinct variant to a cubin with the ptxas the triton wheel ships.
The interpreter tests check what the kernels compute; this checks what the GPU would be given:
that it builds, does not spill registers, fits in shared memory, puts the 16-bit attention dots on
tensor cores (attention, the fused MoE GEMM and the dequant-GEMM), and does not recompile as the batch
size changes (the dequant-GEMM has one tile configuration per bucket of rows, all in the batch-1
sweep). It runs in a subprocess because
the rest of the suite runs with TRITON_INTERPRET=1, which replaces the kernels by Python.
"""

import json
import os
import subprocess
import sys
from collections import Counter

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# model -> kinds of attention layer with a shape no earlier model has (Gemma: sliding and full;
# Mixtral's attention is Llama-3-8B's, so its variants are Llama's)
ATTENTION_KINDS = {"Qwen3-0.6B": 1, "Llama-3-8B": 1, "Qwen2-0.5B": 1, "Gemma-2-2B": 2, "Gemma-3-1B": 2,
                   "Phi-3-mini-4k": 1, "Mixtral-8x7B": 0, "Qwen3-30B-A3B": 1}
DTYPES = ("bf16", "fp16", "fp32")
LATER_FAMILIES = ("Gemma-2-2B", "Gemma-3-1B", "Phi-3-mini-4k", "Mixtral-8x7B", "Qwen3-30B-A3B")  # no fp16 sweep


def _case_key(case: str) -> tuple[str, str]:
    model, dtype = case.split()[:2]
    return model, dtype


@pytest.mark.parametrize("arch, num_sms, max_shared", [(90, 132, 232448), (80, 108, 166912)])
def test_every_variant_compiles_within_the_targets_limits(tmp_path, arch, num_sms, max_shared):
    report_path = tmp_path / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "paged_triton.kernels.aot", "--arch", str(arch), "--num-sms", str(num_sms),
         "--max-shared", str(max_shared), "--json", str(report_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, f"paged_triton.kernels.aot failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    report = json.loads(report_path.read_text())
    assert report["target"] == f"cuda:{arch}" and report["problems"] == []
    variants = report["variants"]
    assert {v["kernel"] for v in variants} == {
        "_store_kvcache_kernel", "_paged_decode_split_kernel", "_paged_decode_merge_kernel",
        "_paged_prefill_kernel", "_rms_norm_kernel", "_rotary_embedding_kernel", "_silu_and_mul_kernel",
        "_gelu_tanh_and_mul_kernel", "_fused_moe_gemm_kernel", "_wna16_gemm_kernel",
    }
    for v in variants:
        assert v["error"] is None and v["registers"] and v["spill_stores"] == 0 and v["spill_loads"] == 0, v
        assert v["registers"] * 32 * v["num_warps"] <= 65536 and v["shared_bytes"] <= max_shared, v

    # By design only the model's shape (and a layer's sliding window / soft cap being on) picks a
    # decode variant, plus num_splits == 1 or > 1: two per attention kind, model and dtype, whatever
    # the batch size, context length, window size or block-table width.
    split = Counter(_case_key(v["case"]) for v in variants if v["kernel"] == "_paged_decode_split_kernel")
    assert split == {(m, d): 2 * n for m, n in ATTENTION_KINDS.items() for d in DTYPES
                     if n and not (m in LATER_FAMILIES and d == "fp16")}
    for kernel, counts in report["variants_per_kernel"].items():
        assert counts["batch_1"] == counts["all_batches"], kernel

    for v in variants:
        if v["kernel"] == "_fused_moe_gemm_kernel":
            _, dtype = _case_key(v["case"])
            assert (v["mma"] is None) if dtype == "fp32" else v["mma"] in ("mma.sync", "wgmma"), v
        if v["kernel"] in ("_paged_decode_split_kernel", "_paged_prefill_kernel"):
            _, dtype = _case_key(v["case"])
            if dtype == "fp32":
                assert v["mma"] is None, v  # ieee fp32 dots stay off the (tf32) tensor cores
            elif v["kernel"] == "_paged_prefill_kernel" and arch >= 90:
                assert v["mma"] == "wgmma", v  # Hopper's warpgroup MMA, not the older mma.sync
            else:
                assert v["mma"] == "mma.sync", v
        if v["kernel"] == "_wna16_gemm_kernel":
            # the dequantized 16-bit weights go through tensor cores; fp32 stays exact (ieee)
            assert (v["mma"] is None) == (_case_key(v["case"])[1] == "fp32"), v
