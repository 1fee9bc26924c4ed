"""Serving on Triton Inference Server: the code behind model_repository/.

- request.py: one Triton request -> prompt + SamplingParams + output options (or an error).
- response.py: engine outputs -> output tensors (text deltas, token windows for the ensemble).
- engine_loop.py: the engine thread (adds, steps, cancellation, health).
- sender.py: the response-sender thread.
- metrics.py: vLLM-named counters / histograms and our gauges via Triton custom metrics.
- llm_model.py: the paged_llm model; text_models.py: preprocessing / postprocessing.
- repository.py: prepare_model_repository(dst_dir, model_dir, **engine_args).
"""
