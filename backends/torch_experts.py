"""torch: routed experts streamed into transformers' own fused experts module.

Each layer's experts module keeps its class and math; its forward is wrapped so that, once the router has
chosen, the chosen experts are fetched (airmlx.experts.ExpertCache) and each is put in place of the module's
(num_experts, ...) parameters as a module of one expert, the tokens' expert numbers renumbered to match. No
stacked copy is made: a decode step computes on the cached tensors themselves.
"""
import functools
from dataclasses import dataclass

import numpy as np
import torch


def load_expert(backend, entry, expert, tensors, layouts):
    """One expert's checkpoint tensors -> ({fused parameter name: (1, ...) tensor}, bytes). Read as its layer's
    layout in `layouts` orders them, each fused parameter is a view of the read buffer; otherwise (the first
    expert of a layer, or a conversion that is not a plain concatenation) transformers' own conversion mapping
    makes them, as for a whole layer, and the first conversion of a layer is learnt as its layout."""
    layout = layouts.get(entry.name)
    if layout and laid_out(layout, expert, tensors):
        params = {}
        for pname, names, shape, dtype in layout.params:
            first = tensors[layout.name(expert, names[0])]
            host = first.owner if isinstance(first.owner, torch.Tensor) else torch.from_numpy(first.owner)
            size = sum(tensors[layout.name(expert, n)].nbytes for n in names)
            params[pname] = host[first.offset: first.offset + size].view(dtype).reshape(shape).to(backend.device)
        return params, sum(t.numel() * t.element_size() for t in params.values())
    raw = tensors
    tensors = {name: backend.from_raw(r) for name, r in raw.items()}
    if backend.qconfig:
        tensors, _, _ = backend.quantized(tensors)  # fused experts: dequantised
    if backend.expert_params:
        params = stacked(backend.expert_params, f".{backend.arch.experts}.{expert}.", tensors,
                         backend.torch_arch.experts_in_out)
    else:
        params = {path.rpartition(".")[2]: t for path, (_, t) in backend.convert(tensors).items()}
    if entry.name not in layouts:
        layouts[entry.name] = Layout.learnt(backend.arch.experts, expert, raw, params)
    return params, sum(t.numel() * t.element_size() for t in params.values())


def stacked(expert_params, infix, tensors, in_out=False):
    """A split fused checkpoint's expert (the backend's expert_params; its tensors named "...<infix><end>") as
    the module's parameters of one expert: the parts one after another or alternating, weights transposed where
    the module keeps them (in, out)."""
    by_end = {name.split(infix, 1)[1]: t for name, t in tensors.items()}
    out = {}
    for pname, ends, interleaved in expert_params:
        parts = [by_end[end] for end in ends]
        t = torch.stack(parts, 1).flatten(0, 1) if interleaved else torch.cat(parts)
        if t.dim() == 2 and in_out:
            t = t.T
        out[pname] = t[None]
    return out


@dataclass(frozen=True)
class Layout:
    """How a layer's fused expert parameters are made of an expert's checkpoint tensors: each the bytes of some
    of them one after another (gate_up_proj = w1 then w3), named by what follows ".<experts>.<e>."."""
    head: str  # the tensor names' start, up to and including ".<experts>."
    params: tuple  # ((parameter name, (tensor name ends, in order), shape, dtype), ...)

    def name(self, expert, end):
        return f"{self.head}{expert}.{end}"

    def order(self, expert):
        """The expert's tensor names in the order its read lays them out."""
        return [self.name(expert, n) for _, names, _, _ in self.params for n in names]

    @staticmethod
    def learnt(experts_path, expert, raw, params):
        """The layout `params` show, given the raw tensors they were converted from, or None when some
        parameter is not whole raw tensors' bytes one after another (a cast, a transpose, a dequantisation)
        or two tensors' bytes are alike (which is which could not be told)."""
        head = next(iter(raw)).split(f".{experts_path}.{expert}.", 1)[0] + f".{experts_path}."
        prefix = f"{head}{expert}."
        if not all(n.startswith(prefix) for n in raw):
            return None
        left = {n[len(prefix):]: r.data.reshape(-1).view(np.uint8) for n, r in raw.items()}
        out = []
        for pname in sorted(params):
            t = params[pname]
            got = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
            pos, names = 0, []
            while pos < len(got):
                hits = [n for n, b in left.items() if len(b) <= len(got) - pos and np.array_equal(got[pos: pos + len(b)], b)]
                if len(hits) != 1:
                    return None
                names.append(hits[0])
                pos += len(left.pop(hits[0]))
            out.append((pname, tuple(names), tuple(t.shape), t.dtype))
        layout = Layout(head, tuple(out))
        at = 0
        for pname, names, _, dtype in out:  # each parameter must start where its dtype can view it
            if at % dtype.itemsize:
                return None
            at += sum(raw[layout.name(expert, n)].nbytes for n in names)
        return layout if not left else None


def laid_out(layout, expert, tensors):
    """Whether the read laid the expert's tensors out as `layout` orders them."""
    order, at = layout.order(expert), 0
    for name in order:
        if name not in tensors or tensors[name].offset != at:
            return False
        at += tensors[name].nbytes
    return len(tensors) == len(order)


def stream_experts(backend, layers, chunks):
    for layer in layers:
        module = backend.skeleton.get_submodule(f"{backend.arch.layers}.{layer}.{backend.torch_arch.experts}")
        module.forward = functools.partial(streamed_forward, module, layer, chunks, module.num_experts,
                                           eager_forward(type(module)), backend.torch_arch.experts_sentinel)


def eager_forward(cls):
    """The experts class's own eager forward: transformers' experts_implementation="eager", under the
    decorator that dispatches to grouped_mm. For a module of one expert it is one pair of matmuls on that
    expert's tokens, without the grouped path's sorting and counting (0.7 ms less a call on a CPU, bit for bit
    the same in bf16)."""
    return getattr(cls.forward, "__wrapped__", cls.forward)


def streamed_forward(module, layer, chunks, num_experts, forward, sentinel, hidden_states, top_k_index,
                     top_k_weights):
    """The module's own (eager) forward once per routed expert, on the expert as the cache holds it (nothing
    is stacked: the cache gives groups of one, ExpertCache with stacking 0); the other experts' slots are
    renumbered to the module's sentinel (num_experts), which its forward skips, or, without one, the expert's
    tokens alone are given to it, with the weight their slot of it has."""
    routed = torch.unique(top_k_index).tolist()
    out = None
    for experts, handles in chunks(layer, routed):
        (expert,), (held,) = experts, handles
        other = top_k_index != expert  # renumbered: the expert is 0 of the module of one, the others its sentinel
        weights = top_k_weights if len(routed) == 1 else top_k_weights * ~other
        saved = {name: getattr(module, name) for name in held}
        try:
            for name in saved:
                setattr(module, name, torch.nn.Parameter(held[name], requires_grad=False))
            module.num_experts = 1
            if sentinel:
                y = forward(module, hidden_states, other.to(top_k_index.dtype), weights)
            else:
                rows = (~other).any(-1).nonzero().flatten()
                mine = (top_k_weights * ~other)[rows].sum(-1, keepdim=True)  # one slot at most is the expert's
                y = torch.zeros_like(hidden_states).index_add_(0, rows, forward(
                    module, hidden_states[rows], torch.zeros_like(mine, dtype=top_k_index.dtype), mine))
        finally:
            for name, placeholder in saved.items():
                setattr(module, name, placeholder)
            module.num_experts = num_experts
        out = y if out is None else out + y
    return out
