"""postprocessing: see paged_engine.serving.text_models.PostprocessingModel."""

import triton_python_backend_utils as pb_utils

from paged_engine.serving.text_models import PostprocessingModel


class TritonPythonModel:
    def initialize(self, args):
        self.model = PostprocessingModel(pb_utils)
        self.model.initialize(args)

    def execute(self, requests):
        return self.model.execute(requests)

    def finalize(self):
        pass
