"""Offline throughput, W1 and W2 (issue 7), beside transformers in the same run.

    python -m benchmarks.throughput --workload W1 --json results/w1.json
    python -m benchmarks.throughput --workload W2 --json results/w2.json
    python -m benchmarks.throughput --workload W1 --tiny --device cpu --num-requests 4   # smoke

W1 is nano-vllm's benchmark (Qwen3-0.6B, 256 requests, lengths randint(100, 1024), temperature
0.6, max_model_len 4096); W2 is vLLM's H100 throughput run (Llama-3-8B, 1000 x 256 in / 256 out,
temperature 1.0). Random weights of the real architecture (config.json + load_format="dummy"),
prompts of random token ids, ignore_eos. The engine is warmed up with a few untimed requests;
the timed region is adding all requests and stepping until the last one finishes, with the
device synchronized before each clock reading. Metric: output tokens / wall time (and total =
prompt + output tokens / wall time). Then transformers `generate` runs the same requests
(hf_baseline.py). Peak KV-cache utilisation comes from per-step samples (common.KVTracker).
"""

from __future__ import annotations

import argparse
import sys
import time

from benchmarks.common import (
    add_common_args,
    copy_bandwidth,
    device_memory_info,
    environment,
    format_table,
    free_device_memory,
    make_engine,
    prepare_model_dir,
    resolve_device,
    resolve_dtype,
    run_engine,
    setup_env,
    warm_up_engine,
    write_json,
)
from benchmarks.workloads import get_workload

WARMUP_REQUESTS = 8
WARMUP_TOKENS = 8
TARGETS = {
    "W1": {"output_tokens_per_s": 9530.0, "speedup_vs_transformers": 24.0},
    "W2": {"output_tokens_per_s": 11364.0},
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__.split("\n")[0])
    p.add_argument("--workload", default="W1", choices=["W1", "W2", "w1", "w2"])
    p.add_argument("--baseline-batch-size", type=int, default=None,
                   help="transformers batch size (default: as large as fits)")
    p.add_argument("--baseline-num-requests", type=int, default=None,
                   help="run the baseline on only the first N requests (tokens/s stays comparable "
                        "only if the length mix is the same; default: all)")
    p.add_argument("--no-kv-tracking", dest="track_kv", action="store_false",
                   help="skip the per-step KV-cache samples")
    p.add_argument("--no-profile", dest="profile", action="store_false",
                   help="skip the per-step time breakdown (schedule / model run / postprocess)")
    add_common_args(p)
    return p


