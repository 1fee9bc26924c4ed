"""preprocessing: see paged_engine.serving.text_models.PreprocessingModel."""

import triton_python_backend_utils as pb_utils

from paged_engine.serving.text_models import PreprocessingModel


class TritonPythonModel:
    def initialize(self, args):
        self.model = PreprocessingModel(pb_utils)
        self.model.initialize(args)

    def execute(self, requests):
        return self.model.execute(requests)

    def finalize(self):
        pass
