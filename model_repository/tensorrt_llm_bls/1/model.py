"""tensorrt_llm_bls: see paged_engine.serving.bls_model.TensorrtLlmBlsModel."""

import triton_python_backend_utils as pb_utils

from paged_engine.serving.bls_model import TensorrtLlmBlsModel


class TritonPythonModel:
    def initialize(self, args):
        self.model = TensorrtLlmBlsModel(pb_utils)
        self.model.initialize(args)

    def execute(self, requests):
        return self.model.execute(requests)

    def finalize(self):
        self.model.finalize()
