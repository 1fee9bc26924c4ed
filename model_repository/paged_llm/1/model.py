"""paged_llm: the decoupled engine model (vllm_backend-compatible tensors + token-level outputs).

The logic lives in paged_engine.serving.llm_model; see its docstring.
"""

import triton_python_backend_utils as pb_utils

from paged_engine.serving.llm_model import PagedLLMModel


class TritonPythonModel:
    def initialize(self, args):
        self.model = PagedLLMModel(pb_utils)
        self.model.initialize(args)

    def execute(self, requests):
        return self.model.execute(requests)

    def finalize(self):
        self.model.finalize()
