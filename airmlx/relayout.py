"""Checkpoint tensors the sharder writes in another layout than stored. Checkpoints that keep a layer's routed
experts in one fused tensor, (experts, ...) (Qwen3-VL-MoE, Granite MoE): the sharder splits it into each
expert's own tensors, named as the per-expert checkpoints of the same family name them, so the stage layout,
the expert reads and both backends see each expert apart, as they do for Mixtral or Qwen3-MoE. Linears
stored (in, out), as transformers' Conv1D keeps them (GPT-2): written (out, in), as every other linear. And
fp8 weights with block scales (DeepSeek-V3, Qwen3-FP8, MiniMax-M2: quant_method "fp8"): written dequantised, in
the model's dtype, as transformers dequantises them where it cannot compute in fp8."""
import functools
import math
import re
from dataclasses import dataclass

import numpy as np

from . import quant
from .errors import CheckpointError
from .tensorfile import DTYPE_SIZES, TensorInfo


@dataclass(frozen=True)
class Derived(TensorInfo):
    """A tensor the sharder makes from stored bytes when it writes it (read_array), not a byte range it copies."""

    @property
    def nbytes(self):
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]


@dataclass(frozen=True)
class TransposedPart(Derived):
    """Output rows [first, last) of one expert's weight in a fused tensor stored (in, out): [start, end) is the
    expert's whole (in, out) block, which the sharder reads, slices and transposes into a (out, in) weight."""
    block: tuple = ()  # (in, out), as stored
    rows: tuple = ()  # (first, last) of out


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


@dataclass(frozen=True)
class Fp8Blocks(Derived):
    """An fp8 weight ([start, end) of its file, in `fp8`) times its weight_scale_inv, one scale per block of
    block[0] rows by block[1] columns (the last blocks may be partial), rounded to `dtype`."""
    fp8: str = "F8_E4M3"
    block: tuple = ()
    scale: tuple = ()  # (path, data start, TensorInfo) of the scales, (ceil(rows / block[0]), ceil(cols / block[1]))


FP8_SCALES = ".weight_scale_inv"
FLOAT_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def dequantized_fp8(config: dict, sources: dict, src) -> dict:
    """sources with each fp8 weight of a checkpoint quantised by transformers' fine-grained fp8 (quantization_config
    quant_method "fp8": a weight_scale_inv beside each fp8 weight) as an Fp8Blocks of the model's dtype, its scales
    dropped. A scale without its fp8 weight, or an fp8 weight without its scales, is refused in one line."""
    qc = config.get("quantization_config") or {}
    if qc.get("quant_method") != "fp8" or "quantization" in config:
        return sources
    dtype = FLOAT_DTYPES.get(config.get("dtype") or config.get("torch_dtype"), "BF16")
    out = {}
    for name, (path, data_start, info) in sources.items():
        if name.endswith(FP8_SCALES):
            weight = sources.get(name[: -len(FP8_SCALES)] + ".weight")
            if weight is None or weight[2].dtype not in FP8_VALUES:
                what = f"a weight that is not stored in fp8 ({weight[2].dtype})" if weight else "no weight"
                raise CheckpointError(f"{src}: {name} scales {what}; the checkpoint is inconsistent.")
            continue
        if info.dtype not in FP8_VALUES:
            out[name] = (path, data_start, info)
            continue
        scale = sources.get(name.removesuffix(".weight") + FP8_SCALES)
        if scale is None or len(info.shape) != 2:
            what = "without its weight_scale_inv" if scale is None else f"with shape {list(info.shape)}"
            raise CheckpointError(f"{src}: {name} is stored in fp8 {what}; airmlx reads fp8 linear weights with "
                                  "block scales (DeepSeek-V3's format) only.")
        block = fp8_block(name, info.shape, scale[2], qc.get("weight_block_size"), src)
        out[name] = (path, data_start, Fp8Blocks(name, dtype, tuple(info.shape), info.start, info.end,
                                                 fp8=info.dtype, block=block, scale=scale))
    return out


