"""The executor: what the engine calls to run a batch, whatever the number of processes behind it.

`UniprocExecutor` runs the model runner in the engine's own process. The tensor-parallel
`MultiprocExecutor` (multiproc_executor.py: one model runner per rank, workers in their own
processes) has the same interface: `execute_model(SchedulerOutput) -> ModelRunnerOutput`,
`num_kv_blocks`, `check_health()`, `shutdown()`; the batch is plain data, so it goes to the
workers as it is.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from paged_engine.config import EngineConfig
    from paged_engine.core.batch import ModelRunnerOutput, SchedulerOutput


class Executor:
    """Interface of the engine's executors (tests give the engine fakes with the same methods)."""

    num_kv_blocks: int

    @staticmethod
    def from_config(config: "EngineConfig") -> "Executor":
        if getattr(config, "tensor_parallel_size", 1) > 1:
            from paged_engine.executor.multiproc_executor import MultiprocExecutor

            return MultiprocExecutor(config)
        return UniprocExecutor(config)

    def execute_model(self, batch: "SchedulerOutput", draft_probs: dict | None = None
                      ) -> "ModelRunnerOutput":
        """Run a batch. draft_probs (speculative decoding with a draft model): seq_id -> the
        draft's probabilities of its drafts; only the sampling rank needs them."""
        raise NotImplementedError

    def check_health(self) -> None:
        """Raise if the executor can no longer run steps (a dead tensor-parallel worker)."""

    def shutdown(self) -> None:
        pass


class UniprocExecutor(Executor):
    """One ModelRunner on one device, in this process."""

    def __init__(self, config: "EngineConfig"):
        from paged_engine.executor.model_runner import ModelRunner

        self.runner = ModelRunner(config, config.hf_config)
        self.num_kv_blocks = self.runner.num_kv_blocks

    def execute_model(self, batch: "SchedulerOutput", draft_probs: dict | None = None
                      ) -> "ModelRunnerOutput":
        return self.runner.execute_model(batch, draft_probs)

    def shutdown(self) -> None:
        runner, self.runner = self.runner, None
        if runner is not None:
            runner.shutdown()
