"""The model on each rank of a pipeline (the split: airmlx/pipeline.py; the messages: airmlx/pipeline_link.py).

Rank 0 holds a PipelineModel: an AirModel over its own range whose every sweep goes on to the other ranks. Its
backend records what the other ranks must repeat: each step context's arguments (tokens, mask, which cache)
and what happens to the KV caches (made, rows selected, trimmed, merged and split by the server's engine,
dropped), so the token loop, scoring, the chat and the server's engine run on it unchanged. The other ranks
follow: they build the same contexts over their own caches, run their range and send the hidden states on;
the last rank sends the head's output back to rank 0.

A sweep on rank 0 runs its range, then sends the hidden states of every context; the next sweep may start
before the results come back (score() does, up to one sweep in flight per other rank), so rank r works on
pass i while rank r + 1 works on pass i - 1, and every rank still reads its range once per sweep. generate()
and the server's engine do the same with a batch split into micro-batches (micro_batch_count).
"""
import collections
import contextlib
import threading
import time
import weakref
from pathlib import Path

import numpy as np

from .errors import AirmlxError, DraftModelError, GenerationError
from .manifest import Manifest
from .micro_batches import generate_in_parts
from .model import AirModel, exclusive
from .pipeline import PipelineError, agree_on_split, rank_budget
from .pipeline_link import DEFAULT_TIMEOUT, RESULT, STATS, STEP, STOP, Link, deferred_interrupt
from .plan import DEFAULT_PREFILL_STEP, resolve_budget
from .schedule import Scheduler
from .store import evict
from .units import format_bytes


class PipelineStep:
    """A step context on rank 0: the backend's own, and the arguments that make the same one elsewhere."""
    __slots__ = ("local", "spec")

    def __init__(self, local, spec):
        self.local, self.spec = local, spec


class RecordingBackend:
    """Rank 0's backend: the real one, recording what the other ranks must repeat on their own KV caches and
    the arguments of every step context. Everything else goes straight to the real backend."""

    def __init__(self, inner):
        self._inner = inner
        self._ids = weakref.WeakKeyDictionary()  # cache -> the number the other ranks know it by
        self._count = 0
        self._ops = []

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def _made(self, cache, op: list):
        """Number a cache made here and record how the other ranks make theirs (op, after its number)."""
        n, self._count = self._count, self._count + 1
        self._ids[cache] = n
        self._ops.append([op[0], n, *op[1:]])
        weakref.finalize(cache, self._dropped, n)
        return cache

    def new_cache(self, batch_size, left_padding):
        return self._made(self._inner.new_cache(batch_size, left_padding),
                          ["new", int(batch_size), [int(p) for p in left_padding]])

    def merge_caches(self, caches, lengths):
        """The server's engine joins requests into one batch: the other ranks merge their caches alike."""
        ids = [self.cache_id(c) for c in caches]
        merged = self._inner.merge_caches(caches, lengths)
        if merged is None:
            return None
        return self._made(merged, ["merge", ids, [[int(n) for n in rows] for rows in lengths]])

    def extract_cache(self, cache, row, length):
        ids = self.cache_id(cache)
        single = self._inner.extract_cache(cache, row, length)
        if single is None:
            return None
        return self._made(single, ["extract", ids, int(row), int(length)])

    def _dropped(self, n):
        self._ops.append(["drop", n])

    def cache_id(self, cache) -> int:
        if cache not in self._ids:
            raise PipelineError("a KV cache made outside this model reached a pipeline step; make caches with "
                                "model.new_cache().")
        return self._ids[cache]

    def select_rows(self, cache, rows):
        self._inner.select_rows(cache, rows)
        self._ops.append(["select", self.cache_id(cache), [int(r) for r in rows]])

    def trim_cache(self, cache, keep):
        self._inner.trim_cache(cache, keep)
        self._ops.append(["trim", self.cache_id(cache), int(keep)])

    def begin_step(self, tokens, attention_mask, cache, *args, **kwargs):
        local = self._inner.begin_step(tokens, attention_mask, cache, *args, **kwargs)
        spec = {"tokens": np.asarray(tokens), "mask": np.asarray(attention_mask).astype(np.int8),
                "cache": None if cache is None else self.cache_id(cache), "args": list(args), "kwargs": kwargs}
        return PipelineStep(local, spec)

    def run_stage(self, stage, x, step):
        return self._inner.run_stage(stage, x, step.local)

    def logits(self, x):
        return x if isinstance(x, np.ndarray) else self._inner.logits(x)  # results from the last rank: numpy

    def take_ops(self) -> list:
        ops, self._ops = self._ops, []
        return ops

    def note(self, op: list) -> None:
        self._ops.append(op)


