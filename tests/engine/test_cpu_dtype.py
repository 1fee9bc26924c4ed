"""dtype="auto" on CPU: bfloat16 where the CPU has native bf16 (AVX512-BF16 / AMX-BF16), float32
elsewhere, and float32 whenever PAGED_TRITON_CPU_BF16=0 (what the rest of the suite runs with)."""

import pytest
import torch

from paged_engine import config as config_module
from paged_engine.config import EngineConfig, cpu_has_native_bf16


def _cpuinfo_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            line = next(ln for ln in f if ln.startswith("flags"))
    except (OSError, StopIteration):
        pytest.skip("no /proc/cpuinfo flags here")
    return set(line.split(":", 1)[1].split())


@pytest.mark.parametrize("native, expected", [(True, "bfloat16"), (False, "float32")])
def test_auto_dtype_on_cpu_follows_the_capability_check(tiny_model_dir, monkeypatch, native, expected):
    monkeypatch.setattr(config_module, "cpu_has_native_bf16", lambda: native)
    assert EngineConfig(model=tiny_model_dir, device="cpu").dtype == expected
    # an explicit dtype is never overridden
    assert EngineConfig(model=tiny_model_dir, device="cpu", dtype="float32").dtype == "float32"
    assert EngineConfig(model=tiny_model_dir, device="cpu", dtype="bf16").dtype == "bfloat16"


@pytest.mark.parametrize("amx, avx512_bf16, expected", [
    (False, False, False), (True, False, True), (False, True, True), (True, True, True)])
def test_capability_check_reads_torchs_probes(monkeypatch, amx, avx512_bf16, expected):
    monkeypatch.delenv("PAGED_TRITON_CPU_BF16", raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    assert cpu_has_native_bf16() is expected


@pytest.mark.parametrize("value", ["0", "false", "off"])
def test_environment_keeps_auto_at_float32(monkeypatch, tiny_model_dir, value):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    monkeypatch.setenv("PAGED_TRITON_CPU_BF16", value)
    assert cpu_has_native_bf16() is False
    assert EngineConfig(model=tiny_model_dir, device="cpu").dtype == "float32"


def test_capability_check_agrees_with_the_kernels_cpu_flags(monkeypatch):
    """Independent of torch's probes: the flags Linux reports for this CPU."""
    monkeypatch.delenv("PAGED_TRITON_CPU_BF16", raising=False)
    flags = _cpuinfo_flags()
    assert cpu_has_native_bf16() == bool({"avx512_bf16", "amx_bf16"} & flags)
