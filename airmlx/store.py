"""Reading stages fast: one open per stage, large reads into reusable buffers, raw tensor views.

The store knows files and bytes, not what layers mean. Opening a shard folder checks every stage file's
size and safetensors header, so a truncated or foreign file fails here, named, before any compute; every
later read checks again that the file is the one checked then (size, inode, modification time), so a file
replaced or rewritten under a running model is an error naming it, never a silent mix of weights.

Buffers come from the backend (`allocate`): MLX gets its own arrays, so a stage is read straight into the
memory it computes from; torch gets numpy (pinned on CUDA). Streamed stages share a few slot-sized pooled
buffers; resident stages get buffers of their own size that are never pooled.
"""
import ctypes
import errno
import mmap
import os
import sys
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import CorruptShardError
from .manifest import Manifest, repair_hint, stage_file_problem, verify_folder
from .readahead import ReadAhead
from .tensorfile import NUMPY_VIEWS, read_header

READ_CHUNK = 16 << 20
PREADV = hasattr(os, "preadv")  # several buffers filled by one read call (not on Windows)
PAGE = mmap.PAGESIZE
MADV_POPULATE_READ = 22  # Linux >= 5.14: map (and read, when cold) every page of a range, in one call
MADV_HUGEPAGE = 14
MADV_DONTNEED = 4
HUGE_PAGE = 2 << 20  # a PMD mapping with 4 KiB pages (x86-64, arm64 Linux)
# CPython's mmap.mmap() holds the GIL for the whole mmap() call, so MAP_POPULATE on the prefetch thread stalled
# the compute thread for as long as a cold stage took to read. madvise through ctypes runs without the GIL.
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
HUGE_MAPPINGS = _LIBC is not None  # populate() asks for huge pages
# A streamed stage's mapping is made once and kept: between its uses only its pages are dropped (MADV_DONTNEED),
# so a sweep does not map, view and unmap every stage again (on the 617.7 MB bench model that was 0.25 ms of a
# 2-core machine's CPU per stage, beside compute). Elsewhere each use maps the file anew.
KEEP_MAPPINGS = _LIBC is not None
if _LIBC is not None:
    _LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def populate(buf: np.ndarray, mapped: mmap.mmap) -> None:
    """Map every page of a fresh read-only mapping (reading it from disk if cold) without holding the GIL:
    madvise(MADV_POPULATE_READ) where the kernel has it, else read-ahead and one touch per page (numpy
    releases the GIL in that loop). On Linux the mapping asks for huge pages first (MADV_HUGEPAGE, where
    transparent huge pages are "always" or "madvise"): a file system with large folios (ext4, xfs) then reads
    it into the page cache in 2 MB folios mapped whole, so mapping, computing on and unmapping a stage costs
    a 512th of the page-table work (a warm 617.7 MB sweep: 0.128 s with 4 KiB pages, 0.083 s so)."""
    if _LIBC is not None and buf.size:
        _LIBC.madvise(buf.ctypes.data, buf.size, MADV_HUGEPAGE)  # a hint: a kernel without it says EINVAL
        if _LIBC.madvise(buf.ctypes.data, buf.size, MADV_POPULATE_READ) == 0:
            return
        err = ctypes.get_errno()
        if err != errno.EINVAL:  # EINVAL: a kernel before 5.14; anything else: the file cannot be read
            raise OSError(err, os.strerror(err))
    if hasattr(mapped, "madvise"):
        mapped.madvise(mmap.MADV_WILLNEED)
    int(buf[::PAGE].sum())


def mapping_kib(addr: int, field: str) -> int:
    """A field ("Rss:", "FilePmdMapped:") of this process's mapping that starts at addr, from /proc/self/smaps,
    in KiB (0 where the mapping does not list it)."""
    with open("/proc/self/smaps") as f:
        lines = f.read().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(format(addr, "x") + "-"))
    for line in lines[start + 1:]:
        if line.startswith(field):
            return int(line.split()[1])
        if "-" in line.split()[0]:  # the next mapping
            break
    return 0


