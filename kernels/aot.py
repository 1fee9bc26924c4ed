"""Compile every kernel variant the engine launches for a CUDA GPU, on a machine without one:
``python -m kernels.aot [--arch 90] [--num-sms 132] [--json PATH]``.

The CPU interpreter runs the kernels' semantics but never compiles them, so a kernel can pass every
interpreter test and still fail to build for the GPU, spill registers, need more shared memory than
an SM has, miss the tensor cores, or recompile for every new batch size. This runs Triton's own
compiler (TTIR -> TTGIR -> LLVM IR -> PTX -> cubin, with the ptxas the triton wheel ships) for the
target, without a driver:

1. The launchers are called on CPU tensors with the shapes of real models (Qwen3-0.6B, Llama-3-8B,
   Qwen2-0.5B for head_dim 64 and a group of 7; Gemma-2-2B and Gemma-3-1B for head_dim 256,
   sliding-window and full layers, soft caps, Gemma's norm and gelu-tanh; Phi-3-mini-4k for
   head_dim 96, partial rotary (Phi-4-mini style) and a window on every layer; Mixtral-8x7B and
   Qwen3-30B-A3B for the fused MoE kernel; bf16, fp16, fp32; block_size 16) over a sweep of batch
   sizes, context lengths and chunk lengths, as the engine calls them; the dequant-GEMM of every
   linear layer too, for each integer layout the loader produces (``QUANT_SCHEMES``). Each launch
   is recorded instead of run.
2. Each recorded launch goes through Triton's own argument binder for the target, which computes
   the specialisation (dtypes, "divisible by 16" and "== 1" integer attributes, constexprs) and
   the compile key exactly as a launch on that GPU would. Distinct keys are distinct compiled
   variants: their number per kernel must not depend on the batch sweep.
3. Each variant is compiled; ``ptxas -v`` on its PTX gives registers, spills and the stack, the
   compiled metadata gives shared memory, and the PTX shows whether dots use tensor-core
   instructions (``mma.sync`` / ``wgmma``).

Exit status 0 when every variant compiles within the target's limits (no spills, registers and
shared memory that fit, tensor cores in the 16-bit attention kernels, and as many variants for a
sweep of one batch size as for the whole sweep), 1 otherwise. Needs no GPU; run it *without*
``TRITON_INTERPRET=1`` (the interpreter replaces the kernels with Python functions).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

import torch

from . import _utils

_ATTENTION_KERNELS = ("_paged_decode_split_kernel", "_paged_prefill_kernel")
# Kernels whose 16-bit dots must run on tensor cores.
_TENSOR_CORE_KERNELS = _ATTENTION_KERNELS + ("_fused_moe_gemm_kernel", "_wna16_gemm_kernel")
# The integer checkpoints' layouts the loader produces: (bits, group size or None per channel,
# zero points, act-order g_idx).
QUANT_SCHEMES = ((4, 128, False, False), (4, 128, True, False), (4, 128, True, True), (8, None, False, False))
BLOCK_SIZE = 16
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, d in DTYPES.items() if d == dtype)


@dataclass(frozen=True)
class ModelShape:
    name: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    qk_norm: bool
    sliding_window: int | None = None  # the window of the sliding layers
    full_layers: bool = True  # some layers attend to the whole context
    softcap: float | None = None  # attention soft cap (Gemma 2)
    gemma_norm: bool = False  # (1 + w) RMSNorm
    activation: str = "silu"  # "silu" or "gelu_tanh"
    rotary_dim: int | None = None  # partial rotary
    moe: tuple[int, int, int] | None = None  # (experts, top_k, expert intermediate)
    # dtypes swept (of those asked for); None: all. The later families skip fp16: their checkpoints
    # are bf16 and fp16 compiles the same 16-bit code (fp32 has its own tile configs).
    dtypes: tuple[str, ...] | None = None

    def attention_kinds(self) -> list[tuple[int | None, float | None]]:
        """(sliding_window, softcap) of each kind of attention layer the model has."""
        kinds = [(None, self.softcap)] if self.full_layers or self.sliding_window is None else []
        if self.sliding_window is not None:
            kinds.append((self.sliding_window, self.softcap))
        return kinds


MODELS = (
    ModelShape("Qwen3-0.6B", 16, 8, 128, 1024, 3072, qk_norm=True),
    ModelShape("Llama-3-8B", 32, 8, 128, 4096, 14336, qk_norm=False),
    ModelShape("Qwen2-0.5B", 14, 2, 64, 896, 4864, qk_norm=False),
    ModelShape("Gemma-2-2B", 8, 4, 256, 2304, 9216, qk_norm=False, sliding_window=4096, softcap=50.0,
               gemma_norm=True, activation="gelu_tanh", dtypes=("bf16", "fp32")),
    ModelShape("Gemma-3-1B", 4, 1, 256, 1152, 6912, qk_norm=True, sliding_window=512, gemma_norm=True,
               activation="gelu_tanh", dtypes=("bf16", "fp32")),
    ModelShape("Phi-3-mini-4k", 32, 32, 96, 3072, 8192, qk_norm=False, sliding_window=2047, full_layers=False,
               rotary_dim=72, dtypes=("bf16", "fp32")),
    ModelShape("Mixtral-8x7B", 32, 8, 128, 4096, 14336, qk_norm=False, moe=(8, 2, 14336), dtypes=("bf16", "fp32")),
    ModelShape("Qwen3-30B-A3B", 32, 4, 128, 2048, 6144, qk_norm=True, moe=(128, 8, 768), dtypes=("bf16", "fp32")),
)
# Decode batch sizes of the sweep: CUDA-graph buckets and odd eager sizes.
BATCH_SIZES = (1, 2, 3, 5, 8, 13, 16, 31, 64, 100, 256)
# Context lengths: 1, around a block, a few hundred, up to W1's max_model_len.
CONTEXT_LENS = (1, 15, 16, 17, 300, 1000, 4096)
# Prefill chunks: (chunk length, cached prefix length).
PREFILL_CHUNKS = ((1, 0), (7, 0), (64, 0), (65, 0), (300, 32), (1024, 3072), (4096, 0))


@dataclass
class Launch:
    kernel: str
    fn: object  # triton JITFunction
    args: tuple
    kwargs: dict
    case: str  # which model / dtype / op / sweep point launched it


@dataclass
class Variant:
    kernel: str
    case: str  # the first launch that needed this variant
    num_warps: int
    num_stages: int
    compile_s: float = 0.0
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    stack_bytes: int | None = None
    shared_bytes: int | None = None
    mma: str | None = None  # tensor-core instruction in the PTX: "wgmma", "mma.sync" or None
    problems: list[str] = field(default_factory=list)
    error: str | None = None


@contextlib.contextmanager
def record_launches(target: _utils.CaptureTarget):
    """Record ``kernel[grid](...)`` launches instead of running them; launchers accept CPU tensors
    and see ``target``'s capability and SM count meanwhile."""
    from triton.runtime.jit import JITFunction

    if _utils.interpreting():
        raise RuntimeError("paged_triton.kernels.aot compiles real kernels: run it without TRITON_INTERPRET=1")
    launches: list[Launch] = []
    case = [""]

    def run(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self.fn.__name__, self, args, kwargs, case[0]))
        return None

    saved_run, saved_target = JITFunction.run, _utils._capture
    JITFunction.run, _utils._capture = run, target
    try:
        yield launches, case
    finally:
        JITFunction.run, _utils._capture = saved_run, saved_target


