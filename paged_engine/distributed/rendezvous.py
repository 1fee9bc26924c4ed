"""How the ranks of a tensor-parallel engine find each other: torch.distributed's TCPStore.

Rank 0 (the engine's process) hosts the store; every other rank connects to it, says it is up,
joins the process groups and later leaves its error there if it fails, so rank 0 can name the
cause instead of a bare "connection closed". The addresses follow the variables `torchrun`
sets (`MASTER_ADDR`, `MASTER_PORT`, `WORLD_SIZE`, `RANK`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`);
without `MASTER_ADDR` everything is on this machine and the store takes a free port.

Two groups: the model's (NCCL on GPUs, gloo on CPU; its timeout bounds every collective of a
step) and the batch channel's (gloo; on the workers a long timeout: they wait in it while the
engine idles).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

# A worker waits this long for the next batch (the engine may idle for days).
CHANNEL_TIMEOUT_S = 30 * 24 * 3600.0
_KEY = "paged_engine/"


@dataclass
class Rendezvous:
    master_addr: str
    master_port: int          # 0: pick a free one (single machine)
    world_size: int
    local_world_size: int     # ranks on rank 0's machine (0 .. local_world_size - 1)

    @classmethod
    def from_env(cls, tensor_parallel_size: int, env=None) -> "Rendezvous":
        env = os.environ if env is None else env
        tp = tensor_parallel_size
        world = int(env.get("WORLD_SIZE", tp))
        if world != tp:
            raise ValueError(f"WORLD_SIZE={world} in the environment but tensor_parallel_size={tp}")
        if "MASTER_ADDR" not in env:
            return cls("127.0.0.1", 0, tp, tp)
        local = int(env.get("LOCAL_WORLD_SIZE", tp))
        if not 1 <= local <= tp:
            raise ValueError(f"LOCAL_WORLD_SIZE={local} must be in [1, tensor_parallel_size={tp}]")
        port = int(env.get("MASTER_PORT", 29500))
        return cls(env["MASTER_ADDR"], port, tp, local)


def worker_key(rank: int, what: str) -> str:
    return f"{_KEY}{what}/{rank}"


def host_store(rdzv: Rendezvous, timeout_s: float):
    import torch.distributed as dist

    return dist.TCPStore(rdzv.master_addr if rdzv.master_port else "127.0.0.1", rdzv.master_port,
                         rdzv.world_size, is_master=True, timeout=timedelta(seconds=timeout_s),
                         wait_for_workers=False)


def join_store(master_addr: str, master_port: int, world_size: int, timeout_s: float):
    import torch.distributed as dist

    return dist.TCPStore(master_addr, master_port, world_size, is_master=False,
                         timeout=timedelta(seconds=timeout_s))


def init_groups(store, rank: int, world_size: int, device_type: str, timeout_s: float):
    """Join the model's default process group and create the channel's; returns the channel group.

    Every rank calls this in the same order (new_group is collective)."""
    import torch.distributed as dist

    if dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialised in this process: one "
                           "tensor-parallel engine per process")
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))
    # A group's timeout is each process's own: rank 0 never waits long to send, the workers wait
    # for the next batch as long as the engine idles.
    channel_timeout_s = timeout_s if rank == 0 else CHANNEL_TIMEOUT_S
    return dist.new_group(list(range(world_size)), backend="gloo",
                          timeout=timedelta(seconds=channel_timeout_s))


def destroy_groups() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
