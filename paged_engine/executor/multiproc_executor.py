"""MultiprocExecutor: one model over `tensor_parallel_size` ranks (torch.distributed).

Rank 0's ModelRunner lives in the engine's process, next to the scheduler, the sampler (it is the
only rank that samples) and the detokenizer; ranks 1..n-1 are worker processes
(executor/tp_worker.py) that the executor starts on this machine, or that were started on other
machines (`LOCAL_WORLD_SIZE` below the size, see distributed/rendezvous.py). Each step the
SchedulerOutput, plain data, goes to every rank by one gloo broadcast
(distributed/broadcast_channel.py); every rank runs the model on its shard (column-parallel
qkv / gate_up, row-parallel o / down with an all-reduce, the vocabulary split) and rank 0
gathers the logits and samples. Each rank holds its shard of the KV cache; the block tables are
the scheduler's, the same for all.

A worker that dies fails the step that needs it (its connections close, or the collective
times out after `distributed_timeout_s`): the executor raises a RuntimeError naming the rank
and its error, and from then on every call raises it at once. `check_health()` finds a dead
local worker while the engine idles. `shutdown()` (also at interpreter exit) stops every worker
it started: a clean "shutdown" message, then terminate / kill after a grace period.
"""

from __future__ import annotations

import atexit
import logging
import os
import pickle
import shutil
import subprocess
import sys
import time

from paged_engine.executor.executor import Executor

logger = logging.getLogger(__name__)

# Seconds a worker gets to exit after "shutdown" (then terminate, then kill).
SHUTDOWN_GRACE_S = 10.0


def _python_executable() -> str:
    """The interpreter to start workers with (inside Triton's stub, sys.executable may be the stub)."""
    if os.path.basename(sys.executable).startswith("python"):
        return sys.executable
    return shutil.which("python3") or os.path.join(sys.prefix, "bin", "python3")


class TensorParallelError(RuntimeError):
    """A rank of the tensor-parallel group failed; the executor cannot run steps any more."""


