"""Tiny GGUF files for the tests, and a dequantizer written from the GGUF block layouts.

`write_tiny_llama_gguf` writes what llama.cpp's converter writes for a Llama: the tensors under
GGUF names, the q/k projection rows permuted for llama.cpp's rotary layout, the metadata keys
of the GGUF spec, and the tokenizer of a tiny Hugging Face model as `tokenizer.ggml.*`. Weights
are the HF model's (quantized with the `gguf` package's quantizers) for the types that have a
quantizer, or random blocks for the K-quants (which have none in Python).

`spec_dequantize` is independent of the code under test: it reads the block structs as ggml
defines them (ggml-common.h `block_q4_0` ... `block_q6_K`; the element order of ggml-quants.c's
reference `dequantize_row_*`), one field at a time, in float64.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# type name -> (elements per block, bytes per block)
BLOCKS = {
    "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34),
    "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144), "Q5_K": (256, 176),
    "Q6_K": (256, 210),
}
K_QUANTS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


# --- the reference dequantizer -------------------------------------------------------------------

def _half(b: np.ndarray, offset: int) -> np.ndarray:
    """The little-endian float16 at byte `offset` of every block -> float64 [num_blocks]."""
    return b[:, offset:offset + 2].copy().view("<f2")[:, 0].astype(np.float64)


def _u32(b: np.ndarray, offset: int) -> np.ndarray:
    return b[:, offset:offset + 4].copy().view("<u4")[:, 0].astype(np.int64)


def _q4_0(b, y):
    d, qs = _half(b, 0), b[:, 2:18].astype(np.int64)
    for j in range(16):
        y[:, j] = ((qs[:, j] & 0xF) - 8) * d
        y[:, j + 16] = ((qs[:, j] >> 4) - 8) * d


def _q4_1(b, y):
    d, m, qs = _half(b, 0), _half(b, 2), b[:, 4:20].astype(np.int64)
    for j in range(16):
        y[:, j] = (qs[:, j] & 0xF) * d + m
        y[:, j + 16] = (qs[:, j] >> 4) * d + m


def _q5(b, y, with_min: bool):
    d = _half(b, 0)
    m = _half(b, 2) if with_min else 0.0
    at = 4 if with_min else 2
    qh, qs = _u32(b, at), b[:, at + 4:at + 20].astype(np.int64)
    offset = 0 if with_min else 16
    for j in range(16):
        lo = (qs[:, j] & 0xF) | (((qh >> j) & 1) << 4)          # element j: bit j of qh
        hi = (qs[:, j] >> 4) | (((qh >> (j + 16)) & 1) << 4)    # element j+16: bit j+16
        y[:, j] = (lo - offset) * d + m
        y[:, j + 16] = (hi - offset) * d + m


def _q8_0(b, y):
    d, qs = _half(b, 0), b[:, 2:34].copy().view(np.int8).astype(np.int64)
    y[:] = qs * d[:, None]


def _scale_min_k4(scales: np.ndarray, j: int) -> tuple[np.ndarray, np.ndarray]:
    """The 6-bit scale and min of sub-block j of a Q4_K/Q5_K super-block (12 packed bytes)."""
    if j < 4:
        return scales[:, j] & 63, scales[:, j + 4] & 63
    sc = (scales[:, j + 4] & 0xF) | ((scales[:, j - 4] >> 6) << 4)
    mn = (scales[:, j + 4] >> 4) | ((scales[:, j] >> 6) << 4)
    return sc, mn


def _q4_k(b, y):
    d, dmin = _half(b, 0), _half(b, 2)
    scales, qs = b[:, 4:16].astype(np.int64), b[:, 16:144].astype(np.int64)
    for chunk in range(4):  # 64 elements: 32 low nibbles, then 32 high nibbles
        sc1, m1 = _scale_min_k4(scales, 2 * chunk)
        sc2, m2 = _scale_min_k4(scales, 2 * chunk + 1)
        q = qs[:, 32 * chunk:32 * chunk + 32]
        y[:, 64 * chunk:64 * chunk + 32] = (d * sc1)[:, None] * (q & 0xF) - (dmin * m1)[:, None]
        y[:, 64 * chunk + 32:64 * chunk + 64] = (d * sc2)[:, None] * (q >> 4) - (dmin * m2)[:, None]


def _q5_k(b, y):
    d, dmin = _half(b, 0), _half(b, 2)
    scales = b[:, 4:16].astype(np.int64)
    qh, qs = b[:, 16:48].astype(np.int64), b[:, 48:176].astype(np.int64)
    for chunk in range(4):
        sc1, m1 = _scale_min_k4(scales, 2 * chunk)
        sc2, m2 = _scale_min_k4(scales, 2 * chunk + 1)
        q = qs[:, 32 * chunk:32 * chunk + 32]
        lo = (q & 0xF) + 16 * ((qh >> (2 * chunk)) & 1)
        hi = (q >> 4) + 16 * ((qh >> (2 * chunk + 1)) & 1)
        y[:, 64 * chunk:64 * chunk + 32] = (d * sc1)[:, None] * lo - (dmin * m1)[:, None]
        y[:, 64 * chunk + 32:64 * chunk + 64] = (d * sc2)[:, None] * hi - (dmin * m2)[:, None]


def _q6_k(b, y):
    ql, qh = b[:, 0:128].astype(np.int64), b[:, 128:192].astype(np.int64)
    sc = b[:, 192:208].copy().view(np.int8).astype(np.int64)
    d = _half(b, 208)
    for half in range(2):  # 128 elements from 64 ql bytes, 32 qh bytes, 8 scales
        l_ = ql[:, 64 * half:64 * half + 64]
        h_ = qh[:, 32 * half:32 * half + 32]
        s_ = sc[:, 8 * half:8 * half + 8]
        out = y[:, 128 * half:128 * half + 128]
        for l in range(32):
            group = l // 16
            q1 = ((l_[:, l] & 0xF) | (((h_[:, l] >> 0) & 3) << 4)) - 32
            q2 = ((l_[:, l + 32] & 0xF) | (((h_[:, l] >> 2) & 3) << 4)) - 32
            q3 = ((l_[:, l] >> 4) | (((h_[:, l] >> 4) & 3) << 4)) - 32
            q4 = ((l_[:, l + 32] >> 4) | (((h_[:, l] >> 6) & 3) << 4)) - 32
            out[:, l] = d * s_[:, group] * q1
            out[:, l + 32] = d * s_[:, group + 2] * q2
            out[:, l + 64] = d * s_[:, group + 4] * q3
            out[:, l + 96] = d * s_[:, group + 6] * q4


def _q2_k(b, y):
    scales, qs = b[:, 0:16].astype(np.int64), b[:, 16:80].astype(np.int64)
    d, dmin = _half(b, 80), _half(b, 82)
    n, s = 0, 0
    for half in range(2):
        q = qs[:, 32 * half:32 * half + 32]
        for shift in (0, 2, 4, 6):
            for part in (slice(0, 16), slice(16, 32)):  # each 16 elements have their own scale
                sc = scales[:, s]
                s += 1
                vals = (q[:, part] >> shift) & 3
                y[:, n:n + 16] = (d * (sc & 0xF))[:, None] * vals - (dmin * (sc >> 4))[:, None]
                n += 16


def _q3_k_scales(packed: np.ndarray) -> np.ndarray:
    """The 16 signed 6-bit scales of a Q3_K super-block: low 4 bits in bytes 0-7 (low nibble for
    scales 0-7, high nibble for 8-15), high 2 bits in bytes 8-11 (2 bits per scale)."""
    out = np.empty((packed.shape[0], 16), dtype=np.int64)
    for i in range(16):
        low = packed[:, i] & 0xF if i < 8 else packed[:, i - 8] >> 4
        high = (packed[:, 8 + i % 4] >> (2 * (i // 4))) & 3
        out[:, i] = (low | (high << 4)) - 32
    return out


def _q3_k(b, y):
    hmask, qs = b[:, 0:32].astype(np.int64), b[:, 32:96].astype(np.int64)
    scales = _q3_k_scales(b[:, 96:108].astype(np.int64))
    d = _half(b, 108)
    n, s, bit = 0, 0, 0
    for half in range(2):
        q = qs[:, 32 * half:32 * half + 32]
        for shift in (0, 2, 4, 6):
            for part in (slice(0, 16), slice(16, 32)):
                low = (q[:, part] >> shift) & 3
                high_set = (hmask[:, part] >> bit) & 1  # a clear high bit subtracts 4
                y[:, n:n + 16] = (d * scales[:, s])[:, None] * (low - 4 * (1 - high_set))
                s += 1
                n += 16
            bit += 1


_DEQUANT = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": lambda b, y: _q5(b, y, False),
            "Q5_1": lambda b, y: _q5(b, y, True), "Q8_0": _q8_0, "Q2_K": _q2_k, "Q3_K": _q3_k,
            "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}


def spec_dequantize(raw: np.ndarray, type_name: str, shape: tuple[int, ...]) -> np.ndarray:
    """float64 values of a GGUF tensor's raw data (numpy shape `shape`, row-major)."""
    if type_name == "F32":
        return raw.view("<f4").astype(np.float64).reshape(shape)
    if type_name == "F16":
        return raw.view("<f2").astype(np.float64).reshape(shape)
    if type_name == "BF16":
        bits = raw.view("<u2").astype(np.uint32) << 16
        return bits.view("<f4").astype(np.float64).reshape(shape)
    elems, nbytes = BLOCKS[type_name]
    blocks = np.ascontiguousarray(raw).view(np.uint8).reshape(-1, nbytes)
    y = np.zeros((blocks.shape[0], elems), dtype=np.float64)
    _DEQUANT[type_name](blocks, y)
    return y.reshape(shape)


