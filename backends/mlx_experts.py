"""MLX: routed experts streamed into mlx-lm's own SwitchGLU.

Each MoE block's SwitchGLU keeps its class and math; the block calls a stand-in instead, which, given the
router's choices, fetches the chosen experts (airmlx.experts.ExpertCache), stacks them in place of the
SwitchGLU's (num_experts, ...) weights and renumbers the tokens' expert indices to match.
"""
import functools
from collections import Counter

import mlx.core as mx
import numpy as np
from mlx.utils import tree_unflatten

from airmlx.archs import expert_index, expert_pattern
from airmlx.errors import BackendError
from airmlx.quant import SUPPORTED_GROUP_SIZES


def switch_name(backend, tensor_name):
    """A routed expert's checkpoint tensor -> the SwitchGLU parameter it stacks into, e.g.
    model.layers.3.block_sparse_moe.experts.5.w1.scales -> model.layers.3.block_sparse_moe.switch_mlp.gate_proj.scales."""
    arch = backend.arch
    m = expert_pattern(arch).match(tensor_name)
    proj, _, kind = tensor_name[m.end():].partition(".")
    return f"{arch.layer_prefix}{m.group(1)}.{arch.stacked_experts}.{dict(arch.expert_names).get(proj, proj)}.{kind}"


def widened_when_stacked(backend, infos):
    """Half-precision experts computed in float32 stay in the cache as stored and are widened only in their
    group's stacked copy: the cache holds twice as many, and the values are the same (widening is exact)."""
    return (not backend.zero_copy and backend.dtype == mx.float32 and not backend.qconfig
            and any(i.dtype in ("BF16", "F16") for i in infos.values()))


def stacking(backend, infos):
    """Bytes a loaded expert takes while its group is stacked, per byte it holds: as held, or, widened, its
    float32 copy and the as-stored stack of one weight at a time (StreamedSwitch evaluates them in turn)."""
    if not widened_when_stacked(backend, infos):
        return 1.0
    per_expert = Counter()
    for name, info in infos.items():
        per_expert[expert_index(backend.arch, name)] += info.nbytes
    return mx.float32.size / 2 + max(i.nbytes for i in infos.values()) / min(per_expert.values())


def quantising_hint(qconfig, plain) -> str:
    """How a compression could take in the experts' unquantised weights: a group size that divides their rows'
    length (none, where no supported one does)."""
    if not qconfig:
        return "shard with compression='8bit' or '4bit', "
    widths = {raw.shape[-1] for raw in plain.values()}
    fits = [g for g in SUPPORTED_GROUP_SIZES if g != qconfig.get("group_size") and all(w % g == 0 for w in widths)]
    if not fits:
        return ""
    return f"shard with a group size that divides their rows' length {sorted(widths)} (e.g. " \
           f"compression='{qconfig['bits']}bit-g{fits[0]}'), "


def load_expert(backend, entry, tensors):
    """One expert's checkpoint tensors -> ({SwitchGLU parameter, e.g. gate_proj.weight: array}, bytes)."""
    prefix = f"{backend.arch.layer_prefix}{entry.layer}.{backend.arch.stacked_experts}."
    # weights the sharder left unquantised (none, or those whose rows do not split into its groups)
    plain = {name: raw for name, raw in tensors.items()
             if name.endswith(".weight") and f"{name[:-len('.weight')]}.scales" not in tensors}
    half = {raw.dtype for raw in plain.values()} & {"BF16", "F16"}
    if half and (backend.dtype is None or backend.dtype != mx.float32) and mx.default_device().type == mx.cpu:
        # mlx-lm's SwitchGLU uses gather_mm, which MLX's CPU build runs only in float32 (resident mlx-lm too)
        raise BackendError(f"MLX on the CPU runs unquantised MoE experts only in float32, and this "
                           f"{backend.arch.model_type} checkpoint's experts are {half.pop()}"
                           f"{' where left unquantised' if backend.qconfig else ''}; pass dtype='float32', "
                           f"{quantising_hint(backend.qconfig, plain)}or use backend='torch'.")
    convert = backend.as_stored if widened_when_stacked(backend, tensors) else backend.from_raw
    params = {switch_name(backend, name)[len(prefix):]: convert(raw) for name, raw in tensors.items()}
    mx.eval(list(params.values()))
    return params, sum(a.nbytes for a in params.values())


def stream_experts(backend, layers, chunks):
    block_path, _, attr = backend.arch.stacked_experts.rpartition(".")
    for layer in layers:
        block = functools.reduce(getattr, block_path.split("."), backend.skeleton.layers[layer])
        prefix = f"{backend.arch.layer_prefix}{layer}.{backend.arch.stacked_experts}."
        placeholders = {k[len(prefix):]: a for k, a in backend.placeholders.items() if k.startswith(prefix)}
        # an instance attribute, so the SwitchGLU stays in the parameter tree
        object.__setattr__(block, attr, StreamedSwitch(getattr(block, attr), layer, chunks, placeholders,
                                                       backend.dtype))


class StreamedSwitch:
    def __init__(self, switch, layer, chunks, placeholders, dtype=None):
        self.switch, self.layer, self.chunks, self.placeholders = switch, layer, chunks, placeholders
        self.dtype = dtype  # the compute dtype: experts kept as stored are widened to it once stacked
        self.num_experts = next(iter(placeholders.values())).shape[0]

    def __call__(self, x, indices):
        routed = np.unique(np.array(indices)).tolist()
        out = None
        for experts, handles in self.chunks(self.layer, routed):
            index = np.zeros(self.num_experts, dtype=np.int32)
            index[experts] = np.arange(len(experts))
            stacked = {}
            for k in handles[0]:
                stacked[k] = self._widened(mx.stack([h[k] for h in handles]))
                if stacked[k].dtype != handles[0][k].dtype:
                    mx.eval(stacked[k])  # widened now: one weight's as-stored stack at a time (stacking())
            self.switch.update(tree_unflatten(list(stacked.items())))
            try:
                y = self.switch(x, mx.array(index)[indices])
            finally:
                self.switch.update(tree_unflatten([(k, self.placeholders[k]) for k in stacked]))
            if len(experts) < len(routed):  # a group of a large prefill: other experts' slots count zero here
                chosen = np.zeros(self.num_experts, dtype=bool)
                chosen[experts] = True
                y = y * mx.array(chosen)[indices][..., None].astype(y.dtype)
            out = y if out is None else out + y
            # evaluated now, so this group's experts (and their stacked copy) can go before the next is read
            mx.eval(out)
            del stacked, handles, y
        return out

    def _widened(self, a):
        if self.dtype is None or a.dtype == self.dtype or not mx.issubdtype(a.dtype, mx.floating):
            return a
        return a.astype(self.dtype)
