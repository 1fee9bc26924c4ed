"""Triton-lang kernels for the paged engine, each with a plain-torch ``*_ref`` twin.

The engine calls the launchers on CUDA and the ``*_ref`` functions on CPU; both take the same
arguments. Importing this package needs no GPU.

Note: the launchers re-exported here share their modules' names, so ``kernels.rms_norm`` is the
function; reach a module itself with ``importlib.import_module("kernels.rms_norm")``.
"""

from .activation import silu_and_mul, silu_and_mul_ref
from .paged_decode_attention import (
    DecodeWorkspace,
    choose_num_splits,
    paged_decode_attention,
    paged_decode_attention_ref,
)
from .paged_prefill_attention import paged_prefill_attention, paged_prefill_attention_ref
from .rms_norm import rms_norm, rms_norm_ref
from .rotary_embedding import compute_cos_sin_cache, rotary_embedding, rotary_embedding_ref
from .store_kvcache import store_kvcache, store_kvcache_ref

__all__ = [
    "DecodeWorkspace",
    "choose_num_splits",
    "compute_cos_sin_cache",
    "paged_decode_attention",
    "paged_decode_attention_ref",
    "paged_prefill_attention",
    "paged_prefill_attention_ref",
    "rms_norm",
    "rms_norm_ref",
    "rotary_embedding",
    "rotary_embedding_ref",
    "silu_and_mul",
    "silu_and_mul_ref",
    "store_kvcache",
    "store_kvcache_ref",
]
