"""Checkpoint tensors the sharder writes in another layout than stored. Checkpoints that keep a layer's routed
experts in one fused tensor, (experts, ...) (Qwen3-VL-MoE, Granite MoE): the sharder splits it into each
expert's own tensors, named as the per-expert checkpoints of the same family name them, so the stage layout,
the expert reads and both backends see each expert apart, as they do for Mixtral or Qwen3-MoE. And linears
stored (in, out), as transformers' Conv1D keeps them (GPT-2): written (out, in), as every other linear."""
import functools
import math
import re
from dataclasses import dataclass

import numpy as np

from .errors import CheckpointError
from .tensorfile import DTYPE_SIZES, TensorInfo


@dataclass(frozen=True)
class TransposedPart(TensorInfo):
    """Output rows [first, last) of one expert's weight in a fused tensor stored (in, out): [start, end) is the
    expert's whole (in, out) block, which the sharder reads, slices and transposes into a (out, in) weight."""
    block: tuple = ()  # (in, out), as stored
    rows: tuple = ()  # (first, last) of out

    @property
    def nbytes(self):
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]


def split_fused_experts(arch, config: dict, sources: dict) -> dict:
    """sources (tensor name -> (file, data start, TensorInfo)) with each fused expert tensor that arch names
    (Arch.fused_experts) replaced by its experts' own: byte ranges where the checkpoint stores (out, in) per
    expert, TransposedParts where it stores (in, out). Which of the two, transformers tells by the shape: (out,
    in) unless the shape is the transpose of that, found here by where the hidden size sits."""
    if not arch or not arch.fused_experts:
        return sources
    fused = {name: (hidden_in, parts) for name, hidden_in, parts in arch.fused_experts}
    in_layer = re.compile(re.escape(arch.layer_prefix) + r"(\d+)\.(.+)$")
    hidden = config.get("hidden_size")
    out = {}
    for name, (path, data_start, info) in sources.items():
        m = in_layer.match(name)
        if not (m and m.group(2) in fused):
            out[name] = (path, data_start, info)
            continue
        hidden_in, parts = fused[m.group(2)]
        shape = tuple(info.shape)
        # (out, in) has the hidden size last when the experts read it, first when they write it
        transposed = len(shape) == 3 and shape[2 if hidden_in else 1] != hidden
        if len(shape) != 3 or info.dtype not in DTYPE_SIZES or shape[1 if hidden_in == transposed else 2] != hidden:
            raise CheckpointError(f"tensor {name!r} has shape {list(shape)} ({info.dtype}); a fused experts tensor "
                                  f"is (experts, rows, columns) with hidden_size {hidden} one of them: the checkpoint "
                                  "does not match its config.")
        experts, rows, cols = shape
        out_dim, in_dim = (cols, rows) if transposed else (rows, cols)
        if out_dim % len(parts):
            raise CheckpointError(f"tensor {name!r}: {out_dim} outputs do not split into {len(parts)} equal parts "
                                  f"({', '.join(parts)}); the checkpoint does not match its config.")
        size, itemsize = out_dim // len(parts), DTYPE_SIZES[info.dtype]
        block = rows * cols * itemsize
        for e in range(experts):
            start = info.start + e * block
            for i, part in enumerate(parts):
                new = f"{arch.layer_prefix}{m.group(1)}.{arch.experts}.{e}.{part}"
                if transposed:
                    piece = TransposedPart(new, info.dtype, (size, in_dim), start, start + block, block=(rows, cols),
                                           rows=(i * size, (i + 1) * size))
                else:
                    first = start + i * size * cols * itemsize
                    piece = TensorInfo(new, info.dtype, (size, cols), first, first + size * cols * itemsize)
                out[new] = (path, data_start, piece)
    return out


def conv1d_as_linear(arch, sources: dict) -> dict:
    """sources with the weights of the layers' Conv1D linears (Arch.conv1d) as TransposedParts: written (out, in)."""
    if not arch or not arch.conv1d:
        return sources
    conv1d = re.compile(re.escape(arch.layer_prefix) + r"\d+\.(" + "|".join(map(re.escape, arch.conv1d)) + r")\.weight$")
    out = {}
    for name, (path, data_start, info) in sources.items():
        if conv1d.match(name) and len(info.shape) == 2 and info.dtype in DTYPE_SIZES:
            rows, cols = info.shape
            info = TransposedPart(name, info.dtype, (cols, rows), info.start, info.end, block=(rows, cols),
                                  rows=(0, cols))
        out[name] = (path, data_start, info)
    return out


def read_array(path, data_start: int, info: TensorInfo, view) -> np.ndarray:
    """A source tensor's values (numpy dtype `view`) in its shape; a TransposedPart sliced and transposed."""
    if isinstance(info, TransposedPart):  # gate's and up's parts of one block: it is read once for both
        whole = info.rows == (0, info.block[1])  # a Conv1D's weight: nothing else is read from its block
        block = (read_bytes if whole else read_kept)(path, data_start + info.start, info.end - info.start,
                                                     np.dtype(view))
        return np.ascontiguousarray(block.reshape(info.block)[:, info.rows[0]: info.rows[1]].T)
    return read_bytes(path, data_start + info.start, info.end - info.start, np.dtype(view)).reshape(info.shape)


def read_bytes(path, start: int, nbytes: int, dtype) -> np.ndarray:
    """nbytes of path from start, as a read-only array of dtype."""
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        return np.frombuffer(f.read(nbytes), dtype=dtype)


read_kept = functools.lru_cache(maxsize=2)(read_bytes)  # the last expert blocks read, for their other parts
