"""Serving on Triton Inference Server: the code behind model_repository/.

- request.py: one Triton request -> prompt + SamplingParams + output options (or an error).
- intake.py: size limits, and the thread that tokenizes text prompts off the engine thread.
- response.py: engine outputs -> output tensors (text deltas, token windows for the ensemble).
- engine_loop.py: the engine thread (adds, steps, cancellation, health).
- sender.py: the response-sender thread.
- metrics.py: vLLM-named counters / histograms and our gauges via Triton custom metrics.
- trtllm_request.py: TensorRT-LLM's front-door inputs -> an engine request.
- llm_model.py: the paged_llm model; text_models.py: preprocessing / postprocessing;
  bls_model.py: tensorrt_llm_bls.
Imports: the engine's public API (paged_engine, output/detokenizer.py) and numpy; never deploy/.
"""
