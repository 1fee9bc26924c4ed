"""Batch-1 latency, W3 (issue 7): end-to-end time, ms per output token, bandwidth utilisation.

    python -m benchmarks.latency --json results/w3.json
    python -m benchmarks.latency --tiny --device cpu --warmup-runs 1 --runs 2   # smoke

Llama-3-8B config with random weights, one request at a time of 32 random prompt tokens and 128
output tokens (ignore_eos, temperature 1.0): 10 untimed warm-up runs, then 30 timed runs. Each
run uses a fresh prompt (so the prefix cache cannot serve part of it). Per run: end-to-end
seconds (add_request to the final token, device synchronized), time to first token, and the
decode time per token after it.

Model bandwidth utilisation (MBU): the bytes a forward pass must read from device memory
(every weight once, the embedding table only as one row unless tied to the head, plus the
K/V of the context, plus writing the new token's K/V), over the time per token, over the
bandwidth of a large device-to-device copy measured in the same run (bytes read + written).
Two figures: `mbu_e2e` (all 128 forward passes' bytes over the e2e time, prefill included)
and `mbu_decode` (decode passes only, over the decode time per token).
The transformers baseline (same model, dtype, prompts; batch 1 generate) runs after the engine,
with fewer runs by default (--baseline-runs), as it is slow.
"""

from __future__ import annotations

import argparse
import random
import sys
import time

from benchmarks.common import (
    add_common_args,
    copy_bandwidth,
    environment,
    format_table,
    free_device_memory,
    make_engine,
    now_s,
    prepare_model_dir,
    resolve_device,
    resolve_dtype,
    setup_env,
    summary,
    synchronize,
    torch_dtype,
    write_json,
)
from benchmarks.workloads import BenchRequest, get_workload
from benchmarks.model_dir import num_word_tokens

TARGETS = {"e2e_s": 0.97, "mbu": 0.65}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.latency", description=__doc__.split("\n")[0])
    p.add_argument("--warmup-runs", type=int, default=10)
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--baseline-warmup-runs", type=int, default=2)
    p.add_argument("--baseline-runs", type=int, default=10)
    p.add_argument("--input-len", type=int, default=None, help="override the prompt length")
    p.add_argument("--output-len", type=int, default=None, help="override the output length")
    add_common_args(p)
    return p


# ----------------------------------------------------------------------------- bytes per token

def weight_bytes_per_forward(hf_config, dtype_bytes: int) -> int:
    """Bytes of weights one forward pass reads (embedding: one row unless tied to the head)."""
    c = hf_config
    h, inter, vocab = c.hidden_size, c.intermediate_size, c.vocab_size
    head_dim = getattr(c, "head_dim", None) or h // c.num_attention_heads
    q, kv = c.num_attention_heads * head_dim, c.num_key_value_heads * head_dim
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * inter + 2 * h
    if getattr(c, "attention_bias", False):
        per_layer += q + 2 * kv
    if c.model_type == "qwen3":
        per_layer += 2 * head_dim  # q_norm, k_norm
    params = c.num_hidden_layers * per_layer + h  # final norm
    params += vocab * h  # lm_head (or the tied embedding, read whole by the head)
    if not getattr(c, "tie_word_embeddings", False):
        params += h  # the embedding row of the input token
    return params * dtype_bytes


def kv_bytes_per_token(hf_config, dtype_bytes: int) -> int:
    c = hf_config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * dtype_bytes


def request_bytes(hf_config, dtype_bytes: int, prompt_len: int, output_len: int) -> dict[str, int]:
    """Bytes moved by the prefill pass and by all decode passes of one request."""
    w = weight_bytes_per_forward(hf_config, dtype_bytes)
    kv = kv_bytes_per_token(hf_config, dtype_bytes)
    prefill = w + kv * (2 * prompt_len)  # write the prompt's K/V, read it once in attention
    decode = 0
    for j in range(1, output_len):  # the token sampled by pass j-1 is fed at position prompt_len+j-1
        context = prompt_len + j
        decode += w + kv * (context + 1)  # read the context's K/V, write the new token's
    return {"weight_bytes_per_forward": w, "kv_bytes_per_token": kv, "prefill_bytes": prefill,
            "decode_bytes": decode}


# ----------------------------------------------------------------------------- runs

