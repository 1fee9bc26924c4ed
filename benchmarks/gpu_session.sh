#!/usr/bin/env bash
# The GPU-only checks and benchmarks of issues 4 and 7, in stages meant for one 10-minute device
# call each. On the GPU machine, from the project root:
#   bash benchmarks/gpu_session.sh check      # GPU tests (CUDA graphs, bf16 kernels) + benchmarks.kernels
#   bash benchmarks/gpu_session.sh w1         # throughput W1 (Qwen3-0.6B) beside transformers
#   bash benchmarks/gpu_session.sh w3         # batch-1 latency W3 (Llama-3-8B)
#   bash benchmarks/gpu_session.sh w2         # throughput W2 (Llama-3-8B)
#   source .device-carry/setup.sh && bash benchmarks/gpu_session.sh w4   # serving through Triton
# Each step writes <step>.log (and <step>.json where the script has one) under $OUT (./out when
# unset) and is cut at STEP_TIMEOUT seconds (default 540), so a stuck step still returns its log;
# lower STEP_TIMEOUT when one call runs several stages.
# Copy the numbers into benchmarks/RESULTS.md from the JSON files, with the device and the date.
set -uo pipefail
out=${OUT:-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
status=0

step() {
  local name=$1
  shift
  echo "== $name: $*"
  timeout "${STEP_TIMEOUT:-540}" "$@" 2>&1 | tee "$out/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc"
  [ "$rc" -eq 0 ] || status=1
}

[ $# -gt 0 ] || { sed -n '2,12p' "$0"; exit 2; }
for stage in "$@"; do
  case $stage in
    check)
      step gpu-tests python3 -m pytest -q -p no:cacheprovider \
        tests/engine/test_model_runner.py::test_cuda_profiling_and_graphs_match_eager \
        tests/engine/test_model_forward.py::test_bfloat16_kernels_on_gpu_match_float32_reference \
        tests/engine/test_model_families.py::test_bfloat16_families_on_gpu_match_float32_reference
      step kernels python3 -m benchmarks.kernels --json "$out/kernels.json" ;;
    w1) step w1 python3 -m benchmarks.throughput --workload W1 --json "$out/w1.json" ;;
    w2) step w2 python3 -m benchmarks.throughput --workload W2 --json "$out/w2.json" ;;
    w3) step w3 python3 -m benchmarks.latency --json "$out/w3.json" ;;
    w4)
      # W4's ratio needs W1 offline: an earlier W1 JSON (W1_JSON=path) or the same call's, else
      # benchmarks.serving runs W1 offline itself first.
      offline=()
      w1=${W1_JSON:-$out/w1.json}
      [ -f "$w1" ] && offline=(--offline-json "$w1")
      step w4 python3 -m benchmarks.serving --json "$out/w4.json" --work-dir /tmp/w4 --client-workers 4 \
        "${offline[@]}" ;;
    *) echo "unknown stage '$stage' (check, w1, w2, w3, w4)" >&2; exit 2 ;;
  esac
done
exit $status
