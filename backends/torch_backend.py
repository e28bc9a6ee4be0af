"""torch backend (CUDA and CPU): stages are transformers' own modules on a meta-device skeleton.

The whole model is built once on the meta device (no memory); loading a stage assigns real tensors to
that stage's parameters, freeing it puts meta tensors back. Masks, rotary embeddings, caches and decoder
layers are transformers'; this file only wires them in sweep order.
"""
import inspect
import warnings
from copy import deepcopy
from dataclasses import dataclass

import numpy as np
import torch
from transformers import AutoModelForCausalLM
from transformers.cache_utils import DynamicCache
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from airmlx.archs import arch_for, layer_types
from airmlx.errors import BackendError, CheckpointError
from airmlx.quant import dequantize, module_params

from . import torch_experts
from .torch_remote import remote_config, shared_rotary
from .base import available_ram

# Stages arrive as read-only views of the page cache (mmap) and inference never writes weights; one filter
# here, because a catch_warnings() per tensor costs more than the load itself.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class TorchStage:
    kind: str
    params: dict  # parameter path -> (module, parameter name, meta placeholder)
    nbytes: int
    module: object = None  # the decoder layer, for layer stages
    layer: int = None


@dataclass
class TorchStep:
    tokens: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor
    cache: DynamicCache
    all_positions: bool = False
    causal_mask: dict = None  # per layer type
    rotary: dict = None  # per layer type
    prepared: bool = False


def resolve_device(device):
    try:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, TypeError):
        raise BackendError(f"device {device!r} is not a torch device; use 'cuda', 'cuda:N' or 'cpu'.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BackendError(f"device {str(device)!r} was asked for but this torch has no CUDA device; "
                           "use device='cpu' or install a CUDA build of torch.")
    if device.type not in ("cuda", "cpu"):
        raise BackendError(f"device {str(device)!r} is not supported by the torch backend; use 'cuda' or 'cpu'.")
    return device


def resolve_dtype(config, dtype, device):
    name = dtype or config.get("dtype") or config.get("torch_dtype") or "float32"
    name = str(name).replace("torch.", "")
    if name not in DTYPES:
        raise BackendError(f"dtype {dtype!r} is not supported; use one of {sorted(DTYPES)}.")
    if device.type == "cpu" and name == "float16" and dtype is None:
        name = "float32"  # CPU kernels for fp16 are slow or missing
    return DTYPES[name]


