"""Tensor parallelism: the per-step cost of N ranks against one, measured in alternation.

    python -m benchmarks.tp [--tp 2] [--rounds 3] [--batch-sizes 1,8] [--decode-steps 32]
                            [--prefill-tokens 256] [--json PATH]

On CPU (gloo) this measures what tensor parallelism adds to a step: the batch broadcast (timed
inside the executor, with its pickled bytes) and the collectives (two all-reduces per layer,
the embedding's, the logits gather), timed on rank 0 around every torch.distributed call, so
they include waiting for the slower rank. Every rank, the single one included, runs
`--threads-per-rank` threads (default 1: on a small shared machine, intra-op threads that wait
for each other would swamp what is measured). One engine per size stays up for the whole run;
each round times both, one after the other, so a load change on a shared machine hits both
alike. Reported: ms per prefill step and per decode step at each batch size, per size, the
ratio tp/1 per round, and the broadcast and collective ms per step.

The model is a random-weight Llama written here (`--hidden-size` etc.; heads and MLP divide by
--tp). On GPUs (more than one) the W2 throughput run compares sizes instead:
`python -m benchmarks.throughput --workload W2 --tensor-parallel-size 2 --json w2-tp2.json`
against the same without it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import tempfile
import time

import torch

from paged_engine import EngineConfig, LLMEngine, SamplingParams


def _engine(model: str, tp: int, args) -> LLMEngine:
    return LLMEngine(EngineConfig(model=model, device="cpu", dtype="float32", block_size=16,
                                  num_kv_blocks=args.num_kv_blocks, max_model_len=1024,
                                  max_num_seqs=max(args.batch_sizes), enforce_eager=True,
                                  max_num_batched_tokens=max(1024, args.prefill_tokens),
                                  tensor_parallel_size=tp, enable_prefix_caching=False))


def _prefill_ms(engine: LLMEngine, n: int, tag: str) -> float:
    engine.add_request(tag, prompt_token_ids=[(7 * i) % 300 + 3 for i in range(n)],
                       params=SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    t0 = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    return (time.perf_counter() - t0) * 1e3


def _decode_ms(engine: LLMEngine, batch_size: int, steps: int, tag: str) -> float:
    params = SamplingParams(max_tokens=steps + 1, temperature=0.0, ignore_eos=True)
    for i in range(batch_size):
        engine.add_request(f"{tag}-{i}", prompt_token_ids=[3 + i, 5, 7, 11, 13, 17, 19, 23], params=params)
    engine.step()  # the prefills
    t0 = time.perf_counter()
    n = 0
    while engine.has_unfinished_requests():
        engine.step()
        n += 1
    return (time.perf_counter() - t0) * 1e3 / n


class CollectiveTimer:
    """Time spent in torch.distributed's all_reduce / gather / all_gather in this process."""

    def __init__(self):
        import torch.distributed as dist

        self.seconds = 0.0
        self.calls = 0
        self._originals = {name: getattr(dist, name) for name in ("all_reduce", "gather", "all_gather")}
        for name, fn in self._originals.items():
            setattr(dist, name, self._timed(fn))

    def restore(self) -> None:
        import torch.distributed as dist

        for name, fn in self._originals.items():
            setattr(dist, name, fn)

    def _timed(self, fn):
        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.seconds += time.perf_counter() - t0
                self.calls += 1
        return timed