class PipelineScheduler(Scheduler):
    """A rank's sweep over its range. It pings the next rank between stages (it is alive, just busy); on rank
    0 every sweep goes on to the other ranks through the driver (the PipelineModel)."""
    link = None
    driver = None

    def _run(self, entry, xs, ctxs, on_output):
        super()._run(entry, xs, ctxs, on_output)
        if self.link is not None:
            self.link.keepalive()

    def forward_local(self, ctxs, on_output, progress=None, scratch=(), inputs=None):
        super().forward_many(ctxs, on_output, progress, scratch, inputs)

    def forward_many(self, ctxs, on_output, progress=None, scratch=(), inputs=None):
        if self.driver is None:
            return self.forward_local(ctxs, on_output, progress, scratch, inputs)
        self.driver.forward_pipeline(ctxs, on_output, progress, scratch)


class RankModel(AirModel):
    """The model of one rank: its range of stages, swept with pings to the next rank."""
    scheduler_type = PipelineScheduler



class PipelineModel(RankModel):
    """Rank 0 of a pipeline: the object users hold, as AirModel. memory_stats(), bytes_read and the plan are this
    rank's; rank_stats() asks every rank."""

    def __init__(self, shard_dir, backend, link: Link, **kwargs):
        self.link = link
        self._broken = None  # the PipelineError that stopped the pipeline
        self._inflight = collections.deque()  # (on_output, contexts) of sweeps sent, results not yet back
        self._overlap, self._overlap_thread = 0, None  # overlapped() depth, and the thread inside it
        self.sweeps_overlapped = 0  # sweeps this rank started while an earlier one was still on the other ranks
        self._ranks_resident = None  # whether every rank holds its whole range (asked once, when needed)
        super().__init__(shard_dir, RecordingBackend(backend), **kwargs)
        self.scheduler.link, self.scheduler.driver = link, self

    def start_pinging(self) -> None:
        """Once every rank has its model (models_opened): from now on the idle rank 0 pings the others."""
        threading.Thread(target=self._ping_while_idle, name="airmlx-pipeline-ping", daemon=True).start()

    def _ping_while_idle(self):
        """The other ranks wait for rank 0 with a deadline: while no call runs (a chat waiting for its user),
        tell them it is alive."""
        while not (self._closing or self._closed):
            time.sleep(self.link.ping_every / 2)
            if self._lock.acquire(blocking=False):
                try:
                    if not (self._closing or self._closed or self._broken):
                        self.link.keepalive()
                finally:
                    self._lock.release()

    def _check_open(self):
        super()._check_open()
        if self._broken is not None:
            raise PipelineError(f"{self._broken} (the pipeline has stopped; launch it again)")

    @contextlib.contextmanager
    def _exchange(self):
        """Messages go out and come back whole (Ctrl-C waits), and a failure stops the pipeline for good."""
        try:
            with deferred_interrupt():
                yield
        except PipelineError as e:
            self._broken = e
            raise

    def forward_pipeline(self, ctxs, on_output, progress=None, scratch=()):
        """This rank's range on every context, then on to the other ranks; on_output(i, result) as the last
        rank's results come back (before this returns, unless inside overlapped())."""
        outs = [None] * len(ctxs)
        self.sweeps_overlapped += bool(self._inflight)
        self.scheduler.forward_local(ctxs, outs.__setitem__, progress, scratch)
        payload = {"ctxs": [c.spec for c in ctxs], "ops": self.backend.take_ops(),
                   "scratch": [self.backend.cache_id(c) for c in scratch]}
        with self._exchange():
            while len(self._inflight) >= self.link.size - 1:  # one sweep in flight per other rank at most
                self._deliver()
            self.link.send(STEP, payload, outs)
            self._inflight.append((on_output, len(ctxs)))
            if not (self._overlap and self._overlap_thread == threading.get_ident()):
                self._drain()

    def _deliver(self):
        on_output, count = self._inflight[0]
        msg = self.link.recv(f"results from rank {self.link.size - 1}")
        if msg.kind != RESULT or len(msg.arrays) != count:
            raise PipelineError(f"rank 0: expected the results of {count} step contexts from rank {self.link.size - 1} "
                                "and got something else; the ranks are out of step: launch them again.")
        self._inflight.popleft()
        for i, x in enumerate(msg.arrays):
            on_output(i, x)

    def _drain(self):
        while self._inflight:
            self._deliver()

    @contextlib.contextmanager
    def overlapped(self):
        """Sweeps inside may return before their results: each is delivered once the ranks' pipeline is full
        or on leaving (results must not be read before then)."""
        with self._lock:
            if self._overlap and self._overlap_thread != threading.get_ident():
                raise PipelineError("rank 0: two threads ran overlapped sweeps on one pipeline model at once; "
                                    "this is a bug in airmlx.")
            self._overlap += 1
            self._overlap_thread = threading.get_ident()
        try:
            yield
        finally:
            with self._lock:
                self._overlap -= 1
                if not self._overlap:
                    self._overlap_thread = None
                    if self._broken is not None:  # nothing more comes back: forget what was in flight
                        self._inflight.clear()
                    elif self._inflight:
                        with self._exchange():
                            self._drain()

    def score(self, requests: list, batch_size: int = 8, max_tokens: int | None = None,
              progress: bool | None = None):
        """As AirModel.score, with the passes in a pipeline: rank r runs pass i while rank r + 1 runs pass i - 1."""
        with self.overlapped():
            results = super().score(requests, batch_size=batch_size, max_tokens=max_tokens, progress=progress)
        return results

    def _token_loop(self, ids, mask, micro_batches, **options):
        """generate()'s token loop. A batch split into micro-batches runs them in a pipeline: rank 0 starts
        micro-batch i's step while the other ranks work on those before it, and each micro-batch's next step
        starts once its logits are back; every rank reads its range once per micro-batch step."""
        if micro_batches not in (None, 1) and options.get("streamer") is not None:
            raise GenerationError(f"micro_batches={micro_batches} with a streamer: a streamer follows one batch; "
                                  "leave micro_batches out, or the streamer.")
        parts = 1 if options.get("streamer") is not None else self.micro_batch_count(ids.shape[0], micro_batches)
        if parts == 1:
            return super()._token_loop(ids, mask, None, **options)
        return generate_in_parts(self, ids, mask, parts, **options)

    def _draft_for(self, draft_model, batch: int, use_cache: bool):
        # a tree's accepted path is kept by keep_cache_positions, which the other ranks' caches would not follow
        if draft_model is not None and draft_model is not False:
            raise DraftModelError("a pipeline over several ranks does not speculate; leave out draft_model.")
        return None

    def micro_batch_count(self, rows: int, asked: int | None = None) -> int:
        """How many micro-batches `rows` rows run in: `asked` (at most one per row), else one per rank when
        every rank holds its range resident (a sweep then costs compute, which the ranks share out), else 1 (a
        rank that streams would read its range once per micro-batch for the same tokens per second)."""
        if rows < 2:
            return 1
        if asked is None:
            if self._ranks_resident is None:
                self._ranks_resident = not any(r["streamed_per_step"] for r in self.rank_stats())
            asked = self.link.size if self._ranks_resident else 1
        return max(1, min(asked, rows))

    @exclusive
    def wait_for(self, ready) -> None:
        """Deliver the sweeps in flight, oldest first, until ready() (an overlapped() caller's results)."""
        with self._exchange():
            while not ready():
                if not self._inflight:
                    raise PipelineError("rank 0: waiting for results no sweep in flight will bring; this is a bug "
                                        "in airmlx.")
                self._deliver()

    @exclusive
    def rank_stats(self) -> list:
        """Every rank's stages, bytes read and steps so far (swept_bytes_read: less the resident stages' loads and
        the disk measurements), plan and peak memory (a dict per rank, rank order)."""
        with self._exchange():
            self._drain()
            self.link.send(STATS, {"ranks": [self.rank_summary(0)]})
            msg = self.link.recv(f"statistics from rank {self.link.size - 1}")
        if msg.kind != STATS:
            raise PipelineError("rank 0: expected every rank's statistics and got something else; the ranks are out "
                                "of step: launch them again.")
        return msg.payload["ranks"]

    def drop_page_cache(self) -> None:
        """Evict every rank's streamed stage files from the page cache before the next step (the benches' cold
        regime): this rank's now, the others' when the next step reaches them."""
        evict(self.stage_files(streamed_only=True))
        self.backend.note(["evict"])

    def stats_line(self, prompt_tokens: int, times: list, start: float) -> str:
        line = super().stats_line(prompt_tokens, times, start)
        try:
            ranks = self.rank_stats()
        except AirmlxError:
            return line
        reads = ", ".join(f"rank {r['rank']} {format_bytes(r['swept_bytes_read'] / max(r['steps'], 1))}" for r in ranks)
        return f"{line} | per step: {reads}"

    def close(self) -> None:
        """Stop the other ranks (they exit), then free this rank's model."""
        self._closing = True
        with self._lock:
            if not self._closed and self._broken is None:
                with contextlib.suppress(PipelineError), self._exchange():
                    self._drain()
                    self.link.send(STOP)
                    while self.link.recv(f"the other ranks to stop (from rank {self.link.size - 1})").kind != STOP:
                        pass
            super().close()
            self.link.close()


