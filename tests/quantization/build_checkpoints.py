"""Build quantized checkpoints of a dense Hugging Face model with the formats' own tools.

Runs in the side virtual environment that `.ci/setup` makes (`.venv-quant`: llm-compressor,
compressed-tensors, auto-gptq), never in the project's (their pins conflict with it):

    .venv-quant/bin/python -P tests/quantization/build_checkpoints.py SRC OUT [NAME ...]

- compressed-tensors checkpoints come from llm-compressor's `oneshot`: round-to-nearest
  (QuantizationModifier) and GPTQ with act-order (GPTQModifier) int4/int8, FP8 per channel, per
  tensor (static activations) and in blocks.
- GPTQ-format checkpoints are packed by AutoGPTQ's own `QuantLinear.pack` (its module loaded by
  path: the package's __init__ needs an older transformers) from the integer values
  compressed-tensors' own unpacker reads out of those checkpoints, so both sides hold the same
  quantized weights.
- AWQ and transformers-FP8 checkpoints are written here from the formats' published layouts (no
  packer of theirs runs on CPU); tests/quantization/test_checkpoint_formats.py converts them back
  with compressed-tensors' own AutoAWQ converter and FP8-block dequantizer to check them.

Only the tensors of quantized modules change between a source compressed-tensors checkpoint and
a derived one, so transformers loading the compressed-tensors checkpoint is the reference for
both.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import torch

# Calibration text for the GPTQ and static-FP8 runs: random token ids are enough for a random model.
CALIBRATION_SAMPLES, CALIBRATION_LEN = 8, 64
GROUP = 64


def _int_scheme(bits: int, symmetric: bool, strategy: str, group_size: int | None, actorder=None) -> dict:
    weights = {"num_bits": bits, "type": "int", "symmetric": symmetric, "strategy": strategy}
    if group_size is not None:
        weights["group_size"] = group_size
    if actorder is not None:
        weights["actorder"] = actorder
    return {"group_0": {"targets": ["Linear"], "weights": weights}}


# name -> (modifier, its arguments, needs calibration data)
CT_RECIPES = {
    "ct-w4a16-g64": ("rtn", dict(config_groups=_int_scheme(4, True, "group", GROUP)), False),
    "ct-w4a16-g64-asym": ("rtn", dict(config_groups=_int_scheme(4, False, "group", GROUP)), False),
    "ct-w8a16-channel": ("rtn", dict(config_groups=_int_scheme(8, True, "channel", None)), False),
    # llm-compressor's act-order GPTQ; since 0.14 it keeps groups contiguous (actorder "weight", no g_idx).
    "ct-gptq-w4a16-g64": ("gptq", dict(config_groups=_int_scheme(4, True, "group", GROUP, "weight")), True),
    "ct-fp8-dynamic": ("rtn", dict(scheme="FP8_DYNAMIC"), False),
    "ct-fp8-static": ("rtn", dict(scheme="FP8"), True),
    "ct-fp8-block": ("rtn", dict(scheme="FP8_BLOCK"), False),
}
# name -> (source compressed-tensors checkpoint, converter)
DERIVED = {
    "gptq-w4-g64-sym": ("ct-w4a16-g64", "gptq_v1"),
    "gptq-w4-g64-asym": ("ct-w4a16-g64-asym", "gptq_v1"),
    "gptq-w4-g64-asym-v2": ("ct-w4a16-g64-asym", "gptq_v2"),
    "gptq-w4-g64-gptq": ("ct-gptq-w4a16-g64", "gptq_v1"),
    "gptq-w4-g64-actorder": ("ct-w4a16-g64-gidx", "gptq_v1"),
    "gptq-w8-channel": ("ct-w8a16-channel", "gptq_v1"),
    "awq-w4-g64": ("ct-w4a16-g64-asym", "awq"),
    "fp8-block": ("ct-fp8-block", "fp8_block"),
    "fp8-tensor-static": ("ct-fp8-static", "fp8_tensor"),
}
# Act-order with a g_idx (groups scattered over the input features), as GPTQ's desc_act and older
# llm-compressor releases write it: llm-compressor quantizes a copy of the model whose weights'
# input columns are permuted; putting the columns back gives each input feature the group its
# permuted position had (g_idx). The dense model of the dequantized weights is the reference.
ACT_ORDER = ("ct-w4a16-g64-gidx", "dense-w4a16-g64-gidx")
# Dense models of compressed-tensors checkpoints, dequantized by compressed-tensors' own unpacker
# and dequantize: transformers 5.24 with compressed-tensors 0.20 cannot load asymmetric
# pack-quantized checkpoints (it expects their packed zero points unpacked), so these are the
# reference there.
DENSE_REFERENCES = {"dense-w4a16-g64-asym": "ct-w4a16-g64-asym"}
ALL = list(CT_RECIPES) + list(DERIVED) + list(ACT_ORDER) + list(DENSE_REFERENCES)


def _calibration(tokenizer_vocab: int):
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, tokenizer_vocab, (CALIBRATION_SAMPLES, CALIBRATION_LEN), generator=g)
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})


def build_ct(src: Path, out: Path, name: str) -> None:
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from transformers import AutoModelForCausalLM

    kind, kwargs, calibrate = CT_RECIPES[name]
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    modifier = (GPTQModifier if kind == "gptq" else QuantizationModifier)(ignore=["lm_head"], **kwargs)
    dataset = _calibration(model.config.vocab_size) if calibrate else None
    oneshot(model=model, recipe=modifier, dataset=dataset,
            num_calibration_samples=CALIBRATION_SAMPLES if calibrate else 512,
            max_seq_length=CALIBRATION_LEN, pipeline="basic" if calibrate else "datafree")
    model.save_pretrained(str(out), save_compressed=True)
    _copy_tokenizer(src, out)


def _copy_tokenizer(src: Path, out: Path) -> None:
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "generation_config.json"):
            shutil.copy(f, out / f.name)


def _load(ckpt: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def _quantized_modules(tensors) -> list[str]:
    return sorted({n[: -len(".weight_packed")] for n in tensors if n.endswith(".weight_packed")} |
                  {n[: -len(".weight_scale")] for n in tensors if n.endswith(".weight_scale")})


def _auto_gptq_quant_linear():
    """AutoGPTQ's QuantLinear, its file loaded alone (its package's __init__ needs transformers 4)."""
    spec = importlib.util.find_spec("auto_gptq")
    path = Path(spec.submodule_search_locations[0]) / "nn_modules" / "qlinear" / "qlinear_cuda.py"
    module_spec = importlib.util.spec_from_file_location("auto_gptq_qlinear_cuda", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.QuantLinear


def _ct_int_module(tensors, module: str, weights_args: dict):
    """(signed int8 values [N, K], scale [N, G], signed zero point [N, G] or None, g_idx or None)
    read by compressed-tensors' own unpacker."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    bits = weights_args["num_bits"]
    shape = tuple(int(v) for v in tensors[f"{module}.weight_shape"])
    q = unpack_from_int32(tensors[f"{module}.weight_packed"], bits, torch.Size(shape))
    scale = tensors[f"{module}.weight_scale"]
    zp = tensors.get(f"{module}.weight_zero_point")
    if zp is not None:
        zp = unpack_from_int32(zp, bits, torch.Size((shape[0], scale.shape[1])), packed_dim=0)
    return q, scale, zp, tensors.get(f"{module}.weight_g_idx")


