"""Per-layer caches for the MLX backend: mlx-lm's own (its model's make_cache), their left-padded batch
versions, and the length, trimming, bytes and arrays the backend asks of them.

A cache is mlx-lm's KVCache / RotatingKVCache / Batch* or a CacheList of such with an ArraysCache: baichuan_m1
keeps its key/value convolution state (the last position's keys and values before the convolution) there.
"""
import mlx.core as mx
from mlx_lm.models.cache import ArraysCache, BatchKVCache, BatchRotatingKVCache, CacheList, KVCache, RotatingKVCache

from airmlx.errors import BackendError

CONV_HISTORY = 64  # convolution states kept per layer, so a cache can be cut back by up to this many writes


def kv_part(cache):
    """The cache holding keys and values (the one masks and lengths are read from)."""
    if isinstance(cache, CacheList):
        return next(c for c in cache.caches if not isinstance(c, ArraysCache))
    return cache


def length(cache):
    """Tokens this layer's cache has seen (with left padding, for batch caches)."""
    c = kv_part(cache)
    if isinstance(c, BatchRotatingKVCache):
        return int(c._offset)
    return int(c.offset) if isinstance(c, (KVCache, RotatingKVCache)) else int(c._idx)


def arrays(cache):
    """The arrays a cache holds, to evaluate before a stage's weights are dropped and to count bytes."""
    if isinstance(cache, CacheList):
        return [a for c in cache.caches for a in arrays(c)]
    if isinstance(cache, ArraysCache):
        return [a for a in cache.cache if a is not None]
    return [cache.keys, cache.values] if cache.keys is not None else []


class ConvState(ArraysCache):
    """An ArraysCache that remembers its state after each of its last CONV_HISTORY steps, by the length of the
    KV cache beside it, so trimming can restore it (a chat edit, a Ctrl-C mid-sweep). The layer writes the
    state after updating the KV cache, the last entry last."""

    def __init__(self, size, kv):
        super().__init__(size)
        self.kv, self.history = kv, []

    def __setitem__(self, idx, value):
        # a copy: the layer writes a slice, which would keep its whole prefill's keys or values alive
        super().__setitem__(idx, None if value is None else mx.contiguous(value))
        if idx == len(self.cache) - 1:
            self.history = (self.history + [(length(self.kv), list(self.cache))])[-CONV_HISTORY:]

    def filter(self, batch_indices):
        super().filter(batch_indices)
        self.history = [(n, [a[batch_indices] if a is not None else None for a in s]) for n, s in self.history]

    def rewind(self, keep):
        saved = [s for n, s in self.history if n == keep]
        if keep and not saved:
            raise BackendError(f"this layer's convolution state cannot go back to {keep} tokens (it keeps the "
                               f"last {CONV_HISTORY} steps); start a new cache (in chat: /reset).")
        self.cache = list(saved[-1]) if saved else [None] * len(self.cache)
        self.history = [(n, s) for n, s in self.history if n <= keep]


def batched(cache, pads):
    """mlx-lm's single-sequence cache -> the batch version for prompts left-padded by `pads`, with a
    convolution state that can be trimmed."""
    if isinstance(cache, CacheList):
        parts = [batched(c, pads) for c in cache.caches]
        kv = kv_part(CacheList(*parts))
        return CacheList(*(ConvState(len(c.cache), kv) if isinstance(c, ArraysCache) else c for c in parts))
    if pads is None:
        return cache
    if isinstance(cache, RotatingKVCache) and cache.keep == 0:
        return BatchRotatingKVCache(cache.max_size, pads)
    if isinstance(cache, KVCache):
        return BatchKVCache(pads)
    if isinstance(cache, ArraysCache):
        return cache
    raise BackendError(f"mlx-lm's {type(cache).__name__} has no left-padded batch version; "
                       "run one prompt at a time.")


def trim(cache, keep):
    drop = length(cache) - keep
    if drop <= 0:
        return
    if isinstance(cache, CacheList):
        for c in cache.caches:
            if isinstance(c, ConvState):
                c.rewind(keep)
            elif not isinstance(c, ArraysCache):
                c.trim(drop)
    else:
        cache.trim(drop)
