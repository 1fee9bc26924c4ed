"""Host-side (Python) time of one decode step at W1 batch sizes, with the model left out.

    python -m benchmarks.host_overhead                      # batches 64 and 256, 100 timed steps
    python -m benchmarks.host_overhead --batch 256 --steps 100 --json host.json
    python -m benchmarks.host_overhead --batch 256 --cprofile 25   # where the time goes
    python -m benchmarks.host_overhead --tiny --batch 4 --steps 3  # smoke (tests)

On a GPU a W1 decode step (Qwen3-0.6B, up to 256 sequences) leaves the device busy for only
about 10-25 ms, so everything the engine does in Python per step must fit in a few ms or the GPU
waits for the host. This measures that host work on the CPU without any model:

- The engine is the real `LLMEngine` (W1's config.json and its synthetic byte-level tokenizer
  with the full 151,936-token vocabulary, so detokenization costs what it costs there) with
  an injected runner. The runner runs the real `ModelRunner._prepare` (flat inputs, slot
  mapping, block tables: host lists turned into tensors) and the real `Sampler` on a narrow
  logits probe (`--probe-vocab` columns), then returns uniformly random token ids of the full
  vocabulary at once (what random weights at temperature 0.6 produce, near enough).
- The narrow probe keeps the sampler's device compute negligible, so its time is the host part:
  building per-row parameter lists, the op launches, the `.tolist()` of the results and the
  per-row `SampleLogprobs`. On a GPU the ops are launched, not run, by the host, at a similar
  cost per op. The sampler on full-width logits ([batch, 151,936] float32) is timed apart:
  on this CPU that is almost all arithmetic that runs on the device on a GPU, not host time.
- W1's requests (nano-vllm's draw: prompts of 100-1024 tokens), block_size 16, prefix caching
  on, temperature 0.6, ignore_eos; max_tokens large enough that no sequence finishes while
  timed, so every timed step is a full decode batch. The prefill steps and
  `--untimed-decode-steps` decode steps run first: per-step costs grow with the tokens
  generated so far, so the timed steps sit about halfway through a W1 output.

Per step: schedule (`scheduler.schedule`), prepare (`_prepare` + the sample-index upload),
sample (host part, from the probe), postprocess (`LLMEngine._postprocess`: update_from_output,
detokenization, stop checks, RequestOutput building; update_from_output also shown alone), and
other (the rest of `step()`: lock, aborted requests, remove_finished, freeing the step's batch).
host = the step's time less what the fake runner spends making its tokens.

Each part is read on two clocks: wall time and the thread's CPU time. The CPU time is what the
step costs on a core of its own; on a shared machine other processes stretch the wall time
but hardly the CPU time, so the table shows CPU-time medians. Garbage collections are timed
apart (gc.callbacks): full collections are rare (one per ~100 steps at batch 256) and long
(they walk every object of the process, ~200k after importing torch and transformers), so
they hide from medians; the mean host time includes them, and the ceiling on output tok/s the
host alone would allow is batch / mean host time. `--gc-freeze` shows what `gc.freeze()` after
startup would save.

Not measured here: CUDA-graph replay (a few copies and one launch, tens of microseconds),
pinned-memory staging of the uploads (CPU tensors are not pinned), and any wait for the device.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import math
import pstats
import random
import sys
import time
from typing import Any

from benchmarks.common import environment, format_table, setup_env, summary, write_json
from benchmarks.model_dir import QWEN3_0_6B, TINY_QWEN3, write_model_dir
from benchmarks.workloads import get_workload

BLOCK_SIZE = 16
TEMPERATURE = 0.6
MAX_MODEL_LEN = 4096
MAX_NUM_BATCHED_TOKENS = 8192  # the engine's default
STAGES = ("schedule", "prepare", "sample", "postprocess", "other")
CLOCKS = ("wall", "cpu")  # the order of _now()'s readings


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.host_overhead",
                                description=__doc__.split("\n")[0])
    p.add_argument("--batch", default="64,256",
                   help="decode batch sizes (sequences), comma-separated (default 64,256)")
    p.add_argument("--steps", type=int, default=100, help="timed decode steps per batch size")
    p.add_argument("--untimed-decode-steps", type=int, default=256,
                   help="decode steps before the timed ones (default 256: about halfway through a "
                        "W1 output, whose mean max_tokens is 562; per-step costs grow with length)")
    p.add_argument("--probe-vocab", type=int, default=8,
                   help="logits width of the sampler probe (host part of the sampler)")
    p.add_argument("--full-sampler-reps", type=int, default=3,
                   help="timed calls of the sampler on full-vocabulary CPU logits (0: skip)")
    p.add_argument("--gc-freeze", action="store_true",
                   help="what-if: gc.collect() + gc.freeze() once the engine is built (as vLLM "
                        "does after startup), so full collections skip the startup objects")
    p.add_argument("--cprofile", type=int, default=0, metavar="N",
                   help="also profile the timed steps (cProfile) and print the top N functions")
    p.add_argument("--tiny", action="store_true",
                   help="tiny vocabulary (2,048), short prompts: a smoke run, numbers mean nothing")
    p.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON")
    return p


def _now() -> tuple[float, float]:
    """(wall, CPU time of this thread) in seconds."""
    return time.perf_counter(), time.thread_time()


def _since(t0: tuple[float, float]) -> tuple[float, float]:
    return time.perf_counter() - t0[0], time.thread_time() - t0[1]


class HostOnlyRunner:
    """The engine's executor seam with the model cut out.

    `execute_model` applies the batch to the runner's sequence copies, prepares the real model inputs, runs the real sampler on a narrow logits probe and
    returns random full-vocabulary tokens; `last` says how long each part took (wall, CPU).
    """

    def __init__(self, num_kv_blocks: int, vocab_size: int, probe_vocab: int, max_rows: int,
                 seed: int = 0):
        import torch

        from paged_engine.executor.model_runner import ModelRunner
        from paged_engine.executor.sampler import Sampler
        from paged_engine.executor.sequence_state import SequenceStates

        self.num_kv_blocks = num_kv_blocks
        self.vocab_size = vocab_size
        # A ModelRunner without __init__: _prepare reads only these fields, and a real one
        # would load a 0.6B-parameter model this measurement does not use.
        self.model_runner = ModelRunner.__new__(ModelRunner)
        self.model_runner.block_size = BLOCK_SIZE
        self.model_runner.device = torch.device("cpu")
        self.model_runner._pin = False
        self.states = SequenceStates()
        self.sampler = Sampler(probe_vocab, "cpu", seed=seed)
        self.probe_logits = torch.randn(max_rows, probe_vocab,
                                        generator=torch.Generator().manual_seed(seed))
        self.rng = random.Random(seed)
        self.last: dict[str, tuple[float, float]] = {}
        self.num_tokens_last = 0

    def execute_model(self, batch):
        import torch

        from paged_engine.core.batch import ModelRunnerOutput

        t = _now()
        states = self.states.update(batch)
        _, _, _, sample_indices, _ = self.model_runner._prepare(batch.seqs, states)
        self.model_runner._to_device(sample_indices, torch.int64)
        prepare = _since(t)
        t = _now()
        rows = [i for i, s in enumerate(batch.seqs) if s.do_sample]
        sampled = self.sampler(self.probe_logits[: len(rows)], [states[i] for i in rows])
        sample = _since(t)
        t = _now()
        output = ModelRunnerOutput.empty(len(batch.seqs))
        for j, i in enumerate(rows):
            output.sampled_token_ids[i].append(self.rng.randrange(self.vocab_size))
            output.logprobs[i].append(sampled.logprobs[j])
        self.last = {"prepare": prepare, "sample": sample, "fake": _since(t)}
        self.num_tokens_last = sum(s.num_tokens for s in batch.seqs)
        return output


def _timed(fn, record: dict[str, tuple[float, float]], key: str):
    def wrapper(*args, **kwargs):
        t = _now()
        try:
            return fn(*args, **kwargs)
        finally:
            record[key] = _since(t)

    return wrapper


class GCTimer:
    """Time the garbage collector spends, from gc.callbacks, while `counting` is set."""

    def __init__(self):
        self.counting = False
        self.seconds = [0.0, 0.0, 0.0]  # by generation
        self.collections = [0, 0, 0]
        self._start = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if not self.counting:
            return
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.seconds[info["generation"]] += time.perf_counter() - self._start
            self.collections[info["generation"]] += 1


def build_engine(model_dir: str, requests, max_tokens: int, probe_vocab: int):
    from paged_engine import EngineConfig, LLMEngine

    num_blocks = sum(math.ceil((len(r.prompt_token_ids) + max_tokens) / BLOCK_SIZE) for r in requests)
    config = EngineConfig(model=model_dir, device="cpu", block_size=BLOCK_SIZE,
                          num_kv_blocks=num_blocks, max_num_seqs=len(requests),
                          max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS,
                          max_model_len=MAX_MODEL_LEN, seed=0)
    runner = HostOnlyRunner(num_blocks, config.hf_config.vocab_size, probe_vocab, len(requests))
    return LLMEngine(config, executor=runner)


def measure(model_dir: str, workload, batch: int, steps: int, untimed_decode_steps: int,
            probe_vocab: int, gc_freeze: bool = False,
            profiler: cProfile.Profile | None = None) -> dict[str, Any]:
    """Fill the engine with `batch` W1 requests, prefill them, run `untimed_decode_steps`, then
    time `steps` decode steps."""
    from paged_engine import SamplingParams

    requests = workload.make_requests(batch)
    # Nobody may finish inside the timed steps. The sequences admitted first decode while the
    # later prompts are prefilled, in steps of at least (token budget - batch) prompt tokens.
    prompt_tokens = sum(len(r.prompt_token_ids) for r in requests)
    max_prefill_steps = math.ceil(prompt_tokens / (MAX_NUM_BATCHED_TOKENS - batch)) + 1
    max_tokens = max_prefill_steps + untimed_decode_steps + steps + 1
    engine = build_engine(model_dir, requests, max_tokens, probe_vocab)
    if gc_freeze:
        gc.collect()
        gc.freeze()
    runner = engine.executor
    for i, r in enumerate(requests):
        engine.add_request(f"req-{i}", prompt_token_ids=r.prompt_token_ids,
                           params=SamplingParams(max_tokens=max_tokens, temperature=TEMPERATURE,
                                                 ignore_eos=True))
    prefill_steps = 0
    sched = engine.scheduler
    while sched.waiting or not all(s.num_computed_tokens == s.num_tokens - 1 for s in sched.running):
        engine.step()
        prefill_steps += 1
    for _ in range(untimed_decode_steps):
        engine.step()

    parts: dict[str, tuple[float, float]] = {}
    sched.schedule = _timed(sched.schedule, parts, "schedule")
    sched.update_from_output = _timed(sched.update_from_output, parts, "update_from_output")
    engine._postprocess = _timed(engine._postprocess, parts, "postprocess")
    keys = (*STAGES, "update_from_output", "host", "step")
    per_step = {clock: {k: [] for k in keys} for clock in CLOCKS}
    tokens_before = engine.output_processor.generation_tokens_total
    outputs_per_step = []
    gc_timer = GCTimer()
    gc.callbacks.append(gc_timer)
    try:
        for _ in range(steps):
            parts.clear()
            if profiler is not None:
                profiler.enable()
            gc_timer.counting = True
            t = _now()
            outputs = engine.step()
            step = _since(t)
            gc_timer.counting = False
            if profiler is not None:
                profiler.disable()
            if runner.num_tokens_last != batch:
                raise RuntimeError(
                    f"a timed step computed {runner.num_tokens_last} tokens, not {batch} decodes")
            outputs_per_step.append(len(outputs))
            last = runner.last
            for c, clock in enumerate(CLOCKS):
                times = per_step[clock]
                run = last["prepare"][c] + last["sample"][c] + last["fake"][c]
                times["schedule"].append(parts["schedule"][c])
                times["prepare"].append(last["prepare"][c])
                times["sample"].append(last["sample"][c])
                times["postprocess"].append(parts["postprocess"][c])
                times["update_from_output"].append(parts["update_from_output"][c])
                times["other"].append(step[c] - parts["schedule"][c] - run - parts["postprocess"][c])
                times["step"].append(step[c])
                times["host"].append(step[c] - last["fake"][c])
    finally:
        gc.callbacks.remove(gc_timer)
    ms = {clock: {k: {s: 1e3 * x if s != "n" else x for s, x in summary(v).items()}
                  for k, v in times.items()} for clock, times in per_step.items()}
    return {
        "batch": batch,
        "prefill_steps": prefill_steps,
        "untimed_decode_steps": untimed_decode_steps,
        "timed_steps": steps,
        "generated_tokens": engine.output_processor.generation_tokens_total - tokens_before,
        "outputs_per_step": outputs_per_step,
        "unfinished_requests": engine.get_num_unfinished_requests(),
        "mean_prompt_tokens": prompt_tokens / batch,
        "ms": ms,
        "gc": {"ms_per_step": 1e3 * sum(gc_timer.seconds) / steps,
               "ms_per_step_by_generation": [1e3 * x / steps for x in gc_timer.seconds],
               "collections_by_generation": gc_timer.collections},
        # Throughput counts every step, garbage collections included: the mean, not the median.
        "host_tokens_per_s_ceiling": batch / (ms["cpu"]["host"]["mean"] / 1e3),
    }


def time_full_sampler(vocab_size: int, batch: int, reps: int) -> dict[str, Any]:
    """The sampler on [batch, vocab] float32 CPU logits: on a GPU this is device work."""
    import torch

    from paged_engine import SamplingParams
    from paged_engine.executor.sampler import Sampler
    from paged_engine.executor.sequence_state import SequenceState

    params = SamplingParams(temperature=TEMPERATURE, ignore_eos=True, max_tokens=16)
    rows = [SequenceState(i, [1], [], [0], params) for i in range(batch)]
    sampler = Sampler(vocab_size, "cpu", seed=0)
    logits = torch.randn(batch, vocab_size, generator=torch.Generator().manual_seed(0))
    sampler(logits, rows)  # untimed: first-call allocations
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        sampler(logits, rows)
        times.append(time.perf_counter() - t)
    return {"batch": batch, "vocab": vocab_size, "reps": reps,
            "ms_median": 1e3 * summary(times)["median"], "cpu_threads": torch.get_num_threads()}


def run(args) -> dict[str, Any]:
    setup_env()
    import tempfile

    import torch

    batches = [int(b) for b in str(args.batch).split(",") if b.strip()]
    if not batches or min(batches) < 1 or args.steps < 1:
        raise ValueError("--batch needs sizes >= 1 and --steps >= 1")
    spec = TINY_QWEN3 if args.tiny else QWEN3_0_6B
    workload = get_workload("W1", tiny=args.tiny)
    profiler = cProfile.Profile() if args.cprofile else None
    doc: dict[str, Any] = {"benchmark": "host_overhead", "model": spec.name, "tiny": args.tiny,
                           "vocab_size": spec.vocab_size, "block_size": BLOCK_SIZE,
                           "temperature": TEMPERATURE, "probe_vocab": args.probe_vocab,
                           "gc_freeze": args.gc_freeze,
                           "environment": environment("cpu"), "results": [], "full_sampler": []}
    # The probe's tensors are tiny: one thread keeps the wake-ups of the CPU thread pool, which
    # a GPU launch does not have, out of the host time (and out of the noise of a shared CPU).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory(prefix="host-overhead-") as tmp:
            model_dir = write_model_dir(spec, tmp, "float32")
            for batch in batches:
                doc["results"].append(measure(model_dir, workload, batch, args.steps,
                                              args.untimed_decode_steps, args.probe_vocab,
                                              args.gc_freeze, profiler))
    finally:
        torch.set_num_threads(threads)
        if args.gc_freeze:
            gc.unfreeze()
    if args.full_sampler_reps > 0:
        for batch in batches:
            doc["full_sampler"].append(
                time_full_sampler(spec.vocab_size, batch, args.full_sampler_reps))
    if profiler is not None:
        doc["cprofile"] = profiler
    return doc


def print_report(doc: dict[str, Any], top: int = 0) -> None:
    headers = ["batch", *STAGES, "(update_from_output)", "host median", "gc", "host mean",
               "host median wall", "ceiling tok/s"]
    rows = []
    for r in doc["results"]:
        cpu, wall = r["ms"]["cpu"], r["ms"]["wall"]
        rows.append([r["batch"], *(cpu[s]["median"] for s in STAGES),
                     cpu["update_from_output"]["median"], cpu["host"]["median"],
                     r["gc"]["ms_per_step"], cpu["host"]["mean"],
                     wall["host"]["median"], r["host_tokens_per_s_ceiling"]])
    print(f"Host time per decode step, ms ({doc['model']}, vocab {doc['vocab_size']:,}, block_size "
          f"{doc['block_size']}, {doc['results'][0]['timed_steps']} steps"
          f"{', gc.freeze() after startup' if doc['gc_freeze'] else ''}). Stages and host median: "
          "CPU-time medians. gc: mean wall time per step in garbage collections (rare full ones "
          "included; inside the stages). host mean: CPU time, gc included; the ceiling is "
          "batch / host mean.")
    print(format_table(rows, headers))
    for s in doc["full_sampler"]:
        print(f"sampler on full [{s['batch']}, {s['vocab']:,}] CPU logits: {s['ms_median']:.1f} ms "
              f"(median of {s['reps']}, {s['cpu_threads']} threads; device work on a GPU)")
    if "cprofile" in doc and top:
        pstats.Stats(doc["cprofile"], stream=sys.stdout).sort_stats("cumulative").print_stats(top)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    doc = run(args)
    print_report(doc, args.cprofile)
    doc.pop("cprofile", None)
    write_json(args.json, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