def launch_model_kernels(model: ModelShape, dtype: torch.dtype, batch_sizes, case: list) -> None:
    """Call every launcher as the engine does for one model and dtype over the sweep."""
    from .activation import gelu_tanh_and_mul, silu_and_mul
    from .fused_moe import fused_moe
    from .paged_decode_attention import paged_decode_attention
    from .paged_prefill_attention import paged_prefill_attention
    from .rms_norm import rms_norm
    from .rotary_embedding import compute_cos_sin_cache, rotary_embedding
    from .store_kvcache import store_kvcache
    from .wna16_gemm import wna16_gemm

    tag = f"{model.name} {_dtype_name(dtype)}"
    h, kvh, d = model.num_heads, model.num_kv_heads, model.head_dim
    max_ctx = max(CONTEXT_LENS + tuple(p + c for c, p in PREFILL_CHUNKS))
    num_blocks = max(batch_sizes) * 2 + max_ctx // BLOCK_SIZE + 1
    k_cache = torch.empty(num_blocks, BLOCK_SIZE, kvh, d, dtype=dtype)
    v_cache = torch.empty_like(k_cache)
    cos_sin = compute_cos_sin_cache(d, 8192, 1e6, rotary_dim=model.rotary_dim)
    scale = d**-0.5
    qkv_width = (h + 2 * kvh) * d
    gemma = model.gemma_norm
    if model.moe is not None:
        num_experts, top_k, moe_i = model.moe
        w13 = torch.empty(num_experts, 2 * moe_i, model.hidden, dtype=dtype)  # never touched: no memory
        w2 = torch.empty(num_experts, model.hidden, moe_i, dtype=dtype)

    def tokens_step(n: int) -> None:
        """The per-layer ops of a step of ``n`` tokens (views of a fused qkv, like the model)."""
        case[0] = f"{tag} tokens={n}"
        x = torch.empty(n, model.hidden, dtype=dtype)
        weight = torch.empty(model.hidden, dtype=dtype)
        rms_norm(x, weight, 1e-6, unit_offset=gemma)
        rms_norm(x, weight, 1e-6, residual=torch.empty_like(x), unit_offset=gemma)
        qkv = torch.empty(n, qkv_width, dtype=dtype)
        q, k, v = qkv.split([h * d, kvh * d, kvh * d], dim=-1)
        if model.qk_norm:
            rms_norm(q.reshape(-1, d), torch.empty(d, dtype=dtype), 1e-6, unit_offset=gemma)
        q3, k3, v3 = q.view(n, h, d), k.view(n, kvh, d), v.view(n, kvh, d)
        rotary_embedding(torch.zeros(n, dtype=torch.int64), q3, k3, cos_sin)
        store_kvcache(k3, v3, k_cache, v_cache, torch.zeros(n, dtype=torch.int64))
        if model.moe is not None:
            ids = torch.zeros(n, top_k, dtype=torch.int64)  # any valid experts: only shapes matter
            fused_moe(x, w13, w2, torch.empty(n, top_k, dtype=torch.float32), ids)
        else:
            act = gelu_tanh_and_mul if model.activation == "gelu_tanh" else silu_and_mul
            act(torch.empty(n, 2 * model.intermediate, dtype=dtype))

    def quantized_linears(n: int) -> None:
        """The dequant-GEMM of every linear layer of a quantized model for a step of ``n`` tokens."""
        layers = {"qkv": (model.hidden, qkv_width), "o": (h * d, model.hidden),
                  "gate_up": (model.hidden, 2 * model.intermediate), "down": (model.intermediate, model.hidden)}
        for bits, group, zeros, act_order in QUANT_SCHEMES:
            for layer, (k, n_out) in layers.items():
                case[0] = f"{tag} wna16 w{bits} g{group} zeros={zeros} act_order={act_order} {layer} tokens={n}"
                group_size = group or k
                groups = -(-k // group_size)
                wna16_gemm(torch.empty(n, k, dtype=dtype), torch.empty(k * bits // 32, n_out, dtype=torch.int32),
                           torch.empty(groups, n_out, dtype=dtype),
                           torch.empty(groups, n_out, dtype=torch.uint8) if zeros else None,
                           torch.empty(k, dtype=torch.int32) if act_order else None, bits, group_size)

    # 33 stands for the middle tile bucket of the dequant-GEMM (17..64 rows) in the batch-1 sweep.
    for n in sorted(set(batch_sizes) | {1, 7, 33, 300, 4096}):
        tokens_step(n)
        quantized_linears(n)

    for window, softcap in model.attention_kinds():
        attn_tag = f"{tag}{f' window={window}' if window else ''}{f' softcap={softcap}' if softcap else ''}"
        for bs in batch_sizes:
            for ctx in CONTEXT_LENS:
                width = -(-ctx // BLOCK_SIZE)
                for table_width in (width, max_ctx // BLOCK_SIZE):  # eager, and the CUDA graphs' static width
                    case[0] = f"{attn_tag} decode batch={bs} context={ctx} table_width={table_width}"
                    q = torch.empty(bs, qkv_width, dtype=dtype)[:, : h * d].view(bs, h, d)
                    tables = torch.zeros(bs, table_width, dtype=torch.int32)
                    lens = torch.full((bs,), ctx, dtype=torch.int32)
                    out = torch.empty(bs, h, d, dtype=dtype)
                    paged_decode_attention(q, k_cache, v_cache, tables, lens, scale, out=out[:bs],
                                           sliding_window=window, softcap=softcap)

        for chunk, prefix in PREFILL_CHUNKS:
            for num_seqs in (1, 3):
                case[0] = f"{attn_tag} prefill seqs={num_seqs} chunk={chunk} prefix={prefix}"
                total = chunk * num_seqs
                q = torch.empty(total, qkv_width, dtype=dtype)[:, : h * d].view(total, h, d)
                tables = torch.zeros(num_seqs, -(-(chunk + prefix) // BLOCK_SIZE), dtype=torch.int32)
                cu = torch.arange(0, total + 1, chunk, dtype=torch.int32)
                lens = torch.full((num_seqs,), chunk + prefix, dtype=torch.int32)
                paged_prefill_attention(
                    q, k_cache, v_cache, tables, cu, lens, scale, out=torch.empty(total, h, d, dtype=dtype),
                    max_seqlen_q=chunk, sliding_window=window, softcap=softcap,
                )


def _binder(fn, backend):
    from triton.runtime.jit import create_function_from_signature

    return create_function_from_signature(fn.signature, fn.params, backend)


def variant_key(launch: Launch, backend) -> tuple:
    """The compile key a launch of ``launch`` would have on the target: Triton's own binder."""
    from triton import knobs

    kwargs = dict(launch.kwargs)
    kwargs["debug"] = kwargs.get("debug", launch.fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    bound_args, specialization, options = _binder(launch.fn, backend)(*launch.args, **kwargs)
    return (launch.kernel, tuple(specialization), str(options)), (kwargs, bound_args, specialization, options)


_PTXAS_INFO = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def ptxas_usage(ptx: str, arch: int) -> tuple[int, int, int, int]:
    """(registers, stack bytes, spill store bytes, spill load bytes) of the PTX's kernel."""
    from triton import knobs
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    ptxas = knobs.nvidia.ptxas.path
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run(
            [ptxas, "-v", f"--gpu-name={sm_arch_from_capability(arch)}", src, "-o", os.path.join(tmp, "k.cubin")],
            capture_output=True, text=True, check=True,
        )
    text = proc.stdout + proc.stderr
    regs, spill = _PTXAS_INFO.search(text), _PTXAS_SPILL.search(text)
    if regs is None or spill is None:
        raise RuntimeError(f"unexpected ptxas -v output:\n{text}")
    return int(regs.group(1)), int(spill.group(1)), int(spill.group(2)), int(spill.group(3))


def compile_variant(launch: Launch, packed, target, max_shared: int) -> Variant:
    import triton
    from triton.compiler import ASTSource, make_backend

    kwargs, bound_args, specialization, options = packed
    backend = make_backend(target)
    options, signature, constexprs, attrs = launch.fn._pack_args(backend, kwargs, bound_args, specialization, options)
    v = Variant(launch.kernel, launch.case, options.num_warps, options.num_stages)
    start = time.perf_counter()
    try:
        compiled = triton.compile(ASTSource(launch.fn, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
    except Exception as e:  # report every failing variant, not just the first
        v.error = f"{type(e).__name__}: {e}".strip()[:2000]
        v.problems.append("does not compile")
        return v
    v.compile_s = time.perf_counter() - start
    ptx = compiled.asm["ptx"]
    v.registers, v.stack_bytes, v.spill_stores, v.spill_loads = ptxas_usage(ptx, target.arch)
    v.shared_bytes = int(compiled.metadata.shared)
    v.mma = "wgmma" if "wgmma" in ptx else "mma.sync" if "mma.sync" in ptx else None
    threads = 32 * v.num_warps
    if v.spill_stores or v.spill_loads:
        v.problems.append(f"spills {v.spill_stores} B stored / {v.spill_loads} B loaded")
    if v.registers * threads > 65536:
        v.problems.append(f"{v.registers} registers x {threads} threads exceed the 65536 of an SM")
    if v.shared_bytes > max_shared:
        v.problems.append(f"{v.shared_bytes} B shared memory > {max_shared} B per block")
    dtype = next(a.dtype for a in launch.args if isinstance(a, torch.Tensor))  # q's: the model's dtype
    if v.kernel in _TENSOR_CORE_KERNELS and dtype != torch.float32 and v.mma is None:
        v.problems.append("16-bit dots do not use tensor cores (no mma/wgmma in the PTX)")
    return v


_pending: list = []  # (launch, packed, target, max_shared) for the compile workers


def _compile_pending(i: int) -> Variant:
    return compile_variant(*_pending[i])


def run(arch: int, num_sms: int, models, dtypes, max_shared: int, jobs: int = 1, log=print) -> dict:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)

    # Variants per kernel for a sweep of one batch size, then for the whole sweep: equal when
    # nothing recompiles as the batch size changes.
    variants_one: dict[str, set] = {}
    variants_all: dict[str, set] = {}
    first: dict[tuple, tuple[Launch, tuple]] = {}
    for model in models:
        for dtype in dtypes:
            if model.dtypes is not None and _dtype_name(dtype) not in model.dtypes:
                continue
            for sweep, into in (((BATCH_SIZES[0],), variants_one), (BATCH_SIZES, variants_all)):
                with record_launches(_utils.CaptureTarget(arch, num_sms)) as (launches, case):
                    launch_model_kernels(model, dtype, sweep, case)
                for launch in launches:
                    key, packed = variant_key(launch, backend)
                    into.setdefault(launch.kernel, set()).add(key)
                    first.setdefault(key, (launch, packed))

    log(f"{len(first)} variants to compile for cuda:{arch} ({jobs} at a time)")
    global _pending
    _pending = [(launch, packed, target, max_shared) for launch, packed in first.values()]
    try:
        if jobs > 1:
            # fork: the workers inherit the recorded launches (JIT functions do not pickle)
            ctx = multiprocessing.get_context("fork")
            with ctx.Pool(jobs) as pool:
                results = pool.map(_compile_pending, range(len(_pending)), chunksize=1)
        else:
            results = [_compile_pending(i) for i in range(len(_pending))]
    finally:
        _pending = []
    for v in results:
        status = "; ".join(v.problems) if v.problems else "ok"
        log(f"  {v.kernel:28s} warps={v.num_warps} stages={v.num_stages} regs={v.registers} "
            f"smem={v.shared_bytes} mma={v.mma or '-'} {v.compile_s:4.1f}s  {v.case}: {status}")

    growth = {
        k: (len(variants_one.get(k, ())), len(variants_all[k]))
        for k in sorted(variants_all)
    }
    problems = [f"{v.kernel} ({v.case}): {p}" for v in results for p in v.problems]
    for kernel, (one, everything) in growth.items():
        if everything != one:
            problems.append(f"{kernel}: {everything} variants over batch sizes {BATCH_SIZES}, {one} for batch 1 alone")
    return {
        "target": f"cuda:{arch}",
        "num_sms": num_sms,
        "triton": __import__("triton").__version__,
        "models": [m.name for m in models],
        "dtypes": [_dtype_name(d) for d in dtypes],
        "batch_sizes": list(BATCH_SIZES),
        "variants_per_kernel": {k: {"batch_1": a, "all_batches": b} for k, (a, b) in growth.items()},
        "variants": [asdict(v) for v in results],
        "problems": problems,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kernels.aot", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x10 (90 = H100)")
    p.add_argument("--num-sms", type=int, default=132, help="SM count the split-KV heuristic sees (H100 SXM: 132)")
    p.add_argument("--max-shared", type=int, default=232448, help="shared memory per block, bytes (sm_90: 227 KiB)")
    p.add_argument("--models", default=",".join(m.name for m in MODELS))
    p.add_argument("--dtypes", default="bf16,fp16,fp32")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes")
    p.add_argument("--json", help="write the report here")
    args = p.parse_args(argv)
    by_name = {m.name: m for m in MODELS}
    try:
        models = [by_name[n] for n in args.models.split(",")]
        dtypes = [DTYPES[n] for n in args.dtypes.split(",")]
    except KeyError as e:
        p.error(f"unknown model or dtype {e}; models: {', '.join(by_name)}; dtypes: {', '.join(DTYPES)}")
    try:
        report = run(args.arch, args.num_sms, models, dtypes, args.max_shared, jobs=args.jobs)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    print("variants per kernel (batch 1 sweep / all batch sizes):")
    for k, counts in report["variants_per_kernel"].items():
        print(f"  {k:28s} {counts['batch_1']} / {counts['all_batches']}")
    if report["problems"]:
        print(f"{len(report['problems'])} problems:")
        for prob in report["problems"]:
            print(f"  {prob}")
        return 1
    print(f"all {len(report['variants'])} variants compile for {report['target']} within its limits")
    return 0


if __name__ == "__main__":
    sys.exit(main())
