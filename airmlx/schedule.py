"""The sweep: stages run in order, the resident ones from memory, the streamed ones from a prefetch thread
that reads ahead in sweep order (the plan in airmlx/plan.py says which is which).

Imports neither mlx nor torch: stages reach the backend as raw tensors and come back as opaque handles.
"""
import queue
import threading
import time
from dataclasses import dataclass, field

from tqdm import tqdm  # text bars everywhere: tqdm.auto wants ipywidgets in notebooks

from .archs import experts_per_token
from .experts import ExpertCache
from .plan import Plan
from .store import HUGE_MAPPINGS, HUGE_PAGE

TAKE_POLL_S = 0.1  # how often a wait for the prefetcher checks that its thread is still alive


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
        """The next stage's data; it must be `name`. Never waits on a thread that has stopped."""
        while True:
            try:
                got, data = self.ready.get(timeout=TAKE_POLL_S)
                break
            except queue.Empty:
                if not self.thread.is_alive() and self.ready.empty():
                    raise RuntimeError("airmlx's prefetch thread has stopped; the sweep restarts it") from None
        if isinstance(data, BaseException):
            raise data
        if got != name:
            self.store.release(data)
            raise RuntimeError(f"prefetch order broken: wanted {name}, got {got}")
        return data

    def done(self):
        self.slots.release()

    def close(self):
        """Stop the thread and give back what it read. A Ctrl-C meanwhile is raised only once that is done,
        so a second Ctrl-C cannot leave a half-closed prefetcher behind."""
        self.stop.set()
        interrupted = False
        while self.thread.is_alive():
            try:
                self.thread.join()
            except KeyboardInterrupt:
                interrupted = True
        while not self.ready.empty():
            _, data = self.ready.get_nowait()
            if not isinstance(data, BaseException):
                self.store.release(data)
        if interrupted:
            raise KeyboardInterrupt


