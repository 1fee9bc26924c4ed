"""The Hugging Face transformers baseline: `generate` with static batches.

Same architecture (from the benchmark's config.json), random weights, same dtype and device as
the engine. Requests are taken in workload order into batches of `batch_size`; each batch is
left-padded to its longest prompt and runs until its largest `max_tokens` (a static batch cannot
drop a finished request), EOS disabled. Only requested tokens count: a request that asked for
100 tokens in a batch that ran 1000 steps contributes 100.

"Batch as large as fits": the first batch size is an estimate from free memory (KV cache of the
padded batch, growing by concatenation in transformers' DynamicCache, hence a factor 2); on an
out-of-memory error the whole timed pass restarts with a batch 3/4 the size, so the reported
time is always one complete pass at one batch size.
"""

from __future__ import annotations

import time
from typing import Any

from benchmarks.common import free_device_memory, now_s, synchronize, torch_dtype


def build_hf_model(model_dir: str, dtype: str, device: str, seed: int = 0):
    """transformers' model for the directory's config, random init, on `device` in `dtype`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    dt = torch_dtype(dtype)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dt)  # init straight in the target dtype on the device: no fp32 copy
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(previous)
    model = model.to(device=device, dtype=dt).eval()
    # Never stop on EOS: the engine runs with ignore_eos, the baseline must generate as much.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = config.pad_token_id
    return model


def kv_bytes_per_token(hf_config, dtype_bytes: int) -> int:
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    return 2 * hf_config.num_hidden_layers * hf_config.num_key_value_heads * head_dim * dtype_bytes


def estimate_batch_size(model, requests, device: str, dtype_bytes: int, memory_fraction: float = 0.85) -> int:
    """Largest batch whose padded KV cache (x2 for DynamicCache growth) and prefill fit."""
    if not device.startswith("cuda"):
        return len(requests)
    import torch

    free, _ = torch.cuda.mem_get_info(device)
    cfg = model.config
    max_len = max(len(r.prompt_token_ids) for r in requests) + max(r.max_tokens for r in requests)
    max_prompt = max(len(r.prompt_token_ids) for r in requests)
    per_seq = 2 * kv_bytes_per_token(cfg, dtype_bytes) * max_len
    # prefill activations of one layer: a few hidden-size tensors, the MLP's gate/up, logits row
    per_seq += max_prompt * (4 * cfg.hidden_size + 3 * cfg.intermediate_size) * dtype_bytes
    per_seq += cfg.vocab_size * 4 * 2
    return max(1, min(len(requests), int(free * memory_fraction // per_seq)))


def _generate_batch(model, batch, temperature: float, device: str, pad_id: int) -> int:
    """One static batch; returns the number of new tokens generated per row."""
    import torch

    max_prompt = max(len(r.prompt_token_ids) for r in batch)
    max_new = max(r.max_tokens for r in batch)
    input_ids = torch.full((len(batch), max_prompt), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), max_prompt), dtype=torch.long)
    for i, r in enumerate(batch):
        n = len(r.prompt_token_ids)
        input_ids[i, max_prompt - n:] = torch.tensor(r.prompt_token_ids)
        attention_mask[i, max_prompt - n:] = 1
    kwargs: dict[str, Any] = dict(max_new_tokens=max_new, min_new_tokens=max_new, use_cache=True,
                                  pad_token_id=pad_id, eos_token_id=None)
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=1.0, top_k=0)
    else:
        kwargs.update(do_sample=False)
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                             **kwargs)
    return int(out.shape[1] - max_prompt)


def run_hf_baseline(model_dir: str, requests, temperature: float, device: str, dtype: str,
                    batch_size: int | None = None, warmup: bool = True) -> dict[str, Any]:
    """Time transformers generate over all requests; returns a JSON-able dict.

    Args:
        batch_size: fixed batch size; None = as large as fits (see module doc).
        warmup: one small untimed generate first (CUDA context, kernels, allocator).
    """
    import torch

    t_build = time.perf_counter()
    model = build_hf_model(model_dir, dtype, device)
    build_s = time.perf_counter() - t_build
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    dtype_bytes = torch.empty((), dtype=torch_dtype(dtype)).element_size()
    if warmup:
        small = [type(requests[0])(requests[0].prompt_token_ids[:16], 4)] * min(2, len(requests))
        _generate_batch(model, small, temperature, device, pad_id)
        synchronize(device)
    bs = batch_size or estimate_batch_size(model, requests, device, dtype_bytes)
    attempts: list[dict[str, Any]] = []
    while True:
        oom = None
        try:
            batches = [requests[i:i + bs] for i in range(0, len(requests), bs)]
            start = now_s(device)
            steps_run = 0
            short_batches = 0
            for batch in batches:
                new = _generate_batch(model, batch, temperature, device, pad_id)
                steps_run += new
                if new < max(r.max_tokens for r in batch):
                    short_batches += 1
            elapsed = now_s(device) - start
        except torch.cuda.OutOfMemoryError as e:  # only raised on CUDA
            if bs == 1:
                raise
            oom = str(e).splitlines()[0][:200]
        if oom is None:
            attempts.append({"batch_size": bs, "ok": True})
            break
        # Outside the except clause: the exception's frames (holding generate's tensors) are
        # gone, so the memory can really be returned before the next attempt.
        attempts.append({"batch_size": bs, "ok": False, "error": oom})
        free_device_memory(device)
        bs = max(1, bs * 3 // 4)
    requested = sum(r.max_tokens for r in requests)
    prompt_tokens = sum(len(r.prompt_token_ids) for r in requests)
    padded = sum(len(b) * max(r.max_tokens for r in b) for b in batches)
    result = {
        "engine": "transformers.generate (static batches, left padding)",
        "batch_size": bs,
        "num_batches": len(batches),
        "attempts": attempts,
        "elapsed_s": elapsed,
        "build_s": build_s,
        "num_requests": len(requests),
        "prompt_tokens": prompt_tokens,
        "output_tokens": requested,
        "generated_tokens_incl_padding": padded,
        "decode_steps": steps_run,
        "batches_stopped_early": short_batches,
        "output_tokens_per_s": requested / elapsed,
        "total_tokens_per_s": (requested + prompt_tokens) / elapsed,
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
    }
    del model
    free_device_memory(device)
    return result
