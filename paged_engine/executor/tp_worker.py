"""A tensor-parallel worker: one rank (1..n-1) of an engine, in its own process.

The engine (rank 0, executor/multiproc_executor.py) starts one per local rank itself. On another
machine, start them with the variables torchrun sets, one process per rank, or `--nproc N` for
ranks RANK .. RANK+N-1 (LOCAL_RANK 0 .. N-1, GPU cuda:LOCAL_RANK):

    MASTER_ADDR=host0 MASTER_PORT=29500 WORLD_SIZE=4 RANK=2 \\
        python -m paged_engine.executor.tp_worker --nproc 2

A worker joins rank 0's TCPStore, takes the engine's config from it (the same model path must
exist on every machine), joins the process groups, builds its shard's ModelRunner and then runs
whatever rank 0 broadcasts: each step's SchedulerOutput through `execute_model` (the batch is
plain data), until "shutdown". A worker that fails leaves its error in the store and exits, which
closes its connections, so rank 0's collective fails at once and names the error. A worker
whose parent engine dies exits too (it watches its parent process when the engine started it).
"""

from __future__ import annotations

import argparse
import copy
import os
import pickle
import subprocess
import sys
import threading
import time

# What rank 0 may ask a worker to run (the runner's methods of the same names).
_METHODS = ("execute_model", "compute_logits")
CONFIG_KEY = "paged_engine/config"


def cpu_threads_per_rank(local_world_size: int) -> int:
    """On CPU the cores this process may use are shared by its ranks (PAGED_ENGINE_THREADS_PER_RANK
    overrides)."""
    given = os.environ.get("PAGED_ENGINE_THREADS_PER_RANK")
    if given:
        return int(given)
    from paged_engine.executor.model_runner import cpu_threads

    return max(1, cpu_threads() // local_world_size)


def _watch_parent(parent_pid: int) -> None:
    def watch():
        while True:
            time.sleep(0.5)
            if os.getppid() != parent_pid:
                os._exit(3)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def run_worker(rank: int, world_size: int, local_rank: int, local_world_size: int,
               master_addr: str, master_port: int, timeout_s: float) -> None:
    import torch

    from paged_engine.distributed.broadcast_channel import BroadcastChannel
    from paged_engine.distributed.parallel_state import tensor_parallel
    from paged_engine.distributed.rendezvous import destroy_groups, init_groups, join_store, worker_key

    store = join_store(master_addr, master_port, world_size, timeout_s)
    runner = None
    try:
        store.set(worker_key(rank, "up"), str(os.getpid()))
        config = copy.copy(pickle.loads(store.get(CONFIG_KEY)))
        if config.device.startswith("cuda"):
            config.device = f"cuda:{local_rank}"
        else:
            torch.set_num_threads(cpu_threads_per_rank(local_world_size))
        if not os.path.isdir(config.model):
            raise ValueError(f"rank {rank}: model directory {config.model!r} does not exist on this "
                             "machine (every machine needs the model at the same path)")
        channel_group = init_groups(store, rank, world_size, config.device.split(":")[0], timeout_s)
        from paged_engine.executor.model_runner import ModelRunner

        with tensor_parallel(rank, world_size):
            runner = ModelRunner(config, config.hf_config)
        channel = BroadcastChannel(channel_group)
        while True:
            method, args = channel.recv()
            if method == "shutdown":
                break
            if method not in _METHODS:
                raise ValueError(f"rank {rank}: unknown method {method!r} from rank 0")
            getattr(runner, method)(*args)
    except BaseException as e:
        try:
            store.set(worker_key(rank, "error"), f"{type(e).__name__}: {e}")
        except Exception:  # noqa: BLE001 - rank 0 is gone too
            pass
        raise
    finally:
        if runner is not None:
            runner.shutdown()
        destroy_groups()


def _env_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise SystemExit(f"tp_worker: the environment variable {name} is required")
        return default
    return int(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m paged_engine.executor.tp_worker",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=None,
                        help="start this many ranks from RANK on (one per GPU of this machine)")
    parser.add_argument("--timeout-s", type=float, default=None,
                        help="collective timeout (default: PAGED_ENGINE_TIMEOUT_S or 120)")
    args = parser.parse_args(argv)
    timeout_s = args.timeout_s or float(os.environ.get("PAGED_ENGINE_TIMEOUT_S", 120))
    rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    addr, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), _env_int("MASTER_PORT", 29500)
    if args.nproc is not None and args.nproc > 1:
        procs = []
        for i in range(args.nproc):
            env = dict(os.environ, RANK=str(rank + i), LOCAL_RANK=str(i), LOCAL_WORLD_SIZE=str(args.nproc))
            procs.append(subprocess.Popen([sys.executable, "-m", __spec__.name, "--timeout-s", str(timeout_s)],
                                          env=env))
        return max(p.wait() for p in procs)
    parent = os.environ.get("PAGED_ENGINE_PARENT_PID")
    if parent:
        _watch_parent(int(parent))
    run_worker(rank, world, _env_int("LOCAL_RANK", 0), _env_int("LOCAL_WORLD_SIZE", 1), addr, port, timeout_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
