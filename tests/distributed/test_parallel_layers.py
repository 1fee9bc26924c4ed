"""Each tensor-parallel layer on two gloo ranks (two processes) against the unsharded layer loaded
from the same checkpoint tensors: column-parallel (plain, merged gate_up, qkv with KV heads split
and replicated), row-parallel (all-reduce, bias once), vocab-parallel embedding (an uneven
vocabulary) and the LM head (logits gathered to rank 0 only)."""

from __future__ import annotations

import multiprocessing as mp
import queue
import socket

import pytest

import _layer_checks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results():
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_layer_checks.run, args=(rank, port, out), daemon=True) for rank in range(2)]
    for p in procs:
        p.start()
    got = {}
    try:
        for _ in range(2 * len(_layer_checks.CHECKS)):
            rank, name, error = out.get(timeout=120)
            got[(rank, name)] = error
    except queue.Empty:
        pass
    for p in procs:
        p.join(30)
        if p.is_alive():
            p.kill()
    return got


@pytest.mark.parametrize("name", [c.__name__ for c in _layer_checks.CHECKS])
def test_layer_matches_unsharded(results, name):
    for rank in range(2):
        assert (rank, name) in results, f"rank {rank} did not run {name}"
        assert results[(rank, name)] is None, f"rank {rank}:\n{results[(rank, name)]}"
