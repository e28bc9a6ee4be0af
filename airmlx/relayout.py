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
from dataclasses import dataclass, replace

import numpy as np

from . import quant
from .archs import routed_experts
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
    """Output rows first, first + step, ... < last of one expert's weight in a fused tensor stored (in, out), or of
    its bias, stored (1, out): [start, end) is the expert's whole block, which the sharder reads, slices and
    transposes into a (out, in) weight."""
    block: tuple = ()  # (in, out), as stored
    rows: tuple = ()  # (first, last) of out
    step: int = 1  # 2 where the parts' outputs alternate (gpt-oss's gate and up)


@dataclass(frozen=True)
class Dequantized(Derived):
    """A weight stored quantised in a format no backend reads (fp8 blocks, mxfp4), written dequantised to `dtype`
    a few rows at a time (dequantized_rows)."""


@dataclass(frozen=True)
class Mxfp4Part(Dequantized):
    """Output rows first, first + step, ... < last of one expert's weight in an mxfp4 pair (gpt-oss's released
    checkpoints): [start, end) the expert's codes, (out, in / 32, 16) bytes of two 4-bit values each, the low
    first; `scales` its exponents, (path, data start, start, end) of (out, in / 32) bytes, each 2 ** (byte - 127)
    for 32 values. Dequantised to `dtype` as transformers dequantises them."""
    rows: tuple = ()
    step: int = 1
    scales: tuple = ()


MXFP4_CODES, MXFP4_SCALES = "_blocks", "_scales"


def quant_method(config: dict) -> str | None:
    """quantization_config's quant_method ("fp8", "mxfp4", ...), unless the checkpoint is mlx-lm's own
    (a "quantization" entry: its scales and biases are read as they are)."""
    return None if "quantization" in config else (config.get("quantization_config") or {}).get("quant_method")


def model_dtype(config: dict) -> str:
    """The safetensors dtype dequantised weights are written in: the config's, else bf16."""
    return quant.SAFETENSORS_DTYPES.get(config.get("dtype") or config.get("torch_dtype"), "BF16")


def split_fused_experts(arch, config: dict, sources: dict) -> dict:
    """sources (tensor name -> (file, data start, TensorInfo)) with each fused expert tensor that arch names
    (Arch.fused_experts) replaced by its experts' own: byte ranges where the checkpoint stores (out, in) per
    expert and the parts one after another, TransposedParts where it stores (in, out) or alternates the parts,
    Mxfp4Parts where it stores mxfp4 codes and scales (quantization_config quant_method "mxfp4"). Whether (out,
    in), transformers tells by the shape (unless Fused.in_out says): (out, in) unless the shape is the transpose of
    that, found here by where the hidden size sits."""
    if not arch or not arch.fused_experts:
        return sources
    fused = {f.tensor: f for f in arch.fused_experts}
    in_layer = re.compile(re.escape(arch.layer_prefix) + r"(\d+)\.(.+)$")
    mxfp4 = quant_method(config) == "mxfp4"
    out = {}
    for name, (path, data_start, info) in sources.items():
        m = in_layer.match(name)
        key = m.group(2) if m else ""
        if mxfp4 and key.endswith(MXFP4_SCALES) and key[: -len(MXFP4_SCALES)] in fused:
            continue  # read with its codes
        codes = mxfp4 and key.endswith(MXFP4_CODES)
        spec = fused.get(key[: -len(MXFP4_CODES)] if codes else key)
        if not spec:
            if mxfp4 and key.endswith((MXFP4_CODES, MXFP4_SCALES)):
                raise CheckpointError(f"tensor {name!r}: mxfp4 codes airmlx cannot place (it reads gpt-oss's "
                                      "experts in mxfp4); the checkpoint does not match its config.")
            out[name] = (path, data_start, info)
            continue
        prefix = f"{arch.layer_prefix}{m.group(1)}.{arch.experts}."
        if codes:
            scales = sources.get(name[: -len(MXFP4_CODES)] + MXFP4_SCALES)
            pieces = mxfp4_parts(name, info, scales, spec, config)
        elif spec.hidden_in is None:
            pieces = bias_parts(name, info, spec, config)
        else:
            pieces = weight_parts(name, info, spec, config)
        for e, part, piece in pieces:
            out[prefix + f"{e}.{part}"] = (path, data_start, replace(piece, name=prefix + f"{e}.{part}"))
    return out


