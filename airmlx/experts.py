"""Routed experts of MoE layers: read after routing, only those the tokens chose, and kept in an LRU
cache inside the memory budget. Imports neither mlx nor torch: experts reach the backend as raw tensors
and come back as opaque handles, like stages.

Reads go fast three ways. A decode step's missing experts are read concurrently by a few reader threads,
all started before its first group computes (each expert is one byte range; the buffers are allocated on the
calling thread, the readers only fill them, laid out as the backend asks).
While a layer computes, the experts the next layer routed to at the previous step are read ahead (router
look-ahead by temporal locality: a wrong guess costs bytes, never correctness). And a usage profile, saved in
the shard folder when the model closes, fills the cache with the hottest experts when the next run starts.
"""
import json
import time
from collections import Counter, OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .errors import CheckpointError, CorruptShardError
from .manifest import repair_hint, write_atomic
from .stagefile import folder_lock

READERS = 4  # expert reads in flight at once (several preads keep an SSD's queue full)
PROFILE_NAME = "expert_usage.json"
PROFILE_TABLES = ("layers", "decode")  # the profile's tables: every routing; decode steps' (one token's top_k)
PROFILE_MIN_STEPS = 16  # decode steps' worth of routing counts a layer needs before they predict its misses


class ExpertCache:
    """(layer, expert) -> the backend's loaded expert, least recently used evicted first, at most
    `capacity` bytes (loaded experts plus reads in flight). The backend asks for a layer's routed experts with
    chunks(), in groups whose stacked copy takes at most `stack_bytes`: an expert holds `held_per_byte` bytes per
    byte of its file once loaded, and `stacking` times that in the copy its group is stacked into (0: the backend
    computes each expert as held, so every group is of one)."""

    def __init__(self, store, backend, entries, capacity, stack_bytes, top_k=1, held_per_byte=1.0, stacking=1.0):
        self.store, self.backend, self.capacity, self.top_k = store, backend, capacity, top_k
        self.held_per_byte = held_per_byte
        self.group_bytes = min(stack_bytes / stacking, capacity) if stacking else 0  # the largest group, as held
        self.entries = {e.layer: e for e in entries}  # layer -> its "experts" stage
        layers = sorted(self.entries)
        self.next_layer = dict(zip(layers, layers[1:]))  # the MoE layer after each (look-ahead reads its experts)
        self.sizes = {(e.layer, int(k)): end - start for e in entries for k, (start, end) in e.parts.items()}
        self.cached = OrderedDict()  # (layer, expert) -> (handle, bytes)
        self.cached_bytes = 0
        self.pending = {}  # (layer, expert) -> Future of StageData, read ahead or concurrently
        self.pending_bytes = 0
        self.last_routed = {}  # layer -> the experts it routed to last time
        self.usage = Counter()  # (layer, expert) -> times routed, this run
        self.prior = Counter()  # (layer, expert) -> times routed in the saved usage profile
        self.decode_usage = Counter()  # of usage, the routing of one token at a time (decode steps)
        self.decode_prior = Counter()  # of prior, the same
        self.profiled = set()  # experts the usage profile put in the cache at start
        self.ahead = set()  # experts being read ahead by look_ahead()
        self.readers = None
        self.warmed = False
        self.hits = self.misses = self.bytes_read = 0
        self.wait_s = 0.0  # the computing thread waiting for expert reads
        self.lookahead_reads = self.lookahead_hits = self.profile_hits = 0

    # -- what the backend calls ---------------------------------------------------------------------
    def chunks(self, layer, experts):
        """Yield (experts, handles) in groups that fit the cache and the stacking room together: one group
        whenever the layer's routed experts fit (every decode step under a budget that allows top_k of them),
        several for a prefill whose union of experts outgrows them. The backend sums the groups' outputs."""
        if not self.warmed:
            self.warm()
        for e in experts:
            if (layer, e) not in self.sizes:
                raise CorruptShardError(f"the router of layer {layer} chose expert {e}, which its shard folder "
                                        f"does not hold; {repair_hint(self.store.folder)}")
        self.usage.update((layer, e) for e in experts)
        if len(experts) <= self.top_k:  # one token's choices, not a prefill's union
            self.decode_usage.update((layer, e) for e in experts)
        self.last_routed[layer] = list(experts)
        self._settle(layer, {(layer, e) for e in experts})
        self._read_missing(layer, experts)
        self.look_ahead(layer)
        group, size = [], 0
        for e in experts:
            n = self.sizes[layer, e] * self.held_per_byte
            if group and size + n > self.group_bytes:
                yield group, self.get(layer, group)
                group, size = [], 0
            group.append(e)
            size += n
        if group:
            yield group, self.get(layer, group)

    def get(self, layer, experts):
        """The loaded experts, in order: cached ones at once, the others read concurrently, then loaded."""
        keep = {(layer, e) for e in experts}
        for e in experts:
            if (layer, e) not in self.cached and (layer, e) not in self.pending:
                self._evict(self.sizes[layer, e], keep)  # room for its read buffer
                self._start_read(layer, e)
        handles = []
        for e in experts:
            key = (layer, e)
            if key in self.cached:
                self.cached.move_to_end(key)
                self.hits += 1
                self.profile_hits += key in self.profiled
            else:
                self.misses += 1
                self.lookahead_hits += key in self.ahead  # read while the layer before computed
                self._load(key, keep)
            handles.append(self.cached[key][0])
        return handles

    def _settle(self, layer, keep):
        """Reads ahead for this layer that its router did not ask for: loaded into the cache all the same."""
        for key in [k for k in self.pending if k[0] == layer and k not in keep]:
            self._load(key, keep | {key})

    # -- reading ------------------------------------------------------------------------------------
    def _read_missing(self, layer, experts):
        """Start reading the first top_k of the layer's routed experts (a decode step's) the cache lacks, all
        at once, so that later groups' reads overlap the earlier groups' compute. Only where room is made by
        evicting experts routed no more often than the one read: under a tight budget a hotter expert keeps
        its place until the group it would make room for comes (MLX's bench cache held 2.4 MB a step less
        without this rule). A larger union (a prefill's, a batch's) is read group by group beyond the first
        top_k: read all at once, it would evict every other layer's experts."""
        experts = experts[: self.top_k]
        keep = {(layer, e) for e in experts}
        for e in experts:
            key = (layer, e)
            if key in self.cached or key in self.pending:
                continue
            if not self._evict(self.sizes[key], keep, below=self.score(key)):
                return  # the rest are read group by group, as their turn frees room
            self._start_read(layer, e)

    def _start_read(self, layer, e):
        key = (layer, e)
        if key in self.pending or key in self.cached:
            return
        if self.readers is None:
            self.readers = ThreadPoolExecutor(READERS, thread_name_prefix="airmlx-experts")
        name = self.entries[layer].name
        buffer = self.backend.allocate(self.sizes[key])  # here, on the thread that computes: MLX allocates there
        order = self.backend.expert_order(self.entries[layer], e)  # laid out as the backend computes on it
        self.pending[key] = self.readers.submit(self.store.read_part, name, e, buffer=buffer, order=order)
        self.pending_bytes += self.sizes[key]

    def _load(self, key, keep):
        t0 = time.perf_counter()
        data = self.pending.pop(key).result()
        self.wait_s += time.perf_counter() - t0
        self.pending_bytes -= self.sizes[key]
        self.ahead.discard(key)
        self.bytes_read += data.nbytes
        handle, nbytes = self.backend.load_expert(self.entries[key[0]], key[1], data.tensors)
        self._evict(nbytes, keep)
        self.cached[key] = (handle, nbytes)
        self.cached_bytes += nbytes

    def look_ahead(self, layer):
        """While `layer` computes, read the experts the next MoE layer routed to last time. They take the
        place of the least recently used experts, as long as room stays for this layer's own group."""
        nxt = self.next_layer.get(layer)
        if nxt is None:
            return
        routed = self.last_routed.get(layer, [])
        keep = {(layer, e) for e in routed} | set(self.pending)
        # this layer's own group needs its room: groups of one (group_bytes 0) one expert as held
        group = self.group_bytes or max((self.sizes[layer, e] for e in routed), default=0) * self.held_per_byte
        for e in self.last_routed.get(nxt, [])[: self.top_k]:
            key = (nxt, e)
            if key in self.cached or key in self.pending:
                continue
            if group + self.pending_bytes + self.sizes[key] > self.capacity:
                return  # not even evicting every other expert would make room
            # a guess may displace only experts routed no more often than itself: never a hotter one
            if not self._evict(self.sizes[key] + group, keep, below=self.score(key)):
                continue
            self._start_read(nxt, e)
            self.ahead.add(key)
            self.lookahead_reads += 1
            keep.add(key)

    def warm(self):
        """Fill the cache with the hottest experts of the saved usage profile, as many as fit."""
        self.warmed = True
        self.prior, self.decode_prior = (Counter({key: n for key, n in counts.items() if key in self.sizes})
                                         for counts in load_profile(self.store.folder))
        hottest = [key for key, _ in self.prior.most_common()]
        chosen, used = [], 0
        for key in hottest:
            held = self.sizes[key] * self.held_per_byte  # as loaded: a dequantised expert holds more than its file
            if used + held > self.capacity - self.group_bytes:
                break
            chosen.append(key)
            used += held
        for key in chosen:
            self._start_read(*key)
        for key in chosen:
            self._load(key, set(chosen))
            self.profiled.add(key)

    def score(self, key):
        """How often an expert is routed to: this run's count plus the saved profile's."""
        return self.usage[key] + self.prior[key]

    def _evict(self, need, keep, below=None):
        """Make room for `need` more bytes, evicting the least often routed experts first (the least recently
        used among equals: layers come in a fixed cycle, where plain LRU would evict exactly the expert needed
        next); with `below`, only experts scored at most that. Returns whether the room was made."""
        fits = lambda: self.cached_bytes + self.pending_bytes + need <= self.capacity
        if fits():
            return True
        for key in sorted(self.cached, key=self.score):  # a stable sort: LRU order among equal scores
            if fits():
                return True
            if key in keep or (below is not None and self.score(key) > below):
                continue
            handle, nbytes = self.cached.pop(key)
            self.backend.free_expert(handle)
            self.cached_bytes -= nbytes
            self.profiled.discard(key)
        return fits()

    def steady_miss_bytes(self, min_steps: int = PROFILE_MIN_STEPS) -> "float | None":
        """Bytes of routed experts a decode step reads once the cache has settled, from the decode steps'
        routing in the saved usage profile (not this run's, which may be one synthetic prompt's; not prefills',
        which count a whole prompt's experts once): the cache keeps the most routed experts (_evict) but for the
        room where a step's misses land, one expert (the room look-ahead leaves a layer's group), so a layer's
        choices miss with the routing share of the experts that do not fit
        (within 10% of simulated steps, tests/test_moe.py). None before warm() or while some layer has fewer
        than min_steps decode steps in the profile."""
        counts = self.decode_prior
        per_layer = Counter()
        for (layer, _), n in counts.items():
            per_layer[layer] += n
        if any(per_layer[layer] < min_steps * self.top_k for layer in self.entries):
            return None
        landing = max(self.sizes.values()) * self.held_per_byte
        held, room = set(), self.capacity - landing
        for key, _ in counts.most_common():
            room -= self.sizes[key] * self.held_per_byte
            if room < 0:
                break
            held.add(key)
        return sum(self.top_k * n / per_layer[key[0]] * self.sizes[key] for key, n in counts.items()
                   if key not in held)

    # -- reporting and the end ----------------------------------------------------------------------
    def stats(self):
        return {"expert_hits": self.hits, "expert_misses": self.misses, "expert_bytes_read": self.bytes_read,
                "expert_cache_bytes": self.cached_bytes, "expert_cache_capacity": self.capacity,
                "expert_lookahead_reads": self.lookahead_reads, "expert_lookahead_hits": self.lookahead_hits,
                "expert_profile_hits": self.profile_hits, "expert_wait_s": round(self.wait_s, 6)}

    def clear(self):
        """Wait for reads in flight, forget them, empty the cache and save the usage profile."""
        for key, future in list(self.pending.items()):
            future.exception()  # waited for; a failed read nobody asked for is dropped (its step raised already)
        self.pending.clear()
        self.pending_bytes = 0
        self.ahead.clear()
        if self.readers is not None:
            self.readers.shutdown()
            self.readers = None
        self._evict(self.capacity + 1, keep=set())
        save_profile(self.store.folder, self.usage, self.decode_usage)


