"""BroadcastChannel: rank 0 sends a picklable object (a step's `SchedulerOutput`) to every rank.

The object travels as a torch.distributed broadcast of a packed uint8 tensor over a gloo group
(CPU memory, on GPUs too, so it never waits behind the model's NCCL kernels): one broadcast of
a fixed `FIRST_CHUNK_BYTES` buffer whose first 8 bytes give the payload's length, and a second
one only for a payload that does not fit (a large prefill's token ids). A decode batch is a few
hundred bytes, so a step costs one broadcast.

The group's timeout is long: the workers wait in `recv` while the engine is idle. A rank that
dies closes its connections, which fails the peers' broadcasts at once.
"""

from __future__ import annotations

import pickle

import torch

FIRST_CHUNK_BYTES = 16 << 10
_LEN_BYTES = 8


class BroadcastChannel:
    """send() on rank 0, recv() on the others, in the same order."""

    def __init__(self, group, src: int = 0):
        import torch.distributed as dist

        self._dist = dist
        self.group = group
        self.src = src
        self._first = torch.empty(FIRST_CHUNK_BYTES, dtype=torch.uint8)

    def send(self, obj) -> int:
        """Broadcast `obj`; returns its pickled size in bytes."""
        payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        n = len(payload)
        head = n.to_bytes(_LEN_BYTES, "little") + payload[: FIRST_CHUNK_BYTES - _LEN_BYTES]
        first = self._first
        first[: len(head)] = torch.frombuffer(bytearray(head), dtype=torch.uint8)
        self._dist.broadcast(first, src=self.src, group=self.group)
        rest = payload[FIRST_CHUNK_BYTES - _LEN_BYTES:]
        if rest:
            self._dist.broadcast(torch.frombuffer(bytearray(rest), dtype=torch.uint8), src=self.src,
                                 group=self.group)
        return n

    def recv(self):
        first = self._first
        self._dist.broadcast(first, src=self.src, group=self.group)
        raw = first.numpy().tobytes()
        n = int.from_bytes(raw[:_LEN_BYTES], "little")
        payload = raw[_LEN_BYTES: _LEN_BYTES + n]
        if n > FIRST_CHUNK_BYTES - _LEN_BYTES:
            rest = torch.empty(n - (FIRST_CHUNK_BYTES - _LEN_BYTES), dtype=torch.uint8)
            self._dist.broadcast(rest, src=self.src, group=self.group)
            payload += rest.numpy().tobytes()
        return pickle.loads(payload)