def convert_gptq(src_ckpt: Path, out: Path, v2: bool) -> None:
    QuantLinear = _auto_gptq_quant_linear()
    config = json.loads((src_ckpt / "config.json").read_text())
    qcfg = config["quantization_config"]
    (weights_args,) = [g["weights"] for g in qcfg["config_groups"].values()]
    bits = weights_args["num_bits"]
    group_size = weights_args.get("group_size") if weights_args["strategy"] == "group" else -1
    tensors = _load(src_ckpt)
    result = {n: t for n, t in tensors.items() if not n.startswith(tuple(f"{m}." for m in _quantized_modules(tensors)))}
    actorder = False
    for module in _quantized_modules(tensors):
        q, scale, zp, g_idx = _ct_int_module(tensors, module, weights_args)
        N, K = q.shape
        offset = 1 << (bits - 1)
        zeros_unsigned = (zp.to(torch.int32) + offset) if zp is not None else torch.full_like(scale, offset, dtype=torch.int32)
        groups = g_idx.long() if g_idx is not None else torch.arange(K) // (group_size if group_size != -1 else K)
        # The dense weight GPTQ's packer expects: (q - zero) * scale, with unsigned q and zero.
        q_unsigned = q.to(torch.int32) + offset
        w = (q_unsigned - zeros_unsigned[:, groups]).to(torch.float32) * scale[:, groups].float()
        linear = torch.nn.Linear(K, N, bias=False)
        linear.weight.data = w
        ql = QuantLinear(bits, group_size, K, N, bias=False, weight_dtype=torch.float32)
        ql.pack(linear, scale.float(), zeros_unsigned.to(torch.float32),
                g_idx.to(torch.int32) if g_idx is not None else None)
        if g_idx is not None:
            actorder = True
        qzeros = ql.qzeros
        if v2:
            # gptq_v2 keeps the zero points as they are: undo v1's "minus one" word by word.
            qzeros = _repack_plus_one(qzeros, bits)
        result[f"{module}.qweight"] = ql.qweight.contiguous()
        result[f"{module}.qzeros"] = qzeros.contiguous()
        result[f"{module}.scales"] = ql.scales.contiguous()
        result[f"{module}.g_idx"] = ql.g_idx.to(torch.int32).contiguous()
    config["quantization_config"] = {
        "quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": actorder,
        "sym": zp is None, "checkpoint_format": "gptq_v2" if v2 else "gptq", "lm_head": False,
        "static_groups": False, "true_sequential": True, "damp_percent": 0.01,
    }
    _write(out, src_ckpt, config, result)


