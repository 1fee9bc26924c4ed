"""paged_engine: a vLLM-class LLM engine (paged KV cache, continuous batching, prefix caching).

    from paged_engine import LLM, SamplingParams
    llm = LLM("path/to/hf_model_dir")                       # device/dtype "auto"
    outs = llm.generate(["Hello"], SamplingParams(max_tokens=32, temperature=0.0))
    print(outs[0].text)

Importing the package is cheap: torch and transformers load when an engine is built.
"""

from paged_engine.config import EngineConfig
from paged_engine.llm import LLM
from paged_engine.llm_engine import LLMEngine
from paged_engine.output.request_output import CompletionOutput, Logprob, RequestOutput
from paged_engine.sampling_params import SamplingParams

__all__ = [
    "LLM",
    "LLMEngine",
    "EngineConfig",
    "SamplingParams",
    "RequestOutput",
    "CompletionOutput",
    "Logprob",
]
