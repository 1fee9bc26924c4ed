"""GGUF checkpoints: dequantization against the format's block layouts, the q/k row order,
config and tokenizer from the metadata, greedy parity with transformers on the same file, the
derived-directory cache, and the errors for files the engine cannot run.

Every file here is written by the test (tests/gguf_files.py) from a tiny random Llama; the cache
lives in a temporary directory. The real model (SmolLM2) is in test_smollm2.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gguf_files import (GGUF_LAYER_NAMES, GGUF_NAMES, K_QUANTS, llama_cpp_unpermute, spec_dequantize,
                        write_tiny_llama_gguf)
from paged_engine import LLM, SamplingParams
from paged_engine.config import EngineConfig
from paged_engine.model_executor import gguf_checkpoint
from paged_engine.model_executor.gguf_checkpoint import SUPPORTED_GGUF_TYPES, gguf_model_dir

HF_NAMES = {g: hf for hf, g in GGUF_NAMES.items()}
LAYER_NAMES = {g: hf for hf, g in GGUF_LAYER_NAMES.items()}
PROMPT_IDS = [5, 77, 190, 23, 301, 8, 42]


def hf_name(gguf_name: str) -> str:
    if gguf_name in HF_NAMES:
        return HF_NAMES[gguf_name]
    _, layer, part, _ = gguf_name.split(".")
    return f"model.layers.{layer}.{LAYER_NAMES[part]}.weight"


@pytest.fixture(scope="module", autouse=True)
def isolated_cache(tmp_path_factory):
    """Everything this module derives goes to a temporary cache, not the user's."""
    with pytest.MonkeyPatch.context() as mp:
        cache = tmp_path_factory.mktemp("gguf-cache")
        mp.setenv("PAGED_TRITON_CACHE", str(cache))
        yield cache


@pytest.fixture(scope="module")
def hf_dir(make_model) -> str:
    """A tiny Llama whose rows divide into 256-element super-blocks (hidden 256, GQA 4/2 heads,
    untied head: the lm_head path SmolLM2's tied embeddings do not take)."""
    return make_model("llama", "byte_level", hidden_size=256, num_heads=4, num_kv_heads=2,
                      intermediate_size=512, num_layers=2, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def gguf_file(hf_dir, tmp_path_factory):
    """gguf_file(type_name, **write kwargs) -> (path, what was written); one file per arguments."""
    made: dict = {}

    def make(type_name: str, **kwargs):
        key = (type_name, json.dumps(kwargs, sort_keys=True))
        if key not in made:
            d = tmp_path_factory.mktemp(f"gguf-{type_name}")
            path = d / f"tiny-{type_name}.gguf"
            made[key] = (str(path), write_tiny_llama_gguf(path, hf_dir, type_name, **kwargs))
        return made[key]

    return make


def derived_tensors(model_dir: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(model_dir, "model.safetensors"))


def hf_greedy(model, prompt_ids: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False)
    return out[0, len(prompt_ids):].tolist()


# --- the weights ---------------------------------------------------------------------------------

@pytest.mark.parametrize("type_name", SUPPORTED_GGUF_TYPES)
def test_dequantized_weights_match_the_format_spec(type_name, gguf_file, hf_dir):
    """Every tensor of the derived checkpoint equals the block-layout reference dequantization of
    the bytes written, with llama.cpp's q/k row permutation undone."""
    path, written = gguf_file(type_name)
    cfg = json.loads(Path(hf_dir, "config.json").read_text())
    got = derived_tensors(gguf_model_dir(path, "float32"))
    assert set(got) == {hf_name(n) for n in written}
    for name, (t, raw) in written.items():
        shape = tuple(got[hf_name(name)].shape)
        assert t == ("F32" if len(shape) == 1 else type_name)  # norms stay F32
        expected = spec_dequantize(raw, t, shape)
        if ".attn_q." in name:
            expected = llama_cpp_unpermute(expected, cfg["num_attention_heads"])
        elif ".attn_k." in name:
            expected = llama_cpp_unpermute(expected, cfg["num_key_value_heads"])
        actual = got[hf_name(name)].double().numpy()
        assert np.isfinite(expected).all()
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max(),
                                   err_msg=f"{type_name}: {name}")


