"""Running a batch on the hardware: the executor, the model runner and the sampler.

Holds: executor.py (Executor interface; UniprocExecutor, room for a multi-process one),
model_runner.py (inputs, KV cache, CUDA graphs), sequence_state.py (the runner's copy of each
sequence), sampler.py (batched sampling on the device). Imports: core/batch.py, model_executor/,
spec_decode/rejection_sampler.py (verifying drafts), torch; never the scheduler or output/.
"""
