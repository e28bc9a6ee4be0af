"""The sweep: which stages stay resident, which stream, and a prefetch thread reading ahead in sweep order.

Imports neither mlx nor torch: stages reach the backend as raw tensors and come back as opaque handles.
"""
import queue
import threading
import time
from dataclasses import dataclass, field

from tqdm import tqdm  # text bars everywhere: tqdm.auto wants ipywidgets in notebooks

from .errors import BudgetError
from .experts import ExpertCache
from .units import format_bytes


@dataclass
class Plan:
    budget: int
    stage_bytes: dict  # stage name -> bytes, in sweep order
    resident: list
    prefetch_depth: int  # stages read ahead while one computes
    expert_cache: int = 0  # MoE: bytes for routed experts (read after routing, kept while they fit)
    expert_bytes: int = 0  # MoE: all routed experts' bytes

    @property
    def streamed(self):
        return [s for s in self.stage_bytes if s not in self.resident]

    @property
    def resident_bytes(self):
        return sum(self.stage_bytes[s] for s in self.resident)

    @property
    def streamed_bytes_per_step(self):
        return sum(self.stage_bytes[s] for s in self.streamed)

    def __str__(self):
        experts = (f", expert cache {format_bytes(self.expert_cache)} of {format_bytes(self.expert_bytes)} experts"
                   if self.expert_bytes else "")
        return (f"budget {format_bytes(self.budget)}: {len(self.resident)}/{len(self.stage_bytes)} stages resident "
                f"({format_bytes(self.resident_bytes)}), {len(self.streamed)} streamed "
                f"({format_bytes(self.streamed_bytes_per_step)} per step), prefetch depth {self.prefetch_depth}"
                + experts)


SAFE_FRACTION = 0.8  # of what the device reports free: room for the OS, the interpreter, fragmentation
RESERVE_CONTEXT = 4096  # tokens of KV cache the default budget leaves room for


def reserve_bytes(config, context=RESERVE_CONTEXT, batch=1):
    """KV cache for `context` tokens plus activations (hidden states and one row of logits per token of a
    1024-token prefill): what the default budget keeps free for everything that is not weights."""
    layers = config.get("num_hidden_layers", 0)
    heads = config.get("num_attention_heads", 1)
    head_dim = config.get("head_dim") or config.get("hidden_size", 0) // heads
    kv_heads = config.get("num_key_value_heads") or heads
    kv = layers * 2 * kv_heads * head_dim * min(context, config.get("max_position_embeddings") or context) * batch * 2
    activations = 1024 * batch * (4 * config.get("hidden_size", 0) + config.get("intermediate_size", 0)) * 4
    return kv + activations + 4 * config.get("vocab_size", 0) * 4


def default_budget(available, config):
    """A safe fraction of the device's free memory, less the KV-cache and activation reserve."""
    return max(int(SAFE_FRACTION * available) - reserve_bytes(config), 0)


def make_plan(stage_bytes, budget, prefetching=True, experts=(0, 0)):
    """Everything resident when it fits; otherwise keep prefetch slots for the largest stage and fill the rest
    of the budget with resident stages: head and embedding first (read every step), then layers spread evenly
    so streamed reads alternate with resident compute. MoE: experts = (all routed experts' bytes, bytes of the
    experts one token needs in a layer); that much is set aside first, and whatever the stages leave over
    caches experts."""
    expert_total, expert_min = experts
    total, largest = sum(stage_bytes.values()), max(stage_bytes.values())
    if budget >= total + expert_total or budget - expert_min >= total:
        return Plan(budget, dict(stage_bytes), list(stage_bytes), 0, min(expert_total, budget - total), expert_total)
    if budget < largest + expert_min:
        what = f"{format_bytes(largest)} (its largest stage)" + (
            f" + {format_bytes(expert_min)} (one token's routed experts in a layer)" if expert_min else "")
        raise BudgetError(f"memory_budget {format_bytes(budget)} is below the minimum for this model, "
                          f"{what}; raise memory_budget to at least {largest + expert_min}.")
    budget_stages = budget - expert_min
    depth = (1 if budget_stages < 4 * largest else 2) if prefetching else 0
    room = budget_stages - depth * largest
    resident = []
    for name in ("head", "embed"):
        if name in stage_bytes and stage_bytes[name] <= room:
            resident.append(name)
            room -= stage_bytes[name]
    layers = [s for s in stage_bytes if s not in ("head", "embed")]
    if layers:
        k = min(len(layers), room // max(stage_bytes[s] for s in layers))
        spread = sorted({int((j + 0.5) * len(layers) / k) for j in range(k)}) if k else []
        resident += [layers[i] for i in spread]
    resident = [s for s in stage_bytes if s in resident]
    cache = budget - sum(stage_bytes[s] for s in resident) - depth * largest if expert_total else 0
    return Plan(budget, dict(stage_bytes), resident, depth, cache, expert_total)


class Prefetcher:
    """Reads streamed stages in sweep order, cycling across steps, at most `depth + 1` stages in flight
    (read, queued or computing). take() hands them out; done() frees a slot."""

    def __init__(self, store, names, depth, read):
        self.store, self.names, self.read = store, list(names), read
        self.slots = threading.Semaphore(depth + 1)
        self.ready = queue.Queue()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="airmlx-prefetch", daemon=True)
        self.thread.start()

    def _run(self):
        i = 0
        while not self.stop.is_set():
            if not self.slots.acquire(timeout=0.05):
                continue
            name = self.names[i % len(self.names)]
            try:
                self.ready.put((name, self.read(name)))
            except BaseException as e:  # handed to the consumer, which raises it
                self.ready.put((name, e))
                return
            i += 1

    def take(self, name):
        got, data = self.ready.get()
        if isinstance(data, BaseException):
            raise data
        assert got == name, f"prefetch order broken: wanted {name}, got {got}"
        return data

    def done(self):
        self.slots.release()

    def close(self):
        self.stop.set()
        self.thread.join()
        while not self.ready.empty():
            _, data = self.ready.get_nowait()
            if not isinstance(data, BaseException):
                self.store.release(data)


