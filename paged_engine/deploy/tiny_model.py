"""Tiny random-weight Hugging Face models and locally trained tokenizers.

No weights can be downloaded, so the launcher's default model, the tests and the examples build
their own: a real `transformers` model class with random weights written by `save_pretrained`
(safetensors), and a tokenizer trained with `tokenizers` on a small multilingual text so that
spaces, CJK and emoji really span several tokens and several bytes.

    make_tiny_model("/tmp/tiny", arch="llama")      # -> "/tmp/tiny"
    ensure_default_model()                          # cached under ~/.cache/paged-triton
"""

from __future__ import annotations

import json
import os
from pathlib import Path

# Enough repetition that BPE learns merges across Latin, CJK and emoji; a vocabulary of a few
# hundred tokens keeps the models tiny while multi-byte characters still split into byte tokens.
TRAINING_TEXT = """
The quick brown fox jumps over the lazy dog. Paged attention stores keys and values in blocks.
Hello world! Hello, world. hello there, general Kenobi. A serving system streams text deltas.
Continuous batching schedules many requests at once; prefix caching reuses shared prompts.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2048 3.14159. Symbols: ( ) [ ] { } < > = + - * / % # @ !
日本語のテキストも少し含めます。東京は日本の首都です。こんにちは世界。
中文文本也需要测试。你好，世界！今天天气很好。我们喜欢编程。
한국어 문장도 있습니다. 안녕하세요 세계.
Emoji: 😀 😃 🚀 🎉 👍🏽 ❤️ 🇯🇵 — café naïve résumé Zürich São Paulo Ελληνικά Русский текст.
    indented code: def f(x):\n        return x * 2\n\ttabs\tand  double  spaces
"""


def _training_corpus() -> list[str]:
    lines = [line for line in TRAINING_TEXT.splitlines() if line.strip()]
    return lines * 20


def build_tokenizer(kind: str = "byte_level", vocab_size: int = 384):
    """Train a `tokenizers.Tokenizer`.

    Args:
        kind: "byte_level" (GPT-2 / Llama-3 / Qwen style byte-level BPE) or "sentencepiece"
            (Llama-2 / Mistral style: Metaspace pre-tokenizer, BPE with byte fallback).
        vocab_size: target vocabulary, special tokens included.
    Returns:
        (tokenizer, special_tokens) where special_tokens maps "bos"/"eos"/"pad"/"unk" to strings.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    if kind == "byte_level":
        special = {"bos": "<|begin_of_text|>", "eos": "<|end_of_text|>", "pad": "<|pad|>"}
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(special.values()),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
    elif kind == "sentencepiece":
        special = {"unk": "<unk>", "bos": "<s>", "eos": "</s>"}
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
        tok.normalizer = normalizers.Sequence(
            [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
        )
        tok.pre_tokenizer = None
        tok.decoder = decoders.Sequence(
            [
                decoders.Replace("▁", " "),
                decoders.ByteFallback(),
                decoders.Fuse(),
                decoders.Strip(" ", 1, 0),
            ]
        )
        byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size + 256,
            special_tokens=list(special.values()) + byte_tokens,
            limit_alphabet=64,
        )
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}; expected 'byte_level' or 'sentencepiece'")
    tok.train_from_iterator(_training_corpus(), trainer=trainer)
    if kind == "sentencepiece":
        # The trainer registers the byte-fallback tokens as special added tokens, so that
        # decode(skip_special_tokens=True) would drop every byte-fallback character; in real
        # SentencePiece models they are ordinary vocabulary.
        d = json.loads(tok.to_str())
        d["added_tokens"] = [
            a for a in d["added_tokens"]
            if not (a["content"].startswith("<0x") and len(a["content"]) == 6)
        ]
        tok = Tokenizer.from_str(json.dumps(d))
    return tok, special


def save_tokenizer(directory: str | os.PathLike, kind: str = "byte_level") -> int:
    """Write tokenizer.json + tokenizer_config.json loadable by `AutoTokenizer`.

    Returns the vocabulary size.
    """
    from transformers import PreTrainedTokenizerFast

    tok, special = build_tokenizer(kind)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=special["bos"],
        eos_token=special["eos"],
        unk_token=special.get("unk"),
        pad_token=special.get("pad", special["eos"]),
        add_bos_token=kind == "sentencepiece",
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    fast.save_pretrained(str(directory))
    return tok.get_vocab_size()


_ARCH_CONFIGS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
}
# Per-family defaults of the tiny models (any of them can be overridden by keyword).
_ARCH_DEFAULTS = {
    "mistral": {"sliding_window": None},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 48},
}


def make_tiny_model(
    directory: str | os.PathLike,
    arch: str = "llama",
    tokenizer: str = "byte_level",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int | None = None,
    intermediate_size: int = 128,
    max_position_embeddings: int = 2048,
    tie_word_embeddings: bool | None = None,
    seed: int = 0,
    **config_overrides,
) -> str:
    """Save a random-weight HF causal LM with a local tokenizer into `directory`.

    Weights are scaled up from HF's tiny default init so that greedy decoding produces varied,
    prompt-dependent tokens (with the default init every prompt decodes to the same token).
    `tie_word_embeddings` None keeps the family's default (tied for Gemma). Returns the directory
    as a string.
    """
    import torch
    import transformers

    if arch not in _ARCH_CONFIGS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {sorted(_ARCH_CONFIGS)}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab_size = save_tokenizer(directory, tokenizer)
    tok_cfg = json.loads((directory / "tokenizer_config.json").read_text())
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(str(directory))
    config_cls, model_cls = _ARCH_CONFIGS[arch]
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=hf_tok.bos_token_id,
        eos_token_id=hf_tok.eos_token_id,
        pad_token_id=hf_tok.pad_token_id,
        rms_norm_eps=1e-6,
        torch_dtype="float32",
    )
    if tie_word_embeddings is not None:
        kwargs["tie_word_embeddings"] = tie_word_embeddings
    if head_dim is not None:
        kwargs["head_dim"] = head_dim
    kwargs.update(_ARCH_DEFAULTS.get(arch, {}))
    kwargs.update(config_overrides)
    config = getattr(transformers, config_cls)(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 1.0 / p.shape[-1] ** 0.5 * 2.0)
            elif "norm" in name:
                # Gemma's norms apply (1 + w): keep the effective scale near 1 there too.
                p.uniform_(-0.2, 0.2) if arch.startswith("gemma") else p.uniform_(0.8, 1.2)
            else:  # biases (Qwen2 qkv)
                p.normal_(0.0, 0.1)
    model.save_pretrained(str(directory), safe_serialization=True)
    del tok_cfg
    return str(directory)


def default_model_dir() -> Path:
    from paged_engine.cache_dir import cache_dir

    return cache_dir() / "tiny-llama"


def ensure_default_model() -> str:
    """The launcher's embedded default: a tiny random Llama, generated once and cached."""
    d = default_model_dir()
    if not (d / "config.json").exists() or not any(d.glob("*.safetensors")):
        tmp = d.with_name(d.name + f".tmp{os.getpid()}")
        make_tiny_model(tmp, arch="llama", hidden_size=128, num_layers=2, num_heads=4,
                        num_kv_heads=2, intermediate_size=256)
        d.parent.mkdir(parents=True, exist_ok=True)
        if d.exists():
            import shutil

            shutil.rmtree(d)
        os.replace(tmp, d)
    return str(d)
