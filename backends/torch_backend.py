"""torch backend (CUDA and CPU): stages are transformers' own modules on a meta-device skeleton.

The whole model is built once on the meta device (no memory); loading a stage assigns real tensors to
that stage's parameters, freeing it puts meta tensors back. Masks, rotary embeddings, caches and decoder
layers are transformers'; this file only wires them in sweep order.
"""
import inspect
import math
import warnings
import weakref
from contextlib import nullcontext
from copy import deepcopy
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import AutoModelForCausalLM
from transformers.cache_utils import DynamicCache
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from airmlx.archs import arch_for, layer_types
from airmlx.errors import BackendError, CacheTrimError, CheckpointError
from airmlx.hf_config import transformers_config
from airmlx.plan import SCORE_LOGITS, workspace_elements

from . import torch_batching, torch_experts, torch_quant
from .base import (
    MLX_WRITTEN,
    available_ram,
    check_complete,
    check_placement,
    check_positions,
    kept_tail,
    position_table,
    with_layer_types,
)
from .torch_float_quant import FLOAT_MODES
from .torch_remote import remote_config, shared_rotary

# Stages arrive as read-only views of the page cache (mmap) and inference never writes weights; one filter
# here, because a catch_warnings() per tensor costs more than the load itself.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
STORED = torch_quant.STORED
TRIM_SLACK = 64  # tokens a sliding-window layer keeps beyond its window, so trims up to this are exact


@dataclass(frozen=True)
class TorchArch:
    """How transformers runs an architecture here."""
    attention: str = "sdpa"  # attn_implementation
    experts: str = "mlp.experts"  # MoE: transformers' fused experts module in a layer
    experts_in_out: bool = False  # the module keeps its weights (experts, in, out) (gpt-oss), not (experts, out, in)
    # the module's forward skips index num_experts (the others' slots are renumbered to it); else each expert's
    # tokens alone are given to it (gpt-oss's one-hot has no such class)
    experts_sentinel: bool = True
    # parameters of a decoder layer (transformers' paths in memory) that mlx-lm's sanitize drops, so a checkpoint
    # mlx-lm wrote lacks them: zeros, as mlx-lm computes without them (ERNIE 4.5's routing bias)
    mlx_dropped: tuple = ()


TORCH_ARCHS = {
    "llama": TorchArch(), "mistral": TorchArch(), "qwen2": TorchArch(), "qwen3": TorchArch(), "phi3": TorchArch(),
    "glm4": TorchArch(), "smollm3": TorchArch(), "olmo2": TorchArch(), "olmo3": TorchArch(), "phi": TorchArch(),
    "ernie4_5": TorchArch(), "helium": TorchArch(), "hunyuan_v1_dense": TorchArch(), "stablelm": TorchArch(),
    "nemotron": TorchArch(), "seed_oss": TorchArch(), "starcoder2": TorchArch(), "gemma": TorchArch(),
    "granite": TorchArch(), "cohere": TorchArch(), "cohere2": TorchArch(), "apertus": TorchArch(),
    "exaone4": TorchArch(), "glm": TorchArch(), "ministral3": TorchArch(), "gpt_neox": TorchArch(),
    "gpt_bigcode": TorchArch(), "gpt2": TorchArch(), "gptj": TorchArch(),
    "mixtral": TorchArch(), "qwen2_moe": TorchArch(), "qwen3_moe": TorchArch(), "deepseek_v2": TorchArch(),
    "deepseek_v3": TorchArch(), "glm4_moe": TorchArch(), "glm4_moe_lite": TorchArch(), "olmoe": TorchArch(),
    "phimoe": TorchArch(), "exaone_moe": TorchArch(),
    "ernie4_5_moe": TorchArch(mlx_dropped=("mlp.gate.moe_statics.e_score_correction_bias",)),
    "laguna": TorchArch(), "dots1": TorchArch(), "mellum": TorchArch(),
    "granitemoe": TorchArch(experts="block_sparse_moe.experts"),
    "gpt_oss": TorchArch(attention="eager", experts_in_out=True, experts_sentinel=False),  # no sdpa with sinks
    "minimax_m2": TorchArch(),  # the checkpoint's block_sparse_moe is transformers' mlp, as for mixtral
    "gemma2": TorchArch(attention="eager"),  # sdpa has no attention soft-capping
    "gemma3_text": TorchArch(),
    # remote-code families: the checkpoint's own code picks its attention (internlm3: transformers' module)
    "internlm2": TorchArch(), "internlm3": TorchArch(), "qwen": TorchArch(), "baichuan_m1": TorchArch(),
}


@dataclass
class TorchStage:
    kind: str
    params: dict  # parameter path -> (module, parameter name, meta placeholder)
    nbytes: int
    module: object = None  # the decoder layer, for layer stages
    layer: int = None
    overrides: list = field(default_factory=list)  # modules running quantised weights (torch_quant)


