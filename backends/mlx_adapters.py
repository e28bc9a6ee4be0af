"""Per-layer caches for the MLX backend: mlx-lm's own (its model's make_cache), their left-padded batch
versions, and the length, trimming, bytes and arrays the backend asks of them.

A cache is mlx-lm's KVCache / RotatingKVCache / Batch* or a CacheList of such with an ArraysCache: baichuan_m1
keeps its key/value convolution state (the last position's keys and values before the convolution) there.
Sliding-window layers keep TRIM_SLACK tokens beyond their window (the attention mask still covers only the
window), so a cache rolls back up to that many tokens exactly; further is a CacheTrimError, never a silent
change of the numbers.
"""
import contextlib

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import ArraysCache, BatchKVCache, BatchRotatingKVCache, CacheList, KVCache, RotatingKVCache

from airmlx.errors import BackendError, CacheTrimError

CONV_HISTORY = 64  # convolution states kept per layer, so a cache can be cut back by up to this many writes
TRIM_SLACK = 64  # tokens a sliding-window layer keeps beyond its window, so trims up to this are exact


class Caches(list):
    """One cache per layer: a list the model can keep a weak reference to (identity, not contents, is
    what makes two of them the same)."""
    __eq__ = object.__eq__
    __hash__ = object.__hash__


def windowed(cache, window):
    """A sliding-window layer's cache: a RotatingKVCache of window + TRIM_SLACK tokens."""
    if isinstance(cache, CacheList):
        return CacheList(*(c if isinstance(c, ArraysCache) else windowed(c, window) for c in cache.caches))
    if isinstance(cache, (KVCache, RotatingKVCache)):
        return RotatingKVCache(max_size=window + TRIM_SLACK, keep=getattr(cache, "keep", 0))
    return cache


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

    def can_rewind(self, keep):
        return not keep or any(n == keep for n, _ in self.history)

    def rewind(self, keep):
        saved = [s for n, s in self.history if n == keep]
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


def check_trim(cache, keep, window):
    """Raise CacheTrimError unless trimming this layer's cache back to `keep` tokens is exact."""
    drop = length(cache) - keep
    if drop <= 0:
        return
    if isinstance(cache, CacheList):
        for c in cache.caches:
            if isinstance(c, ConvState) and not c.can_rewind(keep):
                raise CacheTrimError(f"this model's convolution state cannot go back {drop} tokens (it keeps the "
                                     f"last {CONV_HISTORY} steps); start a new cache (in chat: /reset).")
            if not isinstance(c, ArraysCache):
                check_trim(c, keep, window)
        return
    if isinstance(cache, RotatingKVCache):
        stored = min(cache.offset, cache.keys.shape[2]) if cache.keys is not None else 0
        if stored - drop >= min(keep, window - 1):
            return
    elif isinstance(cache, BatchRotatingKVCache):
        if cache.is_trimmable():
            return
    else:
        return
    raise CacheTrimError(f"the cache cannot go back {drop} tokens exactly: its sliding-window layers keep only the "
                         f"last {window} + {TRIM_SLACK} tokens; start a new cache (in chat: /reset).")


def trim(cache, keep):
    """Roll one layer's cache back to `keep` tokens (check_trim says whether that is exact)."""
    drop = length(cache) - keep
    if drop <= 0:
        return
    if isinstance(cache, CacheList):
        for c in cache.caches:
            if isinstance(c, ConvState):
                c.rewind(keep)
            elif not isinstance(c, ArraysCache):
                trim(c, keep)
    elif isinstance(cache, RotatingKVCache):
        trim_rotating(cache, drop)
    else:
        cache.trim(drop)


def trim_rotating(cache, drop):
    """RotatingKVCache.trim moves the write position back, which is right only while the buffer has not
    wrapped. Here the buffer goes into temporal order, loses its newest `drop` tokens, and is padded in front
    (positions the window no longer reaches) to the layout mlx-lm expects for the new offset."""
    offset = cache.offset - drop
    keys, values = (cache._temporal_order(v)[..., : min(cache.offset, cache.keys.shape[2]) - drop, :]
                    for v in (cache.keys, cache.values))
    size = max(min(offset, cache.max_size), keys.shape[2])

    def padded(v):
        missing = size - v.shape[2]
        return mx.concatenate([mx.zeros((*v.shape[:2], missing, v.shape[3]), v.dtype), v], axis=2) if missing else v

    cache.keys, cache.values = padded(keys), padded(values)
    cache.offset, cache._idx = offset, size


