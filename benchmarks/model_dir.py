"""Model directories for the benchmarks: a real architecture's config.json, no weights.

The engine loads such a directory with `load_format="dummy"` (random weights of the right
shapes) and the Hugging Face baseline builds the same architecture with `from_config`, so no
checkpoint has to be downloaded or written. The engine still needs a tokenizer (it detokenizes
every generated token), so the directory also gets a synthetic byte-level BPE tokenizer whose
vocabulary has exactly the model's `vocab_size` entries:

- ids [0, num_words): "words" — a space followed by 1 to 4 lower-case letters (" a", " ab", ...,
  " zzzz"), built by merges that only ever extend a word by one letter. Any sequence of these ids
  decodes to text that encodes back to exactly the same ids (the pre-tokenizer splits at each
  space and the merges rebuild each word), so a prompt of random ids below 10,000 (the W1
  workload) can be sent as text to the server (W4) and arrive as the same tokens.
- then the 256 byte tokens of byte-level BPE (what a real vocabulary also has; sampled output
  ids may land on them and produce partial UTF-8, as with a real model),
- then the special tokens (bos, eos, pad), the last ids.

Decoding random output ids therefore costs about what it costs with a real vocabulary of the
same size, which a tiny 384-token tokenizer would not give.
"""

from __future__ import annotations

import itertools
import json
import os
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SPECIAL_TOKENS = {"bos": "<|bos|>", "eos": "<|eos|>", "pad": "<|pad|>"}
MAX_WORD_LETTERS = 4


@dataclass(frozen=True)
class ModelSpec:
    """An architecture to benchmark: transformers config class and its fields."""

    name: str
    arch: str                      # "qwen3" | "llama"
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def vocab_size(self) -> int:
        return int(self.config["vocab_size"])


# Qwen3-0.6B (https://huggingface.co/Qwen/Qwen3-0.6B/blob/main/config.json), as in nano-vllm's bench.
QWEN3_0_6B = ModelSpec("Qwen3-0.6B", "qwen3", dict(
    hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
    num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True,
    max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6, attention_bias=False,
    hidden_act="silu",
))
# Meta-Llama-3-8B (https://huggingface.co/meta-llama/Meta-Llama-3-8B/blob/main/config.json).
LLAMA3_8B = ModelSpec("Llama-3-8B", "llama", dict(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
    max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5, attention_bias=False,
    hidden_act="silu",
))
# Scaled-down stand-ins for CPU smoke runs: same architecture families, tiny sizes.
TINY_QWEN3 = ModelSpec("tiny-qwen3", "qwen3", dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, vocab_size=2048, tie_word_embeddings=True,
    max_position_embeddings=4096, rope_theta=1000000.0, rms_norm_eps=1e-6, attention_bias=False,
    hidden_act="silu",
))
TINY_LLAMA = ModelSpec("tiny-llama", "llama", dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=2048, tie_word_embeddings=False,
    max_position_embeddings=4096, rope_theta=500000.0, rms_norm_eps=1e-5, attention_bias=False,
    hidden_act="silu",
))

_CONFIG_CLASSES = {"qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
                   "llama": ("LlamaConfig", "LlamaForCausalLM")}


def num_word_tokens(vocab_size: int) -> int:
    """Ids [0, this) are words that survive decode -> encode unchanged."""
    n = vocab_size - 256 - len(SPECIAL_TOKENS)
    if n < 26:
        raise ValueError(f"vocab_size {vocab_size} is too small for the synthetic tokenizer")
    capacity = sum(26 ** k for k in range(1, MAX_WORD_LETTERS + 1))
    if n > capacity:
        raise ValueError(f"vocab_size {vocab_size} exceeds the synthetic tokenizer's capacity")
    return n


def _words(count: int):
    """The first `count` words in order of length, so every word's prefixes come before it."""
    produced = 0
    for length in range(1, MAX_WORD_LETTERS + 1):
        for letters in itertools.product(string.ascii_lowercase, repeat=length):
            if produced == count:
                return
            yield "".join(letters)
            produced += 1


def build_synthetic_tokenizer(vocab_size: int):
    """A `tokenizers.Tokenizer` (byte-level BPE) with exactly `vocab_size` ids; see module doc."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    space = "\u0120"  # byte-level BPE's printable stand-in for the byte 0x20
    vocab: dict[str, int] = {}
    merges: list[tuple[str, str]] = []
    for word in _words(num_word_tokens(vocab_size)):
        token = space + word
        vocab[token] = len(vocab)
        left = space + word[:-1] if len(word) > 1 else space
        merges.append((left, word[-1]))
    # The alphabet is a set: sort it for a reproducible vocabulary.
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t in SPECIAL_TOKENS.values()])
    assert tok.get_vocab_size() == vocab_size, (tok.get_vocab_size(), vocab_size)
    return tok


def write_model_dir(spec: ModelSpec, directory: str | os.PathLike, dtype: str = "bfloat16") -> str:
    """Write config.json (spec's architecture) and the synthetic tokenizer into `directory`.

    No weights are written: load the directory with `load_format="dummy"` (engine) or
    `from_config` (transformers). Returns the directory as a string.
    """
    import transformers
    from transformers import PreTrainedTokenizerFast

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok = build_synthetic_tokenizer(spec.vocab_size)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"],
        pad_token=SPECIAL_TOKENS["pad"],
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(str(directory))
    ids = {k: tok.token_to_id(v) for k, v in SPECIAL_TOKENS.items()}
    config_name, model_name = _CONFIG_CLASSES[spec.arch]
    config = getattr(transformers, config_name)(
        **spec.config,
        architectures=[model_name],
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
        torch_dtype=dtype,
    )
    config.save_pretrained(str(directory))
    # Drop a generation_config.json that save_pretrained may add: the engine would read more EOS
    # ids from it, and the benchmarks ignore EOS anyway.
    gen = directory / "generation_config.json"
    if gen.exists():
        gen.unlink()
    (directory / "BENCHMARK_MODEL.json").write_text(json.dumps(
        {"name": spec.name, "arch": spec.arch, "config": spec.config,
         "note": "config only; load with load_format='dummy' (random weights)"}, indent=1) + "\n")
    return str(directory)


def load_hf_tokenizer(directory: str | os.PathLike):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory))