def follow(model: RankModel, link: Link) -> None:
    """Run this rank's range for every sweep rank 0 starts, until rank 0 closes the model."""
    caches = {}
    last = link.rank == link.size - 1
    while True:
        msg = link.recv(f"the next step from rank {link.prev}")
        if msg.kind == STOP:
            link.send(STOP)
            return
        if msg.kind == STATS:
            link.send(STATS, {"ranks": msg.payload["ranks"] + [model.rank_summary(link.rank)]})
            continue
        if msg.kind != STEP:
            raise PipelineError(f"rank {link.rank}: an unexpected message came from rank {link.prev}; the ranks are out "
                                "of step: launch them again.")
        try:
            outs = run_step(model, caches, msg)
            if last:
                link.send(RESULT, arrays=[model.backend.logits(x) for x in outs])
            else:
                link.send(STEP, msg.payload, outs)  # recv took the arrays out of it
        except PipelineError:
            raise
        except Exception as e:  # this rank's own failure (a damaged stage file, memory): every rank ends with it
            error = f"rank {link.rank}: {e}"
            link.abort(error, link.rank)
            raise PipelineError(error) from e


def run_step(model: RankModel, caches: dict, msg) -> list:
    """Repeat rank 0's cache operations on this rank's caches, then run its range on the step's contexts."""
    for op in msg.payload["ops"]:
        kind = op[0]
        if kind == "new":
            caches[op[1]] = model.new_cache(op[2], op[3])
        elif kind == "drop":
            caches.pop(op[1], None)
        elif kind in ("merge", "extract"):
            made = (model.merge_caches([caches[i] for i in op[2]], op[3]) if kind == "merge"
                    else model.extract_cache(caches[op[2]], op[3], op[4]))
            if made is None:  # follow() ends every rank with this, naming this one
                raise RuntimeError(f"rank 0 could {kind} its KV caches and this rank could not; launch the ranks "
                                   "again with the same model and version of airmlx.")
            caches[op[1]] = made
        elif kind == "select":
            model.backend.select_rows(caches[op[1]], op[2])
        elif kind == "trim":
            model.trim_cache(caches[op[1]], op[2])
        elif kind == "evict":
            evict(model.stage_files(streamed_only=True))
    ctxs = [model.backend.begin_step(s["tokens"], s["mask"], None if s["cache"] is None else caches[s["cache"]],
                                     *s["args"], **s["kwargs"]) for s in msg.payload["ctxs"]]
    outs = [None] * len(ctxs)
    model.scheduler.forward_many(ctxs, outs.__setitem__, None, [caches[i] for i in msg.payload["scratch"]],
                                 inputs=msg.arrays)
    return outs


