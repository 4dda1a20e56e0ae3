"""The KV cache's blocks as a budget: allocation, reservation, and automatic prefix caching.

Pure bookkeeping over block ids (the tensors are inference/paged.py's). Block 0 is the null
block and never handed out. A request is admitted only if every block it could ever need
(its prompt plus max_tokens, less the cached prefix it shares) can be reserved, so a running
sequence never waits for memory and is never preempted.

Prefix caching (as vLLM's automatic prefix caching): a full block of prompt tokens is known
by the hash of its chain, hash(parent block's hash, the block's tokens), so equal hashes mean
equal token prefixes up to the block's end, and the cached keys/values in it are the ones a
new request with that prefix would compute. Blocks are reference-counted; a cached block no
sequence holds stays in the pool, evictable, in least-recently-released order (a sequence's
blocks are released last block first, so a shared prefix's first blocks are evicted last).
Only unreferenced blocks are ever evicted or rewritten: a running sequence's cache is its own.
"""

from __future__ import annotations

import array
import collections
import hashlib
from collections.abc import Sequence

from llamaworks.inference.paged import NULL_BLOCK


def chain_hash(parent: bytes, tokens: Sequence[int]) -> bytes:
    """The hash of a full block of tokens after the chain ending in `parent` (b"" at the start).
    128-bit BLAKE2b of the parent's hash and the token ids: a collision would silently serve
    another prompt's keys, so no 64-bit built-in hash()."""
    return hashlib.blake2b(parent + array.array("q", tokens).tobytes(), digest_size=16).digest()


def prompt_hashes(tokens: Sequence[int], block_size: int, limit: int | None = None) -> list[bytes]:
    """Chain hashes of the first `limit` full blocks of `tokens` (default: all full blocks)."""
    n = len(tokens) // block_size if limit is None else min(limit, len(tokens) // block_size)
    out, parent = [], b""
    for j in range(n):
        parent = chain_hash(parent, tokens[j * block_size:(j + 1) * block_size])
        out.append(parent)
    return out


def blocks_for(positions: int, block_size: int) -> int:
    return -(-positions // block_size)


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        if num_blocks < 2:
            raise ValueError(f"the KV cache needs at least 2 blocks (one is reserved), got {num_blocks}: "
                             "raise --kv-cache-gb")
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.ref = [0] * num_blocks
        self.free = collections.deque(b for b in range(num_blocks) if b != NULL_BLOCK)
        self.block_hash: dict[int, bytes] = {}
        self.cached: dict[bytes, int] = {}
        self.idle: collections.OrderedDict[int, None] = collections.OrderedDict()  # cached, unreferenced: LRU first
        self.reserved = 0  # blocks promised to admitted sequences, not allocated yet
        self.queries = 0  # prompt tokens looked up
        self.hits = 0  # of which found cached
        self.evictions = 0  # cached blocks reused for other content

    @property
    def capacity(self) -> int:
        return self.num_blocks - 1

    def available(self) -> int:
        """Blocks a new reservation may take: free, or cached and evictable, less those promised."""
        return len(self.free) + len(self.idle) - self.reserved

    def match(self, hashes: Sequence[bytes]) -> list[int]:
        """The cached blocks of the longest cached prefix of a chain of hashes."""
        out = []
        for h in hashes if self.prefix_caching else ():
            b = self.cached.get(h)
            if b is None:
                break
            out.append(b)
        return out

    def admit(self, hashes: Sequence[bytes], total: int, tokens: int) -> list[int] | None:
        """Reserve a sequence that may need `total` blocks, `hashes` being its prompt's full blocks
        it may share (the chain of `tokens` prompt tokens looked up): the shared cached blocks,
        which it now holds, or None when the pool cannot promise the rest now."""
        hits = self.match(hashes)
        idle = sum(self.ref[b] == 0 for b in hits)  # taking them off the idle list costs availability
        if total - len(hits) + idle > self.available():
            return None
        for b in hits:
            if self.ref[b] == 0:
                del self.idle[b]
            self.ref[b] += 1
        self.reserved += total - len(hits)
        self.queries += tokens
        self.hits += len(hits) * self.block_size
        return hits

    def allocate(self) -> int:
        """A private block for an admitted sequence, out of its reservation."""
        assert self.reserved > 0, "allocate() beyond the sequence's reservation"
        self.reserved -= 1
        if self.free:
            b = self.free.popleft()
        else:
            b, _ = self.idle.popitem(last=False)  # evict the least recently released
            del self.cached[self.block_hash.pop(b)]
            self.evictions += 1
        assert self.ref[b] == 0, (b, self.ref[b])
        self.ref[b] = 1
        return b

    def unallocate(self, block: int) -> None:
        """Give a private, unpublished block back to its sequence's reservation (speculative
        decoding allocated it for drafts the target rejected; the sequence may need it later)."""
        assert self.ref[block] == 1 and block not in self.block_hash, (block, self.ref[block])
        self.ref[block] = 0
        self.free.appendleft(block)
        self.reserved += 1

    def register(self, block: int, h: bytes) -> None:
        """Publish a sequence's full, computed prompt block under its chain hash (unless another
        block already holds that prefix, as when two equal prompts were prefilled together)."""
        if self.prefix_caching and h not in self.cached and block not in self.block_hash:
            self.cached[h] = block
            self.block_hash[block] = h

    def release(self, blocks: Sequence[int], unused: int) -> None:
        """A sequence ends: drop its hold on `blocks` and the `unused` rest of its reservation."""
        assert 0 <= unused <= self.reserved, (unused, self.reserved)
        self.reserved -= unused
        for b in reversed(blocks):  # the chain's tail first: evicted before the prefix it extends
            assert self.ref[b] > 0, (b, self.ref[b])
            self.ref[b] -= 1
            if self.ref[b] == 0:
                if b in self.block_hash:
                    self.idle[b] = None
                else:
                    self.free.append(b)

    def stats(self) -> dict[str, float]:
        used = self.capacity - len(self.free) - len(self.idle)
        return {"kv_blocks_total": self.capacity, "kv_blocks_used": used, "kv_blocks_free": len(self.free),
                "kv_blocks_cached": len(self.idle), "kv_blocks_reserved": self.reserved,
                "kv_blocks_shared": sum(r > 1 for r in self.ref), "kv_blocks_evicted": self.evictions,
                "prefix_cache_queries": self.queries, "prefix_cache_hits": self.hits,
                "prefix_cache_hit_rate": self.hits / self.queries if self.queries else 0.0}