def engine_run_once(engine, request: BenchRequest, temperature: float, device: str, rid: str):
    """One request alone: (e2e_s, ttft_s, num_output_tokens)."""
    from paged_engine import SamplingParams

    params = SamplingParams(max_tokens=request.max_tokens, temperature=temperature, top_p=1.0,
                            top_k=-1, ignore_eos=True)
    start = now_s(device)
    engine.add_request(rid, prompt_token_ids=request.prompt_token_ids, params=params)
    ttft = None
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if ttft is None and out.token_ids:
                ttft = now_s(device) - start
            if out.finished:
                final = out
    e2e = now_s(device) - start
    return e2e, ttft, len(final.outputs[0].token_ids)


def hf_run_once(model, request: BenchRequest, temperature: float, device: str, pad_id: int):
    import torch

    input_ids = torch.tensor([request.prompt_token_ids], device=device)
    kwargs = dict(max_new_tokens=request.max_tokens, min_new_tokens=request.max_tokens,
                  use_cache=True, pad_token_id=pad_id, eos_token_id=None,
                  attention_mask=torch.ones_like(input_ids))
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=1.0, top_k=0)
    else:
        kwargs.update(do_sample=False)
    start = now_s(device)
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, **kwargs)
    e2e = now_s(device) - start
    return e2e, int(out.shape[1] - input_ids.shape[1])


def make_requests(wl, num: int, prompt_len: int, output_len: int, seed: int) -> list[BenchRequest]:
    rng = random.Random(seed)
    high = min(wl.token_id_high, num_word_tokens(wl.model.vocab_size) - 1)
    return [BenchRequest([rng.randint(0, high) for _ in range(prompt_len)], output_len) for _ in range(num)]


def run(args) -> dict:
    setup_env()
    wl = get_workload("W3", tiny=args.tiny)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    prompt_len = args.input_len or wl.prompt_len[0]
    output_len = args.output_len or wl.output_len[0]
    if args.num_requests is not None:
        args.runs = args.num_requests
    warm = make_requests(wl, args.warmup_runs, prompt_len, output_len, seed=1)
    timed = make_requests(wl, args.runs, prompt_len, output_len, seed=0)
    model_dir, tmp = prepare_model_dir(wl.model, args, dtype)
    doc: dict = {
        "benchmark": "latency", "workload": wl.name, "model": wl.model.name, "tiny": args.tiny,
        "dtype": dtype, "temperature": wl.temperature, "prompt_len": prompt_len,
        "output_len": output_len, "warmup_runs": args.warmup_runs, "runs": args.runs,
        "environment": environment(device), "targets": TARGETS,
    }
    try:
        import torch

        t0 = time.perf_counter()
        engine = make_engine(model_dir, device, dtype, wl.max_model_len, args)
        doc["engine_init_s"] = time.perf_counter() - t0
        doc["engine_config"] = {k: v for k, v in engine.config.to_dict().items() if k != "model"}
        hf_config = engine.config.hf_config
        dtype_bytes = torch.empty((), dtype=torch_dtype(dtype)).element_size()
        for i, r in enumerate(warm):
            engine_run_once(engine, r, wl.temperature, device, f"warm-{i}")
        e2e, ttft, decode_per_token, counts = [], [], [], []
        for i, r in enumerate(timed):
            t, first, n = engine_run_once(engine, r, wl.temperature, device, f"run-{i}")
            e2e.append(t)
            ttft.append(first)
            counts.append(n)
            if n > 1:
                decode_per_token.append((t - first) / (n - 1))
        engine.shutdown()
        del engine
        free_device_memory(device)

        bw = copy_bandwidth(device)
        nbytes = request_bytes(hf_config, dtype_bytes, prompt_len, output_len)
        e2e_med = summary(e2e)["median"]
        dec_med = summary(decode_per_token)["median"] if decode_per_token else float("nan")
        total_bytes = nbytes["prefill_bytes"] + nbytes["decode_bytes"]
        decode_bytes_per_token = nbytes["decode_bytes"] / max(1, output_len - 1)
        doc["copy_bandwidth"] = bw
        doc["bytes"] = nbytes
        doc["engine"] = {
            "e2e_s": summary(e2e),
            "ttft_s": summary(ttft),
            "decode_s_per_token": summary(decode_per_token),
            "ms_per_output_token": 1e3 * e2e_med / output_len,
            "output_tokens_per_run": counts,
            "all_outputs_full_length": all(n == output_len for n in counts),
            "achieved_bytes_per_s_e2e": total_bytes / e2e_med,
            "achieved_bytes_per_s_decode": decode_bytes_per_token / dec_med,
            "mbu_e2e": total_bytes / e2e_med / bw["bytes_per_s"],
            "mbu_decode": decode_bytes_per_token / dec_med / bw["bytes_per_s"],
            "runs_e2e_s": e2e,
        }

        if args.skip_baseline:
            doc["baseline"] = None
        else:
            from benchmarks.hf_baseline import build_hf_model

            model = build_hf_model(model_dir, dtype, device)
            pad_id = model.config.pad_token_id or 0
            for r in warm[: args.baseline_warmup_runs]:
                hf_run_once(model, r, wl.temperature, device, pad_id)
            synchronize(device)
            runs = [hf_run_once(model, r, wl.temperature, device, pad_id) for r in timed[: args.baseline_runs]]
            b_e2e = [t for t, _ in runs]
            b_med = summary(b_e2e)["median"]
            doc["baseline"] = {
                "engine": "transformers.generate (batch 1)",
                "runs": len(runs),
                "e2e_s": summary(b_e2e),
                "ms_per_output_token": 1e3 * b_med / output_len,
                "output_tokens_per_run": [n for _, n in runs],
                "mbu_e2e": total_bytes / b_med / bw["bytes_per_s"],
                "attn_implementation": getattr(model.config, "_attn_implementation", None),
            }
            doc["speedup_vs_transformers"] = b_med / e2e_med
            del model
            free_device_memory(device)
    finally:
        if tmp is not None:
            tmp.cleanup()
    return doc


