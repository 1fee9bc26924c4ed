"""LLM: offline batch generation on top of LLMEngine.

    llm = LLM("path/to/model", device="cpu", dtype="float32")
    outs = llm.generate(["Hello", "The capital of"], SamplingParams(max_tokens=16, temperature=0))
    for out in outs:
        print(out.text, out.finish_reason)
"""

from __future__ import annotations

import itertools
from typing import Sequence

from paged_engine.config import EngineConfig
from paged_engine.llm_engine import LLMEngine
from paged_engine.output.request_output import RequestOutput
from paged_engine.sampling_params import SamplingParams


class LLM:
    """Offline generation.

    Args:
        model: local Hugging Face model directory.
        **kwargs: EngineConfig fields (device, dtype, block_size, num_kv_blocks, ...).
    """

    def __init__(self, model: str, **kwargs):
        executor = kwargs.pop("executor", None)  # tests inject a fake executor
        self.engine = LLMEngine(EngineConfig(model=model, **kwargs), executor=executor)
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt; returns the final RequestOutputs in prompt order.

        Args:
            prompts: a string, a list of strings, a list of token-id lists (or one token-id list).
            params: one SamplingParams for all prompts, or one per prompt; default SamplingParams().
        Raises:
            ValueError naming the problem for a bad prompt or parameter (nothing runs then).
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if prompts and all(isinstance(t, int) and not isinstance(t, bool) for t in prompts):
            prompts = [prompts]  # one tokenized prompt
        if params is None or isinstance(params, SamplingParams):
            params_list = [params] * len(prompts)
        else:
            params_list = list(params)
            if len(params_list) != len(prompts):
                raise ValueError(
                    f"params: got {len(params_list)} SamplingParams for {len(prompts)} prompts"
                )
        engine = self.engine
        request_ids: list[str] = []
        try:
            for prompt, p in zip(prompts, params_list):
                request_id = f"llm-{next(self._ids)}"
                if isinstance(prompt, str):
                    engine.add_request(request_id, prompt=prompt, params=p)
                else:
                    engine.add_request(request_id, prompt_token_ids=prompt, params=p)
                request_ids.append(request_id)
        except Exception:
            for request_id in request_ids:
                engine.abort(request_id)
            while engine.has_unfinished_requests():
                engine.step()
            raise

        finals: dict[str, RequestOutput] = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    finals[out.request_id] = out
        return [finals[r] for r in request_ids]

    def stats(self) -> dict:
        return self.engine.stats()

    def shutdown(self) -> None:
        self.engine.shutdown()
