"""Requests with caches of their own joined into one left-padded batch and taken apart again, for the
server's engine (airmlx/engine.py). transformers' cache keeps no padding of its own (the attention mask
says which positions of a row are padding), so each row's left padding is kept beside it, on the cache
(PADDING), to tell how many tokens a row holds. And a batch's half-precision Linears on the CPU, computed
in float32 (WideLinears)."""
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from transformers.cache_utils import DynamicCache, DynamicLayer

from airmlx.errors import GenerationError


def mergeable(cache) -> bool:
    """Plain key/value layers only: sliding-window layers keep window bookkeeping a padded batch would break."""
    return isinstance(cache, DynamicCache) and all(type(layer) is DynamicLayer for layer in cache.layers)


def holds(layers) -> "bool | None":
    """Whether these caches' layer holds keys: True in every one, False in none (a layer this process never
    runs: another pipeline rank's, airmlx/pipeline_model.py), None when some do and some do not."""
    states = {layer.is_initialized for layer in layers}
    return states.pop() if len(states) == 1 else None


PADDING = "airmlx_left_padding"  # the cache's attribute: each row's padding positions, left of its tokens


def set_padding(cache, padding) -> None:
    setattr(cache, PADDING, [int(p) for p in padding])


def select_padding(cache, rows) -> None:
    if hasattr(cache, PADDING):
        set_padding(cache, [getattr(cache, PADDING)[r] for r in rows])


def trim_padding(cache, keep: int) -> None:
    """After a trim to `keep` positions: a row's padding cannot be wider than what is left."""
    if hasattr(cache, PADDING):
        set_padding(cache, [min(p, keep) for p in getattr(cache, PADDING)])


def _fill(layer, keys, values):
    layer.lazy_initialization(keys, values)
    layer.keys, layer.values = keys, values


def merge(caches: list, lengths: list, new_cache):
    """One batch cache holding every row of `caches` in order, right-aligned to the longest row (shorter rows
    left-padded with zeros); lengths[i]: the tokens each row of caches[i] holds (padding a cache has beyond
    its longest row is dropped). None when a cache is not mergeable."""
    if not all(mergeable(c) for c in caches):
        return None
    held = [max(rows) for rows in lengths]
    longest = max(held)
    merged = new_cache()
    if not all(type(layer) is DynamicLayer for layer in merged.layers):
        return None
    for i, layer in enumerate(merged.layers):
        state = holds([c.layers[i] for c in caches])
        if state is None:
            return None
        if not state:
            continue  # empty in every cache: stays empty
        keys, values = [], []
        for cache, n in zip(caches, held):
            src = cache.layers[i]
            pad = (0, 0, longest - n, 0)  # left of the sequence axis (-2)
            keys.append(torch.nn.functional.pad(src.keys[..., src.keys.shape[-2] - n:, :], pad))
            values.append(torch.nn.functional.pad(src.values[..., src.values.shape[-2] - n:, :], pad))
        _fill(layer, torch.cat(keys), torch.cat(values))
    set_padding(merged, [longest - n for rows in lengths for n in rows])
    return merged


def extract(cache, row: int, length: int, new_cache):
    """One row of a batch cache as a cache of its own holding the row's last `length` tokens, a copy; None
    when the cache is not mergeable (its layers' bookkeeping would not survive the cut)."""
    if not mergeable(cache):
        return None
    out = new_cache()
    for src, dst in zip(cache.layers, out.layers):
        if not src.is_initialized:
            continue  # a layer this process never runs stays empty
        if row >= src.keys.shape[0]:
            raise GenerationError(f"extract_cache: row {row} is not a row of this cache (it has {src.keys.shape[0]}).")
        padding = getattr(cache, PADDING, None)
        if padding is not None and len(padding) == src.keys.shape[0]:
            if src.keys.shape[-2] - padding[row] != length:  # the engine's count and the cache's must agree
                raise GenerationError(f"extract_cache: row {row} holds {src.keys.shape[-2] - padding[row]} tokens, "
                                      f"not {length}.")
        elif length > src.keys.shape[-2]:  # a cache made elsewhere: only its width is known
            raise GenerationError(f"extract_cache: row {row} holds at most {src.keys.shape[-2]} tokens, not {length}.")
        _fill(dst, src.keys[row:row + 1, :, src.keys.shape[-2] - length:].clone(),
              src.values[row:row + 1, :, src.values.shape[-2] - length:].clone())
    return out


WIDE_BATCH = 2  # a batch of this many sequences or more ...
WIDE_ROWS = 8  # ... and this many rows (sequences x new tokens) multiply half-precision weights in float32
WIDE_ELEMENTS = 1 << 22  # weight elements converted at once, at most (and at most the activation bound's workspace)


class WideLinears(TorchFunctionMode):
    """Half-precision Linears of a batch computed in float32, a block of weight rows at a time: torch's bf16
    CPU matmul without AVX-512 BF16 costs in proportion to the rows (16 rows: 2.4 x the float32 matmul of the
    same shapes). Each product is the float32 accumulation torch's bf16 kernel makes too, rounded once to the
    weights' dtype; the order of the sum differs, so a rare element differs by one unit in the last place."""

    def __init__(self, block_elements: int = WIDE_ELEMENTS):
        super().__init__()
        self.block = max(1, min(block_elements, WIDE_ELEMENTS))  # float32 weight elements converted at once

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if weight.dtype in (torch.bfloat16, torch.float16) and x.dtype == weight.dtype:
                return wide_linear(x, weight, bias, self.block)
        return func(*args, **kwargs)


def wide_linear(x, weight, bias=None, block: int = WIDE_ELEMENTS):
    n, k = weight.shape
    rows = x.reshape(-1, k).float()
    y = torch.empty(rows.shape[0], n, dtype=torch.float32)
    step = max(1, min(block, WIDE_ELEMENTS) // k)
    for r in range(0, n, step):
        torch.matmul(rows, weight[r:r + step].float().t(), out=y[:, r:r + step])
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def wide(backend, x) -> bool:
    """Whether a stage on this input runs its Linears through WideLinears."""
    return (backend.device.type == "cpu" and backend.dtype in (torch.bfloat16, torch.float16) and x is not None
            and x.dim() == 3 and x.shape[0] >= WIDE_BATCH and x.shape[0] * x.shape[1] >= WIDE_ROWS)