def _repack_plus_one(qzeros: torch.Tensor, bits: int) -> torch.Tensor:
    pack = 32 // bits
    mask = (1 << bits) - 1
    words = qzeros.to(torch.int64) & 0xFFFFFFFF
    out = torch.zeros_like(words)
    for j in range(pack):
        v = ((words >> (bits * j)) & mask) + 1
        if bool((v > mask).any()):
            raise ValueError("a v1 zero point of 2**bits - 1 has no v2 encoding")
        out |= v << (bits * j)
    return (out - ((out >> 31) << 32)).to(torch.int32)


# AWQ's GEMM packing: slot i of a word holds output column ORDER[i] of its eight.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def _awq_pack(values: torch.Tensor) -> torch.Tensor:
    """Unsigned 4-bit ``[rows, cols]`` -> int32 ``[rows, cols / 8]`` in AWQ's interleaved order."""
    rows, cols = values.shape
    v = values.to(torch.int64).view(rows, cols // 8, 8)
    word = torch.zeros(rows, cols // 8, dtype=torch.int64)
    for slot, column in enumerate(AWQ_ORDER):
        word |= v[:, :, column] << (4 * slot)
    return (word - ((word >> 31) << 32)).to(torch.int32)


def convert_awq(src_ckpt: Path, out: Path) -> None:
    config = json.loads((src_ckpt / "config.json").read_text())
    (weights_args,) = [g["weights"] for g in config["quantization_config"]["config_groups"].values()]
    assert weights_args["num_bits"] == 4 and weights_args["strategy"] == "group"
    group_size = weights_args["group_size"]
    tensors = _load(src_ckpt)
    modules = _quantized_modules(tensors)
    result = {n: t for n, t in tensors.items() if not n.startswith(tuple(f"{m}." for m in modules))}
    for module in modules:
        q, scale, zp, _ = _ct_int_module(tensors, module, weights_args)
        iweight = (q.to(torch.int32) + 8).t().contiguous()  # [K, N] unsigned
        izeros = (zp.to(torch.int32) + 8).t().contiguous() if zp is not None else torch.full(
            (scale.shape[1], scale.shape[0]), 8, dtype=torch.int32)  # [G, N]
        result[f"{module}.qweight"] = _awq_pack(iweight)
        result[f"{module}.qzeros"] = _awq_pack(izeros)
        result[f"{module}.scales"] = scale.t().contiguous()
    config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group_size,
                                     "zero_point": True, "version": "gemm", "modules_to_not_convert": None}
    _write(out, src_ckpt, config, result)


def convert_fp8(src_ckpt: Path, out: Path, block: bool) -> None:
    config = json.loads((src_ckpt / "config.json").read_text())
    (group,) = config["quantization_config"]["config_groups"].values()
    tensors = _load(src_ckpt)
    result = {}
    for name, t in tensors.items():
        if block and name.endswith(".weight_scale"):
            result[name[: -len("weight_scale")] + "weight_scale_inv"] = t
        elif name.endswith(".weight_scale") or name.endswith(".input_scale"):
            result[name] = t.reshape(())  # AutoFP8 stores scalars
        else:
            result[name] = t
    qcfg = {"quant_method": "fp8", "activation_scheme": "dynamic" if block else "static",
            "modules_to_not_convert": ["lm_head"]}
    if block:
        qcfg["weight_block_size"] = list(group["weights"]["block_structure"])
    config["quantization_config"] = qcfg
    _write(out, src_ckpt, config, result)


def _write(out: Path, src_ckpt: Path, config: dict, tensors: dict) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    _copy_tokenizer(src_ckpt, out)


def _permutation(k: int) -> torch.Tensor:
    return torch.randperm(k, generator=torch.Generator().manual_seed(1000 + k))


def build_permuted_source(src: Path, out: Path) -> None:
    """The dense model with each linear weight's input columns permuted (a quantization vehicle only)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            module.weight.data = module.weight.data[:, _permutation(module.in_features)].contiguous()
    model.save_pretrained(str(out))
    _copy_tokenizer(src, out)


def build_act_order(src: Path, out_root: Path) -> None:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    vehicle_src, vehicle = out_root / ".permuted-dense", out_root / ".permuted-ct"
    if not (vehicle / "config.json").exists():
        shutil.rmtree(vehicle_src, ignore_errors=True)
        shutil.rmtree(vehicle, ignore_errors=True)
        build_permuted_source(src, vehicle_src)
        build_ct(vehicle_src, vehicle, "ct-w4a16-g64")
    config = json.loads((vehicle / "config.json").read_text())
    (group,) = config["quantization_config"]["config_groups"].values()
    args = QuantizationArgs(**{k: v for k, v in group["weights"].items() if v is not None})
    tensors = _load(vehicle)
    modules = _quantized_modules(tensors)
    ct = {n: t for n, t in tensors.items() if not n.startswith(tuple(f"{m}." for m in modules))}
    dense = dict(ct)
    for module in modules:
        q_perm, scale, zp, _ = _ct_int_module(tensors, module, group["weights"])
        K = q_perm.shape[1]
        inverse = torch.argsort(_permutation(K))
        # Original input feature k sat at permuted position inverse[k].
        ct[f"{module}.weight_packed"] = pack_to_int32(q_perm[:, inverse].contiguous(), 4)
        ct[f"{module}.weight_scale"] = scale
        ct[f"{module}.weight_g_idx"] = (inverse // GROUP).to(torch.int32)
        ct[f"{module}.weight_shape"] = tensors[f"{module}.weight_shape"]
        dense[f"{module}.weight"] = dequantize(q_perm, scale, zp, args, dtype=torch.float32)[:, inverse].contiguous()
    group["weights"]["actorder"] = "group"
    _write(out_root / ".ct-w4a16-g64-gidx.tmp", vehicle, config, ct)
    dense_config = {k: v for k, v in config.items() if k != "quantization_config"}
    _write(out_root / ".dense-w4a16-g64-gidx.tmp", vehicle, dense_config, dense)
    for name in ACT_ORDER:
        os.replace(out_root / f".{name}.tmp", out_root / name)


def build_dense_reference(ct_ckpt: Path, out: Path) -> None:
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    config = json.loads((ct_ckpt / "config.json").read_text())
    (group,) = config.pop("quantization_config")["config_groups"].values()
    args = QuantizationArgs(**{k: v for k, v in group["weights"].items() if v is not None})
    tensors = _load(ct_ckpt)
    modules = _quantized_modules(tensors)
    dense = {n: t for n, t in tensors.items() if not n.startswith(tuple(f"{m}." for m in modules))}
    for module in modules:
        q, scale, zp, _ = _ct_int_module(tensors, module, group["weights"])
        dense[f"{module}.weight"] = dequantize(q, scale, zp, args, dtype=torch.float32).contiguous()
    _write(out, ct_ckpt, config, dense)


def build(src: Path, out_root: Path, names: list[str]) -> None:
    for name in names:
        target = out_root / name
        if (target / "config.json").exists():
            continue
        tmp = out_root / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        if name in ACT_ORDER:
            build_act_order(src, out_root)
            print(f"built {target}", flush=True)
            continue
        if name in CT_RECIPES:
            build_ct(src, tmp, name)
        elif name in DENSE_REFERENCES:
            build(src, out_root, [DENSE_REFERENCES[name]])
            build_dense_reference(out_root / DENSE_REFERENCES[name], tmp)
        else:
            source, how = DERIVED[name]
            build(src, out_root, [source])
            if how.startswith("gptq"):
                convert_gptq(out_root / source, tmp, v2=how == "gptq_v2")
            elif how == "awq":
                convert_awq(out_root / source, tmp)
            else:
                convert_fp8(out_root / source, tmp, block=how == "fp8_block")
        os.replace(tmp, target)
        print(f"built {target}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", type=Path, help="dense Hugging Face model directory")
    p.add_argument("out", type=Path, help="directory to hold one subdirectory per checkpoint")
    p.add_argument("names", nargs="*", help=f"checkpoints to build (default: all of {ALL})")
    args = p.parse_args(argv)
    unknown = [n for n in args.names if n not in ALL]
    if unknown:
        p.error(f"unknown checkpoints {unknown}; known: {ALL}")
    args.out.mkdir(parents=True, exist_ok=True)
    build(args.src, args.out, args.names or ALL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