@dataclass
class TorchStep:
    tokens: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor
    cache: DynamicCache
    all_positions: bool = False
    targets: torch.Tensor = None  # scoring: (B, T) token ids; the head returns their log-probabilities
    causal_mask: dict = field(default_factory=dict)  # per layer type, made when a layer of that type first runs
    rotary: dict = field(default_factory=dict)  # per layer type


def set_parameter(module, name, param):
    """setattr(module, name, param) for a parameter the module already has, without nn.Module.__setattr__'s
    checks (a stage load sets every parameter of its layer, and frees them again)."""
    if name in module._parameters:
        module._parameters[name] = param
    else:
        setattr(module, name, param)


def merged_ranges(ranges: list) -> list:
    """Address ranges with the ones that touch or overlap joined (a mapped stage's tensors: usually one)."""
    out = []
    for start, end in sorted(ranges):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [tuple(r) for r in out]


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
        if dtype is None:
            raise BackendError(f"config.json's dtype {name!r} is not one the torch backend computes in; pass dtype= "
                               f"(--dtype), one of {sorted(DTYPES)}.")
        raise BackendError(f"dtype {dtype!r} is not supported; use one of {sorted(DTYPES)}.")
    if device.type == "cpu" and name == "float16" and dtype is None:
        name = "float32"  # CPU kernels for fp16 are slow or missing
    return DTYPES[name]


def linear_for_conv1d(skeleton, arch):
    """The layers' Conv1D modules (Arch.conv1d) replaced by nn.Linear on meta: the sharder wrote their weights
    (out, in), as a Linear's, so quantised stages and the float32 blocks of batches take them as any other."""
    from transformers.pytorch_utils import Conv1D
    for layer in skeleton.get_submodule(arch.layers):
        for path in arch.conv1d:
            parent, _, name = path.rpartition(".")
            owner = layer.get_submodule(parent) if parent else layer
            conv = getattr(owner, name)
            if isinstance(conv, Conv1D):
                in_features, out_features = conv.weight.shape
                setattr(owner, name, torch.nn.Linear(in_features, out_features, device="meta", dtype=conv.weight.dtype))


def cache_argument(function):
    """The name `function` takes the KV cache by: "cache" (transformers >= 5.2x), "layer_past" (GPT-NeoX's
    decoder layers) or "past_key_values"."""
    parameters = inspect.signature(function).parameters
    name = next((name for name in ("cache", "layer_past", "past_key_values") if name in parameters), None)
    if name is None:  # passed in **kwargs it would be dropped, and every step would run without the past
        raise BackendError(f"{function.__qualname__} takes its KV cache by no name airmlx knows (cache, layer_past, "
                           "past_key_values); this transformers version's module cannot stream here.")
    return name


def check_modes(qconfig) -> None:
    """mlx-lm's quantisation modes torch computes: affine (scales and biases, as airmlx's own compression
    writes it) and the float modes of torch_float_quant; a mode added to mlx-lm later is refused when the
    model opens, not at its first step."""
    modes = {q.get("mode", "affine") for q in [qconfig or {}, *(qconfig or {}).values()] if isinstance(q, dict)}
    if unknown := modes - {"affine", *FLOAT_MODES}:
        raise BackendError(f"this checkpoint is quantised by mlx-lm in mode {sorted(unknown)[0]!r}, which the torch "
                           f"backend does not compute (it runs {', '.join(['affine', *FLOAT_MODES])}); run it with "
                           "backend='mlx', or shard the model's Hugging Face checkpoint with compression='4bit'.")


