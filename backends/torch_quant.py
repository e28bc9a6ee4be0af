"""torch: running MLX-layout quantised stages (airmlx's 4/8-bit shards, mlx-community checkpoints).

On the CPU a 4-bit Linear runs on torch's packed int4 matrix multiply (`_weight_int4pack_mm_for_cpu`), its
codes repacked from MLX's layout with a few numpy byte operations (no dequantised copy of the weight ever
exists); an embedding dequantises only the rows a step looks up, and a head the kernel cannot run (a tied
head's 8-bit embedding) a block of its rows at a time as it computes, so neither is ever held dequantised.
Everything else is dequantised once per load: 8-bit codes straight from their bytes, other widths with shifts
and masks (`dequantize_weight`; 3, 5 and 6 bits from the two bytes each code lies in); mlx-lm's float modes
(mxfp4, nvfp4, mxfp8) through torch_float_quant.
MLX computes `w = q * scale + bias`; the int4 kernel computes `(q - 8) * scale + (bias + 8 * scale)`, which
agrees to the rounding of the compute dtype (exactly in float32 up to float32 rounding).
"""
import functools
import math
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import torch
from transformers.core_model_loading import rename_source_key

from airmlx.quant import module_mode, module_params
from airmlx.stage_copies import span

from .base import check_placement
from .torch_float_quant import FLOAT_MODES, TEMPORARY_BYTES, float_rows

DEQUANT_ELEMENTS = 1 << 22  # weights dequantised at once: bounds the temporaries of a stage's load
INT4_GROUPS = (32, 64, 128, 256)  # group sizes torch's int4 kernel takes
HEAD_BLOCK_ELEMENTS = 1 << 18  # a quantised head's weights dequantised at once as it computes on a CPU (1 MB
# in float32); on a GPU DEQUANT_ELEMENTS, where each block costs a few kernel launches
# temporaries per weight of 3, 5 or 6 bits: the int16 codes, the second byte's int16 and a byte gathered, the rest
# in place (straddling_codes; measured 5.2 bytes)
STRADDLING_BYTES = 6
INT4_KERNEL_ROWS = 8  # from this many input rows (prefill, batches) a dequantised block and a matmul are faster


