"""Routed experts of MoE layers: read after routing, only those the tokens chose, and kept in an LRU
cache inside the memory budget. Imports neither mlx nor torch: experts reach the backend as raw tensors
and come back as opaque handles, like stages.
"""
from collections import OrderedDict

from .errors import CorruptShardError
from .manifest import repair_hint


class ExpertCache:
    """(layer, expert) -> the backend's loaded expert, least recently used evicted first, at most
    `capacity` bytes. The backend asks for a layer's routed experts with chunks(), in groups of at most
    `group_bytes` (the backend stacks a group's experts into one copy for the framework's MoE module)."""

    def __init__(self, store, backend, entries, capacity, group_bytes):
        self.store, self.backend, self.capacity = store, backend, capacity
        self.group_bytes = min(group_bytes, capacity)
        self.allocate = getattr(backend, "allocate", None)
        self.entries = {e.layer: e for e in entries}  # layer -> its "experts" stage
        self.sizes = {(e.layer, int(k)): end - start for e in entries for k, (start, end) in e.parts.items()}
        self.cached = OrderedDict()  # (layer, expert) -> (handle, bytes)
        self.cached_bytes = 0
        self.hits = self.misses = self.bytes_read = 0

    def chunks(self, layer, experts):
        """Yield (experts, handles) in groups that fit the cache and the stacking room together: one group
        whenever the layer's routed experts fit (every decode step under a budget that allows top_k of them),
        several for a prefill whose union of experts outgrows them. The backend sums the groups' outputs."""
        group, size = [], 0
        for e in experts:
            if (layer, e) not in self.sizes:
                raise CorruptShardError(f"the router of layer {layer} chose expert {e}, which its shard folder "
                                        f"does not hold; {repair_hint(self.store.folder)}")
            n = self.sizes[layer, e]
            if group and size + n > self.group_bytes:
                yield group, self.get(layer, group)
                group, size = [], 0
            group.append(e)
            size += n
        if group:
            yield group, self.get(layer, group)

    def get(self, layer, experts):
        """The loaded experts, in order, reading those not cached."""
        keep = {(layer, e) for e in experts}
        handles = []
        for e in experts:
            key = (layer, e)
            if key in self.cached:
                self.cached.move_to_end(key)
                self.hits += 1
            else:
                self.misses += 1
                data = self.store.read_part(self.entries[layer].name, e, *([self.allocate] if self.allocate else []))
                self.bytes_read += data.nbytes
                handle, nbytes = self.backend.load_expert(self.entries[layer], e, data.tensors)
                self._evict(nbytes, keep)
                self.cached[key] = (handle, nbytes)
                self.cached_bytes += nbytes
            handles.append(self.cached[key][0])
        return handles

    def _evict(self, need, keep):
        for key in list(self.cached):
            if self.cached_bytes + need <= self.capacity:
                return
            if key not in keep:
                handle, nbytes = self.cached.pop(key)
                self.backend.free_expert(handle)
                self.cached_bytes -= nbytes

    def stats(self):
        return {"expert_hits": self.hits, "expert_misses": self.misses, "expert_bytes_read": self.bytes_read,
                "expert_cache_bytes": self.cached_bytes, "expert_cache_capacity": self.capacity}

    def clear(self):
        self._evict(self.capacity + 1, keep=set())


def expert_demand(entries, scale=1.0):
    """(bytes of every routed expert, of the largest) in memory: the files' bytes times `scale` (what the
    backend makes of them: 1 for views, more when it dequantises), and the largest expert's file bytes."""
    sizes = [end - start for e in entries for start, end in e.parts.values()]
    return (int(sum(sizes) * scale), int(max(sizes) * scale), max(sizes)) if sizes else (0, 0, 0)
