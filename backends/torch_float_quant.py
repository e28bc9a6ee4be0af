"""torch: weights mlx-lm quantised in a float mode, dequantised as mx.dequantize does.

mxfp4 and nvfp4 store two E2M1 codes a byte (lowest nibble first), mxfp8 one E4M3 code a byte; a group's
scale is a power of two (E8M0: 2 ** (s - 127); mxfp4, mxfp8, groups of 32) or an E4M3 number (nvfp4,
groups of 16); there are no biases. A code's value times its scale is exact in float32, so each weight is
rounded once, to the compute dtype: bit-exact with mx.dequantize in float32, bfloat16 and float16 (where, for
mxfp8, mx.dequantize first rounds the scale to float16, flushing scales below 2 ** -24 to zero).
"""
import functools

import torch

FLOAT_MODES = {"mxfp4": "e8m0", "nvfp4": "e4m3", "mxfp8": "e8m0"}  # mode -> its scales' format
E2M1 = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6])
BYTE_PAIRS = torch.stack([E2M1.repeat(16), E2M1.repeat_interleave(16)], -1)  # byte -> (low, high) values
TEMPORARY_BYTES = {4: 6, 8: 4}  # per weight of a block: the byte indices (int32) and the float32 values


@functools.cache
def byte_pairs(device: torch.device) -> torch.Tensor:
    return BYTE_PAIRS.to(device)


def scale_values(scales: torch.Tensor, mode: str) -> torch.Tensor:
    """A group's scale as float32, from its byte."""
    if FLOAT_MODES[mode] == "e4m3":
        return scales.view(torch.float8_e4m3fn).float()
    exponent = scales.to(torch.int32)  # E8M0: the float32 with this exponent field (0: 2 ** -127, subnormal)
    return torch.where(exponent > 0, exponent << 23, 1 << 22).view(torch.float32)


def float_rows(wq: torch.Tensor, scales: torch.Tensor, group_size: int, bits: int, mode: str,
               out: torch.Tensor) -> torch.Tensor:
    """(N, K * bits / 32) codes -> their (N, K) weights, written into `out`."""
    codes = wq.contiguous().view(torch.int32).view(torch.uint8)
    if bits == 8:
        values = codes.view(torch.float8_e4m3fn).float()
    else:
        values = byte_pairs(codes.device)[codes.to(torch.int32)].flatten(-2)
    scale = scale_values(scales, mode)
    if bits == 8:  # mx.dequantize multiplies 8-bit codes in the output dtype: a scale float16 cannot hold is 0 or inf
        scale = scale.to(out.dtype).float()
    values = values.view(*scales.shape, group_size).mul_(scale.unsqueeze(-1))
    return out.copy_(values.view(out.shape))
