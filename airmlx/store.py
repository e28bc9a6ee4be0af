"""Reading stages fast: one open per stage, large reads into reusable buffers, raw tensor views.

The store knows files and bytes, not what layers mean. Opening a shard folder checks every stage file's
size and safetensors header, so a truncated or foreign file fails here, named, before any compute.
"""
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import CorruptShardError
from .manifest import Manifest
from .tensorfile import NUMPY_VIEWS, read_header

READ_CHUNK = 16 << 20


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
    """Keeps up to `keep` freed buffers and hands the smallest big-enough one out again."""

    def __init__(self, keep=4):
        self.keep = keep
        self._free = []
        self._lock = threading.Lock()

    def acquire(self, nbytes):
        with self._lock:
            fits = [b for b in self._free if b.nbytes >= nbytes]
            if fits:
                buf = min(fits, key=lambda b: b.nbytes)
                self._free.remove(buf)
                return buf
        return np.empty(nbytes, dtype=np.uint8)

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
        self._lock = threading.Lock()
        self._layout = {}
        for entry in self.manifest.stages:
            path = self.folder / entry.file
            if not path.is_file():
                raise CorruptShardError(f"stage {entry.name}: file {path} is missing; shard the model again "
                                        "(finished stages are reused).")
            size = path.stat().st_size
            if size != entry.nbytes:
                raise CorruptShardError(f"stage {entry.name}: file {path} has {size} bytes, the manifest says "
                                        f"{entry.nbytes} (truncated or replaced); delete it and shard again.")
            data_start, infos, _ = read_header(path)
            if sorted(infos) != sorted(entry.tensors):
                raise CorruptShardError(f"stage {entry.name}: file {path} holds other tensors than the manifest "
                                        "lists; delete it and shard again.")
            self._layout[entry.name] = (data_start, infos)

    def read_stage(self, name):
        """Read a whole stage file into a pooled buffer; the caller must release() it."""
        entry = self.stages[name]
        path = self.folder / entry.file
        t0 = time.perf_counter()
        buf = self.pool.acquire(entry.nbytes)
        view = memoryview(buf)[: entry.nbytes]
        with open(path, "rb", buffering=0) as f:
            pos = 0
            while pos < entry.nbytes:
                n = f.readinto(view[pos: pos + READ_CHUNK])
                if not n:
                    self.pool.release(buf)
                    raise CorruptShardError(f"stage {name}: file {path} ended after {pos} of {entry.nbytes} bytes; "
                                            "delete it and shard again.")
                pos += n
        data_start, infos = self._layout[name]
        tensors = {}
        for info in infos.values():
            raw = buf[data_start + info.start: data_start + info.end]
            tensors[info.name] = RawTensor(info.dtype, info.shape,
                                           raw.view(NUMPY_VIEWS[info.dtype]).reshape(info.shape))
        with self._lock:
            self.bytes_read += entry.nbytes
        return StageData(name, tensors, buf, entry.nbytes, time.perf_counter() - t0)

    def release(self, data):
        if data.buffer is not None:
            self.pool.release(data.buffer)
            data.buffer = None

    def verify(self):
        """Check every stage's checksum; return one line per damaged stage (empty when all are intact)."""
        from .shard import file_checksum
        problems = []
        for entry in self.manifest.stages:
            if file_checksum(self.folder / entry.file) != entry.checksum:
                problems.append(f"stage {entry.name}: {self.folder / entry.file} does not match its checksum; "
                                "delete the file and shard again to rebuild it.")
        return problems
