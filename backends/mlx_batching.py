"""Requests with caches of their own joined into one left-padded batch and taken apart again, for the
server's engine (airmlx/engine.py): mlx-lm's BatchKVCache does the padding (merge, extend, extract)."""
import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache, KVCache

from airmlx.errors import GenerationError

from . import mlx_adapters


def mergeable(cache) -> bool:
    """Plain key/value layers only: sliding windows and convolution states keep per-layer bookkeeping that a
    padded batch would break."""
    return all(type(c) in (KVCache, BatchKVCache) for c in cache)


def merge(caches: list):
    """One batch cache holding every row of `caches` in order, right-aligned (the shorter ones left-padded);
    None when a cache is not mergeable. The caches given are used up."""
    if not all(mergeable(c) for c in caches):
        return None
    layers = []
    for parts in zip(*caches):
        parts = [c if isinstance(c, BatchKVCache) else BatchKVCache.merge([c]) for c in parts]
        head = parts[0]
        for other in parts[1:]:
            head.extend(other)
        layers.append(head)
    mx.eval(*(a for c in layers for a in mlx_adapters.arrays(c)))
    return mlx_adapters.Caches(layers)


def extract(cache, row: int, length: int):
    """One row of a batch cache as a cache of its own holding the row's last `length` tokens (its padding
    dropped), a copy; None when the cache is not mergeable."""
    if not mergeable(cache):
        return None
    out = []
    for c in cache:
        if c.keys is None and not mlx_adapters.length(c):  # a layer this process never runs (another pipeline rank's)
            out.append(KVCache())
            continue
        if row >= c.keys.shape[0]:
            raise GenerationError(f"extract_cache: row {row} is not a row of this cache (it has {c.keys.shape[0]}).")
        single = c.extract(row) if isinstance(c, BatchKVCache) else c
        if single.offset != length:  # the engine's count and the cache's must agree
            raise GenerationError(f"extract_cache: row {row} holds {single.offset} tokens, not {length}.")
        out.append(single)
    return mlx_adapters.Caches(out)
