"""The safetensors container, read and written on raw bytes (no framework, so bf16 needs nothing special).

Layout: 8-byte little-endian header length N, N bytes of JSON, then the tensors' bytes back to back.
"""
import json
import math
import os
import struct
from dataclasses import dataclass

import numpy as np

from .errors import CorruptShardError

DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1,
}
# numpy views of the raw bytes; bf16 and fp8 have no numpy type, so they travel as raw bit patterns.
NUMPY_VIEWS = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
    "F8_E4M3": np.uint8, "F8_E5M2": np.uint8,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_DIMS = 64  # numpy's limit; also keeps a hostile header from making the size check slow


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple
    start: int  # offset inside the data section
    end: int

    @property
    def nbytes(self):
        return self.end - self.start


def parse_header(blob, data_size, path, fix="re-create this file."):
    """Validate a header's JSON against the data section's size; return ({name: TensorInfo}, metadata).
    Anything malformed raises CorruptShardError naming `path` and ending with `fix`."""
    try:
        raw = json.loads(blob)
    except (ValueError, RecursionError) as e:  # ValueError covers bad UTF-8, bad JSON and over-long integers
        raise CorruptShardError(f"{path}: the safetensors header is not valid JSON ({str(e)[:200]}); {fix}") from None
    if not isinstance(raw, dict):
        raise CorruptShardError(f"{path}: the safetensors header is not a JSON object; {fix}")
    metadata = raw.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CorruptShardError(f"{path}: the safetensors header's __metadata__ is not a JSON object; {fix}")
    infos = {}
    for name, entry in raw.items():
        try:
            dtype, shape, (start, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            ok = (dtype in DTYPE_SIZES and len(shape) <= MAX_DIMS and all(type(d) is int and d >= 0 for d in shape)
                  and type(start) is int and type(end) is int and 0 <= start <= end
                  and end - start == math.prod(shape) * DTYPE_SIZES[dtype])
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise CorruptShardError(f"{path}: tensor {name!r:.200} has a malformed header entry {entry!r:.200}; {fix}")
        infos[name] = TensorInfo(name, dtype, shape, start, end)
    expected = 0
    for info in sorted(infos.values(), key=lambda t: (t.start, t.end)):
        if info.start != expected:
            raise CorruptShardError(f"{path}: tensor {info.name!r:.200} does not follow the previous one "
                                    f"(offset {info.start}, expected {expected}); {fix}")
        expected = info.end
    if expected != data_size:
        what = "truncated" if expected > data_size else "longer than its header says"
        raise CorruptShardError(f"{path}: file is {what} (header describes {expected} data bytes, "
                                f"file holds {data_size}); {fix}")
    return infos, metadata


def read_header(path, fix="re-create this file."):
    """Parse a safetensors file's header; return (data_start, {name: TensorInfo}, metadata)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CorruptShardError(f"{path}: file is truncated ({size} bytes, no safetensors header); {fix}")
        (n,) = struct.unpack("<Q", prefix)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise CorruptShardError(f"{path}: header length {n} does not fit the file's {size} bytes "
                                    f"(truncated or not a safetensors file); {fix}")
        blob = f.read(n)
    infos, metadata = parse_header(blob, size - 8 - n, path, fix)
    return 8 + n, infos, metadata


def encode_header(specs, metadata=None):
    """specs: [(name, dtype, shape)] in file order. Returns header bytes (length prefix included, padded so
    the data section starts 8-byte aligned) and the data section's size."""
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, dtype, shape in specs:
        nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob, offset


def aligned_order(specs):
    """Order tensors by element size, largest first, so every tensor's bytes start aligned to its element size."""
    return sorted(specs, key=lambda s: -DTYPE_SIZES[s[1]])
