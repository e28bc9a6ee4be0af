"""MLX backend: stages are mlx-lm's own modules (TransformerBlock, KVCache/BatchKVCache, masks).

The mlx-lm model is built once; its random-initialised parameters stay lazy and are never evaluated,
so the skeleton costs no memory. Loading a stage swaps real arrays in; freeing swaps the lazy
placeholders back, and every stage's output is evaluated before its weights are dropped.
"""
import functools
import importlib
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.base import create_attention_mask, create_causal_mask
from mlx_lm.models.cache import KVCache, RotatingKVCache

from airmlx.archs import arch_for, expert_index, layer_types, rope_config
from airmlx.errors import BackendError
from airmlx.quant import module_params

from . import mlx_adapters, mlx_experts
from .base import available_ram, check_placement

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


@dataclass(frozen=True)
class MLXArch:
    """How mlx-lm runs an architecture, and the workarounds its modules need here."""
    module: str  # mlx_lm.models.<module>
    sanitize: bool = True  # run mlx-lm's sanitize on each stage (False where it mutates the model)
    mask_array: bool = False  # the attention needs a mask array, not the "causal" shortcut
    # zero left-padded positions before each layer: its attention also reads the position before (a
    # convolution), so padding would leak into a row's first token
    zero_padding: bool = False
    experts: str = None  # MoE: the SwitchGLU in a layer
    expert_names: tuple = ()  # (checkpoint projection, SwitchGLU projection) where they differ
    config_aliases: tuple = ()  # (ModelArgs key, HF config key) where transformers renamed a key mlx-lm reads


MLX_ARCHS = {
    "llama": MLXArch("llama"),
    "mistral": MLXArch("llama"),  # mlx-lm runs mistral checkpoints with its llama module
    "qwen2": MLXArch("qwen2"),
    "qwen3": MLXArch("qwen3"),
    "phi3": MLXArch("phi3"),
    "glm4": MLXArch("glm4"),
    "mixtral": MLXArch("mixtral", experts="block_sparse_moe.switch_mlp",
                       expert_names=(("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj"))),
    "qwen2_moe": MLXArch("qwen2_moe", experts="mlp.switch_mlp"),
    "qwen3_moe": MLXArch("qwen3_moe", experts="mlp.switch_mlp", config_aliases=(("num_experts", "num_local_experts"),)),
    # mlx-lm's gemma2 module has no sliding window of its own: its sliding layers get a RotatingKVCache and
    # a windowed mask here
    "gemma2": MLXArch("gemma2", mask_array=True),
    "gemma3_text": MLXArch("gemma3_text", sanitize=False),
    "internlm2": MLXArch("internlm2"),
    "internlm3": MLXArch("internlm3"),
    "qwen": MLXArch("qwen"),
    # key/value convolution over neighbouring positions (mlx-lm keeps its state in the layer's CacheList)
    "baichuan_m1": MLXArch("baichuan_m1", zero_padding=True),
}


@dataclass
class MLXStage:
    kind: str
    names: list  # parameter paths swapped in
    nbytes: int
    module: object = None  # the block, for layer stages; the tied embedding, for a tied head
    layer: int = None


@dataclass
class MLXStep:
    tokens: mx.array
    mask: object
    cache: list
    all_positions: bool = False
    sliding_mask: object = None  # for sliding-window layers
    valid: mx.array = None  # (B, L, 1), False at left-padded positions: zeroed before each layer (mlx_zero_padding)


def mlx_args(config, module):
    """mlx-lm ModelArgs from an HF config, reading rope settings where transformers 5 puts them."""
    cfg = dict(config)
    theta, scaling = rope_config(config)
    params = config.get("rope_parameters") or {}
    if "partial_rotary_factor" in params:  # transformers 5 moved it into rope_parameters
        cfg.setdefault("partial_rotary_factor", params["partial_rotary_factor"])
    if theta is not None:
        cfg["rope_theta"] = theta
    local = params.get("sliding_attention", {}).get("rope_theta")
    if local is not None:  # gemma3: the sliding layers' own rope base
        cfg.setdefault("rope_local_base_freq", local)
    types = layer_types(config)
    if "full_attention" in types and "sliding_attention" in types:  # mlx-lm gemma3 wants it as a period
        cfg.setdefault("sliding_window_pattern", types.index("full_attention") + 1)
    cfg["rope_scaling"] = scaling
    cfg.setdefault("tie_word_embeddings", False)
    for mlx_key, hf_key in MLX_ARCHS[config["model_type"]].config_aliases:
        if hf_key in cfg:
            cfg.setdefault(mlx_key, cfg[hf_key])
    return module.ModelArgs.from_dict(cfg)


