"""torch: routed experts streamed into transformers' own fused experts module.

Each layer's experts module keeps its class and math; its forward is wrapped so that, once the router has
chosen, the chosen experts are fetched (airmlx.experts.ExpertCache), stacked in place of the module's
(num_experts, ...) parameters, and the tokens' expert numbers are renumbered to match.
"""
import functools

import torch


def load_expert(backend, entry, tensors):
    """One expert's checkpoint tensors -> ({fused parameter name: (1, ...) tensor}, bytes), converted by
    transformers' own conversion mapping as for a whole layer."""
    tensors = {name: backend.from_raw(raw) for name, raw in tensors.items()}
    if backend.qconfig:
        tensors, _, _ = backend.quantized(tensors)  # fused experts: dequantised
    params = {path.rpartition(".")[2]: t for path, (_, t) in backend.convert(tensors).items()}
    return params, sum(t.numel() * t.element_size() for t in params.values())


def stream_experts(backend, layers, chunks):
    for layer in layers:
        module = backend.skeleton.get_submodule(f"{backend.arch.layers}.{layer}.{backend.torch_arch.experts}")
        module.forward = functools.partial(streamed_forward, module, layer, chunks, module.num_experts)


def streamed_forward(module, layer, chunks, num_experts, hidden_states, top_k_index, top_k_weights):
    routed = torch.unique(top_k_index).tolist()
    out = None
    for experts, handles in chunks(layer, routed):
        index = torch.zeros(num_experts, dtype=top_k_index.dtype, device=top_k_index.device)
        index[experts] = torch.arange(len(experts), dtype=top_k_index.dtype, device=index.device)
        weights = top_k_weights
        if len(experts) < len(routed):  # a group of a large prefill: other experts' slots count zero here
            chosen = torch.zeros(num_experts, dtype=torch.bool, device=index.device)
            chosen[experts] = True
            weights = top_k_weights * chosen[top_k_index]
        saved = {name: getattr(module, name) for name in handles[0]}
        try:
            for name in saved:
                stacked = torch.cat([h[name] for h in handles]) if len(handles) > 1 else handles[0][name]
                setattr(module, name, torch.nn.Parameter(stacked, requires_grad=False))
            module.num_experts = len(experts)
            y = type(module).forward(module, hidden_states, index[top_k_index], weights)
        finally:
            for name, placeholder in saved.items():
                setattr(module, name, placeholder)
            module.num_experts = num_experts
        out = y if out is None else out + y
    return out
