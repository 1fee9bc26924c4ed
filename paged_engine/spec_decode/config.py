"""SpeculativeConfig: the `speculative_config` engine argument, with vLLM's keys, validated at load.

    LLM(model, speculative_config={"method": "ngram", "num_speculative_tokens": 4,
                                   "prompt_lookup_max": 4, "prompt_lookup_min": 2})
    LLM(model, speculative_config={"method": "draft_model", "model": DRAFT_DIR,
                                   "num_speculative_tokens": 3})

The same object may come as a JSON string (`--engine-arg speculative_config='{...}'`, or a
string inside `paged_llm/1/model.json`). Unknown keys and impossible values are a ValueError
naming them. Torch-free: the draft model's vocabulary is checked against the target's from their
configs and tokenizer files (`check_draft_vocabulary`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

METHODS = ("ngram", "draft_model")
MAX_SPECULATIVE_TOKENS = 16
# vLLM's default n-gram window when neither bound is given.
DEFAULT_PROMPT_LOOKUP = 5


def _int(key: str, value: Any, *, allow_none: bool = False) -> int | None:
    from paged_engine.config import parse_int

    return parse_int(f"speculative_config.{key}", value, allow_none=allow_none)


@dataclass
class SpeculativeConfig:
    """Speculative decoding settings (vLLM `SpeculativeConfig` keys).

    Args:
        method: "ngram" (prompt lookup: propose the tokens that followed the longest earlier
            occurrence of the sequence's last prompt_lookup_min..prompt_lookup_max tokens) or
            "draft_model" (a smaller model with the same vocabulary proposes greedily or by
            sampling). Inferred as "draft_model" when only `model` is given.
        num_speculative_tokens: k, the most draft tokens verified per sequence and step, 1..16.
        prompt_lookup_max, prompt_lookup_min: n-gram window bounds (vLLM: both 5 when neither is
            given, the other one's value when one is).
        model: the draft model's Hugging Face directory (draft_model only).
        disable_by_batch_size: when more sequences than this run in a step, that step does not
            speculate (verification costs about k+1 times the decode compute, which pays while
            the step is bound by weight reads, not at high batch). None: never disabled by size.
        adaptive: back off per sequence when its drafts keep being rejected: after a step that
            accepts none of its drafts, a sequence skips speculation for 1, 2, 4, .. up to 16
            steps (reset by a step that accepts any). Rejected drafts cost verification compute
            for nothing, so this keeps plain chat from slowing down under n-gram.
    """

    method: str | None = None
    num_speculative_tokens: int | None = None
    prompt_lookup_max: int | None = None
    prompt_lookup_min: int | None = None
    model: str | None = None
    disable_by_batch_size: int | None = None
    adaptive: bool = True

    def __post_init__(self) -> None:
        if self.method is None:
            if self.model is None:
                raise ValueError(
                    "speculative_config.method is required (one of 'ngram', 'draft_model'), "
                    "or give speculative_config.model for a draft model")
            self.method = "draft_model"
        if not isinstance(self.method, str) or self.method.strip().lower() not in METHODS:
            raise ValueError(
                f"speculative_config.method must be one of {list(METHODS)}, got {self.method!r}")
        self.method = self.method.strip().lower()

        if self.num_speculative_tokens is None:
            raise ValueError("speculative_config.num_speculative_tokens is required "
                             f"(1..{MAX_SPECULATIVE_TOKENS})")
        k = _int("num_speculative_tokens", self.num_speculative_tokens)
        if not 1 <= k <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"speculative_config.num_speculative_tokens must be in "
                             f"[1, {MAX_SPECULATIVE_TOKENS}], got {k}")
        self.num_speculative_tokens = k

        lo = _int("prompt_lookup_min", self.prompt_lookup_min, allow_none=True)
        hi = _int("prompt_lookup_max", self.prompt_lookup_max, allow_none=True)
        if self.method == "ngram":
            if self.model is not None:
                raise ValueError("speculative_config.model is for method 'draft_model'; "
                                 "method 'ngram' takes no model")
            if lo is None and hi is None:
                lo = hi = DEFAULT_PROMPT_LOOKUP
            elif lo is None:
                lo = hi
            elif hi is None:
                hi = lo
            if lo < 1:
                raise ValueError(f"speculative_config.prompt_lookup_min must be >= 1, got {lo}")
            if hi < lo:
                raise ValueError(f"speculative_config.prompt_lookup_max ({hi}) must be >= "
                                 f"prompt_lookup_min ({lo})")
        else:
            if lo is not None or hi is not None:
                raise ValueError("speculative_config.prompt_lookup_min/max are for method "
                                 "'ngram', not 'draft_model'")
            if not isinstance(self.model, (str, os.PathLike)) or not str(self.model):
                raise ValueError("speculative_config.model (the draft model's directory) is "
                                 "required for method 'draft_model'")
            self.model = os.fspath(self.model)
            if not os.path.isfile(os.path.join(self.model, "config.json")):
                raise ValueError(f"speculative_config.model: {self.model!r} is not a Hugging Face "
                                 "model directory (no config.json)")
        self.prompt_lookup_min, self.prompt_lookup_max = lo, hi

        n = _int("disable_by_batch_size", self.disable_by_batch_size, allow_none=True)
        if n is not None and n < 1:
            raise ValueError(f"speculative_config.disable_by_batch_size must be >= 1 or None, "
                             f"got {n}")
        self.disable_by_batch_size = n
        from paged_engine.config import parse_bool

        self.adaptive = parse_bool("speculative_config.adaptive", self.adaptive)

    # -- construction --

    @classmethod
    def from_value(cls, value: Any) -> "SpeculativeConfig | None":
        """None, a SpeculativeConfig, a dict or a JSON object string -> SpeculativeConfig | None."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            if not value.strip() or value.strip().lower() in ("none", "null"):
                return None
            try:
                value = json.loads(value)
            except ValueError as e:
                raise ValueError(f"speculative_config is not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config must be a dict (or a JSON object string), "
                             f"got {type(value).__name__}")
        from paged_engine.config import check_known_keys

        known = {"method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min",
                 "model", "disable_by_batch_size", "adaptive"}
        check_known_keys("speculative_config", value, known)
        return cls(**value)

    def to_dict(self) -> dict:
        d = {"method": self.method, "num_speculative_tokens": self.num_speculative_tokens}
        if self.method == "ngram":
            d.update(prompt_lookup_max=self.prompt_lookup_max,
                     prompt_lookup_min=self.prompt_lookup_min)
        else:
            d["model"] = self.model
        d.update(disable_by_batch_size=self.disable_by_batch_size, adaptive=self.adaptive)
        return d

    # -- checks against the target model --

    def check_draft(self, target_hf_config, target_tokenizer_dir: str, max_model_len: int) -> Any:
        """Load the draft's transformers config and check it can serve the target.

        Its vocabulary must be the target's: the same vocab_size, and where the draft directory
        has tokenizer files, the same token -> id table. Its context must hold max_model_len.
        Returns the draft's config. Raises ValueError naming the mismatch.
        """
        from transformers import AutoConfig

        try:
            draft = AutoConfig.from_pretrained(self.model)
        except Exception as e:  # noqa: BLE001 - a config error naming the key
            raise ValueError(f"speculative_config.model: cannot load {self.model!r}: {e}") from e
        target_vocab = getattr(target_hf_config, "vocab_size", None)
        draft_vocab = getattr(draft, "vocab_size", None)
        if draft_vocab != target_vocab:
            raise ValueError(
                f"speculative_config.model: the draft's vocabulary differs from the target's "
                f"(vocab_size {draft_vocab} vs {target_vocab}); a draft model must share the "
                "target's tokenizer")
        draft_max_pos = getattr(draft, "max_position_embeddings", None)
        if draft_max_pos and int(draft_max_pos) < max_model_len:
            raise ValueError(
                f"speculative_config.model: the draft's max_position_embeddings={draft_max_pos} "
                f"is below max_model_len={max_model_len}; lower max_model_len")
        if _has_tokenizer(self.model):
            draft_vocab_table = _vocab_table(self.model)
            target_vocab_table = _vocab_table(target_tokenizer_dir)
            if draft_vocab_table is not None and target_vocab_table is not None and \
                    draft_vocab_table != target_vocab_table:
                diff = sorted(set(draft_vocab_table.items()) ^ set(target_vocab_table.items()))
                raise ValueError(
                    "speculative_config.model: the draft's tokenizer maps tokens to other ids "
                    f"than the target's ({len(diff)} entries differ, e.g. {diff[:3]}); a draft "
                    "model must share the target's tokenizer")
        return draft


def _has_tokenizer(model_dir: str) -> bool:
    return any(os.path.isfile(os.path.join(model_dir, f))
               for f in ("tokenizer.json", "tokenizer.model", "vocab.json"))


def _vocab_table(model_dir: str) -> dict | None:
    """token -> id of the tokenizer in model_dir, added tokens included; None if unreadable."""
    try:
        from transformers import AutoTokenizer

        return dict(AutoTokenizer.from_pretrained(model_dir).get_vocab())
    except Exception:  # noqa: BLE001 - no readable tokenizer: vocab_size was checked
        return None
