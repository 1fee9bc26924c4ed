"""A tensor-parallel engine whose workers die, or never come, fails with an error naming the
rank, never hangs; shutting down leaves no worker process behind. The multi-machine path (a
worker started by hand with torchrun's variables, as on another machine) is the one README's
worked example uses.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from paged_engine import LLM, SamplingParams
from paged_engine.executor.multiproc_executor import TensorParallelError

ARGS = dict(device="cpu", dtype="float32", block_size=8, num_kv_blocks=64, max_model_len=128,
            enforce_eager=True, distributed_timeout_s=20)
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is gone too
        return f.read().split(")")[-1].split()[0] != "Z"


def test_clean_shutdown_leaves_no_worker(tiny_model_dir):
    llm = LLM(tiny_model_dir, tensor_parallel_size=2, **ARGS)
    ex = llm.engine.executor
    pids = [p.pid for p in ex.procs.values()]
    assert pids and all(_alive(p) for p in pids)
    llm.generate(["hello"], GREEDY)
    with pytest.raises(TensorParallelError, match="one tensor-parallel engine per process"):
        LLM(tiny_model_dir, tensor_parallel_size=2, **ARGS)
    assert all(_alive(p) for p in pids), "the refused second engine must not touch the first"
    llm.shutdown()
    assert [p.returncode for p in ex.procs.values()] == [0]
    assert not any(_alive(p) for p in pids)


def test_killed_worker_fails_the_engine_by_name(tiny_model_dir):
    llm = LLM(tiny_model_dir, tensor_parallel_size=2, **ARGS)
    ex = llm.engine.executor
    llm.generate(["hello"], GREEDY)
    worker = ex.procs[1]
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait(10)
    with pytest.raises(TensorParallelError, match="worker rank 1 exited with code -9"):
        llm.engine.check_health()  # found while idle, without a step
    t0 = time.monotonic()
    with pytest.raises(TensorParallelError, match="rank 1"):
        llm.generate(["hello again"], GREEDY)
    assert time.monotonic() - t0 < 5
    llm.shutdown()


def test_remote_worker_with_torchrun_variables_and_its_death(tiny_model_dir, monkeypatch):
    """Rank 1 started by hand as on a second machine (MASTER_ADDR/MASTER_PORT/WORLD_SIZE/RANK);
    the engine holds no handle on it, so its death shows as a failed collective."""
    port = _free_port()
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK="1",
               LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    worker = subprocess.Popen([sys.executable, "-m", "paged_engine.executor.tp_worker"], env=env)
    try:
        for k, v in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_WORLD_SIZE="1").items():
            monkeypatch.setenv(k, v)
        llm = LLM(tiny_model_dir, tensor_parallel_size=2, **ARGS)
        assert llm.engine.executor.procs == {}  # nothing started here
        ref = LLM(tiny_model_dir, **{k: v for k, v in ARGS.items() if k != "distributed_timeout_s"})
        prompts = ["the quick brown fox", "naïve café"]
        tokens = lambda outs: [o.outputs[0].token_ids for o in outs]  # noqa: E731
        assert tokens(llm.generate(prompts, GREEDY)) == tokens(ref.generate(prompts, GREEDY))
        worker.kill()
        worker.wait(10)
        t0 = time.monotonic()
        with pytest.raises(TensorParallelError, match="tensor-parallel engine failed"):
            llm.generate(["after the kill"], GREEDY)
        assert time.monotonic() - t0 < ARGS["distributed_timeout_s"] + 5
        llm.shutdown()
        ref.shutdown()
    finally:
        if worker.poll() is None:
            worker.kill()


def test_missing_remote_rank_is_an_error_not_a_hang(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    with pytest.raises(TensorParallelError, match=r"ranks \[1\] did not join within 2 s"):
        LLM(tiny_model_dir, tensor_parallel_size=2, **dict(ARGS, distributed_timeout_s=2))
