"""Offline generation from the command line.

    python -m paged_engine.generate --model DIR --prompt "Hello" [--prompt "..."] \\
        [--max-tokens 64] [--temperature 0] [--stream] [--json] [--engine-arg block_size=8]

Prints each completion (or, with --stream, the text as it is generated for a single prompt;
with --json, one JSON object per output line).
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m paged_engine.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="local Hugging Face model directory")
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    p.add_argument("--prompt-file", help="file with one prompt per line")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--seed", type=int, default=0, help="engine seed (requests without --sample-seed)")
    p.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="any other EngineConfig field (repeatable)")
    # sampling
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--min-tokens", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--sample-seed", type=int, default=None, help="per-request seed")
    p.add_argument("--n", type=int, default=1)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--logprobs", type=int, default=None)
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument("--json", action="store_true", help="one JSON object per output")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from paged_engine import EngineConfig, LLMEngine, SamplingParams

    prompts = list(args.prompt)
    if args.prompt_file:
        with open(args.prompt_file) as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        print("error: give at least one --prompt (or --prompt-file)", file=sys.stderr)
        return 2
    engine_kwargs = dict(
        model=args.model, device=args.device, dtype=args.dtype, block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks, max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enable_prefix_caching=not args.no_prefix_caching, enforce_eager=args.enforce_eager,
        seed=args.seed,
    )
    for item in args.engine_arg:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"error: --engine-arg expects KEY=VALUE, got {item!r}", file=sys.stderr)
            return 2
        engine_kwargs[key.strip()] = value
    try:
        params = SamplingParams(
            n=args.n, max_tokens=args.max_tokens, min_tokens=args.min_tokens,
            temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
            seed=args.sample_seed, stop=args.stop, ignore_eos=args.ignore_eos,
            repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
            frequency_penalty=args.frequency_penalty, logprobs=args.logprobs,
        )
        engine = LLMEngine(EngineConfig.from_dict(engine_kwargs))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    if args.chat:
        tok = engine.tokenizer
        prompts = [
            tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts
        ]
    start = time.perf_counter()
    try:
        for i, prompt in enumerate(prompts):
            engine.add_request(str(i), prompt=prompt, params=params)
    except ValueError as e:
        print(f"error: prompt {i}: {e}", file=sys.stderr)
        return 2

    stream = args.stream and len(prompts) == 1 and args.n == 1 and not args.json
    finals = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if stream:
                sys.stdout.write(out.new_text)
                sys.stdout.flush()
            if out.finished:
                finals[out.request_id] = out
    elapsed = time.perf_counter() - start
    if stream:
        sys.stdout.write("\n")

    num_generated = 0
    for i in range(len(prompts)):
        out = finals[str(i)]
        for c in out.outputs:
            num_generated += len(c.token_ids)
            if args.json:
                record = {
                    "prompt": prompts[i], "index": c.index, "text": c.text, "token_ids": c.token_ids,
                    "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
                    "num_prompt_tokens": len(out.prompt_token_ids),
                    "num_cached_tokens": out.num_cached_tokens,
                    "cumulative_logprob": c.cumulative_logprob,
                }
                if c.logprobs is not None:
                    record["logprobs"] = [
                        {str(t): {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": lp.decoded_token}
                         for t, lp in entry.items()}
                        for entry in c.logprobs
                    ]
                print(json.dumps(record, ensure_ascii=False))
            elif not stream:
                tag = f"[{i}]" if args.n == 1 else f"[{i}.{c.index}]"
                print(f"{tag} {prompts[i]!r} -> {c.text!r} ({c.finish_reason})")
    print(
        f"{len(prompts)} prompt(s), {num_generated} tokens in {elapsed:.2f}s "
        f"({num_generated / max(elapsed, 1e-9):.1f} tok/s) on {engine.config.device}/{engine.config.dtype}",
        file=sys.stderr,
    )
    engine.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
