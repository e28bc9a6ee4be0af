"""Affine block-wise quantisation in pure numpy, bit-identical to MLX.

``quantize`` reproduces ``mx.quantize(w, group_size, bits, mode="affine")``
(MLX's CPU kernel, mlx/backend/cpu/quantized.cpp) and ``dequantize``
reproduces ``mx.dequantize``. Both are bit-exact for float32, float16 and
bfloat16. bfloat16 has no numpy dtype, so it travels as its raw bit pattern
in a uint16 array together with ``dtype="bfloat16"``.

NaN or infinite weights are not supported (MLX's own result is undefined).
"""

import math
import re

import numpy as np

from .errors import OptionError

SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128)
STORAGE_DTYPES = ("float32", "float16", "bfloat16")

_EPS = np.float32(1e-7)  # MLX's lower bound on |scale|


def _check_params(group_size, bits):
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits!r} is not supported; use one of {SUPPORTED_BITS}")
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(
            f"group_size={group_size!r} is not supported; use one of {SUPPORTED_GROUP_SIZES}"
        )


def _storage_dtype(arr, dtype):
    """Name of the floating type `arr` holds: 'float32', 'float16' or 'bfloat16'."""
    if dtype is None:
        name = arr.dtype.name
    elif isinstance(dtype, str):
        name = dtype
    else:
        name = np.dtype(dtype).name
    if name == "bfloat16":
        if arr.dtype != np.uint16:
            raise ValueError(f"dtype='bfloat16' needs the raw bits as a uint16 array, got {arr.dtype}")
        return name
    if name not in STORAGE_DTYPES:
        raise ValueError(f"dtype {name!r} is not supported; use one of {STORAGE_DTYPES}")
    if np.dtype(name) != arr.dtype:
        raise ValueError(f"dtype={name!r} does not match the array's dtype {arr.dtype}")
    return name