def models_opened(link: Link, failed: bool = False) -> None:
    """Wait, under the startup deadline, until every rank has opened its model (or failed to: `failed`), and end
    every rank naming the ones that failed. Opening may take minutes (torch on a CPU writes its int4 layout copy
    of streamed 4-bit stages the first time), longer than a rank waits for the next step; rank 0 starts pinging
    only after this, as a ping must not cross a collective."""
    rows = link.gather(np.array([int(failed)]), "every rank's model opened")
    bad = [r for r in range(link.size) if rows[r][0]]
    if bad and not failed:
        raise PipelineError(f"rank {link.rank}: rank {bad[0]} could not open its model (its output says why); fix "
                            "that, then launch again.")


def make_transport(framework: str, device=None):
    """The framework's distributed layer as a transport (the backends/ folder holds the framework code)."""
    if framework == "mlx":
        from .backends.mlx_transport import MLXTransport
        return MLXTransport()
    from .backends.torch_transport import TorchTransport
    return TorchTransport(device)


def open_pipeline(shard_dir, backend, transport, memory_budget=None, split=None, timeout: float = DEFAULT_TIMEOUT,
                  prefill_step_size: int = DEFAULT_PREFILL_STEP, prefetching: bool = True,
                  **model_kwargs) -> "PipelineModel | None":
    """This rank's part of a pipeline over transport's world. Rank 0 gets the PipelineModel; the other ranks
    follow rank 0 until it closes the model, then get None. memory_budget: one for every rank, or one per rank
    ("4GB,8GB"); None: each rank's default from its own free memory."""
    link = Link(transport, timeout)
    rank = link.rank
    try:
        manifest = Manifest.load(shard_dir)
        budget = resolve_budget(rank_budget(memory_budget, rank, link.size), backend, manifest.config,
                                prefill_step_size)
        ranks = agree_on_split(link, manifest, Path(shard_dir), backend, budget, split, prefetching)
    except AirmlxError as e:
        if not isinstance(e, PipelineError):
            link.abort(f"rank {rank}: {e}", rank)
        link.close()
        raise
    kwargs = dict(memory_budget=budget, stages=ranks[rank], prefill_step_size=prefill_step_size,
                  prefetching=prefetching, **model_kwargs)
    try:
        model = PipelineModel(shard_dir, backend, link, **kwargs) if rank == 0 else RankModel(shard_dir, backend,
                                                                                                **kwargs)
    except AirmlxError:
        with contextlib.suppress(PipelineError):
            models_opened(link, failed=True)
        link.close()
        raise
    try:
        models_opened(link)
    except PipelineError as e:
        model._broken = e  # nothing more to say to the other ranks
        model.close()
        link.close()
        raise
    if rank == 0:
        model.start_pinging()
        return model
    model.scheduler.link = link
    try:
        follow(model, link)
    finally:
        model.close()
        link.close()
    return None


def open_launched(framework: str, shard_dir, backend, device=None, memory_budget=None, split=None,
                  timeout: float = DEFAULT_TIMEOUT, **model_kwargs) -> AirModel:
    """The model of a process a launcher started (mlx.launch, torchrun): rank 0's PipelineModel, or a plain
    AirModel in a world of one. The other ranks follow rank 0 and exit (status 0) once it closes the model."""
    transport = make_transport(framework, device)
    if transport.size == 1:
        transport.close()
        return AirModel(shard_dir, backend, memory_budget=memory_budget, **model_kwargs)
    model = open_pipeline(shard_dir, backend, transport, memory_budget, split, timeout, **model_kwargs)
    if model is None:
        raise SystemExit(0)
    return model