def dequantize_affine(wq, scales, biases, group_size, bits):
    """MLX's affine layout (codes packed lowest bits first into uint32 words; per-group scale and bias)
    back to weights, with torch ops on the weights' device. Widths that straddle words (3, 5, 6 bits) go
    through the shared numpy quantiser."""
    if 32 % bits:
        as_np = lambda t: t.cpu().view(torch.int16).numpy().view("uint16") if t.dtype == torch.bfloat16 else t.cpu().numpy()
        storage = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}[scales.dtype]
        w = dequantize(wq.cpu().numpy(), as_np(scales), as_np(biases), group_size=group_size, bits=bits, dtype=storage)
        w = torch.from_numpy(w)
        return (w.view(torch.bfloat16) if storage == "bfloat16" else w).to(wq.device)
    if bits == 8:  # little-endian words, lowest bits first: the bytes are the codes
        codes = wq.view(torch.int32).view(torch.uint8)
    else:
        shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=wq.device)
        codes = (wq.view(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    codes = codes.reshape(*scales.shape, group_size).to(scales.dtype)
    # in place: a large embedding dequantised every step is memory-bound (same two roundings as before)
    return codes.mul_(scales.unsqueeze(-1)).add_(biases.unsqueeze(-1)).reshape(*scales.shape[:-1], -1)


class TorchBackend:
    name = "torch"

    def __init__(self, config, device=None, dtype=None, tensor_names=(), trust_remote_code=False, code_dir=None):
        """code_dir: the shard folder, which holds a remote-code checkpoint's .py files."""
        self.arch = arch = arch_for(config)
        remote = arch.remote_code and config["model_type"] not in CONFIG_MAPPING
        hf_config = remote_config(config, arch, trust_remote_code, code_dir) if remote else None
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(config, dtype, self.device)
        self.zero_copy = self.device.type == "cpu"
        self.qconfig = config.get("quantization")
        # mlx-lm's quantisation keys would send transformers looking for a quantiser it does not have
        plain = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
        # the checkpoint's own code picks its attention implementation
        kw = {"trust_remote_code": True} if remote else {"attn_implementation": self.arch.torch_attention}
        hf_config = hf_config or CONFIG_MAPPING[config["model_type"]].from_dict(plain)
        with torch.device("meta"):
            self.skeleton = AutoModelForCausalLM.from_config(hf_config, dtype=self.dtype, **kw)
        self.config = self.skeleton.config
        self.layer_types = layer_types(config)
        embed = self.skeleton.get_input_embeddings()
        if self.arch.embed_scale:  # transformers' scaled embedding keeps sqrt(hidden) in a buffer, meta here
            embed.embed_scale = torch.tensor(embed.scalar_embed_scale, device=self.device)
        self.softcap = config.get("final_logit_softcapping") if self.arch.final_softcap else None
        mapping = get_model_conversion_mapping(self.skeleton)
        self.renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
        self.converters = {p: m for m in mapping if isinstance(m, WeightConverter) for p in m.source_patterns}
        self.converter_list = list(dict.fromkeys(self.converters.values()))
        rotary = (shared_rotary(self.skeleton, arch) if remote else
                  self.skeleton.get_submodule(arch.layers.rpartition(".")[0] + ".rotary_emb"))
        with torch.device(self.device):  # the skeleton's copy lives on meta; rotary buffers are computed, not loaded
            self.rotary = type(rotary)(config=self.config)
        self.rotary_per_type = "layer_type" in inspect.signature(self.rotary.forward).parameters  # gemma3
        self._live = self._peak_live = self._peak = 0

    # -- stages --------------------------------------------------------------------------------
    def _tensor(self, raw):
        t = torch.from_numpy(raw.data)
        if raw.dtype == "BF16":
            t = t.view(torch.bfloat16)
        if t.is_floating_point() and t.dtype != self.dtype:
            t = t.to(self.dtype)
        return t.to(self.device)

    def dequantize(self, tensors):
        """Quantised weights (MLX affine layout) -> plain weights in the compute dtype, one stage at a time,
        on the stage's device."""
        out = dict(tensors)
        for name in [n for n in tensors if n.endswith(".scales")]:
            base = name[: -len(".scales")]
            scales, biases, wq = out.pop(name), out.pop(base + ".biases"), out.pop(base + ".weight")
            out[base + ".weight"] = dequantize_affine(wq, scales, biases, *module_params(self.qconfig, base))
        return out

    def convert(self, tensors):
        """Checkpoint tensors -> the skeleton's parameters, through transformers' own conversion mapping
        (e.g. per-expert MoE weights -> fused experts), one stage at a time: {param path: (name, tensor)}."""
        out, pending = {}, {}
        for name in sorted(tensors, key=dot_natural_key):  # expert 10 after expert 9, as transformers stacks them
            target, pattern = rename_source_key(name, self.renamings, self.converter_list)
            if pattern is None:
                out[target] = (name, tensors[name])
            else:
                conv = pending.setdefault(target, deepcopy(self.converters[pattern]))
                conv.add_tensor(target, name, pattern, tensors[name])
        for target, conv in pending.items():
            for path, t in conv.convert(target).items():
                out[path] = (target, t)
        return out

    def load_stage(self, entry, tensors):
        params, nbytes = {}, 0
        tensors = {name: self._tensor(raw) for name, raw in tensors.items()}
        if self.qconfig:
            tensors = self.dequantize(tensors)
        if entry.kind == "head":  # tied head reads the embedding
            embed, head = self.arch.embed_prefix, self.arch.head + "."
            tensors = {head + n[len(embed):] if n.startswith(embed) else n: t for n, t in tensors.items()}
        for path, (name, tensor) in self.convert(tensors).items():
            module_path, _, pname = path.rpartition(".")
            try:
                module = self.skeleton.get_submodule(module_path)
                placeholder = getattr(module, pname)
            except AttributeError:
                raise CheckpointError(f"stage {entry.name}: tensor {name!r} has no place in transformers' "
                                      f"{type(self.skeleton).__name__}; the checkpoint does not match its config.")
            if tensor.shape != placeholder.shape:
                raise CheckpointError(f"stage {entry.name}: tensor {name!r} has shape {tuple(tensor.shape)}, the "
                                      f"config implies {tuple(placeholder.shape)}; the checkpoint does not match its config.")
            setattr(module, pname, torch.nn.Parameter(tensor, requires_grad=False))
            params[path] = (module, pname, placeholder)
            nbytes += tensor.numel() * tensor.element_size()
        self._live += nbytes
        self._peak_live = max(self._peak_live, self._live)
        index = entry.layer
        layer = self.skeleton.get_submodule(f"{self.arch.layers}.{index}") if index is not None else None
        return TorchStage(entry.kind, params, nbytes, layer, index)

    def free_stage(self, stage):
        for module, pname, placeholder in stage.params.values():
            setattr(module, pname, placeholder)
        stage.params = {}
        self._live -= stage.nbytes

    # -- routed experts (MoE): backends/torch_experts.py ------------------------------------------
    def stream_experts(self, layers, chunks):
        torch_experts.stream_experts(self, layers, chunks)

    def load_expert(self, entry, expert, tensors):
        params, nbytes = torch_experts.load_expert(self, entry, tensors)
        self._live += nbytes
        self._peak_live = max(self._peak_live, self._live)
        return params, nbytes

    def free_expert(self, params):
        self._live -= sum(t.numel() * t.element_size() for t in params.values())

    # -- steps ---------------------------------------------------------------------------------
    def new_cache(self, batch_size, left_padding):
        return DynamicCache(config=self.config)

    def cache_length(self, cache):
        return cache.get_seq_length()

    def trim_cache(self, cache, keep):
        # per layer: a sweep cut short (Ctrl-C) leaves layers holding different lengths
        for layer in cache.layers:
            if not layer.is_initialized:
                continue
            if layer.is_sliding:  # the sliding layer's own crop knows its window bookkeeping
                drop = layer.get_seq_length() - keep
                if drop > 0:
                    layer.crop(-drop)  # transformers 5: a negative crop removes that many tokens
            else:  # keys and values apart: Ctrl-C may land between transformers' two updates
                layer.keys, layer.values = layer.keys[..., :keep, :], layer.values[..., :keep, :]

    def select_rows(self, cache, rows):
        cache.batch_select_indices(torch.as_tensor(rows, device=self.device))

    def cache_bytes(self, cache):
        total = 0
        for layer in getattr(cache, "layers", []):
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total

    def begin_step(self, tokens, attention_mask, cache, all_positions=False):
        ids = torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64)).to(self.device)
        mask = torch.from_numpy(np.ascontiguousarray(attention_mask, dtype=np.int64)).to(self.device)
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)[:, -ids.shape[1]:]
        return TorchStep(ids, mask, positions, cache, all_positions)

    @torch.inference_mode()
    def run_stage(self, stage, x, step):
        model = self.skeleton
        if stage.kind == "embed":
            x = model.get_input_embeddings()(step.tokens)
        elif stage.kind == "layer":
            if not step.prepared:  # once per step, before the first layer writes its cache
                kw = dict(config=self.config, inputs_embeds=x, attention_mask=step.mask,
                          past_key_values=step.cache, position_ids=step.positions)
                make = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
                types = set(self.layer_types)
                step.causal_mask = {t: make[t](**kw) for t in types}
                step.rotary = {t: self.rotary(x, step.positions, *([t] if self.rotary_per_type else []))
                               for t in types}
                step.prepared = True
            kind = self.layer_types[stage.layer]
            x = stage.module(x, attention_mask=step.causal_mask[kind], position_ids=step.positions,
                             past_key_values=step.cache, use_cache=step.cache is not None,
                             position_embeddings=step.rotary[kind])
        else:
            norm, head = model.get_submodule(self.arch.norm), model.get_submodule(self.arch.head)
            x = head(norm(x if step.all_positions else x[:, -1:, :]))
            if self.softcap:
                x = torch.tanh(x / self.softcap) * self.softcap
            # once per step, not per stage: the cache is largest at the step's end (an upper bound)
            self._peak = max(self._peak, self._peak_live + self.cache_bytes(step.cache))
            self._peak_live = self._live
        return x

    def logits(self, x):
        return x.float().cpu().numpy()

    # -- memory --------------------------------------------------------------------------------
    def memory(self):
        if self.device.type == "cuda":
            return {"active": torch.cuda.memory_allocated(self.device),
                    "peak": torch.cuda.max_memory_allocated(self.device)}
        return {"active": self._live, "peak": self._peak}

    def reset_peak(self):
        self._peak = self._peak_live = self._live
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def available_memory(self):
        if self.device.type == "cuda":
            return torch.cuda.mem_get_info(self.device)[0]
        return available_ram()