def run(args) -> dict:
    setup_env()
    wl = get_workload(args.workload, tiny=args.tiny)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    requests = wl.make_requests(args.num_requests)
    model_dir, tmp = prepare_model_dir(wl.model, args, dtype)
    doc: dict = {
        "benchmark": "throughput",
        "workload": wl.name,
        "model": wl.model.name,
        "tiny": args.tiny,
        "dtype": dtype,
        "temperature": wl.temperature,
        "max_model_len": wl.max_model_len,
        "num_requests": len(requests),
        "requested_prompt_tokens": sum(len(r.prompt_token_ids) for r in requests),
        "requested_output_tokens": sum(r.max_tokens for r in requests),
        "environment": environment(device),
        "targets": TARGETS.get(wl.name.split("-")[0], {}),
    }
    try:
        t0 = time.perf_counter()
        engine = make_engine(model_dir, device, dtype, wl.max_model_len, args)
        doc["engine_init_s"] = time.perf_counter() - t0
        doc["engine_config"] = {k: v for k, v in engine.config.to_dict().items() if k != "model"}
        doc["engine_config"]["num_kv_blocks_allocated"] = engine.num_kv_blocks
        doc["memory_after_engine_init"] = device_memory_info(device)
        # Untimed: a few prompt lengths across the workload's range, so that prefill, mixed and
        # decode steps have compiled their kernels before the clock starts.
        # On CPU there is nothing to compile: one short request checks the path.
        plens = sorted(len(r.prompt_token_ids) for r in requests)
        num_warm = WARMUP_REQUESTS if device.startswith("cuda") else 1
        warm_lens = [plens[(len(plens) - 1) * k // max(1, num_warm - 1)] for k in range(num_warm)]
        doc["warmup_requests"] = len(warm_lens)
        doc["warmup_tokens_per_request"] = WARMUP_TOKENS
        doc["warmup_s"] = warm_up_engine(engine, device, warm_lens, WARMUP_TOKENS, wl.temperature)

        result = run_engine(engine, requests, wl.temperature, device, track_kv=args.track_kv,
                            profile=args.profile)
        engine.shutdown()
        del engine
        free_device_memory(device)
        doc["memory_after_engine_shutdown"] = mem = device_memory_info(device)
        doc["warnings"] = []
        if mem.get("allocated_gib", 0.0) > 1.0:
            # The baseline sizes its batches from free memory; what the engine left behind
            # would shrink them (LLMEngine.shutdown should free it all).
            doc["warnings"].append(
                f"{mem['allocated_gib']:.2f} GiB still allocated after engine.shutdown()")
        eng = {
            "elapsed_s": result.elapsed_s,
            "prompt_tokens": result.prompt_tokens,
            "output_tokens": result.output_tokens,
            "output_tokens_per_s": result.output_tokens / result.elapsed_s,
            "total_tokens_per_s": (result.prompt_tokens + result.output_tokens) / result.elapsed_s,
            "requests_per_s": result.num_requests / result.elapsed_s,
            "num_steps": result.num_steps,
            "finish_reasons": result.finish_reasons,
            "kv_cache": result.kv,
            "step_profile": result.profile,
            "stats": result.stats,
            "all_outputs_full_length": all(
                o == r.max_tokens for (_, o), r in zip(result.per_request, requests)),
        }
        doc["engine"] = eng

        if args.skip_baseline:
            doc["baseline"] = None
        else:
            from benchmarks.hf_baseline import run_hf_baseline

            base_reqs = requests[: args.baseline_num_requests] if args.baseline_num_requests else requests
            doc["baseline"] = run_hf_baseline(model_dir, base_reqs, wl.temperature, device, dtype,
                                              batch_size=args.baseline_batch_size)
            doc["speedup_vs_transformers"] = (
                eng["output_tokens_per_s"] / doc["baseline"]["output_tokens_per_s"])
        if device.startswith("cuda"):
            doc["copy_bandwidth"] = copy_bandwidth(device)
    finally:
        if tmp is not None:
            tmp.cleanup()
    return doc


def print_report(doc: dict) -> None:
    eng, base = doc["engine"], doc.get("baseline")
    env = doc["environment"]
    print(f"\n== throughput {doc['workload']} ({doc['model']}, {doc['dtype']}, "
          f"{doc['num_requests']} requests) on {env.get('device_name')} [{env['device']}], "
          f"{env['date_utc']} UTC ==")
    if doc["tiny"]:
        print("   (--tiny: scaled-down model for smoke runs; these numbers say nothing about speed)")
    headers = ["engine", "requests", "prompt tok", "output tok", "time s", "output tok/s", "total tok/s"]
    rows = [["paged-triton", doc["num_requests"], eng["prompt_tokens"], eng["output_tokens"],
             eng["elapsed_s"], eng["output_tokens_per_s"], eng["total_tokens_per_s"]]]
    if base:
        rows.append([f"transformers (batch {base['batch_size']})", base["num_requests"],
                     base["prompt_tokens"], base["output_tokens"], base["elapsed_s"],
                     base["output_tokens_per_s"], base["total_tokens_per_s"]])
    print(format_table(rows, headers))
    if base:
        print(f"speedup vs transformers: {doc['speedup_vs_transformers']:.2f}x")
    for w in doc.get("warnings", []):
        print("WARNING:", w)
    kv = eng.get("kv_cache")
    if kv:
        print(f"KV cache at peak: {kv['peak_used_blocks']}/{kv['kv_blocks_total']} blocks used, "
              f"slot utilisation {kv['slot_utilization_at_peak']:.4f} (tokens in used slots), "
              f"cache fill peak {kv['cache_fill_peak']:.4f} (tokens / all slots)")
    prof = eng.get("step_profile")
    if prof:
        f = prof["fractions"]
        print(f"where the time goes: model run (decode-only steps) {f.get('run_decode', 0):.1%}, "
              f"model run (steps with prefill) {f.get('run_prefill', 0):.1%}, schedule "
              f"{f.get('schedule', 0):.1%}, postprocess (detokenize, stops) {f.get('postprocess', 0):.1%}; "
              f"{prof['decode_steps']} decode steps at {prof.get('ms_per_decode_step', float('nan')):.2f} ms "
              f"(mean batch {prof.get('mean_decode_batch', float('nan')):.1f}), {prof['prefill_steps']} "
              f"prefill steps at {prof.get('ms_per_prefill_step', float('nan')):.2f} ms")
    st = eng["stats"]
    print(f"steps {eng['num_steps']}, preemptions {st.get('preemptions')}, prefix-cache hits "
          f"{st.get('prefix_cache_hits')}, finish reasons {eng['finish_reasons']}")
    if doc["tiny"]:
        return  # the targets are for the full workloads on an H100
    for name, target in doc["targets"].items():
        value = eng["output_tokens_per_s"] if name == "output_tokens_per_s" else doc.get(name)
        if value is not None:
            status = "meets" if value >= target else f"misses by {100 * (1 - value / target):.1f}%"
            print(f"target {name} >= {target:g}: {value:,.2f} ({status})")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    doc = run(args)
    print_report(doc)
    write_json(args.json, doc)
    ok = doc["engine"]["output_tokens"] == doc["requested_output_tokens"]
    if not ok:
        print("ERROR: the engine generated a different number of tokens than requested",
              file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
