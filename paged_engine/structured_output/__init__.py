"""Structured outputs: grammar-constrained decoding with xgrammar.

`StructuredOutputManager` (manager.py) compiles each request's `StructuredOutputsParams` into a
grammar on a small thread pool, off the engine thread, and caches the result by (kind, spec)
for the engine's tokenizer. Each sequence then gets a `SequenceGrammar` (grammar.py): its
matcher, advanced by the output processor with every token the sequence keeps, and asked by the
engine for the next-token bitmask (one row per position the runner samples, drafts included),
which travels in the plain-data batch to the runner (executor/grammar_bitmask.py applies it).
"""

from paged_engine.structured_output.grammar import SequenceGrammar
from paged_engine.structured_output.manager import GrammarCompileError, StructuredOutputManager

__all__ = ["GrammarCompileError", "SequenceGrammar", "StructuredOutputManager"]
