"""MLX backend: stages are mlx-lm's own modules (TransformerBlock, KVCache/BatchKVCache, masks).

The mlx-lm model is built once; its random-initialised parameters stay lazy and are never evaluated,
so the skeleton costs no memory. Loading a stage swaps real arrays in; freeing swaps the lazy
placeholders back, and every stage's output is evaluated before its weights are dropped.
"""
import importlib
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import BatchKVCache, KVCache

from airmlx.archs import arch_for, rope_config
from airmlx.errors import BackendError, CheckpointError
from airmlx.quant import module_params

from .base import available_ram

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
RAW_TO_MX = {"F32": mx.float32, "F16": mx.float16, "BF16": mx.bfloat16, "U32": mx.uint32, "I32": mx.int32,
             "I64": mx.int64, "U8": mx.uint8, "I8": mx.int8, "BOOL": mx.bool_}


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


def mlx_args(config, module):
    """mlx-lm ModelArgs from an HF config, reading rope settings where transformers 5 puts them."""
    cfg = dict(config)
    theta, scaling = rope_config(config)
    if theta is not None:
        cfg["rope_theta"] = theta
    cfg["rope_scaling"] = scaling
    cfg.setdefault("tie_word_embeddings", False)
    return module.ModelArgs.from_dict(cfg)


class MLXBackend:
    name = "mlx"
    zero_copy = False

    def __init__(self, config, device=None, dtype=None, tensor_names=()):
        if device is not None:
            if device not in ("gpu", "cpu"):
                raise BackendError(f"device {device!r} is not an MLX device; use 'gpu' or 'cpu'.")
            mx.set_default_device(mx.gpu if device == "gpu" else mx.cpu)
        if dtype is not None and dtype not in DTYPES:
            raise BackendError(f"dtype {dtype!r} is not supported; use one of {sorted(DTYPES)}.")
        self.dtype = DTYPES.get(dtype)
        module = importlib.import_module(f"mlx_lm.models.{arch_for(config).mlx_module}")
        self.args = mlx_args(config, module)
        self.skeleton = module.Model(self.args)
        self.qconfig = config.get("quantization")
        if self.qconfig:  # quantised modules are those whose .scales the shards carry (mlx-lm's rule)
            names = set(tensor_names)

            def quantized(path, m):
                if isinstance(self.qconfig.get(path), (bool, dict)):
                    return self.qconfig[path]
                return hasattr(m, "to_quantized") and f"{path}.scales" in names

            nn.quantize(self.skeleton, self.qconfig.get("group_size", 64), self.qconfig["bits"],
                        mode=self.qconfig.get("mode", "affine"), class_predicate=quantized)
        self.placeholders = dict(tree_flatten(self.skeleton.parameters()))
        self.num_layers = len(self.skeleton.layers)
        self._cache_limit = 0

    def _array(self, raw):
        a = mx.array(raw.data)
        if raw.dtype == "BF16":
            a = a.view(mx.bfloat16)
        if self.dtype is not None and mx.issubdtype(a.dtype, mx.floating):
            a = a.astype(self.dtype)
        return a

    def load_stage(self, entry, tensors):
        arrays = {name: self._array(raw) for name, raw in tensors.items()}
        nbytes = sum(a.nbytes for a in arrays.values())
        if nbytes > self._cache_limit:  # keep freed stage buffers for reuse instead of reallocating
            self._cache_limit = 2 * nbytes
            mx.set_cache_limit(max(self._cache_limit, mx.get_cache_memory()))
        module, layer = None, None
        if entry.kind == "head" and "lm_head.weight" not in arrays:  # tied: the head is the embedding
            tied = {k[len("model.embed_tokens."):]: arrays.pop(k) for k in list(arrays)
                    if k.startswith("model.embed_tokens.")}
            if "scales" in tied:
                gs, bits = module_params(self.qconfig, "model.embed_tokens")
                module = nn.QuantizedEmbedding(tied["scales"].shape[0], tied["scales"].shape[1] * gs, gs, bits)
            else:
                module = nn.Embedding(*tied["weight"].shape)
            module.update(tied)
        unknown = [n for n in arrays if n not in self.placeholders]
        if unknown:
            raise CheckpointError(f"stage {entry.name}: tensors {unknown[:3]} have no place in mlx-lm's "
                                  f"{type(self.skeleton).__module__}; the checkpoint does not match its config.")
        for n, a in arrays.items():
            if a.shape != self.placeholders[n].shape:
                raise CheckpointError(f"stage {entry.name}: tensor {n!r} has shape {a.shape}, the config implies "
                                      f"{self.placeholders[n].shape}; the checkpoint does not match its config.")
        self.skeleton.load_weights(list(arrays.items()), strict=False)
        mx.eval(list(arrays.values()))
        if entry.kind == "layer":
            layer = int(entry.name.split(".")[1])
            module = self.skeleton.layers[layer]
        return MLXStage(entry.kind, list(arrays), nbytes, module, layer)

    def free_stage(self, stage):
        self.skeleton.load_weights([(n, self.placeholders[n]) for n in stage.names], strict=False)
        stage.names, stage.module = [], None

    def new_cache(self, batch_size, left_padding):
        if batch_size == 1 and not any(left_padding):
            return [KVCache() for _ in range(self.num_layers)]
        return [BatchKVCache(list(left_padding)) for _ in range(self.num_layers)]

    def cache_length(self, cache):
        return int(cache[0].offset) if isinstance(cache[0], KVCache) else int(cache[0]._idx)

    def trim_cache(self, cache, keep):
        # per layer: a sweep cut short (Ctrl-C) leaves layers holding different lengths
        for c in cache:
            length = int(c.offset) if isinstance(c, KVCache) else int(c._idx)
            if length > keep:
                c.trim(length - keep)

    def cache_bytes(self, cache):
        return sum(c.keys.nbytes + c.values.nbytes for c in cache if c.keys is not None)

    def begin_step(self, tokens, attention_mask, cache, all_positions=False):
        # BatchKVCache already knows each row's left padding; the mask is not needed again
        ids = mx.array(tokens.astype("int32"))
        return MLXStep(ids, create_attention_mask(ids, cache[0]), cache, all_positions)

    def run_stage(self, stage, x, step):
        model = self.skeleton
        if stage.kind == "embed":
            x = model.model.embed_tokens(step.tokens)
            mx.eval(x)
        elif stage.kind == "layer":
            cache = step.cache[stage.layer]
            x = stage.module(x, step.mask, cache=cache)
            mx.eval(x, cache.keys, cache.values)  # nothing lazy may keep this stage's weights alive
        else:
            h = model.model.norm(x if step.all_positions else x[:, -1:, :])
            x = stage.module.as_linear(h) if stage.module is not None else model.lm_head(h)
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