def load_profile(folder) -> tuple:
    """(every routing, decode steps' alone): Counters of (layer, expert) -> times routed, from the shard folder's
    usage profile (empty where it has none)."""
    try:
        raw = json.loads((Path(folder) / PROFILE_NAME).read_text())
    except (OSError, ValueError):
        raw = {}
    return tuple(profile_table(raw, table) for table in PROFILE_TABLES)


def profile_table(raw, table) -> Counter:
    try:
        return Counter({(int(layer), int(e)): int(n) for layer, row in raw[table].items() for e, n in row.items()})
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError):  # Overflow: a count of Infinity
        return Counter()


def save_profile(folder, usage, decode_usage=None):
    """Add this run's routing counts (and of them, its decode steps') to the folder's usage profile (a
    read-only folder keeps none)."""
    if not usage:
        return
    try:
        with folder_lock(folder):  # pipeline ranks sharing a folder close together: each adds to the others' counts
            tables = {}
            for table, saved, counts in zip(PROFILE_TABLES, load_profile(folder), (usage, decode_usage or Counter())):
                rows = tables[table] = {}
                for (layer, e), n in (saved + counts).items():
                    rows.setdefault(str(layer), {})[str(e)] = n
            write_atomic(Path(folder) / PROFILE_NAME, json.dumps(tables).encode())
    except (CheckpointError, OSError):  # a read-only folder: no lock file, no profile
        pass


def expert_demand(entries, scale=1.0):
    """(bytes of every routed expert, of the largest) in memory: the files' bytes times `scale` (what the
    backend makes of them: 1 for views, more when it dequantises), and the largest expert's file bytes."""
    sizes = [end - start for e in entries for start, end in e.parts.values()]
    return (int(sum(sizes) * scale), int(max(sizes) * scale), max(sizes)) if sizes else (0, 0, 0)