# --- llama.cpp's q/k layout ---------------------------------------------------------------------

def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The converter's row order for q/k: within each head, the two rotary halves interleaved
    (row 2i from the first half, row 2i+1 from the second), as llama.cpp's rope expects."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_cpp_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# --- llama.cpp's tensor names for a Llama (Hugging Face name -> GGUF name) -----------------------

GGUF_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}
GGUF_LAYER_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


# --- writing a file -------------------------------------------------------------------------------

def _random_k_blocks(type_name: str, num_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """Random super-blocks whose float16 scales are small and finite (the rest is any bits)."""
    _, nbytes = BLOCKS[type_name]
    b = rng.integers(0, 256, size=(num_blocks, nbytes), dtype=np.uint8)

    def put(offset, low, high):
        b[:, offset:offset + 2] = rng.uniform(low, high, num_blocks).astype("<f2")[:, None].view(
            np.uint8).reshape(num_blocks, 2)

    # (offset of d, d range, offset of dmin or None, dmin / d) sized so that weights come out
    # with a spread near 1/sqrt(256), like the tiny HF models'.
    layout = {"Q2_K": (80, 4e-3, 82, 1.5), "Q3_K": (108, 1.5e-3, None, 0),
              "Q4_K": (0, 3e-4, 2, 7.5), "Q5_K": (0, 1.5e-4, 2, 15.5), "Q6_K": (208, 5e-5, None, 0)}
    d_at, d, dmin_at, ratio = layout[type_name]
    put(d_at, 0.5 * d, 1.5 * d)
    if dmin_at is not None:
        put(dmin_at, 0.5 * d * ratio, 1.5 * d * ratio)
    return b


def encode_tensor(w: np.ndarray, type_name: str, rng: np.random.Generator) -> np.ndarray:
    """The raw data of `w` stored as `type_name` (K-quants: random blocks of w's shape)."""
    import gguf

    qtype = gguf.GGMLQuantizationType[type_name]
    if type_name == "F32":
        return w.astype(np.float32)
    if type_name == "F16":
        return w.astype(np.float16)
    if type_name in K_QUANTS:
        elems, nbytes = BLOCKS[type_name]
        rows, cols = w.shape
        return _random_k_blocks(type_name, rows * cols // elems, rng).reshape(rows, cols // elems * nbytes)
    return gguf.quants.quantize(w.astype(np.float32), qtype)


def write_tiny_llama_gguf(path: str | Path, hf_dir: str | Path, type_name: str, seed: int = 0,
                          tensor_types: dict[str, str] | None = None,
                          architecture: str = "llama") -> dict[str, tuple[str, np.ndarray]]:
    """Write the tiny Llama in `hf_dir` (its tokenizer, config and weights) as a GGUF file.

    Args:
        type_name: the ggml type of every 2-D weight (norms stay F32, as llama.cpp keeps them).
        tensor_types: per GGUF tensor name, a type overriding `type_name`.
        architecture: general.architecture (another value makes a file of another arch).
    Returns:
        GGUF tensor name -> (type name, raw data as written), for checking what was loaded.
    """
    import gguf
    import torch
    from safetensors.torch import load_file

    hf_dir = Path(hf_dir)
    cfg = json.loads((hf_dir / "config.json").read_text())
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    tok_cfg = json.loads((hf_dir / "tokenizer_config.json").read_text())
    state = {k: v.to(torch.float32).numpy() for k, v in load_file(str(hf_dir / "model.safetensors")).items()}
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    rng = np.random.default_rng(seed)

    w = gguf.GGUFWriter(str(path), architecture)
    w.add_name("tiny-llama-test")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(float(cfg.get("rope_theta", 10000.0)))
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(cfg["vocab_size"])

    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    added = {a["id"]: a for a in tok.get("added_tokens", [])}
    tokens = [t for t, _ in vocab]
    for i, a in added.items():  # special tokens live in added_tokens
        if i < len(tokens):
            tokens[i] = a["content"]
        else:
            tokens.append(a["content"])
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if i in added and added[i].get("special") else 1 for i in range(len(tokens))])
    w.add_token_merges(merges)
    by_content = {t: i for i, t in enumerate(tokens)}
    w.add_bos_token_id(by_content[tok_cfg["bos_token"]])
    w.add_eos_token_id(by_content[tok_cfg["eos_token"]])
    if tok_cfg.get("pad_token") in by_content:
        w.add_pad_token_id(by_content[tok_cfg["pad_token"]])
    w.add_add_bos_token(False)
    template = tok_cfg.get("chat_template")
    if template is None and (hf_dir / "chat_template.jinja").exists():
        template = (hf_dir / "chat_template.jinja").read_text()
    if template:
        w.add_chat_template(template)

    names = dict(GGUF_NAMES)
    for i in range(cfg["num_hidden_layers"]):
        for hf, g in GGUF_LAYER_NAMES.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{g}.weight"
    written: dict[str, tuple[str, np.ndarray]] = {}
    for hf_name, array in state.items():
        name = names[hf_name]
        if hf_name.endswith("q_proj.weight"):
            array = llama_cpp_permute(array, n_head)
        elif hf_name.endswith("k_proj.weight"):
            array = llama_cpp_permute(array, n_kv)
        t = "F32" if array.ndim == 1 else (tensor_types or {}).get(name, type_name)
        if t in ("F32", "F16"):
            raw = encode_tensor(array, t, rng)
            w.add_tensor(name, raw)
        elif t == "BF16" or t in BLOCKS:
            raw = encode_tensor(array, t, rng)
            w.add_tensor(name, raw, raw_dtype=gguf.GGMLQuantizationType[t])
        else:  # a type without a quantizer here: random bytes of its block size
            qtype = gguf.GGMLQuantizationType[t]
            block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
            rows, cols = array.shape
            raw = rng.integers(0, 256, size=(rows, cols // block_elems * block_bytes), dtype=np.uint8)
            w.add_tensor(name, raw, raw_dtype=qtype)
        written[name] = (t, np.asarray(raw))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written


# --- the reference -----------------------------------------------------------------------------

def transformers_on_gguf(path: str):
    """(tokenizer, model in float32, eval) of transformers on a .gguf file: its own GGUF loader
    and tokenizer, the tests' reference for what the engine derives from the same file."""
    import os

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return tokenizer, model.eval()