def _measure(engine: LLMEngine, tp: int, args, tag: str, timer: CollectiveTimer) -> dict:
    torch.set_num_threads(args.threads_per_rank)
    ex = engine.executor
    before = (getattr(ex, "broadcast_s", 0.0), getattr(ex, "broadcast_bytes", 0), getattr(ex, "num_steps", 0),
              timer.seconds, timer.calls)
    out = {"prefill_ms": _prefill_ms(engine, args.prefill_tokens, f"{tag}-p")}
    for b in args.batch_sizes:
        out[f"decode_b{b}_ms"] = _decode_ms(engine, b, args.decode_steps, f"{tag}-d{b}")
    if tp > 1:
        steps = ex.num_steps - before[2]
        out["broadcast_ms_per_step"] = (ex.broadcast_s - before[0]) * 1e3 / steps
        out["broadcast_bytes_per_step"] = (ex.broadcast_bytes - before[1]) / steps
        out["collective_ms_per_step"] = (timer.seconds - before[3]) * 1e3 / steps
        out["collectives_per_step"] = (timer.calls - before[4]) / steps
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.tp", description=__doc__.split("\n\n")[0])
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--prefill-tokens", type=int, default=256)
    p.add_argument("--hidden-size", type=int, default=1024)
    p.add_argument("--num-layers", type=int, default=8)
    p.add_argument("--num-heads", type=int, default=16)
    p.add_argument("--num-kv-heads", type=int, default=8)
    p.add_argument("--intermediate-size", type=int, default=2816)
    p.add_argument("--num-kv-blocks", type=int, default=256)
    p.add_argument("--threads-per-rank", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    args.batch_sizes = [int(x) for x in args.batch_sizes.split(",")]
    from paged_engine.deploy.tiny_model import make_tiny_model

    with tempfile.TemporaryDirectory(prefix="bench-tp-") as tmp:
        model = make_tiny_model(tmp, hidden_size=args.hidden_size, num_layers=args.num_layers,
                                num_heads=args.num_heads, num_kv_heads=args.num_kv_heads,
                                intermediate_size=args.intermediate_size)
        default_threads = torch.get_num_threads()
        saved_env = os.environ.get("PAGED_ENGINE_THREADS_PER_RANK")
        os.environ["PAGED_ENGINE_THREADS_PER_RANK"] = str(args.threads_per_rank)  # the workers'
        timer = CollectiveTimer()
        engines = {}
        try:
            engines[1] = _engine(model, 1, args)
            engines[args.tp] = _engine(model, args.tp, args)
            gc.collect()
            for tp, engine in engines.items():  # warm-up, untimed
                _measure(engine, tp, argparse.Namespace(**{**vars(args), "decode_steps": 2}), f"w{tp}", timer)
            rounds = []
            for r in range(args.rounds):
                row = {tp: _measure(engine, tp, args, f"r{r}-{tp}", timer) for tp, engine in engines.items()}
                rounds.append(row)
                ratios = {k: row[args.tp][k] / row[1][k] for k in row[1]}
                tpr = row[args.tp]
                print(f"round {r}: " + ", ".join(f"{k} {row[1][k]:.1f} -> {row[args.tp][k]:.1f} "
                                                 f"(x{ratios[k]:.2f})" for k in row[1])
                      + f"; broadcast {tpr['broadcast_ms_per_step']:.3f} ms/step, "
                        f"{tpr['broadcast_bytes_per_step']:.0f} B/step; collectives "
                        f"{tpr['collective_ms_per_step']:.1f} ms/step ({tpr['collectives_per_step']:.0f} calls)",
                      flush=True)
        finally:
            for engine in engines.values():
                engine.shutdown()
            timer.restore()
            torch.set_num_threads(default_threads)
            if saved_env is None:
                os.environ.pop("PAGED_ENGINE_THREADS_PER_RANK", None)
            else:
                os.environ["PAGED_ENGINE_THREADS_PER_RANK"] = saved_env
    keys = list(rounds[0][1])
    summary = {k: {"tp1_ms_median": statistics.median(r[1][k] for r in rounds),
                   f"tp{args.tp}_ms_median": statistics.median(r[args.tp][k] for r in rounds),
                   "ratio_median": statistics.median(r[args.tp][k] / r[1][k] for r in rounds)} for k in keys}
    summary["broadcast_ms_per_step_median"] = statistics.median(r[args.tp]["broadcast_ms_per_step"] for r in rounds)
    for key in ("broadcast_bytes_per_step", "collective_ms_per_step", "collectives_per_step"):
        summary[f"{key}_median"] = statistics.median(r[args.tp][key] for r in rounds)
    doc = {"args": vars(args), "rounds": [{str(k): v for k, v in r.items()} for r in rounds], "summary": summary,
           "environment": {"cpu_count": os.cpu_count(), "machine": platform.machine(),
                           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}}
    print(json.dumps(summary, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