def part_rows(out_dim, spec, name):
    """Each part's (first, last, step) of the fused tensor's out_dim outputs."""
    n = len(spec.parts)
    if out_dim % n:
        raise CheckpointError(f"tensor {name!r}: {out_dim} outputs do not split into {n} equal parts "
                              f"({', '.join(spec.parts)}); the checkpoint does not match its config.")
    size = out_dim // n
    return [(i, out_dim, n) if spec.interleaved else (i * size, (i + 1) * size, 1) for i in range(n)]


def weight_parts(name, info, spec, config):
    """(expert, part, TensorInfo) of a fused (experts, rows, columns) weight."""
    hidden, shape = config.get("hidden_size"), tuple(info.shape)
    # (out, in) has the hidden size last when the experts read it, first when they write it
    transposed = len(shape) == 3 and (spec.in_out or shape[2 if spec.hidden_in else 1] != hidden)
    if len(shape) != 3 or info.dtype not in DTYPE_SIZES or shape[1 if spec.hidden_in == transposed else 2] != hidden:
        raise CheckpointError(f"tensor {name!r} has shape {list(shape)} ({info.dtype}); a fused experts tensor "
                              f"is (experts, rows, columns) with hidden_size {hidden} one of them: the checkpoint "
                              "does not match its config.")
    experts, rows, cols = shape
    out_dim, in_dim = (cols, rows) if transposed else (rows, cols)
    itemsize, block = DTYPE_SIZES[info.dtype], rows * cols * DTYPE_SIZES[info.dtype]
    for e in range(experts):
        start = info.start + e * block
        for part, (first, last, step) in zip(spec.parts, part_rows(out_dim, spec, name)):
            size = len(range(first, last, step))
            if transposed or step > 1:
                if not transposed:
                    raise CheckpointError(f"tensor {name!r}: alternating parts stored (out, in) are not read; the "
                                          "checkpoint does not match its config.")
                yield e, part, TransposedPart(name, info.dtype, (size, in_dim), start, start + block,
                                              block=(rows, cols), rows=(first, last), step=step)
            else:
                at = start + first * cols * itemsize
                yield e, part, TensorInfo(name, info.dtype, (size, cols), at, at + size * cols * itemsize)


def bias_parts(name, info, spec, config):
    """(expert, part, TensorInfo) of a fused (experts, outputs) bias."""
    if len(info.shape) != 2 or info.dtype not in DTYPE_SIZES:
        raise CheckpointError(f"tensor {name!r} has shape {list(info.shape)} ({info.dtype}); a fused experts bias "
                              "is (experts, outputs): the checkpoint does not match its config.")
    experts, out_dim = info.shape
    itemsize = DTYPE_SIZES[info.dtype]
    for e in range(experts):
        start = info.start + e * out_dim * itemsize
        for part, (first, last, step) in zip(spec.parts, part_rows(out_dim, spec, name)):
            size = len(range(first, last, step))
            if step > 1:
                yield e, part, TransposedPart(name, info.dtype, (size,), start, start + out_dim * itemsize,
                                              block=(1, out_dim), rows=(first, last), step=step)
            else:
                at = start + first * itemsize
                yield e, part, TensorInfo(name, info.dtype, (size,), at, at + size * itemsize)


def mxfp4_parts(name, info, scales, spec, config):
    """(expert, part, Mxfp4Part) of a fused mxfp4 weight: codes (experts, out, in / 32, 16) and their scales
    (experts, out, in / 32), both U8."""
    shape = tuple(info.shape)
    if scales is None or len(shape) != 4 or shape[3] != 16 or info.dtype != "U8" or \
            tuple(scales[2].shape) != shape[:3] or scales[2].dtype != "U8":
        raise CheckpointError(f"tensor {name!r} ({list(shape)}, {info.dtype}) and its scales "
                              f"({list(scales[2].shape) if scales else 'none'}) are not mxfp4 codes of 32 values a "
                              "block with one U8 exponent each: the checkpoint does not match its config.")
    experts, out_dim, groups, _ = shape
    dtype = model_dtype(config)
    spath, sstart, sinfo = scales
    for e in range(experts):
        start, sfirst = info.start + e * out_dim * groups * 16, sinfo.start + e * out_dim * groups
        for part, (first, last, step) in zip(spec.parts, part_rows(out_dim, spec, name)):
            yield e, part, Mxfp4Part(name, dtype, (len(range(first, last, step)), groups * 32), start,
                                     start + out_dim * groups * 16, rows=(first, last), step=step,
                                     scales=(spath, sstart, sfirst, sfirst + out_dim * groups))