class MultiprocExecutor(Executor):
    """Rank 0 in this process, ranks 1.. in worker processes.

    Attributes:
        num_kv_blocks: blocks per rank (the same on every rank).
        broadcast_s, broadcast_bytes, num_steps: the batch channel's cost so far (seconds
            rank 0 spent sending, pickled bytes, steps), for benchmarks/tp.py.
    """

    def __init__(self, config):
        import torch
        import torch.distributed as dist

        if dist.is_initialized():
            raise TensorParallelError("torch.distributed is already initialised in this process: one "
                                      "tensor-parallel engine per process")
        from paged_engine.distributed.broadcast_channel import BroadcastChannel
        from paged_engine.distributed.parallel_state import tensor_parallel
        from paged_engine.distributed.rendezvous import Rendezvous, host_store, init_groups
        from paged_engine.executor.model_runner import ModelRunner
        from paged_engine.executor.tp_worker import CONFIG_KEY, cpu_threads_per_rank

        self.tp = config.tensor_parallel_size
        self.timeout_s = config.distributed_timeout_s
        self.rendezvous = Rendezvous.from_env(self.tp)
        self.procs: dict[int, subprocess.Popen] = {}
        self.runner = None
        self._store = None
        self._failure: str | None = None
        self._closed = False
        self._threads = None
        self._owns_groups = False
        self.broadcast_s = 0.0
        self.broadcast_bytes = 0
        self.num_steps = 0
        atexit.register(self.shutdown)
        try:
            device_type = config.device.split(":")[0]
            self._store = host_store(self.rendezvous, self.timeout_s)
            self._store.set(CONFIG_KEY, pickle.dumps(config))
            self._start_local_workers(device_type)
            self._wait_workers_up()
            if device_type == "cpu":  # the machine's cores shared by its ranks
                self._threads = torch.get_num_threads()
                torch.set_num_threads(cpu_threads_per_rank(self.rendezvous.local_world_size))
            self._owns_groups = True
            channel_group = init_groups(self._store, 0, self.tp, device_type, self.timeout_s)
            self.channel = BroadcastChannel(channel_group)
            with tensor_parallel(0, self.tp):
                self.runner = ModelRunner(config, config.hf_config)
            self.num_kv_blocks = self.runner.num_kv_blocks
        except BaseException as e:
            error = self._failed(e)
            self.shutdown()
            raise error from e

    # ------------------------------------------------------------------ workers

    def _start_local_workers(self, device_type: str) -> None:
        rdzv = self.rendezvous
        env = dict(os.environ)
        env.update(
            MASTER_ADDR=rdzv.master_addr if rdzv.master_port else "127.0.0.1",
            MASTER_PORT=str(self._store.port), WORLD_SIZE=str(self.tp),
            LOCAL_WORLD_SIZE=str(rdzv.local_world_size), PAGED_ENGINE_PARENT_PID=str(os.getpid()),
            PAGED_ENGINE_TIMEOUT_S=str(self.timeout_s),
            # The engine's own import path (Triton's stub sets it up itself, not through the env).
            PYTHONPATH=os.pathsep.join(p for p in sys.path if p),
        )
        for rank in range(1, rdzv.local_world_size):
            env_r = dict(env, RANK=str(rank), LOCAL_RANK=str(rank))
            self.procs[rank] = subprocess.Popen(
                [_python_executable(), "-m", "paged_engine.executor.tp_worker"], env=env_r,
                stdin=subprocess.DEVNULL)

    def _wait_workers_up(self) -> None:
        """Until every rank has joined the store; a local worker that exits first is an error now,
        not a timeout later."""
        from paged_engine.distributed.rendezvous import worker_key

        deadline = time.monotonic() + self.timeout_s
        waiting = set(range(1, self.tp))
        while waiting:
            self._check_processes()
            waiting = {r for r in waiting if not self._store.check([worker_key(r, "up")])}
            if not waiting:
                return
            if time.monotonic() > deadline:
                raise TensorParallelError(
                    f"tensor-parallel ranks {sorted(waiting)} did not join within "
                    f"{self.timeout_s:.0f} s (store {self.rendezvous.master_addr}:{self._store.port}; "
                    "ranks on other machines are started with python -m paged_engine.executor.tp_worker)")
            time.sleep(0.05)

    def _check_processes(self) -> None:
        dead = {r: p.returncode for r, p in self.procs.items() if p.poll() is not None}
        if dead:
            raise TensorParallelError(", ".join(f"worker rank {r} exited with code {c}" for r, c in dead.items()))

    def _worker_errors(self) -> list[str]:
        from paged_engine.distributed.rendezvous import worker_key

        errors = []
        if self._store is None:
            return errors
        for rank in range(1, self.tp):
            key = worker_key(rank, "error")
            try:
                if self._store.check([key]):
                    errors.append(f"rank {rank}: {self._store.get(key).decode(errors='replace')}")
            except Exception:  # noqa: BLE001 - the store itself may be unusable
                break
        return errors

    def _failed(self, e: BaseException) -> TensorParallelError:
        """Remember the failure (every later call raises it) and describe it."""
        if self._failure is None:
            time.sleep(0.2)  # let a failing worker finish leaving its error / exiting
            parts = [f"{type(e).__name__}: {e}"]
            try:
                self._check_processes()
            except TensorParallelError as dead:
                parts.append(str(dead))
            parts += self._worker_errors()
            self._failure = "tensor-parallel engine failed: " + "; ".join(parts)
            logger.error("%s", self._failure)
        return TensorParallelError(self._failure)

    # ------------------------------------------------------------------ the interface

    def check_health(self) -> None:
        """Raise TensorParallelError if a rank has failed (cheap: no communication)."""
        if self._failure is not None:
            raise TensorParallelError(self._failure)
        if self._closed:
            raise TensorParallelError("tensor-parallel executor is shut down")
        try:
            self._check_processes()
        except TensorParallelError as e:
            raise self._failed(e) from None

    def _call(self, method: str, batch, *extra):
        self.check_health()
        try:
            t0 = time.perf_counter()
            self.broadcast_bytes += self.channel.send((method, (batch,)))
            self.broadcast_s += time.perf_counter() - t0
            self.num_steps += 1
            return getattr(self.runner, method)(batch, *extra)
        except Exception as e:
            raise self._failed(e) from e

    def execute_model(self, batch, draft_probs: dict | None = None):
        if draft_probs:
            return self._call("execute_model", batch, draft_probs)
        return self._call("execute_model", batch)

    def compute_logits(self, batch):
        """Per scheduled sequence, the float32 logits of its query tokens (runner.compute_logits)."""
        return self._call("compute_logits", batch)

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.shutdown)
        from paged_engine.distributed.rendezvous import destroy_groups

        if self._failure is None and getattr(self, "channel", None) is not None:
            try:
                self.channel.send(("shutdown", ()))
            except Exception as e:  # noqa: BLE001 - a worker is gone: terminate below
                logger.warning("tensor-parallel shutdown message failed: %s", e)
        if self._failure is not None:
            # No clean goodbye: the workers still wait in the channel; close it and stop them.
            if self._owns_groups:
                destroy_groups()
            for proc in self.procs.values():
                if proc.poll() is None:
                    proc.terminate()
        deadline = time.monotonic() + SHUTDOWN_GRACE_S
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        runner, self.runner = self.runner, None
        if runner is not None:
            runner.shutdown()
        if self._owns_groups:
            destroy_groups()
        self._store = None
        if self._threads is not None:
            import torch

            torch.set_num_threads(self._threads)