@dataclass
class StageRecord:
    step: int
    stage: str
    bytes_read: int
    read_s: float
    wait_s: float
    load_s: float
    compute_s: float


@dataclass
class Scheduler:
    store: object
    backend: object
    plan: Plan
    profiling: bool = False
    steps: int = 0
    records: list = field(default_factory=list)

    def __post_init__(self):
        stages = self.store.manifest.stages
        self.entries = [s for s in stages if s.kind != "experts"]
        self.experts = None
        routed = [s for s in stages if s.kind == "experts"]
        if routed:  # the backend runs routing, then asks for the chosen experts
            self.experts = ExpertCache(self.store, self.backend, routed, self.plan.expert_cache)
            self.backend.stream_experts(sorted(s.layer for s in routed), self.experts.chunks)
        self.resident = {}
        self.store.configure_pool(self.plan.prefetch_depth + 1,
                                  max((self.plan.stage_bytes[s] for s in self.plan.streamed), default=0))
        self.prefetcher = None
        # a backend computing in place on host memory gets page-cache views; the others get read buffers
        self.read = self.store.map_stage if self.backend.zero_copy else self.store.read_stage
        self._start_prefetch()

    def _start_prefetch(self):
        if self.plan.prefetch_depth and self.plan.streamed:
            self.prefetcher = Prefetcher(self.store, self.plan.streamed, self.plan.prefetch_depth, self.read)

    def forward(self, ctx, progress=None):
        """One sweep of every stage over the step context; returns the head's output. `progress`: a label
        for a progress bar over the stages (long prefills)."""
        out = []
        self.forward_many([ctx], lambda i, x: out.append(x), progress)
        return out[0]

    def forward_many(self, ctxs, on_output, progress=None):
        """Layer-major sweep: each stage is loaded once and runs every context before the next stage is
        read, so a whole set of batches costs one read of the model. The head's output for context i goes
        to on_output(i, x) and is dropped, so only one batch's logits exist at a time."""
        xs = [None] * len(ctxs)
        entries = self.entries
        if progress:
            entries = tqdm(entries, desc=progress, unit="stage", leave=False)
        try:
            for entry in entries:
                self._run(entry, xs, ctxs, on_output if entry is self.entries[-1] else None)
        except BaseException:
            # an interrupted sweep leaves the prefetcher mid-cycle: start it again from the first stage
            if self.prefetcher:
                self.prefetcher.close()
                self._start_prefetch()
            raise
        self.steps += 1

    def _run(self, entry, xs, ctxs, on_output):
        name = entry.name
        loaded, data, wait_s, load_s = self.resident.get(name), None, 0.0, 0.0
        streamed = name not in self.plan.resident
        if loaded is None:
            t0 = time.perf_counter()
            data = self.prefetcher.take(name) if (streamed and self.prefetcher) else self.read(name)
            t1 = time.perf_counter()
            loaded = self.backend.load_stage(entry, data.tensors)
            if not self.backend.zero_copy:
                self.store.release(data)
            wait_s, load_s = t1 - t0, time.perf_counter() - t1
            if not streamed:
                self.resident[name] = loaded
        t2 = time.perf_counter()
        try:
            for i, ctx in enumerate(ctxs):
                xs[i] = self.backend.run_stage(loaded, xs[i], ctx)
                if on_output:
                    on_output(i, xs[i])
                    xs[i] = None
        finally:
            if streamed:
                self.backend.free_stage(loaded)
                if data is not None:
                    self.store.release(data)
                    data.tensors = None  # drop the views now: a mapping goes with its last view
                if self.prefetcher:
                    self.prefetcher.done()  # only then may the next read start
        if self.profiling:
            self.records.append(StageRecord(self.steps, name, data.nbytes if data else 0,
                                            data.read_s if data else 0.0, wait_s, load_s, time.perf_counter() - t2))

    def close(self):
        if self.prefetcher:
            self.prefetcher.close()
            self.prefetcher = None
        for loaded in self.resident.values():
            self.backend.free_stage(loaded)
        self.resident.clear()
        if self.experts:
            self.experts.clear()
