"""Helpers for the kernel tests: build a paged KV cache with shuffled physical blocks.

Kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set by tests/conftest.py; set here
too so this directory also runs alone). The interpreter runs one program at a time, so the
shapes below keep grids to a few dozen programs.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import random  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


@dataclass
class PagedKV:
    k_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # int32 [num_seqs, max_blocks_per_seq]
    context_lens: torch.Tensor  # int32 [num_seqs]
    seed: int  # reported in assertion messages so a failure can be replayed

    def gather(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequence i's K and V as contiguous [context_len, num_kv_heads, head_dim] (a plain loop,
        independent of the refs' vectorised gather)."""
        block_size = self.k_cache.shape[1]
        n = int(self.context_lens[i])
        ks, vs = [], []
        for pos in range(n):
            block = int(self.block_tables[i, pos // block_size])
            ks.append(self.k_cache[block, pos % block_size])
            vs.append(self.v_cache[block, pos % block_size])
        if not ks:
            empty = self.k_cache.new_zeros(0, *self.k_cache.shape[2:])
            return empty, empty
        return torch.stack(ks), torch.stack(vs)


def _make_paged_kv(context_lens, num_kv_heads, head_dim, block_size, dtype, spare_blocks=3, seed=None):
    """Random K/V in a cache whose physical blocks are handed out in shuffled order; the unused
    tail of each block table points at random (valid) blocks, as a padded table would."""
    seed = random.randrange(2**31) if seed is None else seed
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-n // block_size) for n in context_lens]
    max_blocks = max(max(blocks_per_seq), 1) + 1
    num_blocks = sum(blocks_per_seq) + spare_blocks
    perm = torch.randperm(num_blocks, generator=gen)
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    block_tables = torch.randint(0, num_blocks, (len(context_lens), max_blocks), generator=gen, dtype=torch.int32)
    used = 0
    for i, nb in enumerate(blocks_per_seq):
        block_tables[i, :nb] = perm[used : used + nb].int()
        used += nb
    return PagedKV(k_cache, v_cache, block_tables, torch.tensor(context_lens, dtype=torch.int32), seed)


@pytest.fixture
def make_paged_kv():
    return _make_paged_kv