def select_rows(cache, rows):
    """Keep only these rows of one layer's cache: batch caches filter themselves; a one-row cache (mlx-lm's
    KVCache, RotatingKVCache: new_cache() of one unpadded prompt) has no filter, its arrays are indexed."""
    if isinstance(cache, CacheList):
        for c in cache.caches:
            select_rows(c, rows)
    elif isinstance(cache, (KVCache, RotatingKVCache)):
        if cache.keys is not None:
            cache.keys, cache.values = cache.keys[rows], cache.values[rows]
    else:
        cache.filter(rows)


def empty_layer(cache):
    """Forget what one layer's cache holds (a scoring sweep's scratch cache, once the layer has run)."""
    if isinstance(cache, CacheList):
        for c in cache.caches:
            empty_layer(c)
    elif isinstance(cache, ArraysCache):
        cache.cache = [None] * len(cache.cache)
    else:
        cache.keys = cache.values = None
        cache.offset = 0
        if hasattr(cache, "_idx"):
            cache._idx = 0


# -- tree attention (speculative decoding) ---------------------------------------------------------
def keep_positions(cache, positions, start):
    """Keep only `positions` of one layer's KVCache, in order; the first `start` are already in place."""
    if type(cache) is not KVCache:
        raise BackendError(f"mlx-lm's {type(cache).__name__} cannot keep chosen positions; use chain speculation.")
    n = len(positions)
    if start < n and cache.keys is not None:
        tail = mx.array(positions[start:].astype("int32"))
        moved = [mx.take(a, tail, axis=2) for a in (cache.keys, cache.values)]
        cache.keys[..., start:n, :], cache.values[..., start:n, :] = moved
        mx.eval(cache.keys, cache.values)
    cache.offset = n


def rope_modules(block):
    """(parent module, attribute name) of every rotary embedding in a decoder block."""
    found = []
    for name, module in block.named_modules():
        path, _, attr = name.rpartition(".")
        if attr in ("rope", "rotary_emb"):
            parent = block
            for part in path.split(".") if path else ():
                parent = getattr(parent, part)
            found.append((parent, attr, module))
    return found


# rotary embeddings that hand `offset` straight to mx.fast.rope, which takes one offset per batch row
PER_ROW_OFFSETS = ("RoPE", "Llama3RoPE", "SuScaledRoPE", "YarnRoPE", "ProportionalRoPE")


class PositionedRoPE(nn.Module):
    """A rotary embedding that puts each token at its own position (a tree's nodes share depths): the tokens
    move to the batch axis, one query each, and mlx-lm's own module rotates them with one offset per token,
    or, for modules that compute with their offset, once per distinct position."""

    def __init__(self, rope, positions):
        super().__init__()
        self.rope = rope
        self._offsets = mx.array(positions.astype("int32"))
        self._per_row = type(rope).__name__ in PER_ROW_OFFSETS and type(rope).__module__.startswith(("mlx.", "mlx_lm."))
        groups = {}
        for i, p in enumerate(positions.tolist()):
            groups.setdefault(p, []).append(i)
        self._groups = [(p, mx.array(idx)) for p, idx in groups.items()]
        self._inverse = mx.array(np.argsort([i for idx in groups.values() for i in idx]))

    def __call__(self, x, offset=0, **kwargs):
        # x: (1, heads, L, dims) -> (L, heads, 1, dims): each token a row of its own
        if self._per_row:
            return self.rope(x.transpose(2, 1, 0, 3), offset=self._offsets, **kwargs).transpose(2, 1, 0, 3)
        parts = []
        for p, idx in self._groups:
            part = mx.take(x, idx, axis=2).transpose(2, 1, 0, 3)
            parts.append(self.rope(part, offset=p, **kwargs).transpose(2, 1, 0, 3))
        return mx.take(mx.concatenate(parts, axis=2), self._inverse, axis=2)


@contextlib.contextmanager
def explicit_positions(block, positions):
    """Run a decoder block with every token at its given position (None: the cache's offset, as mlx-lm does)."""
    if positions is None:
        yield
        return
    swaps = rope_modules(block)
    for parent, attr, rope in swaps:
        setattr(parent, attr, PositionedRoPE(rope, positions))
    try:
        yield
    finally:
        for parent, attr, rope in swaps:
            setattr(parent, attr, rope)