def test_f32_gguf_holds_exactly_the_original_weights(gguf_file, hf_dir):
    """Permuted by the converter and un-permuted by the loader, F32 weights come back bit-exact."""
    from safetensors.torch import load_file

    path, _ = gguf_file("F32")
    got = derived_tensors(gguf_model_dir(path, "float32"))
    original = load_file(os.path.join(hf_dir, "model.safetensors"))
    assert set(got) == set(original)
    for name, tensor in original.items():
        assert torch.equal(got[name], tensor.float()), name


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0", "Q5_1"])
def test_quantized_weights_stay_near_the_original(type_name, gguf_file, hf_dir):
    """A sanity check of the writer: block quantization keeps each weight within its error."""
    from safetensors.torch import load_file

    path, _ = gguf_file(type_name)
    got = derived_tensors(gguf_model_dir(path, "float32"))
    original = load_file(os.path.join(hf_dir, "model.safetensors"))
    bound = {"Q8_0": 0.02, "Q4_0": 0.2, "Q5_1": 0.1}[type_name]
    for name, tensor in original.items():
        err = (got[name] - tensor.float()).abs().max() / tensor.float().abs().max()
        assert err < bound, (name, float(err))


# --- config, tokenizer, generation ------------------------------------------------------------------

def test_config_and_tokenizer_come_from_the_metadata(gguf_file, hf_dir):
    from transformers import AutoConfig, AutoTokenizer

    path, _ = gguf_file("F16")
    config = EngineConfig(model=path, device="cpu")
    assert config.gguf_file == os.path.realpath(path)
    original = AutoConfig.from_pretrained(hf_dir)
    got = config.hf_config
    assert got.architectures == ["LlamaForCausalLM"]
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "vocab_size", "max_position_embeddings", "tie_word_embeddings"):
        assert getattr(got, key) == getattr(original, key), key
    assert got.rms_norm_eps == pytest.approx(original.rms_norm_eps)
    # transformers' tokenizer for the same file: the engine must tokenize exactly as it does.
    folder, name = os.path.split(path)
    reference = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    ours = AutoTokenizer.from_pretrained(config.tokenizer)
    for text in ["Hello world! Hello, world.", "日本語のテキスト 😀 café", "  double  spaces\tand\n",
                 "<|begin_of_text|>special"]:
        assert ours.encode(text) == reference.encode(text), text
    messages = [{"role": "user", "content": "Hello there"}]
    assert ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _engine_greedy(model: str, n: int = 10) -> list[int]:
    """The engine's n greedy tokens after PROMPT_IDS, from a .gguf file or its directory."""
    llm = LLM(model, device="cpu", dtype="float32", num_kv_blocks=32, max_model_len=256)
    try:
        out = llm.generate([PROMPT_IDS], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
    finally:
        llm.shutdown()
    return list(out[0].outputs[0].token_ids)


@pytest.mark.parametrize("type_name", ["F16", "Q8_0", "Q4_K", "Q6_K"])
def test_greedy_tokens_match_transformers_on_the_same_file(type_name, gguf_file):
    from transformers import AutoModelForCausalLM

    path, _ = gguf_file(type_name)
    folder, name = os.path.split(path)
    reference = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    expected = hf_greedy(reference, PROMPT_IDS, 10)
    assert _engine_greedy(path) == expected


def test_f32_gguf_generates_what_the_original_model_does(gguf_file, hf_dir):
    from transformers import AutoModelForCausalLM

    path, _ = gguf_file("F32")
    expected = hf_greedy(AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32),
                         PROMPT_IDS, 10)
    assert _engine_greedy(os.path.dirname(path)) == expected  # the directory holding the one .gguf


# --- the cache ------------------------------------------------------------------------------------

def test_second_start_uses_the_cache(gguf_file, monkeypatch):
    path, _ = gguf_file("Q4_1")
    first = gguf_model_dir(path, "float32")

    def no_rebuild(*args, **kwargs):
        raise AssertionError("derived again")

    monkeypatch.setattr(gguf_checkpoint, "_dequantized_state_dict", no_rebuild)
    monkeypatch.setattr(gguf_checkpoint, "check_gguf_file", no_rebuild)
    assert gguf_model_dir(path, "float32") == first
    assert EngineConfig(model=path, device="cpu").model == first


