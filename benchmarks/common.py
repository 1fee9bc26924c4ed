"""Shared pieces of the benchmark scripts: device, clocks, engine runs, KV accounting, reports.

Timing rule (METHOD.md): device work is asynchronous, so every host-clock reading on CUDA comes
after `torch.cuda.synchronize()`; warm-up runs are never inside a timed region.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

REPO_ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- device and clocks

def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: CUDA is not available here")
    return device


def resolve_dtype(dtype: str, device: str) -> str:
    """bf16 on GPU (the workloads' dtype); float32 on CPU, where bf16 matmuls are slow."""
    if dtype != "auto":
        return dtype
    return "float32" if device == "cpu" else "bfloat16"


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def now_s(device: str) -> float:
    """Host clock after all queued device work has finished."""
    synchronize(device)
    return time.perf_counter()


def free_device_memory(device: str) -> None:
    gc.unfreeze()  # make_engine froze the engine with the start-up heap
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def device_memory_info(device: str) -> dict[str, float]:
    if not device.startswith("cuda"):
        return {}
    import torch

    free, total = torch.cuda.mem_get_info(device)
    return {"free_gib": free / 2**30, "total_gib": total / 2**30,
            "allocated_gib": torch.cuda.memory_allocated(device) / 2**30}


def copy_bandwidth(device: str, size_bytes: int | None = None, repeats: int = 20) -> dict[str, float]:
    """Device-to-device copy bandwidth, bytes read + bytes written per second (median of repeats).

    Random data (never zeros), a size far above the L2 cache, two warm-up copies. On CUDA timed
    with events; on CPU with the host clock (a memcpy between two host buffers).
    """
    import torch

    if size_bytes is None:
        size_bytes = (1 << 30) if device.startswith("cuda") else (64 << 20)
    n = size_bytes // 4
    src = torch.empty(n, dtype=torch.int32, device=device).random_()
    dst = torch.empty_like(src)
    for _ in range(2):
        dst.copy_(src)
    times_s = []
    if device.startswith("cuda"):
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times_s.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            dst.copy_(src)
            times_s.append(time.perf_counter() - t0)
    if not torch.equal(dst, src):
        raise RuntimeError("copy bandwidth check: the copy is wrong")
    median = sorted(times_s)[len(times_s) // 2]
    moved = 2 * n * 4
    del src, dst
    return {"size_bytes": n * 4, "median_s": median, "bytes_per_s": moved / median,
            "gb_per_s": moved / median / 1e9, "repeats": repeats}


# ----------------------------------------------------------------------------- statistics

def percentile(values: Iterable[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default)."""
    v = sorted(values)
    if not v:
        return float("nan")
    pos = (len(v) - 1) * q / 100.0
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def summary(values: Iterable[float]) -> dict[str, float]:
    v = list(values)
    if not v:
        return {k: float("nan") for k in ("mean", "median", "min", "max", "p90", "p99", "std")}
    mean = sum(v) / len(v)
    return {"mean": mean, "median": percentile(v, 50), "min": min(v), "max": max(v),
            "p90": percentile(v, 90), "p99": percentile(v, 99),
            "std": math.sqrt(sum((x - mean) ** 2 for x in v) / len(v)), "n": len(v)}


# ----------------------------------------------------------------------------- KV accounting

@dataclass
class KVTracker:
    """KV-cache occupancy sampled after every engine step.

    The engine's `stats()` gives blocks used / total, not the tokens in them, so the tokens are
    counted from the scheduler's running sequences (`num_computed_tokens` = tokens whose K/V is
    in the cache). That count is exact when no block is shared between sequences; with random
    prompts and n=1 nothing is shared (`prefix_cache_hits` in the report shows it; a hit would
    make the token count exceed what the shared blocks hold, and the utilisation is then only
    an upper bound). What the engine should expose instead: a `kv_tokens_used` gauge in
    stats(), kept by the block manager (tokens held in referenced blocks, shared blocks once).

    Reported, at the step where the most blocks were in use:
      slot_utilization = tokens in cache / (used blocks * block_size)  (1 - internal fragmentation)
    and over all steps:
      cache_fill_peak  = max(tokens in cache) / (all blocks * block_size)  (how full the cache got)
    """

    block_size: int
    num_blocks: int
    peak_used_blocks: int = 0
    tokens_at_peak: int = 0
    peak_tokens: int = 0
    num_samples: int = 0
    min_slot_utilization: float = 1.0  # over steps with at least 1/4 of the cache in use

    def sample(self, engine) -> None:
        sched = engine.scheduler
        used_blocks = sched.block_manager.num_used_blocks
        tokens = 0
        for seq in sched.running:
            if seq.block_table:
                tokens += seq.num_computed_tokens
        self.num_samples += 1
        if used_blocks > self.peak_used_blocks or (
            used_blocks == self.peak_used_blocks and tokens > self.tokens_at_peak
        ):
            self.peak_used_blocks, self.tokens_at_peak = used_blocks, tokens
        self.peak_tokens = max(self.peak_tokens, tokens)
        if used_blocks * 4 >= self.num_blocks and used_blocks:
            self.min_slot_utilization = min(self.min_slot_utilization,
                                            tokens / (used_blocks * self.block_size))

    def report(self) -> dict[str, Any]:
        slots_used = self.peak_used_blocks * self.block_size
        return {
            "block_size": self.block_size,
            "kv_blocks_total": self.num_blocks,
            "peak_used_blocks": self.peak_used_blocks,
            "tokens_at_peak": self.tokens_at_peak,
            "slot_utilization_at_peak": self.tokens_at_peak / slots_used if slots_used else float("nan"),
            "cache_fill_peak": self.peak_tokens / (self.num_blocks * self.block_size),
            "blocks_used_fraction_peak": self.peak_used_blocks / self.num_blocks,
            "min_slot_utilization_over_quarter_full_steps": self.min_slot_utilization,
            "num_samples": self.num_samples,
            "note": "tokens counted from running sequences' num_computed_tokens; exact when no "
                    "blocks are shared (prefix_cache_hits == 0)",
        }


# ----------------------------------------------------------------------------- step profile

class StepProfiler:
    """Where the time of an engine step goes, from outside the engine (host clock).

    Wraps the instance's `scheduler.schedule`, `runner.run` and `_postprocess` (the three lines
    of a step) with perf_counter pairs; `runner.run` returns host token ids, so its time includes
    the device work. Steps are split into decode-only steps and steps with a prefill chunk.
    Overhead: a few perf_counter calls per step. `restore()` puts the originals back.
    """

    def __init__(self, engine):
        self.engine = engine
        self.totals_s = {"schedule": 0.0, "run_decode": 0.0, "run_prefill": 0.0, "postprocess": 0.0}
        self.counts = {"decode_steps": 0, "prefill_steps": 0, "decode_tokens": 0, "prefill_tokens": 0}
        self.max_batch_seqs = 0
        self._orig = (engine.scheduler.schedule, engine.executor.execute_model, engine._postprocess)
        sched, run, post = self._orig

        def schedule():
            t = time.perf_counter()
            out = sched()
            self.totals_s["schedule"] += time.perf_counter() - t
            return out

        def runner_run(batch):
            t = time.perf_counter()
            out = run(batch)
            dt = time.perf_counter() - t
            n_tokens = sum(s.num_tokens for s in batch.seqs)
            self.max_batch_seqs = max(self.max_batch_seqs, len(batch.seqs))
            if n_tokens == len(batch.seqs):
                self.totals_s["run_decode"] += dt
                self.counts["decode_steps"] += 1
                self.counts["decode_tokens"] += n_tokens
            else:
                self.totals_s["run_prefill"] += dt
                self.counts["prefill_steps"] += 1
                self.counts["prefill_tokens"] += n_tokens
            return out

        def postprocess(batch, runner_output):
            t = time.perf_counter()
            out = post(batch, runner_output)
            self.totals_s["postprocess"] += time.perf_counter() - t
            return out

        engine.scheduler.schedule = schedule
        engine.executor.execute_model = runner_run
        engine._postprocess = postprocess

    def restore(self) -> None:
        for obj, name in ((self.engine.scheduler, "schedule"), (self.engine.executor, "execute_model"),
                          (self.engine, "_postprocess")):
            if obj is not None and name in vars(obj):
                delattr(obj, name)

    def report(self, elapsed_s: float) -> dict[str, Any]:
        steps = self.counts["decode_steps"] + self.counts["prefill_steps"]
        accounted = sum(self.totals_s.values())
        out: dict[str, Any] = {"totals_s": dict(self.totals_s), **self.counts, "steps": steps,
                               "max_batch_seqs": self.max_batch_seqs,
                               "other_s": elapsed_s - accounted}
        if self.counts["decode_steps"]:
            out["ms_per_decode_step"] = 1e3 * self.totals_s["run_decode"] / self.counts["decode_steps"]
            out["mean_decode_batch"] = self.counts["decode_tokens"] / self.counts["decode_steps"]
        if self.counts["prefill_steps"]:
            out["ms_per_prefill_step"] = 1e3 * self.totals_s["run_prefill"] / self.counts["prefill_steps"]
        if steps:
            out["ms_schedule_per_step"] = 1e3 * self.totals_s["schedule"] / steps
            out["ms_postprocess_per_step"] = 1e3 * self.totals_s["postprocess"] / steps
        out["fractions"] = {k: v / elapsed_s for k, v in self.totals_s.items()} if elapsed_s > 0 else {}
        return out


# ----------------------------------------------------------------------------- engine runs

def make_engine(model_dir: str, device: str, dtype: str, max_model_len: int | None, args) -> Any:
    """LLMEngine with random weights (load_format="dummy") and the CLI's engine options."""
    from paged_engine import EngineConfig, LLMEngine

    kwargs: dict[str, Any] = dict(model=model_dir, device=device, dtype=dtype, load_format="dummy",
                                  max_model_len=max_model_len, seed=0)
    for name in ("block_size", "num_kv_blocks", "gpu_memory_utilization", "max_num_seqs",
                 "max_num_batched_tokens", "enforce_eager", "tensor_parallel_size"):
        value = getattr(args, name, None)
        if value is not None:
            kwargs[name] = value
    if not getattr(args, "prefix_caching", True):
        kwargs["enable_prefix_caching"] = False
    engine = LLMEngine(EngineConfig(**kwargs))
    # As paged_llm does after start-up (vLLM too): full collections would otherwise walk the
    # whole import heap, a pause every few dozen steps (benchmarks.host_overhead --gc-freeze).
    gc.collect()
    gc.freeze()
    return engine


@dataclass
class EngineRun:
    elapsed_s: float
    num_requests: int
    prompt_tokens: int
    output_tokens: int
    finish_reasons: dict[str, int]
    num_steps: int
    kv: dict[str, Any] | None
    stats: dict[str, Any] = field(default_factory=dict)
    profile: dict[str, Any] | None = None
    # per request, in submission order: (prompt tokens, output tokens)
    per_request: list[tuple[int, int]] = field(default_factory=list)
    ttft_s: list[float] = field(default_factory=list)


def run_engine(engine, requests, temperature: float, device: str, track_kv: bool = True,
               id_prefix: str = "req", record_ttft: bool = False, profile: bool = False) -> EngineRun:
    """Add every request, step until all finish; the timed region covers both (as LLM.generate).

    The KV sample after each step costs O(running sequences) of Python, small next to a step;
    `profile` adds StepProfiler's clock readings (a few per step).
    """
    from paged_engine import SamplingParams

    tracker = KVTracker(engine.config.block_size, engine.num_kv_blocks) if track_kv else None
    params = [SamplingParams(max_tokens=r.max_tokens, temperature=temperature, top_p=1.0, top_k=-1,
                             ignore_eos=True) for r in requests]
    ids = [f"{id_prefix}-{i}" for i in range(len(requests))]
    finals: dict[str, Any] = {}
    first_token_s: dict[str, float] = {}
    profiler = StepProfiler(engine) if profile else None
    start = now_s(device)
    for rid, r, p in zip(ids, requests, params):
        engine.add_request(rid, prompt_token_ids=r.prompt_token_ids, params=p)
    steps = 0
    while engine.has_unfinished_requests():
        outputs = engine.step()
        steps += 1
        if record_ttft:
            t = time.perf_counter()  # step() returned host token ids: the device work is done
            for out in outputs:
                if out.request_id not in first_token_s and out.token_ids:
                    first_token_s[out.request_id] = t - start
        for out in outputs:
            if out.finished:
                finals[out.request_id] = out
        if tracker is not None:
            tracker.sample(engine)
    elapsed = now_s(device) - start
    if profiler is not None:
        profiler.restore()
    per_request = [(len(finals[i].prompt_token_ids), len(finals[i].outputs[0].token_ids)) for i in ids]
    reasons: dict[str, int] = {}
    for i in ids:
        reason = str(finals[i].outputs[0].finish_reason)
        reasons[reason] = reasons.get(reason, 0) + 1
    return EngineRun(
        elapsed_s=elapsed, num_requests=len(requests),
        prompt_tokens=sum(p for p, _ in per_request), output_tokens=sum(o for _, o in per_request),
        finish_reasons=reasons, num_steps=steps, kv=tracker.report() if tracker else None,
        stats=engine.stats(), per_request=per_request,
        profile=profiler.report(elapsed) if profiler is not None else None,
        ttft_s=[first_token_s[i] for i in ids if i in first_token_s],
    )


def warm_up_engine(engine, device: str, prompt_lens: list[int], max_tokens: int, temperature: float) -> float:
    """Untimed requests that compile the kernels for prefill, mixed and decode steps."""
    from benchmarks.workloads import BenchRequest

    reqs = [BenchRequest([(7 * i + j) % 1000 + 1 for j in range(n)], max_tokens)
            for i, n in enumerate(prompt_lens)]
    t0 = time.perf_counter()
    run_engine(engine, reqs, temperature, device, track_kv=False, id_prefix="warmup")
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- reports

def environment(device: str) -> dict[str, Any]:
    """Where and when: device name, library versions, git commit, date (for RESULTS.md)."""
    import torch
    import transformers

    env: dict[str, Any] = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "device": device,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "host": platform.node(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        env["device_name"] = props.name
        env["device_memory_gib"] = props.total_memory / 2**30
        env["cuda"] = torch.version.cuda
    else:
        env["device_name"] = platform.processor() or platform.machine()
        env["cpu_threads"] = torch.get_num_threads()
    try:
        env["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip() or None
        env["git_dirty"] = bool(subprocess.run(
            ["git", "status", "--porcelain"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        env["git_commit"] = None
    env["TRITON_INTERPRET"] = os.environ.get("TRITON_INTERPRET")
    return env


def format_table(rows: list[list[Any]], headers: list[str]) -> str:
    def cell(x: Any) -> str:
        if isinstance(x, float):
            if math.isnan(x):
                return "-"
            return f"{x:,.3f}" if abs(x) < 100 else f"{x:,.1f}"
        return str(x)

    cells = [[cell(x) for x in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join(out)


def _json_default(o: Any) -> Any:
    if hasattr(o, "__dict__"):
        return o.__dict__
    return str(o)


def _clean(o: Any) -> Any:
    """NaN/inf -> None so the file is strict JSON."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


def write_json(path: str | None, doc: dict[str, Any]) -> None:
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(_clean(doc), f, indent=1, default=_json_default)
        f.write("\n")
    print(f"wrote {path}", file=sys.stderr)


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto | cuda | cuda:N | cpu (default auto)")
    p.add_argument("--dtype", default="auto",
                   help="auto (bfloat16 on GPU, float32 on CPU) | bfloat16 | float16 | float32")
    p.add_argument("--num-requests", type=int, default=None, help="override the workload's count")
    p.add_argument("--tiny", action="store_true",
                   help="scaled-down model and lengths for CPU smoke runs (numbers mean nothing)")
    p.add_argument("--skip-baseline", action="store_true", help="do not run the transformers baseline")
    p.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON")
    p.add_argument("--model-dir", default=None,
                   help="where to write the config-only model dir (default: a temp dir)")
    g = p.add_argument_group("engine")
    g.add_argument("--block-size", type=int, default=None)
    g.add_argument("--num-kv-blocks", type=int, default=None)
    g.add_argument("--gpu-memory-utilization", type=float, default=None)
    g.add_argument("--max-num-seqs", type=int, default=None)
    g.add_argument("--max-num-batched-tokens", type=int, default=None)
    g.add_argument("--enforce-eager", action="store_true", default=None)
    g.add_argument("--tensor-parallel-size", type=int, default=None,
                   help="ranks the model is split over (cuda:0..N-1; benchmarks.tp compares them)")
    g.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false")


def prepare_model_dir(spec, args, dtype: str) -> tuple[str, Any]:
    """Write (or reuse) the config-only model dir; returns (dir, TemporaryDirectory or None)."""
    import tempfile

    from benchmarks.model_dir import write_model_dir

    if args.model_dir:
        return write_model_dir(spec, args.model_dir, dtype), None
    tmp = tempfile.TemporaryDirectory(prefix=f"bench-{spec.name}-")
    return write_model_dir(spec, tmp.name, dtype), tmp


def setup_env() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def tiny_triton_server(prefix: str, **engine_args):
    """A started TritonServer serving the tiny random Llama (byte-level tokenizer) from a fresh
    repository under a new temporary directory (its log beside it); the serving benchmarks'."""
    import tempfile

    from paged_engine.deploy.repository import prepare_model_repository
    from paged_engine.deploy.tiny_model import make_tiny_model
    from paged_engine.deploy.tritonserver import TritonServer

    work = tempfile.mkdtemp(prefix=prefix)
    model_dir = make_tiny_model(f"{work}/model", arch="llama", tokenizer="byte_level")
    repo = prepare_model_repository(f"{work}/repo", model_dir, **engine_args)
    server = TritonServer(repo, log_file=f"{work}/server.log",
                          extra_args=["--exit-timeout-secs=1"]).start(timeout_s=600)
    return server