def huge_pages_possible() -> bool:
    """Whether transparent huge pages may back a mapping that asks for them (Linux: not "never")."""
    try:
        return "[never]" not in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False


def evict(paths) -> None:
    """Drop files from the page cache (clean pages only; shard files are fsynced when written), so the next
    read comes from the disk."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def numpy_buffer(nbytes: int):
    """The default allocator: (owner, writable uint8 view) of plain host memory."""
    buf = np.empty(nbytes, dtype=np.uint8)
    return buf, buf


@dataclass
class RawTensor:
    dtype: str  # safetensors dtype name ("BF16", "F32", ...)
    shape: tuple
    data: np.ndarray  # typed view of the stage buffer; BF16/FP8 come as their raw bit patterns
    owner: object = None  # the allocator's object the data lives in (an mx.array for MLX), for zero-copy loads
    offset: int = 0  # byte offset of data inside owner

    @property
    def nbytes(self):
        return self.data.nbytes


@dataclass
class Buffer:
    owner: object
    view: np.ndarray  # uint8, writable
    pooled: bool

    @property
    def nbytes(self):
        return self.view.nbytes


@dataclass
class StageData:
    name: str
    tensors: dict
    buffer: Buffer  # None for mappings and expert parts
    nbytes: int  # bytes read
    read_s: float
    held: int = 0  # bytes counted as handed out (a buffer outside the pool, a mapping) until release()
    done: object = None  # a kept mapping's use: drops its pages and its count, once (release(), or when dropped)


class BufferPool:
    """Streamed stages read into slot-sized buffers kept for reuse (at most `keep`, one per stage in flight),
    so stages of mixed sizes share slots instead of reallocating (and page-faulting) every step. Any other
    request gets a buffer of its own size that release() drops. fill() allocates the slots up front, on the
    calling thread (MLX allocates only on the thread that computes)."""

    def __init__(self, allocate: Callable = numpy_buffer, keep: int = 0, slot_bytes: int = 0):
        self.allocate, self.keep, self.slot_bytes = allocate, keep, slot_bytes
        self.slots = 0  # slot buffers in existence, free or lent out
        self._free = []
        self._lock = threading.Lock()

    def acquire(self, nbytes: int, pooled: bool = True) -> Buffer:
        if pooled and nbytes <= self.slot_bytes:
            with self._lock:
                if self._free:
                    return self._free.pop()
                self.slots += 1
            return Buffer(*self.allocate(self.slot_bytes), pooled=True)
        return Buffer(*self.allocate(nbytes), pooled=False)

    def release(self, buf: Buffer) -> None:
        with self._lock:
            if not buf.pooled:
                return
            if buf.nbytes == self.slot_bytes and len(self._free) < self.keep:
                self._free.append(buf)
            else:
                self.slots -= 1

    def fill(self) -> None:
        with self._lock:
            missing = self.keep - len(self._free)
            self.slots += missing
        for _ in range(missing):
            self.release(Buffer(*self.allocate(self.slot_bytes), pooled=True))

    def clear(self) -> None:
        with self._lock:
            self.slots -= len(self._free)
            self._free.clear()

    @property
    def pooled_bytes(self) -> int:
        """Bytes of the slot buffers the pool has made and not dropped: free or lent out."""
        return self.slots * self.slot_bytes


class ShardStore:
    def __init__(self, folder, stages: "list | None" = None):
        """stages: the names of the stages this store reads (a pipeline rank's range), in the manifest's
        order; only their files need to be in the folder. Default: every stage."""
        self.folder = Path(folder)
        self.manifest = Manifest.load(self.folder)
        wanted = None if stages is None else set(stages)
        self.stages = {s.name: s for s in self.manifest.stages if wanted is None or s.name in wanted}
        self.pool = BufferPool()
        self.bytes_read = 0
        self.measured_bytes_read = 0  # the part of bytes_read the bandwidth measurements read
        self.held_bytes = 0  # bytes handed out outside the pool and not yet given back (buffers, live mappings)
        self.peak_held_bytes = 0
        self._lock = threading.Lock()
        self._layout = {}
        self._identity = {}  # stage name -> (size, device, inode, mtime) of the file checked at open
        self._paths = {}  # stage name -> the file read for it: its own, or a backend's copy (use_copy)
        self._folios_checked = set()  # stages whose page-cache folios map_stage has looked at (once each)
        self._check_folios = HUGE_MAPPINGS and huge_pages_possible()
        self._kept_maps = {}  # stage name -> (mapping, its uint8 view, its tensors): see map_stage
        self.readahead = ReadAhead()
        for entry in self.stages.values():
            path = self._paths[entry.name] = self.folder / entry.file
            problem = stage_file_problem(path, entry)
            if problem:
                raise CorruptShardError(f"stage {entry.name}: file {path} {problem}; {repair_hint(self.folder)}")
            st = path.stat()
            data_start, infos, _ = read_header(path, fix=f"stage {entry.name} is damaged; {repair_hint(self.folder)}")
            if sorted(infos) != sorted(entry.tensors):
                raise CorruptShardError(f"stage {entry.name}: file {path} holds other tensors than the manifest "
                                        f"lists; {repair_hint(self.folder)}")
            if entry.parts is not None and any(end > st.st_size - data_start for _, end in entry.parts.values()):
                raise CorruptShardError(f"stage {entry.name}: the manifest's expert ranges run past the end of "
                                        f"{path}; {repair_hint(self.folder)}")
            self._layout[entry.name] = (data_start, infos)
            self._identity[entry.name] = identity(st)

    def path(self, name: str) -> Path:
        """The file read for a stage."""
        return self._paths[name]

    def read_ahead(self, names: list) -> None:
        """Ask the OS to start reading these stages' files into its page cache (airmlx/readahead.py)."""
        self.readahead.hint([(self._paths[n], self.stages[n].nbytes) for n in names])

    def use_copy(self, name: str, path) -> None:
        """Read a stage from `path` from now on: a backend's copy of its file with the same header (names,
        dtypes, shapes, offsets) and other bytes in some tensors (airmlx/stage_copies.py writes them)."""
        path = Path(path)
        data_start, infos, _ = read_header(path, fix="delete it; it is written again")
        if (data_start, infos) != self._layout[name] or path.stat().st_size != self.stages[name].nbytes:
            raise CorruptShardError(f"stage {name}: its copy {path} does not match the stage's file; delete it "
                                    "and it is written again.")
        self._paths[name] = path
        self._identity[name] = identity(path.stat())
        self._kept_maps.pop(name, None)

    def data_start(self, name: str) -> int:
        """Where a stage file's tensor data starts (after its header)."""
        return self._layout[name][0]

    def tensor_infos(self, name: str) -> dict:
        """{tensor name: TensorInfo(dtype, shape, start, end)} of a stage, from its header."""
        return self._layout[name][1]

    def configure_pool(self, keep: int, slot_bytes: int, allocate: Callable = numpy_buffer) -> None:
        """Streamed stages share `keep` pooled buffers of `slot_bytes`, allocated now by `allocate`."""
        self.pool.clear()
        self.pool = BufferPool(allocate, keep, slot_bytes)
        self.pool.fill()

    # -- reads -------------------------------------------------------------------------------------
    def read_stage(self, name: str, pooled: bool = True) -> StageData:
        """Read a whole stage file into a buffer (a pooled slot for streamed stages); release() gives it back."""
        entry = self.stages[name]
        t0 = time.perf_counter()
        buf = self.pool.acquire(entry.nbytes, pooled)
        try:
            self._read_into(name, 0, buf.view[: entry.nbytes])
        except BaseException:
            self.pool.release(buf)
            raise
        tensors = self._views(name, buf.view, buf.owner)
        held = 0 if buf.pooled else buf.nbytes  # pooled slots count as the pool's, lent or not
        self._count(entry.nbytes, held)
        return StageData(name, tensors, buf, entry.nbytes, time.perf_counter() - t0, held)

    def read_part(self, name: str, part: int, buffer: tuple = None, order: list = None) -> StageData:
        """Read one part of a stage (a routed expert: its tensors are one byte range) into a fresh buffer (or
        `buffer`, an (owner, uint8 view) of the part's size), which the returned tensors view; the caller keeps
        or drops it (no release). With `order` (the part's tensor names), the tensors lie in the buffer one
        after another in that order, not the file's: a backend gets them laid out as it computes on them, with
        no copy. Safe to call from several threads at once."""
        entry = self.stages[name]
        start, end = entry.parts[str(part)]
        data_start, infos = self._layout[name]
        t0 = time.perf_counter()
        owner, view = buffer or numpy_buffer(end - start)
        mine = sorted((i for i in infos.values() if start <= i.start and i.end <= end), key=lambda i: i.start)
        if order is None:
            self._read_into(name, data_start + start, view, f", expert {part}")
            placed = {i.name: i.start - start for i in mine}
        else:
            if sorted(order) != sorted(i.name for i in mine):
                raise ValueError(f"{name}[{part}]: order {order} names other tensors than the part's")
            placed, at = {}, 0
            for n in order:
                placed[n], at = at, at + infos[n].nbytes
            pieces = [view[placed[i.name]: placed[i.name] + i.nbytes] for i in mine]  # file order (safetensors: no holes)
            self._read_into(name, data_start + start, pieces[0], f", expert {part}", pieces[1:])
        tensors = {i.name: RawTensor(i.dtype, i.shape, view[placed[i.name]: placed[i.name] + i.nbytes]
                                     .view(NUMPY_VIEWS[i.dtype]).reshape(i.shape), owner, placed[i.name])
                   for i in mine}
        self._count(end - start, 0)
        return StageData(f"{name}[{part}]", tensors, None, end - start, time.perf_counter() - t0)

    def map_stage(self, name: str) -> StageData:
        """Map a stage file instead of reading it: the tensors are read-only views of the page cache, so a
        backend that computes on host memory in place (torch on CPU) never copies them. Every page is mapped
        here, on the calling (prefetch) thread and without the GIL (populate()), so compute later runs
        without page faults and is not held up meanwhile. A file truncated while mapped would kill the
        process (SIGBUS), so the file is checked against the one opened first. On Linux the mapping and its
        views are kept for the stage's next use: release() drops its pages, the next map_stage maps them again."""
        entry = self.stages[name]
        t0 = time.perf_counter()
        kept = self._kept_maps.get(name)
        if kept is not None:  # mapped at an earlier sweep, its pages dropped since (release): map them again
            mapped, buf, tensors = kept
            try:
                self._check_unchanged(name, os.stat(self._paths[name]))
                populate(buf, mapped)
            except OSError as e:
                raise self._unreadable(name, e) from None
            self._count(entry.nbytes, entry.nbytes)
            return self._kept_use(name, tensors, time.perf_counter() - t0)
        mapped, buf = self._mapped(name)
        if self._check_folios and name not in self._folios_checked:
            self._folios_checked.add(name)
            if self._small_folios(buf):
                del buf
                mapped.close()
                evict([self._paths[name]])
                mapped, buf = self._mapped(name)
                if self._small_folios(buf):  # this system reads files so: stop asking
                    self._check_folios = False
        tensors = self._views(name, buf)
        self._count(entry.nbytes, entry.nbytes)
        if KEEP_MAPPINGS:
            self._kept_maps[name] = (mapped, buf, tensors)
            return self._kept_use(name, tensors, time.perf_counter() - t0)
        weakref.finalize(mapped, self._count, 0, -entry.nbytes)  # unmapped once the last view is gone
        return StageData(name, tensors, None, entry.nbytes, time.perf_counter() - t0, entry.nbytes)

    def _kept_use(self, name, tensors, seconds):
        nbytes = self.stages[name].nbytes
        data = StageData(name, dict(tensors), None, nbytes, seconds, nbytes)
        data.done = weakref.finalize(data, self._drop_pages, name, nbytes)  # a use never released: dropped with it
        return data

    def _drop_pages(self, name, nbytes):
        kept = self._kept_maps.get(name)
        if kept is not None:
            _LIBC.madvise(kept[1].ctypes.data, kept[1].size, MADV_DONTNEED)  # the page cache keeps them; we do not
        self._count(0, -nbytes)

    def _mapped(self, name: str) -> tuple:
        """(mapping, its uint8 view) of a stage file, every page mapped (populate)."""
        with self._open(name) as f:
            try:
                mapped = mmap.mmap(f.fileno(), self.stages[name].nbytes, access=mmap.ACCESS_READ)
            except (OSError, ValueError) as e:
                raise self._unreadable(name, e) from None
        buf = np.frombuffer(mapped, dtype=np.uint8)
        try:
            populate(buf, mapped)
        except OSError as e:
            raise self._unreadable(name, e) from None
        return mapped, buf

    @staticmethod
    def _small_folios(fresh: np.ndarray) -> bool:
        """Whether a populated mapping of a stage file maps none of it as huge pages, though it spans a whole
        aligned one: the file sits in the page cache in small folios, read there by read() (another backend, a
        checksum, the sharder's small writes) rather than by a mapping that asked for huge pages. Every warm
        sweep then costs 1.4-2.1 x more (python -m airmlx.bench --warm-after-read). map_stage then drops the file
        from the page cache, once, so the next populate reads it into huge pages. (Told by the kernel's own
        count, once per stage: a populate's speed told small folios from huge ones on one machine, not another.)"""
        start = fresh.ctypes.data
        if -(-start // HUGE_PAGE) * HUGE_PAGE + HUGE_PAGE > start + fresh.size:
            return False
        try:
            return mapping_kib(start, "FilePmdMapped:") == 0
        except (OSError, StopIteration):  # no /proc/self/smaps: nothing to tell by
            return False

    def release(self, data: StageData) -> None:
        """Give a read_stage() buffer back, or drop a kept mapping's pages (any other mapping goes with its
        last view)."""
        if data.buffer is not None:
            self.pool.release(data.buffer)
            data.buffer = None
            self._count(0, -data.held)
        elif data.done is not None:
            data.done()

    @property
    def buffer_bytes(self) -> int:
        """Stage bytes in memory for reading: the pool's slots and the buffers and mappings handed out."""
        return self.pool.pooled_bytes + self.held_bytes

    def _open(self, name):
        """Open a stage file, checking it is still the file checked when the folder was opened."""
        path = self._paths[name]
        try:
            f = open(path, "rb", buffering=0)
        except OSError as e:
            raise self._unreadable(name, e) from None
        try:
            self._check_unchanged(name, os.fstat(f.fileno()))
        except CorruptShardError:
            f.close()
            raise
        return f

    def _check_unchanged(self, name, st):
        """A stage file, by its stat, must be the file checked when the folder was opened."""
        if identity(st) != self._identity[name]:
            raise CorruptShardError(f"stage {name}: file {self._paths[name]} changed while the model was open "
                                    f"(replaced, truncated or rewritten); reload the model, and if the folder is "
                                    f"damaged {repair_hint(self.folder)}")

    def _read_into(self, name, offset, view, what="", then=()):
        """Fill view with the file's bytes from offset on, then each of `then` with the bytes that follow, in
        large reads: several views in one call (preadv), so the kernel reads their whole range at once, not
        one view after another; a file that ends early is damaged."""
        path = self._paths[name]
        views = [memoryview(v).cast("B") for v in (view, *then) if len(v)]
        with self._open(name) as f:
            try:
                while views:
                    if PREADV:
                        n = os.preadv(f.fileno(), views[:64] if len(views) > 1 else [views[0][:READ_CHUNK]], offset)
                    else:
                        f.seek(offset)
                        n = f.readinto(views[0][:READ_CHUNK])
                    if not n:
                        raise CorruptShardError(f"stage {name}{what}: file {path} ended "
                                                f"{sum(len(v) for v in views)} bytes early; {repair_hint(self.folder)}")
                    offset += n
                    while n:  # past what was filled
                        k = min(n, len(views[0]))
                        views[0], n = views[0][k:], n - k
                        if not len(views[0]):
                            views.pop(0)
            except OSError as e:
                raise self._unreadable(name, e) from None

    def _unreadable(self, name, error):
        path = self._paths[name]
        return CorruptShardError(f"stage {name}: reading {path} failed ({type(error).__name__}: "
                                 f"{getattr(error, 'strerror', None) or error}); {repair_hint(self.folder)}")

    def _views(self, name, buf, owner=None):
        data_start, infos = self._layout[name]
        return {info.name: RawTensor(info.dtype, info.shape,
                                     buf[data_start + info.start: data_start + info.end]
                                     .view(NUMPY_VIEWS[info.dtype]).reshape(info.shape),
                                     owner, data_start + info.start)
                for info in infos.values()}

    def _count(self, read, held):
        with self._lock:
            self.bytes_read += read
            self.held_bytes += held
            self.peak_held_bytes = max(self.peak_held_bytes, self.held_bytes)

    def reset_peak(self) -> None:
        with self._lock:
            self.peak_held_bytes = self.held_bytes

    # -- tools -------------------------------------------------------------------------------------
    def read_bandwidth(self, names: list, cold: bool = True, mapped: bool = False) -> float:
        """Bytes per second reading these stages in order with the store's own reads (mapped: the mappings a
        backend computing on the page cache streams through); cold: from the disk (their files evicted from
        the page cache first)."""
        if cold:
            evict([self._paths[n] for n in names])
        t0, total = time.perf_counter(), 0
        for n in names:
            data = self.map_stage(n) if mapped else self.read_stage(n, pooled=False)
            total += data.nbytes
            self.release(data)
            data.tensors = None
        self.measured_bytes_read += total
        return total / (time.perf_counter() - t0)

    def part_read_bandwidth(self, parts: list, cold: bool = True, together: int = 1) -> float:
        """Bytes per second reading these parts ((stage name, part) pairs: routed experts) with read_part,
        `together` at a time on as many threads, as a MoE layer reads the experts it routed to; cold: their
        files evicted from the page cache first."""
        if cold:
            evict(sorted({self._paths[name] for name, _ in parts}))
        t0, total = time.perf_counter(), 0
        with ThreadPoolExecutor(together, thread_name_prefix="airmlx-bandwidth") as pool:
            for i in range(0, len(parts), together):
                total += sum(d.nbytes for d in pool.map(lambda p: self.read_part(*p), parts[i: i + together]))
        self.measured_bytes_read += total
        return total / (time.perf_counter() - t0)

    def verify(self) -> list:
        """Check every stage's checksum; return one line per damaged stage (empty when all are intact)."""
        return verify_folder(self.folder)

    def close(self) -> None:
        self.pool.clear()
        self._kept_maps.clear()  # each unmapped once the backend's last view of it is gone
        self.readahead.close()


def identity(st):
    """What says a file is still the one checked: its size, device, inode and modification time."""
    return st.st_size, st.st_dev, st.st_ino, st.st_mtime_ns