SWITCH_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def stacked_pattern(arch, tail: str):
    """Matches a SwitchGLU projection of a layer (Arch.stacked_experts) followed by `tail`: groups (layer, projection,
    and those of tail)."""
    return re.compile(re.escape(arch.layer_prefix) + r"(\d+)\." + re.escape(arch.stacked_experts) +
                      r"\.(" + "|".join(SWITCH_PROJECTIONS) + ")" + tail + "$")


def expert_name(arch, layer, e: int, projection: str, tail: str = "") -> str:
    """A SwitchGLU projection's name for expert e as the family's per-expert checkpoints name it."""
    back = {switch: proj for proj, switch in arch.expert_names}
    return f"{arch.layer_prefix}{layer}.{arch.experts}.{e}.{back.get(projection, projection)}{tail}"


def split_stacked_experts(arch, config: dict, sources: dict) -> dict:
    """sources with each routed-expert tensor mlx-lm stacks, (experts, ...), as mlx-community checkpoints store
    them ("<layer>.<switch_mlp>.<projection>.<weight, scales, biases or bias>"), replaced by each expert's own:
    its block is one byte range, named as a per-expert checkpoint of the family names it. So the experts stage
    apart from their layer and stream after routing, and the torch backend (whose transformers modules know no
    SwitchGLU) runs them, as it runs the same family's Hugging Face checkpoints."""
    if not arch or not arch.experts:
        return sources
    stacked, experts = stacked_pattern(arch, r"\.(weight|scales|biases|bias)"), routed_experts(config)
    out = {}
    for name, (path, data_start, info) in sources.items():
        m = stacked.match(name)
        if not m:
            out[name] = (path, data_start, info)
            continue
        if not info.shape or info.shape[0] != experts or info.dtype not in DTYPE_SIZES:
            raise CheckpointError(f"tensor {name!r} has shape {list(info.shape)} ({info.dtype}); a layer's stacked "
                                  f"experts are ({experts} experts, ...) as config.json counts them: the checkpoint "
                                  "does not match its config.")
        block = math.prod(info.shape[1:]) * DTYPE_SIZES[info.dtype]
        for e in range(experts):
            new = expert_name(arch, m.group(1), e, m.group(2), "." + m.group(3))
            start = info.start + e * block
            out[new] = (path, data_start, TensorInfo(new, info.dtype, tuple(info.shape[1:]), start, start + block))
    return out


def per_expert_quantization(arch, config: dict) -> dict:
    """config with each of mlx-lm's per-module quantisation settings of a stacked SwitchGLU projection given to
    that projection of every expert too (split_stacked_experts names them): the MLX backend reads the stacked
    module's, the torch backend each expert's."""
    qconfig = config.get("quantization")
    if not arch or not arch.experts or not isinstance(qconfig, dict):
        return config
    stacked, experts = stacked_pattern(arch, ""), routed_experts(config)
    split = {expert_name(arch, m.group(1), e, m.group(2)): v
             for k, v in qconfig.items() if (m := stacked.match(k)) for e in range(experts)}
    if not split:
        return config
    same = config.get("quantization_config") == qconfig  # mlx-lm writes both
    qconfig = {**qconfig, **split}
    return {**config, "quantization": qconfig, **({"quantization_config": qconfig} if same else {})}


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
class Fp8Blocks(Dequantized):
    """An fp8 weight ([start, end) of its file, in `fp8`) times its weight_scale_inv, one scale per block of
    block[0] rows by block[1] columns (the last blocks may be partial), rounded to `dtype`."""
    fp8: str = "F8_E4M3"
    block: tuple = ()
    scale: tuple = ()  # (path, data start, TensorInfo) of the scales, (ceil(rows / block[0]), ceil(cols / block[1]))