def fp8_block(name, shape, scale_info, configured, src) -> tuple:
    """The (rows, columns) each scale of an fp8 weight covers: the config's weight_block_size, or the whole
    weight for a single scale; checked against the scales' grid."""
    rows, cols = shape
    grid = tuple(scale_info.shape) or (1, 1)
    if math.prod(grid) == 1 and len(grid) <= 2 and scale_info.dtype in quant.FLOAT_VIEWS:
        return rows, cols
    block = tuple(configured or ())
    if len(grid) != 2 or len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block) or \
            grid != (-(-rows // block[0]), -(-cols // block[1])) or scale_info.dtype not in quant.FLOAT_VIEWS:
        raise CheckpointError(f"{src}: {name} ({rows} x {cols}) has weight_scale_inv of shape {list(grid)} "
                              f"({scale_info.dtype}), which blocks of {list(block) or 'no weight_block_size'} "
                              "(quantization_config) do not give; the checkpoint is inconsistent.")
    return block


def fp8_values(e_bits: int, m_bits: int, finite: bool) -> np.ndarray:
    """The float32 value of each of the 256 codes of an fp8 format: 1 sign bit, then e_bits of exponent (bias
    2 ** (e_bits - 1) - 1) and m_bits of mantissa; finite: E4M3FN (no infinities; all ones is NaN)."""
    code = np.arange(256)
    bias = (1 << (e_bits - 1)) - 1
    e, m = (code >> m_bits) & ((1 << e_bits) - 1), (code & ((1 << m_bits) - 1)) / (1 << m_bits)
    value = np.where(e == 0, m * 2.0 ** (1 - bias), (1 + m) * 2.0 ** (e - bias))
    top = (1 << e_bits) - 1
    if finite:
        value = np.where((e == top) & (m == 1 - 1 / (1 << m_bits)), np.nan, value)
    else:
        value = np.where(e == top, np.where(m == 0, np.inf, np.nan), value)
    return np.where(code & 0x80, -value, value).astype(np.float32)


FP8_VALUES = {"F8_E4M3": fp8_values(4, 3, finite=True), "F8_E5M2": fp8_values(5, 2, finite=False)}
FP8_ROWS = 256  # rows dequantised at once: a few MB of float32 for the widest weights


def fp8_rows(path, data_start: int, info: Fp8Blocks):
    """An Fp8Blocks' values, a few rows at a time: each code's value times its block's scale in float32, rounded
    to info.dtype (as transformers' dequantisation computes them). The stage writer writes each piece as it comes,
    so no dequantised copy of a whole weight is made."""
    (rows, cols), (block_rows, block_cols) = info.shape, info.block
    codes = read_bytes(path, data_start + info.start, rows * cols, np.uint8).reshape(rows, cols)
    spath, sstart, sinfo = info.scale
    storage, view = quant.FLOAT_VIEWS[sinfo.dtype]
    scales = quant.to_float32(read_bytes(spath, sstart + sinfo.start, sinfo.end - sinfo.start, np.dtype(view)),
                              storage).reshape(-(-rows // block_rows), -(-cols // block_cols))
    storage = quant.FLOAT_VIEWS[info.dtype][0]
    for first in range(0, rows, block_rows):
        per_column = np.repeat(scales[first // block_rows], block_cols)[:cols]
        for r in range(first, min(first + block_rows, rows), FP8_ROWS):
            values = FP8_VALUES[info.fp8][codes[r: min(r + FP8_ROWS, first + block_rows, rows)]]
            values *= per_column
            yield quant.from_float32(values, storage)


def read_array(path, data_start: int, info: TensorInfo, view) -> np.ndarray:
    """A source tensor's values (numpy dtype `view`) in its shape; a TransposedPart sliced and transposed, an
    Fp8Blocks dequantised."""
    if isinstance(info, Fp8Blocks):
        return np.concatenate(list(fp8_rows(path, data_start, info)))
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
