"""BlockManager: the pool of fixed-size KV-cache blocks shared by all sequences.

- A sequence holds a block table (physical block ids); blocks are allocated on demand as its
  computed tokens grow, so a sequence wastes less than one block.
- Blocks carry reference counts: n>1 children and prefix-cache hits share blocks.
- Automatic prefix caching (vLLM `hash_block_tokens`, nano-vllm `block_manager.py`): every *full*
  block whose KV has been computed is registered under hash(parent_hash, block tokens), chained
  so a hash identifies the whole prefix. A lookup verifies the stored tokens and parent hash on
  a hit. Only blocks before the sequence's last token are looked up, so at least one token is
  always computed (its logits are needed to sample).
- Free blocks wait in one queue (vLLM `FreeKVCacheBlockQueue`): blocks are handed out from the
  front. A freed block that holds a registered prefix keeps its hash and goes to the back, so
  cached blocks are reused in least-recently-used order and evicted only when handed out again.
  A freed block without a hash goes to the front (nothing to keep). A sequence's blocks are
  freed tail first, so a prompt's later blocks (less likely shared) are evicted before its head.

- Sliding-window models (Mistral v0.1, Gemma's local layers, Phi-3) keep every block of a
  sequence until it finishes: attention skips the keys before the window, but no block is freed
  early, so capacity is counted for the whole sequence (see the README's Models section).

Torch-free; the scheduler is the only caller.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    from paged_engine.core.sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "block_hash", "parent_hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.block_hash: int | None = None     # set while registered in the prefix cache
        self.parent_hash: int | None = None
        self.token_ids: tuple[int, ...] | None = None  # stored tokens, verified on a hit

    def __repr__(self) -> str:
        return f"Block({self.block_id}, ref={self.ref_count}, hash={self.block_hash})"


def hash_block_tokens(parent_hash: int | None, token_ids: tuple[int, ...]) -> int:
    """Chained hash of one full block: identifies the block's tokens and the whole prefix."""
    return hash((parent_hash, token_ids))


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockManager:
    """Allocates, shares, caches and frees KV-cache blocks.

    Args:
        num_blocks: blocks in the KV cache.
        block_size: tokens per block.
        enable_prefix_caching: register full blocks and look prompts up in the cache.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        # Block objects are created on first use (block_id == index), so a huge cache (millions
        # of blocks for a tiny model on a big GPU) costs nothing until it is used. Blocks with
        # ids >= len(self.blocks) are "fresh": free, never used.
        self.blocks: list[Block] = []
        # Freed blocks; front = next handed out. Values unused; OrderedDict gives O(1) removal
        # from the middle. Unhashed blocks sit at the front, cached ones behind in LRU order;
        # fresh blocks are handed out after the unhashed ones and before evicting cached ones.
        self.free_queue: OrderedDict[int, None] = OrderedDict()
        self.hash_to_block: dict[int, int] = {}

    # -- capacity --

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue) + self.num_blocks - len(self.blocks)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def free_block_order(self) -> list[int]:
        """Free block ids in the order they would be handed out (tests, debugging)."""
        unhashed = [b for b in self.free_queue if self.blocks[b].block_hash is None]
        cached = [b for b in self.free_queue if self.blocks[b].block_hash is not None]
        return unhashed + list(range(len(self.blocks), self.num_blocks)) + cached

    def blocks_for_tokens(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    # -- hashing --

    def _block_tokens(self, seq: "Sequence", i: int) -> tuple[int, ...]:
        bs = self.block_size
        return tuple(seq.token_slice(i * bs, (i + 1) * bs))

    def _block_hash(self, seq: "Sequence", i: int) -> int:
        """Hash of the sequence's i-th block (must be full of known tokens); cached on the seq."""
        hashes = seq.block_hashes
        while len(hashes) <= i:
            j = len(hashes)
            parent = hashes[j - 1] if j else None
            hashes.append(hash_block_tokens(parent, self._block_tokens(seq, j)))
        return hashes[i]

    # -- prefix cache lookup --

    def find_cached_prefix(self, seq: "Sequence") -> list[int]:
        """Block ids holding the longest cached prefix of `seq` (full blocks, verified).

        Stops before the block holding the last token so at least one token gets computed.
        Pure lookup: nothing is allocated or touched.
        """
        if not self.enable_prefix_caching:
            return []
        hit: list[int] = []
        parent = None
        for i in range((seq.num_tokens - 1) // self.block_size):
            h = self._block_hash(seq, i)
            block_id = self.hash_to_block.get(h)
            if block_id is None:
                break
            block = self.blocks[block_id]
            if block.parent_hash != parent or block.token_ids != self._block_tokens(seq, i):
                break  # hash collision: not our prefix
            hit.append(block_id)
            parent = h
        return hit

    # -- allocation --

    def _pop_free_block(self) -> Block:
        block = None
        if self.free_queue:
            first = self.blocks[next(iter(self.free_queue))]
            if first.block_hash is None or len(self.blocks) == self.num_blocks:
                self.free_queue.popitem(last=False)
                block = first
        if block is None:  # a fresh block rather than evicting a cached prefix
            block = Block(len(self.blocks))
            self.blocks.append(block)
        if block.block_hash is not None:  # evict the cached prefix it held
            if self.hash_to_block.get(block.block_hash) == block.block_id:
                del self.hash_to_block[block.block_hash]
            block.block_hash = block.parent_hash = block.token_ids = None
        block.ref_count = 1
        return block

    def _touch(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_queue[block_id]
        block.ref_count += 1

    def can_allocate(self, seq: "Sequence", num_new_tokens: int, cached_block_ids: list[int] = ()) -> bool:
        """Whether `seq` (taking `cached_block_ids` first, if it holds none) fits num_new_tokens more."""
        num_computed = seq.num_computed_tokens if seq.block_table else len(cached_block_ids) * self.block_size
        have = len(seq.block_table) if seq.block_table else len(cached_block_ids)
        needed = self.blocks_for_tokens(num_computed + num_new_tokens) - have
        reusable = 0 if seq.block_table else sum(
            1 for b in cached_block_ids if self.blocks[b].ref_count == 0
        )
        return self.num_free_blocks - reusable >= needed

    def allocate(self, seq: "Sequence", num_new_tokens: int, cached_block_ids: list[int] = ()) -> bool:
        """Give `seq` blocks for num_computed_tokens + num_new_tokens tokens.

        A sequence without blocks first takes `cached_block_ids` (a prefix-cache hit from
        find_cached_prefix; the caller sets num_computed_tokens to match). Returns False, changing
        nothing, when not enough blocks are free.
        """
        table = seq.block_table
        if table and seq.num_computed_tokens + num_new_tokens <= len(table) * self.block_size:
            return True  # the common decode step: its blocks already hold room for the tokens
        if not self.can_allocate(seq, num_new_tokens, cached_block_ids):
            return False
        if not seq.block_table and cached_block_ids:
            for b in cached_block_ids:
                self._touch(b)
            seq.block_table = list(cached_block_ids)
            seq.num_registered_blocks = len(cached_block_ids)
            num_computed = len(cached_block_ids) * self.block_size
        else:
            num_computed = seq.num_computed_tokens
        needed = self.blocks_for_tokens(num_computed + num_new_tokens) - len(seq.block_table)
        for _ in range(needed):
            seq.block_table.append(self._pop_free_block().block_id)
        return True

    def fork(self, parent: "Sequence", child: "Sequence", num_blocks: int) -> None:
        """Share the parent's first num_blocks (full, computed) blocks with a child that has none."""
        assert not child.block_table and num_blocks <= len(parent.block_table)
        for b in parent.block_table[:num_blocks]:
            self._touch(b)
        child.block_table = parent.block_table[:num_blocks]
        child.block_hashes = parent.block_hashes[:num_blocks]
        child.num_registered_blocks = min(num_blocks, parent.num_registered_blocks)

    def free(self, seq: "Sequence") -> None:
        """Release the sequence's blocks, tail first. Cached blocks stay reusable until evicted."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, block
            if block.ref_count == 0:
                self.free_queue[block_id] = None
                if block.block_hash is None:
                    self.free_queue.move_to_end(block_id, last=False)
        seq.block_table = []
        seq.num_registered_blocks = 0

    # -- prefix cache registration --

    def register_full_blocks(self, seq: "Sequence") -> None:
        """Register the sequence's blocks that are now full of computed KV in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        if seq.num_computed_tokens < (seq.num_registered_blocks + 1) * self.block_size:
            return  # no block filled up since the last registration (most steps)
        num_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        for i in range(seq.num_registered_blocks, num_full):
            block = self.blocks[seq.block_table[i]]
            if block.block_hash is not None:
                continue  # already registered (a shared block)
            h = self._block_hash(seq, i)
            if h in self.hash_to_block:
                continue  # same content already cached in another block; this one stays private
            self.hash_to_block[h] = block.block_id
            block.block_hash = h
            block.parent_hash = seq.block_hashes[i - 1] if i else None
            block.token_ids = self._block_tokens(seq, i)
        seq.num_registered_blocks = max(seq.num_registered_blocks, num_full)

    def reset_prefix_cache(self) -> None:
        """Forget all cached prefixes of free blocks (blocks in use keep their registration)."""
        for block_id in list(self.free_queue):
            block = self.blocks[block_id]
            if block.block_hash is not None:
                if self.hash_to_block.get(block.block_hash) == block_id:
                    del self.hash_to_block[block.block_hash]
                block.block_hash = block.parent_hash = block.token_ids = None
                self.free_queue.move_to_end(block_id, last=False)

    # -- checks (tests, debugging) --

    def check_invariants(self, seqs: Iterable["Sequence"]) -> None:
        """Assert the pool is consistent with the block tables of `seqs` (all live sequences)."""
        refs = [0] * len(self.blocks)
        for seq in seqs:
            assert len(set(seq.block_table)) == len(seq.block_table), f"duplicate block in {seq}"
            for b in seq.block_table:
                assert 0 <= b < len(self.blocks), f"{seq} holds a block never handed out"
                refs[b] += 1
        for block in self.blocks:
            assert block.ref_count == refs[block.block_id], (
                f"{block}: ref_count {block.ref_count} != {refs[block.block_id]} table references"
            )
            in_free = block.block_id in self.free_queue
            assert in_free == (block.ref_count == 0), f"{block} free={in_free}"
        for h, b in self.hash_to_block.items():
            assert self.blocks[b].block_hash == h, f"hash table entry {h} -> {self.blocks[b]}"
        free_order = self.free_block_order()
        assert list(self.free_queue) == [b for b in free_order if b < len(self.blocks)], "queue order"
        assert self.num_free_blocks + sum(1 for b in self.blocks if b.ref_count > 0) == self.num_blocks
