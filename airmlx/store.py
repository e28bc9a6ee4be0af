"""Reading stages fast: one open per stage, large reads into reusable buffers, raw tensor views.

The store knows files and bytes, not what layers mean. Opening a shard folder checks every stage file's
size and safetensors header, so a truncated or foreign file fails here, named, before any compute.
"""
import mmap
import os
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import CorruptShardError
from .manifest import Manifest, repair_hint, stage_file_problem, verify_folder
from .tensorfile import NUMPY_VIEWS, read_header

READ_CHUNK = 16 << 20
POPULATE = hasattr(mmap, "MAP_POPULATE")  # Linux: the kernel maps every page inside mmap()
PAGE = mmap.PAGESIZE


def evict(paths) -> None:
    """Drop files from the page cache (clean pages only; shard files are fsynced when written), so the next
    read comes from the disk."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


@dataclass
class RawTensor:
    dtype: str  # safetensors dtype name ("BF16", "F32", ...)
    shape: tuple
    data: np.ndarray  # typed view of the stage buffer; BF16/FP8 come as their raw bit patterns

    @property
    def nbytes(self):
        return self.data.nbytes


@dataclass
class StageData:
    name: str
    tensors: dict
    buffer: np.ndarray  # owned by the pool until release()
    nbytes: int
    read_s: float


class BufferPool:
    """Keeps up to `keep` freed buffers and hands the smallest big-enough one out again. Requests up to
    `slot_bytes` get a buffer of exactly slot_bytes, so streamed stages of mixed sizes share slots instead of
    reallocating (and page-faulting) every step."""

    def __init__(self, keep=4, slot_bytes=0):
        self.keep, self.slot_bytes = keep, slot_bytes
        self._free = []
        self._lock = threading.Lock()

    def acquire(self, nbytes):
        with self._lock:
            fits = [i for i, b in enumerate(self._free) if b.nbytes >= nbytes]
            if fits:  # by position: numpy arrays compare elementwise, so list.remove() would not do
                return self._free.pop(min(fits, key=lambda i: self._free[i].nbytes))
        return np.empty(max(nbytes, self.slot_bytes) if nbytes <= self.slot_bytes else nbytes, dtype=np.uint8)

    def release(self, buf):
        with self._lock:
            self._free.append(buf)
            self._free.sort(key=lambda b: -b.nbytes)
            del self._free[self.keep:]


class ShardStore:
    def __init__(self, folder):
        self.folder = Path(folder)
        self.manifest = Manifest.load(self.folder)
        self.stages = {s.name: s for s in self.manifest.stages}
        self.pool = BufferPool()
        self.bytes_read = 0
        self.held_bytes = 0  # stage bytes handed out and not yet given back (buffers and live mappings)
        self.peak_held_bytes = 0
        self._lock = threading.Lock()
        self._layout = {}
        for entry in self.manifest.stages:
            path = self.folder / entry.file
            problem = stage_file_problem(path, entry)
            if problem:
                raise CorruptShardError(f"stage {entry.name}: file {path} {problem}; {repair_hint(self.folder)}")
            size = entry.nbytes
            data_start, infos, _ = read_header(path, fix=f"stage {entry.name} is damaged; {repair_hint(self.folder)}")
            if sorted(infos) != sorted(entry.tensors):
                raise CorruptShardError(f"stage {entry.name}: file {path} holds other tensors than the manifest "
                                        f"lists; {repair_hint(self.folder)}")
            if entry.parts is not None and any(end > size - data_start for _, end in entry.parts.values()):
                raise CorruptShardError(f"stage {entry.name}: the manifest's expert ranges run past the end of "
                                        f"{path}; {repair_hint(self.folder)}")
            self._layout[entry.name] = (data_start, infos)

    def read_stage(self, name):
        """Read a whole stage file into a pooled buffer; the caller must release() it."""
        entry = self.stages[name]
        path = self.folder / entry.file
        t0 = time.perf_counter()
        buf = self.pool.acquire(entry.nbytes)
        try:
            self._read_into(path, 0, memoryview(buf)[: entry.nbytes], f"stage {name}")
        except CorruptShardError:
            self.pool.release(buf)
            raise
        tensors = self._views(name, buf)
        with self._lock:
            self.bytes_read += entry.nbytes
        self._hold(entry.nbytes)
        return StageData(name, tensors, buf, entry.nbytes, time.perf_counter() - t0)

    def read_part(self, name, part):
        """Read one part of a stage (a routed expert: its tensors are one byte range) into a fresh buffer,
        which the returned tensors view; the caller keeps or drops it (no release)."""
        entry = self.stages[name]
        start, end = entry.parts[str(part)]
        data_start, infos = self._layout[name]
        t0 = time.perf_counter()
        buf = np.empty(end - start, dtype=np.uint8)
        self._read_into(self.folder / entry.file, data_start + start, memoryview(buf), f"stage {name}, expert {part},")
        tensors = {info.name: RawTensor(info.dtype, info.shape, buf[info.start - start: info.end - start]
                                        .view(NUMPY_VIEWS[info.dtype]).reshape(info.shape))
                   for info in infos.values() if start <= info.start and info.end <= end}
        with self._lock:
            self.bytes_read += buf.nbytes
        return StageData(f"{name}[{part}]", tensors, None, buf.nbytes, time.perf_counter() - t0)

    def _read_into(self, path, offset, view, what):
        """Fill view with the file's bytes from offset on, in large reads; a file that ends early is damaged."""
        with open(path, "rb", buffering=0) as f:
            f.seek(offset)
            pos = 0
            while pos < len(view):
                n = f.readinto(view[pos: pos + READ_CHUNK])
                if not n:
                    raise CorruptShardError(f"{what} file {path} ended {len(view) - pos} bytes early; "
                                            f"{repair_hint(self.folder)}")
                pos += n

    def hold(self, nbytes):
        """Count bytes kept elsewhere (the expert cache) as held."""
        self._hold(nbytes)

    def _hold(self, nbytes):
        with self._lock:
            self.held_bytes += nbytes
            self.peak_held_bytes = max(self.peak_held_bytes, self.held_bytes)

    def map_stage(self, name):
        """Map a stage file instead of reading it: the tensors are read-only views of the page cache, so a
        backend that computes on host memory in place (torch on CPU) never copies them. Every page is mapped
        here, on the calling (prefetch) thread, so compute later runs without page faults: on Linux the
        kernel populates the mapping inside mmap() (read-ahead when cold, GIL released); elsewhere
        MADV_WILLNEED starts the read-ahead and one touch per page waits for it."""
        entry = self.stages[name]
        t0 = time.perf_counter()
        with open(self.folder / entry.file, "rb") as f:
            if POPULATE:
                mapped = mmap.mmap(f.fileno(), entry.nbytes, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE,
                                   prot=mmap.PROT_READ)
            else:
                mapped = mmap.mmap(f.fileno(), entry.nbytes, access=mmap.ACCESS_READ)
        buf = np.frombuffer(mapped, dtype=np.uint8)
        if not POPULATE:
            if hasattr(mapped, "madvise"):
                mapped.madvise(mmap.MADV_WILLNEED)
            int(buf[::PAGE].sum())  # fault every page in (numpy releases the GIL in this loop)
        tensors = self._views(name, buf)
        with self._lock:
            self.bytes_read += entry.nbytes
        self._hold(entry.nbytes)
        weakref.finalize(mapped, self._hold, -entry.nbytes)  # unmapped once the last view is gone
        return StageData(name, tensors, None, entry.nbytes, time.perf_counter() - t0)

    def _views(self, name, buf):
        data_start, infos = self._layout[name]
        return {info.name: RawTensor(info.dtype, info.shape,
                                     buf[data_start + info.start: data_start + info.end]
                                     .view(NUMPY_VIEWS[info.dtype]).reshape(info.shape))
                for info in infos.values()}

    def release(self, data):
        if data.buffer is not None:
            self.pool.release(data.buffer)
            data.buffer = None
            self._hold(-data.nbytes)

    def read_bandwidth(self, names: list, cold: bool = True) -> float:
        """Bytes per second reading these stages in order with the store's own reads; cold: from the disk
        (their files evicted from the page cache first)."""
        if cold:
            evict([self.folder / self.stages[n].file for n in names])
        t0, total = time.perf_counter(), 0
        for n in names:
            data = self.read_stage(n)
            total += data.nbytes
            self.release(data)
        return total / (time.perf_counter() - t0)

    def configure_pool(self, keep: int, slot_bytes: int) -> None:
        """Keep up to `keep` freed read buffers, each `slot_bytes` for requests that fit one."""
        self.pool.keep, self.pool.slot_bytes = keep, slot_bytes

    def verify(self) -> list:
        """Check every stage's checksum; return one line per damaged stage (empty when all are intact)."""
        return verify_folder(self.folder)
