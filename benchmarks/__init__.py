"""Benchmarks of issue 7, one command each (see benchmarks/RESULTS.md):

    python -m benchmarks.throughput --workload W1|W2   # offline throughput beside transformers
    python -m benchmarks.latency                       # W3: batch-1 latency and bandwidth use
    python -m benchmarks.serving                       # W4: W1 through tritonserver + paged-client bench

Each prints a table and writes JSON with --json PATH; --tiny --device cpu runs a scaled-down
model for smoke tests. Modules: model_dir (config-only model + synthetic tokenizer), workloads,
hf_baseline (transformers generate), common (clocks, engine runs, KV accounting, reports).
"""