def hinted_stages(store, streamed: list, mapped: bool) -> set:
    """The streamed stages worth a read-ahead hint. A hint has the kernel read a file in small folios, which a
    mapping then cannot map as huge pages (store.populate), so on Linux a mapped stage of a huge page or more
    is read by its own populate instead: on the 617.7 MB bench model (34 MB stages) hints made warm steps 1.5-1.6 x
    slower and cold ones 1.1-1.2 x. Smaller stages, buffered reads and other systems gain from them."""
    if not (mapped and HUGE_MAPPINGS):
        return set(streamed)
    return {n for n in streamed if store.stages[n].nbytes < HUGE_PAGE}


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
    resident_bytes_read: int = 0  # the resident stages' loads: once, not per step
    records: list = field(default_factory=list)
    owed_slot: bool = False  # a streamed stage was freed and its prefetch slot is not yet given back (_pay_slot)

    def __post_init__(self):
        stages = list(self.store.stages.values())  # the stages the store reads: all, or a pipeline rank's range
        self.entries = [s for s in stages if s.kind != "experts"]
        self.experts = None
        routed = [s for s in stages if s.kind == "experts"]
        if routed:  # the backend runs routing, then asks for the chosen experts
            self.experts = ExpertCache(self.store, self.backend, routed, self.plan.expert_cache,
                                       self.plan.expert_stack, experts_per_token(self.store.manifest.config),
                                       self.plan.expert_held_per_byte, self.plan.expert_stacking)
            self.backend.stream_experts(sorted(s.layer for s in routed), self.experts.chunks)
        self.resident = {}  # name -> (loaded stage, its raw data while the backend views it)
        # a backend computing in place on host memory gets page-cache views of streamed stages; resident
        # stages are read into memory of their own (a file changed under a mapping would kill the process)
        self._read = self.store.map_stage if self.backend.page_cache_views else self.store.read_stage
        slots = self.plan.prefetch_depth + 1 if self.plan.streamed and not self.backend.page_cache_views else 0
        self.store.configure_pool(slots, self.plan.slot_bytes, self.backend.allocate)
        self.prefetcher = None
        streamed = self.plan.streamed
        self.hinted = hinted_stages(self.store, streamed, self.backend.page_cache_views)
        self.next_streamed = {n: after for n, after in zip(streamed, streamed[1:] + streamed[:1])
                              if after in self.hinted}

    def read_ahead(self, max_bytes: int) -> int:
        """Hint the next sweep's first streamed stages, up to max_bytes of them (at least one); returns the
        bytes hinted. A speculative round gives this before drafting: the disk reads while the draft runs."""
        names, total = [], 0
        for name in self.plan.streamed:
            if total + self.store.stages[name].nbytes > max_bytes and total:
                break
            if name in self.hinted:
                names.append(name)
                total += self.store.stages[name].nbytes
        self.store.read_ahead(names)
        return total

    def read(self, name):
        """A streamed stage read and prepared (on the calling thread: the prefetch thread)."""
        return self._prepared(self._read(name))

    def _prepared(self, data):
        data.tensors = self.backend.prepare(self.store.stages[data.name], data.tensors)
        return data

    def _start_prefetch(self):
        if self.prefetcher is not None and not self.prefetcher.thread.is_alive():
            self._stop_prefetch()  # it stopped on an error it reported (or would report): start afresh
        if self.prefetcher is None and self.plan.prefetch_depth and self.plan.streamed:
            self.prefetcher = Prefetcher(self.store, self.plan.streamed, self.plan.prefetch_depth, self.read)

    def _stop_prefetch(self):
        old, self.prefetcher, self.owed_slot = self.prefetcher, None, False
        if old is not None:
            old.close()

    def forward(self, ctx, progress=None):
        """One sweep of every stage over the step context; returns the head's output. `progress`: a label
        for a progress bar over the stages (long prefills)."""
        out = []
        self.forward_many([ctx], lambda i, x: out.append(x), progress)
        return out[0]

    def forward_many(self, ctxs, on_output, progress=None, scratch=(), inputs=None):
        """Layer-major sweep: each stage is loaded once and runs every context before the next stage is
        read, so a whole set of batches (or a long prompt's chunks) costs one read of the model. The head's
        output for context i goes to on_output(i, x) and is dropped. `scratch`: caches nobody needs after
        this sweep; each layer's part is emptied once that layer has run every context. `inputs`: each
        context's hidden states when the stages start past the embedding (a pipeline rank's range); the
        last stage's output then goes to on_output, whatever its kind."""
        self._start_prefetch()
        xs = [None] * len(ctxs) if inputs is None else list(inputs)
        entries = self.entries
        if progress:
            entries = tqdm(entries, desc=progress, unit="stage", leave=False)
        try:
            for entry in entries:
                self._run(entry, xs, ctxs, on_output if entry is self.entries[-1] else None)
                if entry.kind == "layer":
                    for cache in scratch:
                        self.backend.drop_cache_layer(cache, entry.layer)
        except BaseException:
            # an interrupted sweep leaves the prefetcher mid-cycle: the next sweep starts a new one
            self._stop_prefetch()
            raise
        self._pay_slot()
        self.steps += 1

    def _pay_slot(self):
        """Give back the prefetch slot of the streamed stage freed last. A stage frees its slot once the next
        stage is loaded, not when it is freed: the prefetch thread's Python work (mapping a stage, its views)
        then runs while compute is in the framework's kernels without the GIL, instead of holding up the next
        stage's load. The next read starts later only by that load: the next stage was read ahead already."""
        if self.owed_slot:
            self.owed_slot = False
            if self.prefetcher:
                self.prefetcher.done()

    def _run(self, entry, xs, ctxs, on_output):
        name = entry.name
        streamed = name not in self.plan.resident
        loaded, data = self.resident.get(name, (None, None))
        read_bytes, read_s, wait_s, load_s = 0, 0.0, 0.0, 0.0
        if loaded is None:
            t0 = time.perf_counter()
            if streamed and self.prefetcher:
                data = self.prefetcher.take(name)
            elif streamed:  # read here; then the disk reads the next stage into the page cache while this computes
                data = self.read(name)
                if name in self.next_streamed:
                    self.store.read_ahead([self.next_streamed[name]])
            else:
                data = self._prepared(self.store.read_stage(name, pooled=False))
            t1 = time.perf_counter()
            read_bytes, read_s = data.nbytes, data.read_s
            try:
                loaded = self.backend.load_stage(entry, data.tensors)
            except BaseException:
                self._give_back(data)
                if streamed and self.prefetcher:
                    self.prefetcher.done()
                raise
            if not self.backend.keeps_views(entry):  # the backend made its own copy: the buffer can go now
                data = self._give_back(data)
            wait_s, load_s = t1 - t0, time.perf_counter() - t1
            if not streamed:
                self.resident[name] = (loaded, data)
                self.resident_bytes_read += read_bytes
        self._pay_slot()
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
                self._give_back(data)
                self.owed_slot = True  # only then may the next read start (_pay_slot)
        if self.profiling:
            self.records.append(StageRecord(self.steps, name, read_bytes, read_s, wait_s, load_s,
                                            time.perf_counter() - t2))

    def _give_back(self, data):
        if data is not None:
            self.store.release(data)
            data.tensors = None  # drop the views now: a mapping goes with its last view

    def close(self):
        self._stop_prefetch()
        for loaded, data in self.resident.values():
            self.backend.free_stage(loaded)
            self._give_back(data)
        self.resident.clear()
        if self.experts:
            self.experts.clear()
        self.store.close()
