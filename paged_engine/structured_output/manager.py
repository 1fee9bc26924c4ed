"""StructuredOutputManager: compiles grammars off the engine thread and caches them.

xgrammar compiles a grammar against the tokenizer's vocabulary (which tokens can start, end or
cross each terminal); for a JSON schema that takes milliseconds to seconds. The engine thread
must not wait for it, so compilation runs on a small thread pool: `compile` returns a Future at
once and the request waits in the scheduler (WAITING_FOR_GRAMMAR) until it resolves, without
holding KV blocks or holding up other requests. Results (failures too, so a bad schema sent
again fails at once) are cached by (kind, spec, options) for this manager's tokenizer, in
least-recently-used order.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Iterable

from paged_engine.structured_output.grammar import SequenceGrammar

if TYPE_CHECKING:
    from paged_engine.sampling_params import StructuredOutputsParams

# xgrammar's C++ errors start with "[hh:mm:ss] /path/file.cc:line: "; the rest is the message.
_CPP_PREFIX = re.compile(r"^\[[0-9:]+\]\s+\S+:\d+:\s*")


class GrammarCompileError(ValueError):
    """A structured_outputs spec that does not compile; the message names the problem."""


def choice_grammar(choices: Iterable[str]) -> str:
    """EBNF whose root derives exactly one of `choices` (each a JSON-escaped string literal)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


class StructuredOutputManager:
    """Grammar compilation for one engine (one tokenizer, one vocabulary).

    Args:
        tokenizer: the engine's Hugging Face tokenizer.
        vocab_size: the model's logits width (may exceed the tokenizer's length).
        stop_token_ids: the model's EOS ids: the grammar allows them where it may end.
        max_workers: compile threads.
        max_cached: compiled grammars kept.
    """

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: Iterable[int],
                 max_workers: int = 2, max_cached: int = 256):
        self.vocab_size = vocab_size
        self._max_cached = max_cached
        self._cache: OrderedDict[tuple, Future] = OrderedDict()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers, thread_name_prefix="grammar-compile")
        stop_ids = sorted(int(t) for t in stop_token_ids)
        # The tokenizer's vocabulary is read once, on the pool: it is the first task, so every
        # compile finds it done or running on another thread.
        self._compiler = self._pool.submit(self._make_compiler, tokenizer, vocab_size, stop_ids)

    @staticmethod
    def _make_compiler(tokenizer, vocab_size: int, stop_ids: list[int]):
        import xgrammar

        info = xgrammar.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=stop_ids or None)
        return xgrammar.GrammarCompiler(info, max_threads=1)

    def compile(self, spec: "StructuredOutputsParams") -> Future:
        """A Future of the compiled grammar of `spec` (done at once when cached); its exception
        is a GrammarCompileError naming the problem."""
        key = spec.cache_key()
        with self._lock:
            future = self._cache.get(key)
            if future is not None:
                self._cache.move_to_end(key)
                return future
            future = self._pool.submit(self._compile, spec)
            self._cache[key] = future
            while len(self._cache) > self._max_cached:
                self._cache.popitem(last=False)
            return future

    def _compile(self, spec: "StructuredOutputsParams"):
        compiler = self._compiler.result()
        kind = spec.kind
        try:
            if kind == "json":
                return compiler.compile_json_schema(
                    json.dumps(spec.json), any_whitespace=not spec.disable_any_whitespace)
            if kind == "json_object":
                return compiler.compile_json_schema(
                    '{"type": "object"}', any_whitespace=not spec.disable_any_whitespace)
            if kind == "regex":
                return compiler.compile_regex(spec.regex)
            if kind == "choice":
                return compiler.compile_grammar(choice_grammar(spec.choice))
            return compiler.compile_grammar(spec.grammar)
        except Exception as e:  # xgrammar raises RuntimeError / ValueError subclasses
            message = _CPP_PREFIX.sub("", str(e).strip()) or type(e).__name__
            raise GrammarCompileError(f"structured_outputs.{kind} does not compile: {message}") from None

    def new_grammar(self, compiled) -> SequenceGrammar:
        """A fresh matcher (at the start of the output) of a compiled grammar."""
        return SequenceGrammar(compiled, self.vocab_size)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