def print_report(doc: dict) -> None:
    eng, base, env = doc["engine"], doc.get("baseline"), doc["environment"]
    print(f"\n== latency {doc['workload']} ({doc['model']}, {doc['dtype']}, batch 1, "
          f"{doc['prompt_len']} in / {doc['output_len']} out, {doc['runs']} timed runs after "
          f"{doc['warmup_runs']} warm-up) on {env.get('device_name')} [{env['device']}], "
          f"{env['date_utc']} UTC ==")
    if doc["tiny"]:
        print("   (--tiny: scaled-down model for smoke runs; these numbers say nothing about speed)")
    headers = ["engine", "runs", "e2e median s", "e2e p90 s", "ms/token", "TTFT median ms",
               "decode ms/token", "MBU e2e", "MBU decode"]
    rows = [["paged-triton", doc["runs"], eng["e2e_s"]["median"], eng["e2e_s"]["p90"],
             eng["ms_per_output_token"], 1e3 * eng["ttft_s"]["median"],
             1e3 * eng["decode_s_per_token"]["median"], eng["mbu_e2e"], eng["mbu_decode"]]]
    if base:
        rows.append(["transformers", base["runs"], base["e2e_s"]["median"], base["e2e_s"]["p90"],
                     base["ms_per_output_token"], float("nan"), float("nan"), base["mbu_e2e"],
                     float("nan")])
    print(format_table(rows, headers))
    bw = doc["copy_bandwidth"]
    print(f"copy bandwidth (read+write) {bw['gb_per_s']:.1f} GB/s over {bw['size_bytes'] / 2**20:.0f} MiB; "
          f"weights {doc['bytes']['weight_bytes_per_forward'] / 1e9:.3f} GB per forward")
    if base:
        print(f"speedup vs transformers (e2e): {doc['speedup_vs_transformers']:.2f}x")
    if doc["tiny"]:
        return  # the targets are for the full workload on an H100
    e2e = eng["e2e_s"]["median"]
    status = "meets" if e2e <= TARGETS["e2e_s"] else f"misses by {100 * (e2e / TARGETS['e2e_s'] - 1):.1f}%"
    print(f"target e2e <= {TARGETS['e2e_s']} s: {e2e:.4f} s ({status}); "
          f"target MBU >= {TARGETS['mbu']}: {eng['mbu_e2e']:.3f}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    doc = run(args)
    print_report(doc)
    write_json(args.json, doc)
    if not doc["engine"]["all_outputs_full_length"]:
        print("ERROR: a run generated fewer tokens than requested", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