FP8_SCALES = ".weight_scale_inv"


def dequantized_fp8(config: dict, sources: dict, src) -> dict:
    """sources with each fp8 weight of a checkpoint quantised by transformers' fine-grained fp8 (quantization_config
    quant_method "fp8": a weight_scale_inv beside each fp8 weight) as an Fp8Blocks of the model's dtype, its scales
    dropped. A scale without its fp8 weight, or an fp8 weight without its scales, is refused in one line."""
    if quant_method(config) != "fp8":
        return sources
    dtype, configured = model_dtype(config), config["quantization_config"].get("weight_block_size")
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
        block = fp8_block(name, info.shape, scale[2], configured, src)
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
DEQUANT_ROWS = 256  # rows dequantised at once: a few MB of float32 for the widest weights


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
        for r in range(first, min(first + block_rows, rows), DEQUANT_ROWS):
            values = FP8_VALUES[info.fp8][codes[r: min(r + DEQUANT_ROWS, first + block_rows, rows)]]
            values *= per_column
            yield quant.from_float32(values, storage)


FP4_VALUES = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)  # E2M1


def mxfp4_rows(path, data_start: int, info: Mxfp4Part):
    """An Mxfp4Part's values, DEQUANT_ROWS rows at a time (each 4-bit code's value times 2 ** (its exponent - 127),
    rounded to info.dtype)."""
    rows, cols = info.shape
    codes = read_kept(path, data_start + info.start, info.end - info.start, np.dtype(np.uint8)).reshape(
        -1, cols // 32, 16)[info.rows[0]: info.rows[1]: info.step]
    spath, sstart, first, last = info.scales
    exponents = read_kept(spath, sstart + first, last - first, np.dtype(np.uint8)).reshape(-1, cols // 32)[
        info.rows[0]: info.rows[1]: info.step]
    storage = quant.FLOAT_VIEWS[info.dtype][0]
    for r in range(0, rows, DEQUANT_ROWS):
        part = codes[r: r + DEQUANT_ROWS]
        values = np.empty(part.shape[:2] + (32,), np.float32)
        values[..., 0::2], values[..., 1::2] = FP4_VALUES[part & 0x0F], FP4_VALUES[part >> 4]
        values *= np.ldexp(np.float32(1), exponents[r: r + DEQUANT_ROWS].astype(np.int32) - 127)[..., None]
        yield quant.from_float32(values.reshape(len(part), cols), storage)


def dequantized_rows(path, data_start: int, info: Dequantized):
    """A Dequantized weight's values in pieces of rows, in order (the stage writer writes each as it comes)."""
    return (fp8_rows if isinstance(info, Fp8Blocks) else mxfp4_rows)(path, data_start, info)


def read_array(path, data_start: int, info: TensorInfo, view) -> np.ndarray:
    """A source tensor's values (numpy dtype `view`) in its shape; a TransposedPart sliced and transposed, an
    Fp8Blocks or Mxfp4Part dequantised."""
    if isinstance(info, Dequantized):
        return np.concatenate(list(dequantized_rows(path, data_start, info)))
    if isinstance(info, TransposedPart):  # gate's and up's parts of one block: it is read once for both
        whole = info.rows == (0, info.block[1]) and info.step == 1  # a Conv1D's weight: nothing else is read
        block = (read_bytes if whole else read_kept)(path, data_start + info.start, info.end - info.start,
                                                     np.dtype(view))
        part = block.reshape(info.block)[:, info.rows[0]: info.rows[1]: info.step]
        return np.ascontiguousarray(part.T).reshape(info.shape)
    return read_bytes(path, data_start + info.start, info.end - info.start, np.dtype(view)).reshape(info.shape)


def read_bytes(path, start: int, nbytes: int, dtype) -> np.ndarray:
    """nbytes of path from start, as a read-only array of dtype."""
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        return np.frombuffer(f.read(nbytes), dtype=dtype)


read_kept = functools.lru_cache(maxsize=4)(read_bytes)  # the last expert blocks read, for their other parts
