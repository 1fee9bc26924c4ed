"""kernels.bench on a machine without a GPU: a clear refusal, and a logic smoke run.

The smoke run executes the benchmark code paths on CPU in the interpreter with tiny shapes and a
stand-in timer (the numbers mean nothing; only the Python around the measurements is checked,
including the correctness comparisons against the refs). The CUDA-graph check needs a GPU.
"""

import pytest
import torch

import benchmarks.kernels as bench

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")


def test_bench_refuses_without_gpu(monkeypatch, capsys):
    assert bench.main([]) == 2  # TRITON_INTERPRET is set in the tests
    assert "TRITON_INTERPRET" in capsys.readouterr().err
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert bench.main([]) == 2
        assert "no CUDA GPU" in capsys.readouterr().err


def test_bench_logic_smoke_on_cpu(monkeypatch, capsys):
    monkeypatch.setattr(bench, "NUM_HEADS", 8)
    monkeypatch.setattr(bench, "NUM_KV_HEADS", 2)
    monkeypatch.setattr(bench, "HEAD_DIM", 64)
    monkeypatch.setattr(bench, "DTYPE", torch.float16)  # bf16 tl.dot is wrong in the interpreter
    monkeypatch.setattr(bench, "DECODE_SHAPES", ((2, 40, 0.75),))
    monkeypatch.setattr(bench, "PREFILL_SHAPES", ((48, 48), (80, 20)))
    monkeypatch.setattr(bench, "SMALL_OPS_TOKENS", 4)
    monkeypatch.setattr(bench, "SMALL_OPS_HIDDEN", 128)
    monkeypatch.setattr(bench, "VARIANT_BATCH_SIZES", (1, 3))
    monkeypatch.setattr(bench, "MOE_SHAPES", (("tiny", 4, 2, 32, 48, (1, 6)),))
    monkeypatch.setattr(bench, "WNA16_SHAPES", ((64, 256),))
    monkeypatch.setattr(bench, "WNA16_BATCHES", (1, 64))
    monkeypatch.setattr(bench, "_bench", lambda fn, quick: (fn(), 1.0)[1])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda *args: None)
    device, failures = torch.device("cpu"), []
    rows = bench.bench_decode(device, True, 1.0, failures)
    rows += bench.bench_prefill(device, True, failures)
    rows += bench.bench_small_ops(device, True, 1.0, failures)
    rows += bench.bench_fused_moe(device, True, failures)
    rows += bench.bench_wna16(device, True, failures)
    bench._print_table(rows, 1.0)
    lines = bench.check_variants(device, failures)
    assert failures == []
    assert [r.name for r in rows] == [
        "paged_decode_attention",
        "paged_prefill_attention",
        "paged_prefill_attention",
        "rms_norm (+residual)",
        "silu_and_mul",
        "rotary_embedding",
        "store_kvcache",
        "fused_moe",
        "fused_moe",
        "wna16_gemm w4g128",
        "wna16_gemm w4g128 act-order+zeros",
        "wna16_gemm w4g128",
    ]
    assert all(line.endswith("OK") for line in lines)
    assert capsys.readouterr().out.count("| paged_") == 3