class MLXBackend:
    name = "mlx"
    zero_copy = False

    def __init__(self, manifest, device=None, dtype=None, trust_remote_code=False, code_dir=None):
        """trust_remote_code and code_dir are the torch backend's: mlx-lm has a module for every family."""
        config = manifest.config
        if device is not None:
            if device not in ("gpu", "cpu"):
                raise BackendError(f"device {device!r} is not an MLX device; use 'gpu' or 'cpu'.")
            mx.set_default_device(mx.gpu if device == "gpu" else mx.cpu)
        if dtype is not None and dtype not in DTYPES:
            raise BackendError(f"dtype {dtype!r} is not supported; use one of {sorted(DTYPES)}.")
        self.dtype = DTYPES.get(dtype)
        self.arch = arch_for(config)
        self.mlx_arch = MLX_ARCHS[config["model_type"]]
        module = importlib.import_module(f"mlx_lm.models.{self.mlx_arch.module}")
        self.args = mlx_args(config, module)
        self.skeleton = module.Model(self.args)
        self.qconfig = config.get("quantization")
        if self.qconfig:  # quantised modules are those whose .scales the shards carry (mlx-lm's rule)
            names = {t for s in manifest.stages for t in s.tensors}
            if self.arch.experts:  # streamed experts stack into the SwitchGLU: it is quantised if they are
                names |= {mlx_experts.switch_name(self, n) for n in names if expert_index(self.arch, n) is not None}

            def quantized(path, m):
                if isinstance(self.qconfig.get(path), (bool, dict)):
                    return self.qconfig[path]
                return hasattr(m, "to_quantized") and f"{path}.scales" in names

            nn.quantize(self.skeleton, self.qconfig.get("group_size", 64), self.qconfig["bits"],
                        mode=self.qconfig.get("mode", "affine"), class_predicate=quantized)
        self.placeholders = dict(tree_flatten(self.skeleton.parameters()))
        self.num_layers = len(self.skeleton.layers)
        self.sliding = [t == "sliding_attention" for t in layer_types(config)]
        self.window = config.get("sliding_window")
        self.softcap = config.get("final_logit_softcapping") if self.arch.final_softcap else None
        self._cache_limit = 0

    def from_raw(self, raw):
        a = mx.array(raw.data)
        if raw.dtype == "BF16":
            a = a.view(mx.bfloat16)
        if self.dtype is not None and mx.issubdtype(a.dtype, mx.floating):
            a = a.astype(self.dtype)
        return a

    def sanitize(self, arrays, layer):
        """mlx-lm's own sanitize on one stage (e.g. per-expert MoE weights -> stacked SwitchGLU weights).
        Some sanitizers look for layer 0's keys only, so a layer stage goes through as layer 0."""
        if not (self.mlx_arch.sanitize and hasattr(self.skeleton, "sanitize")):
            return arrays
        if layer is None:
            return self.skeleton.sanitize(arrays)
        ours, zero = f"{self.arch.layers}.{layer}.", f"{self.arch.layers}.0."
        out = self.skeleton.sanitize({zero + k[len(ours):] if k.startswith(ours) else k: a for k, a in arrays.items()})
        return {ours + k[len(zero):] if k.startswith(zero) else k: a for k, a in out.items()}

    def load_stage(self, entry, tensors):
        layer = entry.layer
        arrays = {name: self.from_raw(raw) for name, raw in tensors.items()}
        nbytes = sum(a.nbytes for a in arrays.values())
        if nbytes > self._cache_limit:  # keep freed stage buffers for reuse instead of reallocating
            self._cache_limit = 2 * nbytes
            mx.set_cache_limit(max(self._cache_limit, mx.get_cache_memory()))
        module = None
        embed = self.arch.embed_prefix
        if entry.kind == "head" and f"{self.arch.head}.weight" not in arrays:  # tied: the head is the embedding
            tied = {k[len(embed):]: arrays.pop(k) for k in list(arrays) if k.startswith(embed)}
            if "scales" in tied:
                gs, bits = module_params(self.qconfig, self.arch.embed)
                module = nn.QuantizedEmbedding(tied["scales"].shape[0], tied["scales"].shape[1] * gs, gs, bits)
            else:
                module = nn.Embedding(*tied["weight"].shape)
            module.update(tied)
        arrays = self.sanitize(arrays, layer)
        for n, a in arrays.items():
            placeholder = self.placeholders.get(n)
            check_placement(entry, n, a.shape, None if placeholder is None else placeholder.shape,
                            f"mlx-lm's {type(self.skeleton).__module__}")
        self.skeleton.load_weights(list(arrays.items()), strict=False)
        mx.eval(list(arrays.values()))
        if entry.kind == "layer":
            module = self.skeleton.layers[layer]
        return MLXStage(entry.kind, list(arrays), nbytes, module, layer)

    def free_stage(self, stage):
        self.skeleton.load_weights([(n, self.placeholders[n]) for n in stage.names], strict=False)
        stage.names, stage.module = [], None

    # -- routed experts (MoE): backends/mlx_experts.py --------------------------------------------
    def stream_experts(self, layers, chunks):
        mlx_experts.stream_experts(self, layers, chunks)

    def load_expert(self, entry, expert, tensors):
        return mlx_experts.load_expert(self, entry, tensors)

    def free_expert(self, loaded):
        pass  # the arrays go with the cache's last reference

    def new_cache(self, batch_size, left_padding):
        pads = list(left_padding)
        if hasattr(self.skeleton, "make_cache"):  # mlx-lm's own: sliding windows, convolution states
            caches = self.skeleton.make_cache()
        else:  # sliding-window layers keep a RotatingKVCache of the window, as mlx-lm's gemma3 make_cache does
            caches = [RotatingKVCache(max_size=self.window) if s else KVCache() for s in self.sliding]
        batch = batch_size > 1 or any(pads)
        return [mlx_adapters.batched(c, pads if batch else None) for c in caches]

    def cache_length(self, cache):
        return mlx_adapters.length(cache[0])

    def trim_cache(self, cache, keep):
        # per layer: a sweep cut short (Ctrl-C) leaves layers holding different lengths
        for c in cache:
            mlx_adapters.trim(c, keep)

    def cache_bytes(self, cache):
        return sum(a.nbytes for c in cache for a in mlx_adapters.arrays(c))

    def begin_step(self, tokens, attention_mask, cache, all_positions=False):
        ids = mx.array(tokens.astype("int32"))
        array = self.mlx_arch.mask_array
        if cache is None:  # one sweep, nothing kept (scoring): the mask carries the left padding itself
            pads = np.argmax(np.asarray(attention_mask) != 0, axis=1)

            def mask(window=None):
                if pads.any():
                    return create_causal_mask(ids.shape[1], window_size=window, left_padding=mx.array(pads))
                return create_attention_mask(ids, window_size=window, return_array=array)
            step = MLXStep(ids, mask(), None, all_positions, mask(self.window) if any(self.sliding) else None)
        else:  # the batch caches already know each row's left padding; the mask is not needed again
            kv = [mlx_adapters.kv_part(c) for c in cache]
            full = next((c for c, s in zip(kv, self.sliding) if not s), kv[0])
            step = MLXStep(ids, create_attention_mask(ids, full, return_array=array), cache, all_positions)
            if any(self.sliding):
                swa = kv[self.sliding.index(True)]
                step.sliding_mask = create_attention_mask(ids, swa, window_size=self.window, return_array=array)
        valid = np.asarray(attention_mask)[:, -ids.shape[1]:] != 0
        if self.mlx_arch.zero_padding and not valid.all():
            step.valid = mx.array(valid)[..., None]
        return step

    def select_rows(self, cache, rows):
        for c in cache:
            c.filter(mx.array(rows))

    def _module(self, path):
        return functools.reduce(getattr, path.split("."), self.skeleton)

    def _grouped(self, mask):
        # mlx-lm's gemma2 attention scores are (B, kv_heads, repeats, L, K): a per-row (B, 1, L, K) mask
        # would broadcast B against kv_heads, so it gets the repeats axis
        if self.mlx_arch.mask_array and isinstance(mask, mx.array) and mask.ndim == 4 and \
                self.args.num_attention_heads != self.args.num_key_value_heads:
            return mask[:, :, None]
        return mask

    def run_stage(self, stage, x, step):
        if stage.kind == "embed":
            x = self._module(self.arch.embed)(step.tokens)
            if self.arch.embed_scale:
                x = x * mx.array(self.args.hidden_size ** 0.5, x.dtype)
            mx.eval(x)
        elif stage.kind == "layer":
            cache = step.cache[stage.layer] if step.cache is not None else None
            if step.valid is not None:
                x = mx.where(step.valid, x, 0.0)
            x = stage.module(x, self._grouped(step.sliding_mask if self.sliding[stage.layer] else step.mask),
                             cache=cache)
            # nothing lazy may keep weights alive
            mx.eval(x, *(mlx_adapters.arrays(cache) if cache is not None else ()))
        else:
            h = self._module(self.arch.norm)(x if step.all_positions else x[:, -1:, :])
            x = stage.module.as_linear(h) if stage.module is not None else self._module(self.arch.head)(h)
            if self.softcap:
                x = mx.tanh(x / self.softcap) * self.softcap
            mx.eval(x)
        return x

    def logits(self, x):
        return np.array(x.astype(mx.float32))

    def memory(self):
        return {"active": mx.get_active_memory(), "peak": mx.get_peak_memory()}

    def reset_peak(self):
        mx.reset_peak_memory()

    def available_memory(self):
        if mx.metal.is_available():
            return mx.metal.device_info()["max_recommended_working_set_size"] - mx.get_active_memory()
        return available_ram()