def dequantize_weight(wq, scales, biases, group_size, bits, mode="affine", dtype=None):
    """MLX's quantised layout (codes packed lowest bits first into uint32 words; per-group scale and bias, or
    a float mode's scale alone) back to weights in `dtype` (default: the scales'), with torch ops on the
    weights' device, a block of rows at a time so the temporaries stay small."""
    lead, cols = scales.shape[:-1], scales.shape[-1] * group_size
    wq, scales = wq.reshape(-1, wq.shape[-1]), scales.reshape(-1, scales.shape[-1])
    biases = None if biases is None else biases.reshape(-1, biases.shape[-1])
    out = torch.empty(wq.shape[0], cols, dtype=dtype or scales.dtype, device=wq.device)
    rows = max(1, DEQUANT_ELEMENTS // cols)
    for r in range(0, wq.shape[0], rows):
        dequantize_rows(wq[r:r + rows], scales[r:r + rows], row_slice(biases, r, rows), group_size, bits,
                        out[r:r + rows], mode)
    return out.reshape(*lead, cols)


def row_slice(t, first, count):
    """Rows first .. first + count of t; None for a float mode's absent biases."""
    return None if t is None else t[first:first + count]


def dequant_bytes(bits, itemsize, mode="affine"):
    """Temporaries per weight of a block dequantize_rows fills: the codes (bytes for 8-bit, int32 otherwise),
    their float copy, the product and the sum; STRADDLING_BYTES for 3, 5 and 6 bits; a float mode's own."""
    if mode in FLOAT_MODES:
        return TEMPORARY_BYTES[bits]
    if 32 % bits:
        return STRADDLING_BYTES
    return (1 if bits == 8 else 4) + 3 * itemsize


def dequantize_rows(wq, scales, biases, group_size, bits, out, mode="affine"):
    """(N, K * bits / 32) codes -> their (N, K) weights, written into `out` (a block reused from call to call
    makes no new memory of its size)."""
    if mode in FLOAT_MODES:
        return float_rows(wq, scales, group_size, bits, mode, out)
    if bits == 8:  # a code per byte, in order: no shifting
        codes = wq.contiguous().view(torch.uint8)
    elif 32 % bits:
        codes = straddling_codes(wq, bits)
    else:
        shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=wq.device)
        codes = (wq.view(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    w = out.view(*scales.shape, group_size)
    w.copy_(codes.reshape(w.shape))
    # the product, rounded, then the sum: as mx.dequantize rounds (a fused multiply-add would not)
    w.mul_(scales.unsqueeze(-1)).add_(biases.unsqueeze(-1))
    return out


def straddling_codes(wq, bits):
    """The codes of a width that does not divide 32 (3, 5, 6 bits), as int16: MLX packs each row as one
    little-endian bit stream, so a code lies within two consecutive bytes, which repeat their pattern every
    lcm(bits, 8) bits: gather the two bytes of every code, join them, shift and mask. (A code's bits lie below
    bit 13 of the pair, so int16's sign, which the right shift copies down, never reaches the mask.)"""
    chunk_bits = math.lcm(bits, 8)
    per_chunk, chunk_bytes = chunk_bits // bits, chunk_bits // 8
    raw = wq.contiguous().view(torch.uint8).reshape(wq.shape[0], -1, chunk_bytes)
    first = [k * bits // 8 for k in range(per_chunk)]
    codes = raw[..., first].to(torch.int16)
    # a code within one byte takes the bits above it from the next (or the same) byte: masked off below
    second = raw[..., [min(i + 1, chunk_bytes - 1) for i in first]].to(torch.int16)
    codes |= second.bitwise_left_shift_(8)
    del second
    codes >>= torch.tensor([k * bits % 8 for k in range(per_chunk)], dtype=torch.int16, device=wq.device)
    return codes.bitwise_and_((1 << bits) - 1)


def repack_int4(wq, block=None):
    """MLX's 4-bit codes (N, K / 8) uint32 (numpy or torch) -> torch's CPU int4 layout (N, K / 2) uint8: rows in
    blocks of `block` (int4_block(): 32 with AVX2, 64 with AVX-512), each block K-major with block / 2 bytes per k,
    rows r and r + block / 2 of a block sharing a byte (low, high nibble). numpy does it (it releases the GIL: this
    runs on the prefetch thread)."""
    block = block or int4_block()
    wq = wq.numpy() if isinstance(wq, torch.Tensor) else wq
    n, k = wq.shape[0], wq.shape[1] * 8
    by = wq.view(np.uint8).reshape(n // block, 2, block // 2, k // 2)  # byte j of a row: codes 2j (low), 2j+1 (high)
    top, bottom = by[:, 0], by[:, 1]
    out = np.empty((n // block, k // 2, 2, block // 2), np.uint8)
    view = out.transpose(0, 2, 3, 1)
    np.bitwise_or(top & 15, bottom << 4, out=view[:, 0])  # even k
    np.bitwise_or(top >> 4, bottom & 0xF0, out=view[:, 1])  # odd k
    return torch.from_numpy(out.reshape(n, k // 2))


@functools.cache
def int4_block():
    """The rows a block of torch's packed int4 CPU layout has on this CPU (32, or 64 where torch uses AVX-512), as
    repack_int4 lays them out (checked once against torch's own packing), or None: no kernel, or another layout."""
    convert = getattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu", None)
    if convert is None or not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        return None
    codes = torch.randint(0, 16, (128, 128), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    wq = (codes.reshape(128, 16, 8) << torch.arange(0, 32, 4, dtype=torch.int32)).sum(-1).to(torch.int32)
    try:
        packed = convert(codes, 1)
    except RuntimeError:
        return None
    return next((block for block in (32, 64) if torch.equal(repack_int4(wq, block), packed)), None)


def int4_kernel_ok():
    """torch's packed int4 CPU kernel exists and lays codes out as repack_int4 does."""
    return int4_block() is not None


def packable(module, bits, group_size, mode="affine"):
    """A Linear whose 4-bit affine weight torch's int4 kernel can run."""
    return (isinstance(module, torch.nn.Linear) and bits == 4 and mode == "affine" and group_size in INT4_GROUPS
            and int4_kernel_ok() and module.out_features % int4_block() == 0 and module.in_features % group_size == 0)


def unpack_int4(packed, out=None):
    """repack_int4's inverse: torch's CPU int4 layout (N, K / 2) uint8 -> the codes (N, K), uint8 or written into
    `out` (N, K) of any dtype (no other copy of that size is made)."""
    n, k, block = packed.shape[0], packed.shape[1] * 2, int4_block()
    by = packed.reshape(n // block, k // 2, 2, block // 2)  # (block of rows, byte column j, k parity, row in the half)
    out = torch.empty(n, k, dtype=torch.uint8, device=packed.device) if out is None else out
    rows = out.view(n // block, 2, block // 2, k // 2, 2)  # the low nibble is a block's first half of rows
    rows[:, 0].copy_((by & 15).permute(0, 3, 1, 2))
    rows[:, 1].copy_((by >> 4).permute(0, 3, 1, 2))
    return out


def int4_dense(x, packed, scales_and_zeros, group_size):
    """x @ w.T for many rows of x: the weight dequantised a block of rows at a time (the kernel's own formula,
    (q - 8) * scale + zero) and multiplied densely; torch's int4 kernel slows in proportion to x's rows. A block
    is dequantised in place, so it holds one block of weights (the activation bound's workspace) at a time."""
    n, k = packed.shape[0], packed.shape[1] * 2
    y = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    block = int4_block()
    rows = max(block, DEQUANT_ELEMENTS // k // block * block)
    weights = torch.empty(min(rows, n), k, dtype=x.dtype, device=x.device)
    for r in range(0, n, rows):
        w = unpack_int4(packed[r:r + rows], weights[:min(rows, n - r)])
        scales, zeros = (scales_and_zeros[:, r:r + rows, i].t().unsqueeze(-1) for i in (0, 1))
        w.view(w.shape[0], -1, group_size).sub_(8).mul_(scales).add_(zeros)
        torch.matmul(x, w.t(), out=y[:, r:r + rows])
    return y


def int4_linear(module, packed, scales_and_zeros, group_size, x):
    shape = x.shape
    x = x.reshape(-1, shape[-1]).contiguous()
    if x.shape[0] < INT4_KERNEL_ROWS:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scales_and_zeros)
    else:
        y = int4_dense(x, packed, scales_and_zeros, group_size)
    y = y.reshape(*shape[:-1], y.shape[-1])
    return y + module.bias if module.bias is not None else y


def scales_and_zeros(scales, biases):
    """MLX's (N, K / group) scales and biases -> the int4 kernel's (K / group, N, 2) scales and zeros."""
    zeros = biases + 8 * scales  # (q - 8) * s + (b + 8 s) = q * s + b
    return torch.stack([scales.t(), zeros.t()], -1).contiguous()


def install_int4(module, packed, stacked, group_size):
    """Run `module` (a Linear) on its 4-bit weight in torch's layout (repack_int4) and its scales_and_zeros:
    forward is replaced until remove(module)."""
    module.forward = functools.partial(int4_linear, module, packed, stacked, group_size)


def quantized_embedding(module, wq, scales, biases, group_size, bits, mode, dtype, ids):
    rows = ids.reshape(-1)
    biases = None if biases is None else biases[rows]  # None: a float mode has no biases
    codes = wq.view(torch.int32)[rows].view(wq.dtype)  # (torch before 2.7 cannot index uint32)
    out = dequantize_weight(codes, scales[rows], biases, group_size, bits, mode, dtype).reshape(*ids.shape, -1)
    scale = getattr(module, "embed_scale", None)  # Gemma's scaled embeddings multiply in their own forward
    return out if scale is None else out * scale.to(out.dtype)


def install_embedding(module, wq, scales, biases, group_size, bits, mode, dtype):
    """Look up rows of a quantised embedding, dequantising only those: forward is replaced until remove()."""
    module.forward = functools.partial(quantized_embedding, module, wq, scales, biases, group_size, bits, mode, dtype)


def quantized_linear(module, wq, scales, biases, group_size, bits, mode, dtype, x):
    """x @ w.T (+ bias) for a weight kept quantised: a block of its rows dequantised at a time, never all of it."""
    n, cols = scales.shape[0], scales.shape[-1] * group_size
    rows = max(1, head_block(x.device) // cols)
    y = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    block = torch.empty(min(rows, n), cols, dtype=dtype, device=x.device)  # one block, refilled
    for r in range(0, n, rows):
        w = dequantize_rows(wq[r:r + rows], scales[r:r + rows], row_slice(biases, r, rows), group_size, bits,
                            block[:min(rows, n - r)], mode)
        y[..., r:r + w.shape[0]] = torch.nn.functional.linear(x, w)  # F.linear: a wide batch's WideLinears applies
    return y + module.bias if module.bias is not None else y


def head_block(device) -> int:
    return HEAD_BLOCK_ELEMENTS if device.type == "cpu" else DEQUANT_ELEMENTS


def install_linear(module, wq, scales, biases, group_size, bits, mode="affine", dtype=None):
    """Run a Linear on its quantised weight (quantized_linear): forward is replaced until remove()."""
    module.forward = functools.partial(quantized_linear, module, wq, scales, biases, group_size, bits, mode,
                                       dtype or scales.dtype)


def remove(module):
    module.__dict__.pop("forward", None)


# -- what the torch backend asks, stage by stage -----------------------------------------------------
def quantized_footprint(backend, entry, name, info, infos):
    """(bytes held, bytes of temporaries while loading) of one quantised weight, as quantized() runs it."""
    base = name.rpartition(".")[0]
    scales = infos[base + ".scales"]
    group_size, bits = module_params(backend.qconfig, base)
    mode, itemsize = module_mode(backend.qconfig, base), backend.dtype.itemsize
    rows, cols = math.prod(scales.shape[:-1]), scales.shape[-1] * group_size
    module = target_module(backend, stage_name(backend, entry, base))
    # scales and biases as loaded: the compute dtype's, or a float mode's scale bytes alone
    quantized_bytes = info.nbytes + math.prod(scales.shape) * (1 if mode in FLOAT_MODES else 2 * itemsize)
    if packable_weight(backend, entry, base):
        # the packed codes and stacked scales and zeros; the repack's temporaries while loading
        return rows * cols // 2 + math.prod(scales.shape) * 2 * backend.dtype.itemsize, info.nbytes // 2
    if isinstance(module, torch.nn.Embedding):  # kept quantised: rows are dequantised as they are looked up
        return quantized_bytes, 0
    # dequantising a block of rows
    block = min(rows * cols, DEQUANT_ELEMENTS)
    if stage_name(backend, entry, base) == backend.arch.head:  # kept quantised: dequantised a block per forward
        block = min(rows * cols, head_block(backend.device))  # and the block itself
        return quantized_bytes, block * (dequant_bytes(bits, itemsize, mode) + itemsize)
    return rows * cols * itemsize, block * dequant_bytes(bits, itemsize, mode)

def stage_name(backend, entry, name):
    """A checkpoint name (a tensor's, or a module's: "model.embed_tokens") as load_stage sees it: a tied head's
    embedding tensors are the head's."""
    if entry.kind == "head" and (name + ".").startswith(backend.arch.embed_prefix):
        return (backend.arch.head + "." + name[len(backend.arch.embed_prefix):]).rstrip(".")
    return name

def packable_weight(backend, entry, base):
    """Whether quantised weight `base` runs on the packed int4 kernel (see torch_quant)."""
    if backend.device.type != "cpu" or not backend.qconfig:
        return False
    group_size, bits = module_params(backend.qconfig, base)
    return packable(target_module(backend, stage_name(backend, entry, base)), bits, group_size,
                    module_mode(backend.qconfig, base))

def prepare_stage(backend, entry, tensors):
    """On the reading thread: 4-bit codes of packable Linears repacked into torch's int4 layout (INT4PACK: an
    array of its own), or, read from a copy in that layout (INT4_COPY), viewed as that layout already
    (INT4PACK_VIEW: a view of the stage's mapping, kept until the stage is freed), their scales and biases too
    where the copy stacked them (one (K / group, N, 2) view under the scales' name)."""
    if not backend.qconfig or backend.device.type != "cpu":
        return tensors
    out = dict(tensors)
    copied = backend.int4_copies.get(entry.name)
    for name in [n for n in tensors if n.endswith(".scales")]:
        base = name[: -len(".scales")]
        if packable_weight(backend, entry, base):
            raw = tensors[base + ".weight"]
            shape = (raw.shape[0], raw.shape[1] * 4)
            if copied is None:
                out[base + ".weight"] = replace(raw, dtype="INT4PACK", data=repack_int4(raw.data).numpy(),
                                                owner=None, shape=shape)
                continue
            out[base + ".weight"] = replace(raw, dtype="INT4PACK_VIEW", data=raw.data.view(np.uint8), shape=shape)
            if (name, base + ".biases") in copied:
                scales, biases = tensors[name], out.pop(base + ".biases")
                stacked = (scales.shape[1], scales.shape[0], 2)
                out[name] = replace(scales, data=joined(scales.data, biases.data).reshape(stacked), shape=stacked)
    return out


def joined(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """One flat view of two arrays of a dtype that lie back to back in memory."""
    address = lambda a: a.__array_interface__["data"][0]  # numpy's .ctypes costs microseconds a call
    if address(second) != address(first) + first.nbytes or second.dtype != first.dtype:
        raise ValueError("the stacked scales and zeros are not back to back in the int4 layout copy")
    return np.lib.stride_tricks.as_strided(first, shape=(first.size + second.size,), strides=(first.itemsize,),
                                           writeable=False)


INT4_COPY = "torch-int4"  # the folder of streamed 4-bit stages in the int4 kernel's layout (airmlx.stage_copies)
INT4_COPY_VERSION = 2  # of that layout (1: codes repacked; 2: and scales stacked); others are written again


def int4_copy_version() -> int:
    """The copy's layout version on this CPU: 64 more where torch packs blocks of 64 rows (AVX-512)."""
    return INT4_COPY_VERSION + (64 if int4_block() == 64 else 0)
STORED = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def int4_copy_groups(backend, store, names: list) -> dict:
    """{stage: tensor groups} for the stages of `names` with 4-bit weights the int4 kernel runs: what the copy
    in the kernel's layout transforms once (int4_copy_transform): each weight's codes, and its scales and
    biases where they lie back to back and are stored in the compute dtype (so the stacked scales and zeros
    are the very bits install_int4 would compute)."""
    wanted = {}
    for name in names:
        entry, infos = store.stages[name], store.tensor_infos(name)
        groups = []
        for base in [t[: -len(".scales")] for t in infos if t.endswith(".scales")]:
            if not packable_weight(backend, entry, base):
                continue
            groups.append((base + ".weight",))
            pair = (base + ".scales", base + ".biases")
            if span(infos, pair) and all(STORED.get(infos[t].dtype) == backend.dtype for t in pair):
                groups.append(pair)
        if groups:
            wanted[name] = groups
    return wanted


def int4_copy_transform(names: tuple, arrays: list) -> np.ndarray:
    """A group's bytes in the int4 layout copy: codes repacked, or scales and biases as scales_and_zeros."""
    if len(names) == 1:
        return repack_int4(arrays[0]).numpy()
    # bf16 arrives as its bit patterns (uint16)
    scales, biases = (torch.from_numpy(a.view(np.int16)).view(torch.bfloat16) if a.dtype == np.uint16
                      else torch.from_numpy(a) for a in arrays)
    return scales_and_zeros(scales, biases).view(torch.uint8).numpy()


def target_module(backend, base):
    """The module a checkpoint weight `base`.weight lands in, or None (renamed into another's parameters);
    found once per name (a streamed stage asks at every load)."""
    if base not in backend.quantized_targets:
        backend.quantized_targets[base] = _find_target(backend, base)
    return backend.quantized_targets[base]


def _find_target(backend, base):
    target, pattern = rename_source_key(base + ".weight", backend.renamings, backend.converter_list)
    if pattern is not None:
        return None
    try:
        return backend.skeleton.get_submodule(target.rpartition(".")[0])
    except AttributeError:
        return None

def load_quantized(backend, tensors, raw_ranges=(), source=None, keep=False):
    """Quantised weights (MLX affine layout) of a stage: 4-bit Linears on the CPU run packed, embeddings
    dequantise the rows they look up (both through torch_quant, their modules' forward replaced), the
    rest become plain weights in the compute dtype. source: a tensor's checkpoint name where the stage renamed
    it (a tied head's embedding), whose quantisation it keeps. keep: the stage keeps its raw buffers (views of
    them need no copy). Returns (plain tensors, replaced modules, bytes made)."""
    out, overrides, nbytes = dict(tensors), [], 0
    for name in [n for n in tensors if n.endswith(".scales")]:
        base = name[: -len(".scales")]
        scales, biases, wq = out.pop(name), out.pop(base + ".biases", None), out.pop(base + ".weight")
        configured = (source or {}).get(name, name)[: -len(".scales")]
        (group_size, bits), mode = module_params(backend.qconfig, configured), module_mode(backend.qconfig, configured)
        module = target_module(backend, base)
        if wq.dtype == torch.uint8 and module is not None:  # in the int4 kernel's layout (prepare_stage)
            check_placement(SimpleNamespace(name=base), base + ".weight", (wq.shape[0], wq.shape[1] * 2),
                            tuple(module.weight.shape), f"transformers' {type(backend.skeleton).__name__}",
                            *backend.mlx_written)
            # biases None: the copy in the kernel's layout holds the stacked scales and zeros already
            kept = [backend._kept(t, raw_ranges, keep)
                    for t in (wq, scales if biases is None else scales_and_zeros(scales, biases))]
            install_int4(module, *kept, group_size)
            nbytes += sum(backend._made(t, raw_ranges) for t in kept)
            overrides.append(module)
        elif isinstance(module, torch.nn.Embedding) or base == backend.arch.head:  # kept quantised
            install = install_embedding if isinstance(module, torch.nn.Embedding) else install_linear
            kept = [t if t is None else backend._kept(t, raw_ranges, keep) for t in (wq, scales, biases)]
            install(module, *kept, group_size, bits, mode, backend.dtype)
            nbytes += sum(backend._made(t, raw_ranges) for t in kept if t is not None)
            overrides.append(module)
        else:
            out[base + ".weight"] = dequantize_weight(wq, scales, biases, group_size, bits, mode, backend.dtype)
    return out, overrides, nbytes
