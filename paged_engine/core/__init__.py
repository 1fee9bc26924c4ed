"""The engine core, torch-free: sequences, the KV block pool, the scheduler and the batch dataclasses.

Holds: sequence.py (Sequence, Request), block_manager.py (paged blocks, prefix cache),
scheduler.py (token-budget continuous batching), batch.py (SchedulerOutput / ModelRunnerOutput,
the plain-data seams with the runner). Imports: the standard library, paged_engine.config and
paged_engine.sampling_params only; never torch, never another engine folder.
"""