def to_float32(arr, storage):
    if storage == "bfloat16":
        return (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.astype(np.float32, copy=False)


def from_float32(x, storage):
    """Round float32 values to `storage`, nearest-even, as MLX's converters do."""
    if storage == "bfloat16":
        bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
        rounded = ((bits + (((bits >> 16) & 1) + np.uint32(0x7FFF))) >> 16).astype(np.uint16)
        nan = np.isnan(x)
        if nan.any():
            rounded[nan] = 0x7FC0
        return rounded
    return x.astype(storage)


def _pack(q, bits):
    """Pack uint8 codes (..., cols) into uint32 words, lowest bits first.

    MLX's layout is one little-endian bit stream per row, so `per_chunk` codes
    fill exactly `chunk_bytes` whole bytes (e.g. 8 three-bit codes -> 3 bytes).
    """
    chunk_bits = math.lcm(bits, 8)
    per_chunk, chunk_bytes = chunk_bits // bits, chunk_bits // 8
    q = q.reshape(*q.shape[:-1], -1, per_chunk)
    acc_dtype = np.dtype(np.uint8) if chunk_bytes == 1 else np.dtype("<u8")
    acc = np.zeros(q.shape[:-1], acc_dtype)
    for k in range(per_chunk):
        acc |= q[..., k].astype(acc_dtype) << (k * bits)
    packed = acc[..., None].view(np.uint8)[..., :chunk_bytes]
    return np.ascontiguousarray(packed).reshape(*q.shape[:-2], -1).view("<u4")


def _unpack(wq, bits):
    """Inverse of `_pack`: uint32 words (..., n) -> uint8 codes (..., n*32/bits)."""
    chunk_bits = math.lcm(bits, 8)
    per_chunk, chunk_bytes = chunk_bits // bits, chunk_bits // 8
    lead = wq.shape[:-1]
    raw = np.ascontiguousarray(wq, dtype="<u4").view(np.uint8)
    raw = raw.reshape(*lead, -1, chunk_bytes)
    if chunk_bytes == 1:
        acc = raw[..., 0]
    else:
        acc = np.zeros(raw.shape[:-1], np.uint64)
        for byte in range(chunk_bytes):
            acc |= raw[..., byte].astype(np.uint64) << (8 * byte)
    mask = (1 << bits) - 1
    codes = [(acc >> (k * bits)) & mask for k in range(per_chunk)]
    return np.stack(codes, axis=-1).astype(np.uint8).reshape(*lead, -1)


def quantize(w, group_size=64, bits=4, dtype=None):
    """Quantise `w` along its last axis like ``mx.quantize(..., mode="affine")``.

    Returns ``(wq, scales, biases)``: ``wq`` uint32 of shape
    (..., cols*bits/32), ``scales``/``biases`` of shape (..., cols/group_size)
    in w's storage type (raw uint16 bits when ``dtype="bfloat16"``), so that
    ``w ~= scales * q + biases`` per group. Bit-identical to MLX.
    """
    _check_params(group_size, bits)
    w = np.asarray(w)
    storage = _storage_dtype(w, dtype)
    if w.ndim < 1 or w.shape[-1] % group_size:
        raise ValueError(
            f"last dimension of w (shape {w.shape}) must be divisible by group_size={group_size}"
        )
    lead = w.shape[:-1]
    groups = to_float32(w, storage).reshape(*lead, -1, group_size)
    n_bins = np.float32((1 << bits) - 1)
    scale, bias = affine_params(groups, bits)

    # Codes use the float32 scale/bias, before they are rounded to storage.
    q = groups - bias[..., None]
    q /= scale[..., None]
    np.rint(q, out=q)
    np.clip(q, 0, n_bins, out=q)
    wq = _pack(q.astype(np.uint8).reshape(*lead, -1), bits)
    return wq, from_float32(scale, storage), from_float32(bias, storage)


def affine_params(groups, bits):
    """MLX's float32 scale and bias of each group (..., groups, group_size), before rounding to storage."""
    n_bins = np.float32((1 << bits) - 1)
    # MLX anchors the end of the range with the larger magnitude exactly on a
    # code: scale is negative when the max is anchored (it maps to code 0).
    w_max = groups.max(axis=-1)
    w_min = groups.min(axis=-1)
    anchor_min = np.abs(w_min) > np.abs(w_max)
    scale = np.maximum((w_max - w_min) / n_bins, _EPS)
    scale = np.where(anchor_min, scale, -scale)
    edge = np.where(anchor_min, w_min, w_max)
    q0 = np.rint(edge / scale)
    # When the edge rounds to code 0 MLX keeps the scale and uses a zero bias;
    # otherwise it nudges the scale so that code q0 hits the edge exactly.
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(q0 != 0, edge / q0, scale)
    bias = np.where(q0 != 0, edge, np.float32(0))
    return scale, bias


def dequantize(wq, scales, biases, group_size=64, bits=4, dtype=None):
    """Rebuild weights like ``mx.dequantize(..., mode="affine")``; bit-exact.

    The result has the storage type of ``scales`` (raw uint16 bits when
    ``dtype="bfloat16"``). As in MLX, ``code * scale`` and ``+ bias`` are each
    rounded to that type, computed via float32.
    """
    _check_params(group_size, bits)
    wq, scales, biases = np.asarray(wq), np.asarray(scales), np.asarray(biases)
    storage = _storage_dtype(scales, dtype)
    _storage_dtype(biases, storage)
    if wq.dtype != np.uint32:
        raise ValueError(f"wq must be uint32, got {wq.dtype}")
    cols = wq.shape[-1] * 32 // bits
    expected = (*wq.shape[:-1], cols // group_size)
    whole_groups = wq.shape[-1] * 32 % (bits * group_size) == 0
    if not whole_groups or scales.shape != expected or biases.shape != expected:
        raise ValueError(
            f"scales/biases shapes {scales.shape}/{biases.shape} do not match wq {wq.shape} "
            f"for group_size={group_size}, bits={bits}; expected {expected}"
        )
    codes = _unpack(wq, bits).reshape(*expected, group_size).astype(np.float32)
    scaled = codes * to_float32(scales, storage)[..., None]
    scaled = to_float32(from_float32(scaled, storage), storage)
    out = from_float32(scaled + to_float32(biases, storage)[..., None], storage)
    return out.reshape(*wq.shape[:-1], cols)


# --- how shard folders use it --------------------------------------------------------------------
COMPRESSIONS = {"4bit": 4, "8bit": 8}
DEFAULT_GROUP_SIZE = 64
FLOAT_VIEWS = {"F32": ("float32", np.float32), "F16": ("float16", np.float16), "BF16": ("bfloat16", np.uint16)}
STORAGE_NAMES = {name: storage for name, (storage, _) in FLOAT_VIEWS.items()}  # "BF16" -> "bfloat16"
SAFETENSORS_DTYPES = {storage: name for name, storage in STORAGE_NAMES.items()}  # "bfloat16" -> "BF16"


METHODS = ("gptq",)  # calibrated rounding (airmlx/calibrate.py); None: plain round-to-nearest
COMPRESSION_SPELLING = re.compile(r"(\d+)bit(?:-g(\d+))?(?:-([a-z]+))?")


def compression_config(compression):
    """"4bit" | "8bit" (group size 64), optionally "-g32" / "-g128" and "-gptq" (e.g. "4bit-g32-gptq"), or a
    dict {"bits": 4, "group_size": 32, "method": "gptq"} -> the mlx-lm style {"group_size", "bits", "mode"}
    (plus "method" when calibrated) recorded in config and manifest."""
    spec = compression
    if isinstance(spec, str) and (m := COMPRESSION_SPELLING.fullmatch(spec)):
        spec = {"bits": int(m.group(1)), "group_size": int(m.group(2) or DEFAULT_GROUP_SIZE), "method": m.group(3)}
    whole = isinstance(spec, dict) and all(type(spec.get(k, 0)) is int for k in ("bits", "group_size"))  # not 4.0
    ok = whole and set(spec) <= {"bits", "group_size", "method", "mode"} and \
        spec.get("bits") in COMPRESSIONS.values() and spec.get("group_size", DEFAULT_GROUP_SIZE) in \
        SUPPORTED_GROUP_SIZES and spec.get("method") in (None, *METHODS) and spec.get("mode", "affine") == "affine"
    if not ok:
        raise OptionError(f"compression {compression!r} is unknown; use one of {sorted(COMPRESSIONS)} (optionally "
                          f"with -g32 or -g128 for the group size and -gptq for calibrated rounding, e.g. "
                          "'4bit-g32-gptq'), a dict like {'bits': 4, 'group_size': 32}, or None.")
    q = {"group_size": spec.get("group_size", DEFAULT_GROUP_SIZE), "bits": spec["bits"], "mode": "affine"}
    return {**q, "method": spec["method"]} if spec.get("method") else q


def compression_name(compression):
    """The short spelling of a compression, for folder names: '4bit', '4bit-g32', '4bit-gptq', ..."""
    q = compression_config(compression)
    group = "" if q["group_size"] == DEFAULT_GROUP_SIZE else f"-g{q['group_size']}"
    return f"{q['bits']}bit{group}" + (f"-{q['method']}" if q.get("method") else "")


def quantizable(name, dtype, shape, group_size):
    """The tensors mlx-lm quantises: Linear and Embedding weights (2-D) whose rows split into whole groups."""
    return (name.endswith(".weight") and len(shape) == 2 and dtype in FLOAT_VIEWS
            and shape[-1] % group_size == 0)


def module_params(qconfig, module_path):
    """group_size and bits for one module, honouring mlx-lm's per-module overrides in the config."""
    params = qconfig.get(module_path)
    params = params if isinstance(params, dict) else qconfig
    return params.get("group_size", DEFAULT_GROUP_SIZE), params["bits"]


def module_mode(qconfig, module_path) -> str:
    """mlx-lm's quantisation mode of one module: "affine" (scales and biases; airmlx's own), or a float mode
    ("mxfp4", "nvfp4", "mxfp8": float codes and scales, no biases)."""
    params = qconfig.get(module_path)
    return (params if isinstance(params, dict) and "mode" in params else qconfig).get("mode", "affine")