class TorchBackend:
    """Stages are transformers modules on a meta skeleton. On the CPU a stage's tensors are views of its
    read buffer or page-cache mapping (no copy) unless they need a dtype conversion or dequantising."""
    name = "torch"
    counts_buffers = False  # the store's buffers and mappings are numpy: memory() counts only torch's own

    def __init__(self, manifest, device=None, dtype=None, trust_remote_code=False, code_dir=None):
        """code_dir: the shard folder, which holds a remote-code checkpoint's .py files."""
        config = with_layer_types(manifest.config)
        self.arch = arch = arch_for(config)
        self.torch_arch = TORCH_ARCHS[config["model_type"]]
        remote = arch.remote_code and config["model_type"] not in CONFIG_MAPPING
        hf_config = remote_config(config, arch, trust_remote_code, code_dir) if remote else None
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(config, dtype, self.device)
        self.itemsize = self.dtype.itemsize  # of activations and KV caches
        self.qconfig = config.get("quantization")
        check_modes(self.qconfig)
        self.mlx_written = (MLX_WRITTEN,) if manifest.extra.get("written_by") == "mlx-lm" else ()  # errors' cause
        self.expert_layouts = {}  # MoE: experts stage -> how its fused parameters lie in an expert's read (or None)
        stored = str(config.get("dtype") or config.get("torch_dtype") or "float32").replace("torch.", "")
        # tensors stay views of the raw buffers: on the CPU, when nothing needs converting
        self.zero_copy = self.device.type == "cpu" and not self.qconfig and DTYPES.get(stored) == self.dtype
        self.page_cache_views = self.zero_copy
        # the checkpoint's own code picks its attention implementation
        kw = {"trust_remote_code": True} if remote else {"attn_implementation": self.torch_arch.attention}
        # without mlx-lm's quantisation keys, which would send transformers looking for a quantiser it lacks; a
        # config it cannot read is one line
        hf_config = hf_config or transformers_config(config)
        with torch.device("meta"):
            # from_config leaves the model training: a config's dropout (Phi-2's resid_pdrop 0.1) would run
            try:
                self.skeleton = AutoModelForCausalLM.from_config(hf_config, dtype=self.dtype, **kw).eval()
            except (KeyError, ValueError, TypeError) as e:  # transformers' modules read what config.json says
                detail = " ".join(str(e).split())[:200]
                raise CheckpointError(f"config.json: transformers cannot build its {config.get('model_type')} model "
                                      f"from it ({type(e).__name__}: {detail}); check the values it holds.") from None
        self.config = self.skeleton.config
        linear_for_conv1d(self.skeleton, arch)
        self.wide_block = workspace_elements(config)  # a batch's float32 weight blocks (torch_batching)
        self.layer_types = layer_types(config)
        self.position_table = position_table(arch, config)
        embed = self.skeleton.get_input_embeddings()
        if self.arch.embed_scale:  # transformers' scaled embedding keeps sqrt(hidden) in a buffer, meta here
            embed.embed_scale = torch.tensor(embed.scalar_embed_scale, device=self.device)
        self.softcap = config.get("final_logit_softcapping") if self.arch.final_softcap else None
        self.embed_multiplier, self.logit_multiplier, self.logit_divisor = (
            getattr(self.config, key) if key else None
            for key in (arch.embed_multiplier, arch.logit_multiplier, arch.logit_divisor))
        mapping = get_model_conversion_mapping(self.skeleton)
        self.renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
        self.converters = {p: m for m in mapping if isinstance(m, WeightConverter) for p in m.source_patterns}
        self.converter_list = list(dict.fromkeys(self.converters.values()))
        # experts the sharder split from a fused tensor (Arch.fused_experts): the experts module's parameter each
        # fused tensor is in memory, the per-expert tensors it is made of, in order, and whether they alternate
        self.expert_params = tuple(
            (rename_source_key(f"{arch.layer_prefix}0.{f.tensor}", self.renamings, self.converter_list)[0]
             .rpartition(".")[2], f.parts, f.interleaved) for f in arch.fused_experts)
        # an expert loaded as a copy of its read, not views of it: parts alternating or weights kept (in, out)
        self.expert_copies = self.torch_arch.experts_in_out or any(f.interleaved for f in arch.fused_experts)
        # the final norm and head as transformers names them in memory (GPT-NeoX's embed_out is its lm_head)
        self.norm_path, self.head_path = (
            rename_source_key(f"{path}.weight", self.renamings, self.converter_list)[0].removesuffix(".weight")
            for path in (arch.norm, arch.head))
        # learned positions (Arch.positions) are added in the embed stage: no rotary embedding
        rotary = None if arch.positions else shared_rotary(self.skeleton, arch) if remote else \
            self.skeleton.get_submodule(arch.layers.rpartition(".")[0] + ".rotary_emb")
        with torch.device(self.device):  # the skeleton's copy lives on meta; rotary buffers are computed, not loaded
            self.rotary = None if rotary is None else type(rotary)(config=self.config)
        self.rotary_per_type = rotary is not None and \
            "layer_type" in inspect.signature(self.rotary.forward).parameters  # gemma3
        # transformers >= 5.2x names the cache argument `cache` (past_key_values= is deprecated there)
        self.layer_cache_arg = cache_argument(type(self.skeleton.get_submodule(f"{arch.layers}.0")).forward)
        self.mask_cache_arg = cache_argument(create_causal_mask)
        # the mask is sized from the cache of the layer that first runs it (a pipeline rank's first layer of a
        # type need not be the model's); transformers without layer_idx reads the model's first
        self.mask_layer_arg = "layer_idx" in inspect.signature(create_causal_mask).parameters
        self._live = self._peak_live = self._peak = 0  # bytes of tensors made here (not views of buffers)
        self.window = config.get("sliding_window")
        self._renames, self._slots = {}, {}  # per stage: checkpoint name -> parameter path; path -> its slot
        self._held_dtypes = {}  # checkpoint name -> the dtype its parameter is held in (held_dtype)
        # per stage loaded as views under plain renames: (layer, ((name, bf16, slot, path), ...),
        # {name: (weakref to the raw tensor viewed last, its parameter while the store keeps that view)})
        self._bound = {}
        self._complete = set()  # stages whose first load filled every parameter they own (check_complete)
        self.quantized_targets = {}  # checkpoint weight name -> the module it lands in (torch_quant.target_module)
        self.int4_copies = {}  # stage -> its tensor groups in the copy in torch's int4 layout (torch_quant.INT4_COPY)
        self._copy_groups = {}  # what copy_layout asked stage_copies for

    # -- memory ------------------------------------------------------------------------------------
    def allocate(self, nbytes):
        """A read buffer: numpy, in pinned (page-locked) memory when the stage is headed for a CUDA device."""
        if self.device.type == "cuda":
            owner = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            return owner, owner.numpy()
        buf = np.empty(nbytes, dtype=np.uint8)
        return buf, buf

    def footprint(self, entry, infos):
        """(bytes a loaded stage holds, bytes while it loads): views of its buffer on the CPU, or what
        conversion, dequantising or the copy to the GPU makes (the host buffer is not device memory)."""
        made, views, temporaries, prepared = 0, False, 0, 0
        for info in infos.values():
            name = info.name
            if self.qconfig and name.endswith((".scales", ".biases")):
                made += 0 if f"{name.rpartition('.')[0]}.weight" in infos else info.nbytes
                continue
            if self.qconfig and f"{name.rpartition('.')[0]}.scales" in infos:
                held, transient = torch_quant.quantized_footprint(self, entry, name, info, infos)
                made += held
                temporaries = max(temporaries, transient)
                prepared += info.nbytes if torch_quant.packable_weight(self, entry, name.rpartition(".")[0]) else 0
            elif info.dtype in STORED and (STORED[info.dtype] != (held := self.held_dtype(name))
                                           or self.device.type == "cuda"):
                made += math.prod(info.shape) * held.itemsize
            elif self.device.type == "cuda" or not self.zero_copy or entry.kind == "experts" and self.expert_copies:
                made += info.nbytes
            else:
                views = True
        buffer = entry.nbytes if self.device.type == "cpu" else 0
        # a stage read ahead holds its buffer and what prepare() made of it (repacked 4-bit codes)
        return (buffer if views else 0) + made, buffer + made + temporaries, entry.nbytes + prepared // 2

    def copy_layout(self, store, streamed):
        """On the CPU, streamed stages with 4-bit Linears are best read from a copy with their codes in the
        int4 kernel's layout (repacked once), so no load repacks: what that copy transforms, and how."""
        if self.device.type != "cpu" or not self.qconfig or not torch_quant.int4_kernel_ok():
            return None
        self._copy_groups = torch_quant.int4_copy_groups(self, store, list(streamed))
        return (torch_quant.INT4_COPY, self._copy_groups, torch_quant.int4_copy_transform,
                torch_quant.int4_copy_version())

    def use_copies(self, stages) -> None:
        """These stages come from the int4 layout copy: mapped like bf16 stage files, their codes (and stacked
        scales) used as read, so the loaded stage views the mapping until free_stage."""
        self.int4_copies = {name: set(self._copy_groups[name]) for name in stages}
        self.page_cache_views = self.page_cache_views or bool(self.int4_copies)

    def keeps_views(self, entry) -> bool:
        return self.zero_copy or entry.name in self.int4_copies

    def prepare(self, entry, tensors):
        """On the reading thread: 4-bit codes of packable Linears repacked into torch's int4 layout."""
        return torch_quant.prepare_stage(self, entry, tensors)

    def quantized(self, tensors, raw_ranges=(), source=None, keep=False):
        return torch_quant.load_quantized(self, tensors, raw_ranges, source, keep)

    def set_scratch(self, nbytes):
        pass  # torch's CPU allocator returns freed memory; the CUDA caching allocator is counted by memory()

    @staticmethod
    def draft_dtype(device=None) -> "str | None":
        """The dtype a draft model computes in unless told: bfloat16 on the CPU (torch's bf16 GEMV and packed
        int4 kernel are several times faster there than float32's), the checkpoint's elsewhere."""
        return "bfloat16" if resolve_device(device).type == "cpu" else None

    def memory(self):
        if self.device.type == "cuda":
            return {"active": torch.cuda.memory_allocated(self.device),
                    "peak": torch.cuda.max_memory_allocated(self.device)}
        return {"active": self._live, "peak": max(self._peak, self._peak_live)}

    def reset_peak(self):
        self._peak = self._peak_live = self._live
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def available_memory(self):
        if self.device.type == "cuda":
            return torch.cuda.mem_get_info(self.device)[0]
        return available_ram()

    @staticmethod
    def _views_buffer(tensor, raw_ranges) -> bool:
        """Whether a tensor is a view of one of a stage's read buffers (not memory of its own)."""
        ptr = tensor.data_ptr()
        return tensor.device.type == "cpu" and any(start <= ptr < end for start, end in raw_ranges)

    def _made(self, tensor, raw_ranges):
        """Bytes of a tensor this backend allocated (0 for a view of a raw buffer)."""
        return 0 if self._views_buffer(tensor, raw_ranges) else tensor.numel() * tensor.element_size()

    # -- stages --------------------------------------------------------------------------------
    def from_raw(self, raw):
        return self._typed(raw, torch.from_numpy(raw.data))  # read-only mappings too: see the warning filter

    def _typed(self, raw, t, dtype=None):
        """from_raw, given the raw tensor's bytes as a torch tensor; dtype: a float tensor's, if not the model's."""
        if raw.dtype == "BF16":
            t = t.view(torch.bfloat16)
        if t.is_floating_point() and t.dtype != (dtype or self.dtype):
            t = t.to(dtype or self.dtype)
        return t.to(self.device)

    def held_dtype(self, name):
        """The float dtype a checkpoint tensor is held in: the model's, or another where transformers' module keeps
        that parameter so (float32 routers and routing biases in bf16 or fp16 models, _keep_in_fp32_modules_strict:
        DeepSeek-V2/V3, GLM-4.5, dots.llm1, ERNIE 4.5, K-EXAONE), as transformers loads it."""
        dtype = self._held_dtypes.get(name)
        if dtype is None:
            dtype = self.dtype
            target, pattern = rename_source_key(name, self.renamings, self.converter_list)
            if pattern is None:  # (not _slot: a stage may hold the parameter now, not its placeholder)
                module_path, _, pname = target.rpartition(".")
                try:
                    current = getattr(self.skeleton.get_submodule(module_path), pname)
                except AttributeError:
                    current = None
                if isinstance(current, torch.Tensor) and current.is_floating_point():
                    dtype = current.dtype
            self._held_dtypes[name] = dtype
        return dtype

    def _kept(self, tensor, raw_ranges, keep=False):
        """A tensor the loaded stage keeps: its own copy when it still views a read buffer that goes back to
        the pool right after loading (keep: the stage keeps its buffers, keeps_views)."""
        return tensor.clone() if not keep and self._views_buffer(tensor, raw_ranges) else tensor

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
        bound = self._bound.get(entry.name)
        if bound is not None and len(bound[1]) == len(tensors):
            return self._load_bound(entry, bound, tensors)
        params, nbytes, raw = {}, 0, tensors
        tensors = {name: torch.from_numpy(r.data) for name, r in raw.items()}
        # the read buffer's address ranges: tensors still viewing them are its, not this backend's
        raw_ranges = merged_ranges([(t.data_ptr(), t.data_ptr() + t.nbytes) for name, t in tensors.items()
                                    if raw[name].dtype != "INT4PACK"])
        tensors = {name: self._typed(raw[name], t, self.held_dtype(name)) for name, t in tensors.items()}
        source = None
        if entry.kind == "head":  # a tied head reads the embedding: its tensors take the head's names
            source = {torch_quant.stage_name(self, entry, n): n for n in tensors}
            tensors = {name: tensors[n] for name, n in source.items()}
        overrides, keep = [], self.keeps_views(entry)
        if self.qconfig:
            tensors, overrides, nbytes = self.quantized(tensors, raw_ranges, source, keep)
        for path, (name, tensor) in self._converted(entry, tensors).items():
            module, pname, placeholder = self._slot(path)
            check_placement(entry, name, tensor.shape, None if placeholder is None else placeholder.shape,
                            f"transformers' {type(self.skeleton).__name__}", *self.mlx_written)
            tensor = self._kept(tensor, raw_ranges, keep)
            set_parameter(module, pname, torch.nn.Parameter(tensor, requires_grad=False))
            params[path] = (module, pname, placeholder)
            nbytes += self._made(tensor, raw_ranges)
        if self.mlx_written and entry.kind == "layer":
            nbytes += self._zeros_for_dropped(entry, params)
        if entry.name not in self._complete:
            check_complete(entry, [], self._unfilled(entry, overrides), f"transformers' {type(self.skeleton).__name__}",
                           *self.mlx_written)
            self._complete.add(entry.name)
        self._live += nbytes
        self._peak_live = max(self._peak_live, self._live)
        index = entry.layer
        layer = self.skeleton.get_submodule(f"{self.arch.layers}.{index}") if index is not None else None
        if (keep and not nbytes and not self.qconfig and source is None and entry.name in self._renames
                and all(pname in module._parameters for module, pname, _ in params.values())):
            # every parameter is a view of its tensor's bytes, under a plain rename: the next load of this
            # stage (each sweep's, when it streams) only makes the views again (_load_bound)
            renamed = self._renames[entry.name]
            self._bound[entry.name] = (layer, tuple((name, raw[name].dtype == "BF16", params[path], path)
                                                    for name, path in renamed.items()), {})
        return TorchStage(entry.kind, params, nbytes, layer, index, overrides)

    def _zeros_for_dropped(self, entry, params) -> int:
        """Zeros for the parameters of a layer mlx-lm dropped (TorchArch.mlx_dropped) that its checkpoint lacked;
        their bytes."""
        made = 0
        for name in self.torch_arch.mlx_dropped:
            path = f"{self.arch.layers}.{entry.layer}.{name}"
            module, pname, placeholder = self._slot(path)
            if placeholder is None or path in params:  # a dense layer, or the checkpoint had it
                continue
            zeros = torch.zeros(placeholder.shape, dtype=placeholder.dtype, device=self.device)
            set_parameter(module, pname, torch.nn.Parameter(zeros, requires_grad=False))
            params[path] = (module, pname, placeholder)
            made += zeros.numel() * zeros.element_size()
        return made

    def _unfilled(self, entry, overrides) -> list:
        """The parameters of the modules a stage fills left on meta by its load: a tensor the checkpoint lacks
        (they would run on whatever the meta tensor turns into). Routed experts are read apart; a module whose
        forward runs quantised keeps its meta weight."""
        if entry.kind == "layer":
            roots = [f"{self.arch.layers}.{entry.layer}"]
        elif entry.kind == "embed":
            roots = [self.arch.embed] + ([self.arch.positions] if self.arch.positions else [])
        else:
            roots = [self.norm_path, self.head_path]  # as transformers names them in memory
        replaced = {id(m) for m in overrides}
        missing = []
        for root in roots:
            try:
                top = self.skeleton.get_submodule(root)
            except AttributeError:
                continue
            for path, module in top.named_modules(prefix=root):
                if id(module) in replaced or ".experts." in f"{path}.":
                    continue
                missing += [f"{path}.{name}" for name, p in module.named_parameters(recurse=False) if p.is_meta]
        return missing

    def _load_bound(self, entry, bound, tensors):
        """load_stage for a stage loaded before as views of its read buffer: the same parameters made as
        views of this read's (the store checked the file is the one opened, so names, dtypes and shapes are
        those checked at the first load), or, where the store hands the same views again (a mapping it keeps
        between sweeps), the parameters made last time."""
        layer, slots, made = bound
        params = {}
        for name, bf16, slot, path in slots:
            raw = tensors[name]
            seen, param = made.get(name, (None, None))
            same = seen is not None and seen() is raw
            if param is None or not same:
                t = torch.from_numpy(raw.data)
                param = torch.nn.Parameter(t.view(torch.bfloat16) if bf16 else t, requires_grad=False)
                # held only for views the store keeps anyway (else it would keep the last read's memory alive),
                # and dropped with them (store.close(): the mapping goes with this last view)
                made[name] = (weakref.ref(raw), param if same else None)
                if same:
                    weakref.finalize(raw, made.pop, name, None)
            module, pname, _ = slot
            module._parameters[pname] = param
            params[path] = slot
        return TorchStage(entry.kind, params, 0, layer, entry.layer)

    def _converted(self, entry, tensors):
        """convert(), remembered per stage when transformers' mapping only renames (the usual case), so a
        streamed stage's later loads skip the pattern matching."""
        renamed = self._renames.get(entry.name)
        if renamed is not None and renamed.keys() == tensors.keys():
            return {path: (name, tensors[name]) for name, path in renamed.items()}
        out = self.convert(tensors)
        if all(name in tensors and tensors[name] is t for name, t in out.values()):
            self._renames[entry.name] = {name: path for path, (name, _) in out.items()}
        return out

    def _slot(self, path):
        """(module, parameter name, meta placeholder) a parameter path names, or (None, name, None)."""
        if path not in self._slots:
            module_path, _, pname = path.rpartition(".")
            try:
                module = self.skeleton.get_submodule(module_path)
                self._slots[path] = (module, pname, getattr(module, pname))
            except AttributeError:
                return None, pname, None
        return self._slots[path]

    def free_stage(self, stage):
        for module, pname, placeholder in stage.params.values():
            set_parameter(module, pname, placeholder)
        for module in stage.overrides:
            torch_quant.remove(module)
        stage.params, stage.overrides = {}, []
        self._live -= stage.nbytes

    # -- routed experts (MoE): backends/torch_experts.py ------------------------------------------
    def stream_experts(self, layers, chunks):
        torch_experts.stream_experts(self, layers, chunks)

    def load_expert(self, entry, expert, tensors):
        params, nbytes = torch_experts.load_expert(self, entry, expert, tensors, self.expert_layouts)
        self._live += nbytes
        self._peak_live = max(self._peak_live, self._live)
        return params, nbytes

    def expert_order(self, entry, expert):
        layout = self.expert_layouts.get(entry.name)
        return layout.order(expert) if layout else None

    def quantized_widening(self, infos, itemsize):
        return 0  # a quantised weight is dequantised in blocks the activation bound's workspace counts

    def expert_stacking(self, infos):
        return 0.0  # each expert computed as the cache holds it: nothing stacked (backends/torch_experts.py)

    def free_expert(self, loaded):
        self._live -= sum(t.numel() * t.element_size() for t in loaded.values())

    # -- caches ------------------------------------------------------------------------------------
    def new_cache(self, batch_size, left_padding):
        """transformers' DynamicCache; its sliding-window layers record their past, and keep TRIM_SLACK
        tokens beyond the window (trimmed after each layer runs), so a cache rolls back that far exactly."""
        cache = DynamicCache(config=self.config)
        for layer in cache.layers:
            if getattr(layer, "is_sliding", False):
                layer.activate_past_recording()
        torch_batching.set_padding(cache, left_padding)
        return cache

    def cache_length(self, cache):
        return cache.get_seq_length()

    def trim_cache(self, cache, keep):
        # per layer: a sweep cut short (Ctrl-C) leaves layers holding different lengths
        for layer in cache.layers:
            drop = layer.get_seq_length() - keep if layer.is_initialized else 0
            if drop > 0 and layer.is_sliding and layer.get_seq_length() >= layer.sliding_window \
                    and layer.keys.shape[-2] - (layer.sliding_window - 1) < drop:
                raise CacheTrimError(
                    f"the cache cannot go back {drop} tokens exactly: its sliding-window layers keep only the last "
                    f"{layer.sliding_window} + {TRIM_SLACK} tokens; start a new cache (in chat: /reset).")
        for layer in cache.layers:
            drop = layer.get_seq_length() - keep if layer.is_initialized else 0
            if drop <= 0:
                continue
            if layer.is_sliding:  # the sliding layer's own crop knows its window bookkeeping
                layer.crop(-drop)  # transformers 5: a negative crop removes that many tokens
            else:  # keys and values apart: Ctrl-C may land between transformers' two updates
                layer.keys, layer.values = layer.keys[..., :keep, :], layer.values[..., :keep, :]
        torch_batching.trim_padding(cache, keep)

    def drop_cache_layer(self, cache, layer):
        cache.layers[layer] = type(cache.layers[layer])(**({"sliding_window": cache.layers[layer].sliding_window}
                                                          if cache.layers[layer].is_sliding else {}))

    def select_rows(self, cache, rows):
        cache.batch_select_indices(torch.as_tensor(rows, device=self.device))
        torch_batching.select_padding(cache, rows)

    def cache_bytes(self, cache):
        total = 0
        for layer in getattr(cache, "layers", []):
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total

    # -- steps ---------------------------------------------------------------------------------
    def begin_step(self, tokens, attention_mask, cache, all_positions=False, targets=None, attend=None,
                   positions=None):
        check_positions(self.position_table, attention_mask, positions)
        ids = torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64)).to(self.device)
        mask = torch.from_numpy(np.ascontiguousarray(attention_mask, dtype=np.int64)).to(self.device)
        if attend is not None:  # tree attention: transformers takes a prepared 4-D mask as it is
            mask, positions = self._attend_mask(attend), torch.from_numpy(np.asarray(positions, dtype=np.int64))
            positions = positions.to(self.device)
        else:
            positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)[:, -ids.shape[1]:]
        if targets is not None:
            targets = torch.from_numpy(np.ascontiguousarray(targets, dtype=np.int64)).to(self.device)
        return TorchStep(ids, mask, positions, cache, all_positions or targets is not None, targets)

    def _prepare(self, step, kind, x, layer):
        """The mask and rotary embedding of this step for a layer type, made when a layer of that type first
        runs: transformers reads the cache of the first layer of that type, which then holds exactly the
        tokens before this step's (a long prompt runs in chunks, each through a layer before the next)."""
        if kind not in step.causal_mask:
            make = create_sliding_window_causal_mask if kind == "sliding_attention" else create_causal_mask
            step.causal_mask[kind] = make(config=self.config, inputs_embeds=x, attention_mask=step.mask,
                                          position_ids=step.positions, **{self.mask_cache_arg: step.cache},
                                          **({"layer_idx": layer} if self.mask_layer_arg else {}))
            step.rotary[kind] = None if self.rotary is None else \
                self.rotary(x, step.positions, *([kind] if self.rotary_per_type else []))
        return step.causal_mask[kind], step.rotary[kind]

    @torch.inference_mode()
    def run_stage(self, stage, x, step):
        model = self.skeleton
        if stage.kind == "embed":
            x = model.get_input_embeddings()(step.tokens)
            if self.arch.positions:
                x = x + model.get_submodule(self.arch.positions)(step.positions)
            if self.embed_multiplier is not None:
                x = x * self.embed_multiplier
        elif stage.kind == "layer":
            kind = self.layer_types[stage.layer]
            mask, rotary = self._prepare(step, kind, x, stage.layer)
            with torch_batching.WideLinears(self.wide_block) if torch_batching.wide(self, x) else nullcontext():
                x = stage.module(x, attention_mask=mask, position_ids=step.positions,
                                 use_cache=step.cache is not None, position_embeddings=rotary,
                                 **{self.layer_cache_arg: step.cache})
            if kind == "sliding_attention" and step.cache is not None:
                layer = step.cache.layers[stage.layer]
                keep = layer.sliding_window - 1 + TRIM_SLACK
                if layer.keys.shape[-2] > keep:  # recording its past: keep the window and the slack only
                    layer.keys, layer.values = layer.keys[..., -keep:, :], layer.values[..., -keep:, :]
        elif step.targets is not None:
            x = self._score(x, step.targets)
        else:
            x = x if step.all_positions else x[:, -1:, :]
            with torch_batching.WideLinears(self.wide_block) if torch_batching.wide(self, x) else nullcontext():
                x = self._head(x)
        if stage.kind != "layer":
            # once per step, not per stage: the cache is largest at the step's end (an upper bound)
            cache = self.cache_bytes(step.cache) if step.cache is not None else 0
            self._peak = max(self._peak, self._peak_live + cache)
            self._peak_live = self._live
        return x

    def _head(self, x):
        norm, head = self.skeleton.get_submodule(self.norm_path), self.skeleton.get_submodule(self.head_path)
        x = head(norm(x))
        if self.logit_multiplier is not None:
            x = x * self.logit_multiplier
        if self.logit_divisor is not None:
            x = x / self.logit_divisor
        return torch.tanh(x / self.softcap) * self.softcap if self.softcap else x

    def _score(self, x, targets):
        """(B, T, 2): log p(target) and whether the target was the argmax, per position, computed a few
        positions at a time so the full (B, T, vocab) logits never exist."""
        step = max(1, SCORE_LOGITS // (x.shape[0] * self.config.vocab_size))
        out = torch.empty(*x.shape[:2], 2, dtype=torch.float32, device=x.device)
        for i in range(0, x.shape[1], step):
            logits = self._head(x[:, i:i + step]).float()
            t = targets[:, i:i + step]
            out[:, i:i + step, 0] = logits.gather(-1, t[..., None])[..., 0] - torch.logsumexp(logits, -1)
            out[:, i:i + step, 1] = (logits.argmax(-1) == t).float()
        return out

    def logits(self, x):
        return x.float().cpu().numpy()

    # -- tree attention (speculative decoding: airmlx/speculative.py) ---------------------------
    def _attend_mask(self, attend):
        """A (B, T, past + T) boolean `attend` as the 4-D mask this model's attention takes: boolean for sdpa,
        additive (0 or the dtype's minimum) for eager attention."""
        allowed = torch.from_numpy(np.ascontiguousarray(attend, dtype=bool))[:, None].to(self.device)
        if self.config._attn_implementation == "sdpa":
            return allowed
        zero = torch.zeros((), dtype=self.dtype, device=self.device)
        return torch.where(allowed, zero, torch.finfo(self.dtype).min)

    def tree_attention_problem(self):
        """Why this model cannot verify a tree of tokens in one step (None when it can)."""
        if "sliding_attention" in self.layer_types:
            return "its sliding-window layers cannot drop a tree's other branches from their cache exactly"
        if not type(self.skeleton).__module__.startswith("transformers."):
            return "it runs the checkpoint's own modelling code, which may not take a tree attention mask"
        return None

    @torch.inference_mode()
    def keep_cache_positions(self, cache, positions):
        positions, start = kept_tail(positions)
        tail, n = torch.as_tensor(positions[start:], device=self.device), len(positions)
        for layer in cache.layers:
            if not layer.is_initialized:
                continue
            if start < n:  # advanced indexing copies, so writing over the same positions is safe
                layer.keys[..., start:n, :] = layer.keys[..., tail, :]
                layer.values[..., start:n, :] = layer.values[..., tail, :]
            layer.keys, layer.values = layer.keys[..., :n, :], layer.values[..., :n, :]

    # -- requests joining and leaving one batch (the server's engine; backends/torch_batching.py) --------
    def merge_caches(self, caches, lengths):
        return torch_batching.merge(caches, lengths, lambda: self.new_cache(1, [0]))

    def extract_cache(self, cache, row, length):
        return torch_batching.extract(cache, row, length, lambda: self.new_cache(1, [0]))