def test_changed_file_or_dtype_is_derived_anew(gguf_file, isolated_cache):
    path, _ = gguf_file("Q8_0")
    f32 = gguf_model_dir(path, "float32")
    bf16 = gguf_model_dir(path, "bfloat16")
    assert bf16 != f32
    assert all(t.dtype == torch.bfloat16 for t in derived_tensors(bf16).values())
    assert json.loads(Path(bf16, "config.json").read_text())["torch_dtype"] == "bfloat16"
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    again = gguf_model_dir(path, "float32")
    assert again != f32 and Path(again, "model.safetensors").exists()
    leftovers = [p.name for p in Path(isolated_cache, "gguf").iterdir() if ".tmp-" in p.name]
    assert leftovers == []


def test_failed_derivation_leaves_nothing_behind(gguf_file, monkeypatch, isolated_cache):
    path, _ = gguf_file("Q5_0")

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(gguf_checkpoint, "_dequantized_state_dict", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        gguf_model_dir(path, "float16")
    entries = [p.name for p in Path(isolated_cache, "gguf").iterdir()
               if p.name.startswith("tiny-Q5_0") and not p.name.endswith(".lock")]
    assert entries and not any(n.endswith("-float16") or ".tmp-" in n for n in entries), entries


def test_two_processes_starting_at_once_see_one_complete_directory(gguf_file, isolated_cache):
    """Both derive or wait for the same entry; each then loads every tensor from it."""
    path, _ = gguf_file("Q4_0")
    script = (
        "import sys, os\n"
        "from safetensors.torch import load_file\n"
        "from paged_engine.model_executor.gguf_checkpoint import gguf_model_dir\n"
        "d = gguf_model_dir(sys.argv[1], 'float32')\n"
        "n = len(load_file(os.path.join(d, 'model.safetensors')))\n"
        "print(d, n)\n"
    )
    env = {**os.environ, "PAGED_TRITON_CACHE": str(isolated_cache), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", script, path], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in results]
    lines = [out.strip().splitlines()[-1] for out, _ in results]
    assert lines[0] == lines[1] and int(lines[0].split()[1]) == 2 * 9 + 3
    assert not any(".tmp-" in p.name for p in Path(isolated_cache, "gguf").iterdir())


# --- what the engine cannot run --------------------------------------------------------------------

def test_unsupported_tensor_type_names_file_tensor_type_and_supported(gguf_file):
    path, _ = gguf_file("Q8_0", tensor_types={"blk.1.ffn_up.weight": "IQ4_NL"})
    with pytest.raises(ValueError) as e:
        EngineConfig(model=path, device="cpu")
    msg = str(e.value)
    assert path in msg and "'blk.1.ffn_up.weight'" in msg and "IQ4_NL" in msg
    assert all(t in msg for t in ("Q4_K", "Q6_K", "Q8_0", "BF16"))
    assert "no matching" not in msg


def test_unknown_architecture_names_it_and_the_supported_ones(gguf_file):
    path, _ = gguf_file("F16", architecture="phi2")
    with pytest.raises(ValueError) as e:
        EngineConfig(model=path, device="cpu")
    msg = str(e.value)
    assert path in msg and "'phi2'" in msg and "llama" in msg and "qwen2" in msg


def test_not_a_gguf_several_ggufs_and_split_files(tmp_path, gguf_file):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04 not gguf")
    with pytest.raises(ValueError, match="not a GGUF file"):
        EngineConfig(model=str(junk), device="cpu")
    src, _ = gguf_file("F16")
    two = tmp_path / "two"
    two.mkdir()
    for n in ("a.gguf", "b.gguf"):
        os.symlink(src, two / n)
    with pytest.raises(ValueError, match=r"holds 2 GGUF files \(a.gguf, b.gguf\)"):
        EngineConfig(model=str(two), device="cpu")
    split = tmp_path / "model-00001-of-00003.gguf"
    os.symlink(src, split)
    with pytest.raises(ValueError, match="split GGUF checkpoints"):
        EngineConfig(model=str(split), device="cpu")
    assert not any(p.name.startswith("junk") for p in tmp_path.iterdir() if p.is_dir())


def test_launcher_checks_gguf_files_before_starting(gguf_file, tmp_path):
    from paged_engine.deploy.launcher import LaunchError, check_model_dir

    good, _ = gguf_file("F16")
    assert check_model_dir(good) == os.path.realpath(good)
    bad, _ = gguf_file("Q8_0", tensor_types={"blk.1.ffn_up.weight": "IQ4_NL"})
    with pytest.raises(LaunchError, match="IQ4_NL"):
        check_model_dir(bad)
    holder = tmp_path / "holder"
    holder.mkdir()
    os.symlink(good, holder / "m.gguf")
    assert check_model_dir(str(holder)) == os.path.realpath(good)


def _hf_dir_with_extra_tensor(src: str, dst: Path, name: str, config_update: dict | None = None):
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    tensors[name] = torch.zeros(4, 4, dtype=torch.int32)
    save_file(tensors, str(dst / "model.safetensors"))
    if config_update:
        cfg = json.loads((dst / "config.json").read_text())
        cfg.update(config_update)
        (dst / "config.json").write_text(json.dumps(cfg))


def test_quantized_tensors_without_a_declared_format_are_named(tiny_model_dir, tmp_path):
    dst = tmp_path / "gptq-ish"
    _hf_dir_with_extra_tensor(tiny_model_dir, dst, "model.layers.0.self_attn.q_proj.qweight")
    with pytest.raises(ValueError) as e:
        LLM(str(dst), device="cpu", dtype="float32", num_kv_blocks=16)
    msg = str(e.value)
    assert str(dst / "model.safetensors") in msg and "GPTQ/AWQ" in msg and "GGUF" in msg
    assert "no matching" not in msg


def test_tensor_of_another_architecture_is_named(tiny_model_dir, tmp_path):
    dst = tmp_path / "other"
    _hf_dir_with_extra_tensor(tiny_model_dir, dst, "transformer.h.0.attn.c_attn.weight")
    with pytest.raises(ValueError) as e:
        LLM(str(dst), device="cpu", dtype="float32", num_kv_blocks=16)
    msg = str(e.value)
    assert "'transformer.h.0.attn.c_attn.weight'" in msg and "LlamaForCausalLM" in msg
    assert "Qwen2ForCausalLM" in msg and "no matching" not in msg


def test_launcher_names_unsupported_checkpoint_formats(tiny_model_dir, tmp_path):
    import shutil

    from paged_engine.deploy.launcher import LaunchError, check_model_dir

    def with_quantization(name, quantization_config):
        dst = tmp_path / name
        shutil.copytree(tiny_model_dir, dst)
        cfg = json.loads((dst / "config.json").read_text())
        cfg["quantization_config"] = quantization_config
        (dst / "config.json").write_text(json.dumps(cfg))
        return str(dst)

    bnb = with_quantization("bnb", {"quant_method": "bitsandbytes", "load_in_4bit": True})
    with pytest.raises(LaunchError, match=r"quantization format 'bitsandbytes' is not supported") as e:
        check_model_dir(bnb)
    assert "gptq" in str(e.value) and "awq" in str(e.value)  # what is supported is named
    gptq3 = with_quantization("gptq3", {"quant_method": "gptq", "bits": 3, "group_size": 128})
    with pytest.raises(LaunchError, match=r"3-bit GPTQ is not supported"):
        check_model_dir(gptq3)
    bins = tmp_path / "bins"
    shutil.copytree(tiny_model_dir, bins, ignore=shutil.ignore_patterns("*.safetensors"))
    (bins / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(LaunchError) as e:
        check_model_dir(str(bins))
    assert "*.bin" in str(e.value) and "safetensors" in str(e.value) and "GGUF" in str(e.value)


def test_llama_cpp_architecture_names_of_the_supported_families_are_accepted():
    """llama.cpp names some architectures differently from transformers' model_type (gemma3 for
    gemma3_text, qwen3moe for qwen3_moe): the gguf package's own table is the reference."""
    import gguf

    from paged_engine.model_executor.gguf_checkpoint import supported_gguf_architectures

    ours = supported_gguf_architectures()
    for arch in (gguf.MODEL_ARCH.LLAMA, gguf.MODEL_ARCH.QWEN2, gguf.MODEL_ARCH.QWEN3,
                 gguf.MODEL_ARCH.QWEN3MOE, gguf.MODEL_ARCH.PHI3, gguf.MODEL_ARCH.GEMMA2,
                 gguf.MODEL_ARCH.GEMMA3):
        assert gguf.MODEL_ARCH_NAMES[arch] in ours, (gguf.MODEL_ARCH_NAMES[arch], ours)
