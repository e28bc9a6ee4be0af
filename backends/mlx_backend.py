"""MLX backend: stages are mlx-lm's own modules (TransformerBlock, KVCache/BatchKVCache, masks).

The mlx-lm model is built once; its random-initialised parameters stay lazy and are never evaluated,
so the skeleton costs no memory. Loading a stage swaps real arrays in; freeing swaps the lazy
placeholders back, and every stage's output is evaluated before its weights are dropped.
"""
import dataclasses
import functools
import importlib
import math
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.base import create_attention_mask, create_causal_mask
from mlx_lm.models.cache import KVCache

from airmlx.archs import arch_for, expert_index, layer_types, renamed
from airmlx.errors import BackendError
from airmlx.plan import SCORE_LOGITS
from airmlx.quant import module_params
from airmlx.tensorfile import DTYPE_SIZES

from . import mlx_adapters, mlx_batching, mlx_experts
from .base import available_ram, check_complete, check_placement, check_positions, kept_tail, position_table, with_layer_types
from .mlx_archs import MLX_ARCHS, MLX_LIMITS, mlx_args, rotate_part_of_heads, routing_bias, untruncated_yarn

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
RAW_DTYPES = {"F32": mx.float32, "F16": mx.float16, "BF16": mx.bfloat16, "F64": mx.float64, "U32": mx.uint32,
              "U16": mx.uint16, "U8": mx.uint8, "I64": mx.int64, "I32": mx.int32, "I16": mx.int16, "I8": mx.int8,
              "U64": mx.uint64, "BOOL": mx.bool_}
FLOATS = ("F32", "F16", "BF16", "F64")


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
    attention_mask: np.ndarray  # over past + new tokens
    cache: list
    all_positions: bool = False
    targets: mx.array = None  # scoring: (B, T) token ids; the head returns their log-probabilities
    masks: dict = field(default_factory=dict)  # per layer type, made when a layer of that type first runs
    valid: mx.array = None  # (B, L, 1), False at left-padded positions: zeroed before each layer (zero_padding)
    attend: mx.array = None  # tree attention: (B, 1, L, past + L) bool, for every layer
    positions: np.ndarray = None  # tree attention: (L,) each token's position


class MLXBackend:
    """Stages are read straight into MLX arrays (allocate) and loaded as views of them: no copy, unless a
    dtype= asks for a conversion."""
    name = "mlx"
    counts_buffers = True  # the store's read buffers are MLX arrays: memory() counts them
    page_cache_views = False

    def __init__(self, manifest, device=None, dtype=None, trust_remote_code=False, code_dir=None):
        """trust_remote_code and code_dir are the torch backend's: mlx-lm has a module for every family."""
        config = with_layer_types(manifest.config)
        if device is not None:
            if device not in ("gpu", "cpu"):
                raise BackendError(f"device {device!r} is not an MLX device; use 'gpu' or 'cpu'.")
            if device == "gpu" and not mx.is_available(mx.gpu):
                raise BackendError("this MLX build has no GPU (Linux's mlx[cpu]); use device='cpu' or leave device "
                                   "out.")
            mx.set_default_device(mx.gpu if device == "gpu" else mx.cpu)
        if dtype is not None and dtype not in DTYPES:
            raise BackendError(f"dtype {dtype!r} is not supported; use one of {sorted(DTYPES)}.")
        self.dtype = DTYPES.get(dtype)
        self.zero_copy = self.dtype is None  # loaded stages are views of their read buffers
        mx.reset_peak_memory()  # the process's peak: an earlier model's is not this one's
        stored = str(config.get("dtype") or config.get("torch_dtype") or "bfloat16").replace("torch.", "")
        self.itemsize = (self.dtype or DTYPES.get(stored, mx.bfloat16)).size  # of activations and KV caches
        self.arch = arch_for(config)
        self.mlx_arch = MLX_ARCHS[config["model_type"]]
        self.position_table = position_table(self.arch, config)
        # where the stages' modules sit in mlx-lm's model (the checkpoint's paths, renamed where mlx-lm's differ)
        self.paths = dataclasses.replace(self.arch, **{k: self.mlx_name(getattr(self.arch, k) + ".")[:-1]
                                                       for k in ("embed", "positions", "layers", "norm", "head")
                                                       if getattr(self.arch, k)})
        module = importlib.import_module(f"mlx_lm.models.{self.mlx_arch.module}")
        limit = MLX_LIMITS.get(config["model_type"], lambda _: None)(config)
        if limit:
            raise BackendError(f"mlx-lm's {self.mlx_arch.module} module has {limit}; use backend='torch'.")
        try:
            self.args = mlx_args(config, module)
            self.skeleton = module.Model(self.args)
        except (TypeError, ValueError, KeyError, IndexError, ZeroDivisionError) as e:  # a config mlx-lm cannot build
            raise BackendError(f"mlx-lm's {self.mlx_arch.module} module cannot be built from this config.json "
                               f"({type(e).__name__}: {str(e)[:200]}); try backend='torch'.") from None
        if self.mlx_arch.partial_rotary:
            rotate_part_of_heads(self.skeleton, config, self.mlx_arch.partial_rotary)
        untruncated_yarn(self.skeleton, config)
        if self.mlx_arch.routing_bias:
            routing_bias(self.skeleton, config, self.mlx_arch.routing_bias)
        # a checkpoint mlx-lm wrote has no routing bias (its sanitize drops it): it routes with zeros, as mlx-lm
        self.unbiased = self.mlx_arch.routing_bias if manifest.extra.get("written_by") == "mlx-lm" else None
        self.qconfig = config.get("quantization")
        if self.qconfig:  # quantised modules are those whose .scales the shards carry (mlx-lm's rule)
            names = {self.mlx_name(t) for s in manifest.stages for t in s.tensors}
            if self.arch.experts:  # streamed experts stack into the SwitchGLU: it is quantised if they are
                names |= {mlx_experts.switch_name(self, n) for n in names if expert_index(self.arch, n) is not None}

            def quantized(path, m):
                if isinstance(self.qconfig.get(path), (bool, dict)):
                    return self.qconfig[path]
                return hasattr(m, "to_quantized") and f"{path}.scales" in names

            nn.quantize(self.skeleton, self.qconfig.get("group_size", 64), self.qconfig["bits"],
                        mode=self.qconfig.get("mode", "affine"), class_predicate=quantized)
        self.placeholders = dict(tree_flatten(self.skeleton.parameters()))
        self.complete = set()  # stages whose tensors were found to fill every parameter their modules have
        # arrays the modules compute for themselves (rotary frequencies) are lazy on this thread's stream:
        # evaluated now, so any thread can run the model later
        mx.eval([v for m in self.skeleton.modules() for k, v in m.items()
                 if isinstance(v, mx.array) and k.startswith("_")])
        self.num_layers = len(self.skeleton.layers)
        self.sliding = [t == "sliding_attention" for t in layer_types(config)]
        self.window = config.get("sliding_window")
        self.softcap = config.get("final_logit_softcapping") if self.arch.final_softcap else None
        self.embed_multiplier, self.logit_multiplier, self.logit_divisor = (
            getattr(self.args, key) if key else None
            for key in (self.arch.embed_multiplier, self.arch.logit_multiplier, self.arch.logit_divisor))
        mx.set_cache_limit(0)  # freed buffers go back at once until the model says what scratch may stay

    # -- memory ------------------------------------------------------------------------------------
    def allocate(self, nbytes):
        """A read buffer in MLX memory: (the array, a writable numpy view of it)."""
        owner = mx.zeros((nbytes,), dtype=mx.uint8)
        mx.eval(owner)
        return owner, np.array(owner, copy=False)

    def footprint(self, entry, infos):
        """(bytes a loaded stage holds, bytes while it loads): its read buffer, which the arrays view, and
        whatever a dtype conversion makes."""
        if self.zero_copy or entry.kind == "experts" and mlx_experts.widened_when_stacked(self, infos):
            return entry.nbytes, entry.nbytes, entry.nbytes
        made = sum(math.prod(i.shape) * self.dtype.size if i.dtype in FLOATS else i.nbytes for i in infos.values())
        return made, entry.nbytes + made, entry.nbytes

    def quantized_widening(self, infos, itemsize):
        # mx.quantized_matmul casts scales and biases stored narrower than its input to the input's dtype, anew
        # at each call: 7.1 MB for SmolLM2's 8-bit head (49152 x 18 float16 scales and biases) in float32
        return max((2 * math.prod(i.shape) * itemsize for n, i in infos.items()
                    if n.endswith(".scales") and i.dtype in FLOATS and DTYPE_SIZES[i.dtype] < itemsize), default=0)

    def copy_layout(self, store, streamed):
        return None  # MLX reads the stage files as they are

    def use_copies(self, stages) -> None:
        pass

    def keeps_views(self, entry) -> bool:
        return self.zero_copy

    def set_scratch(self, nbytes):
        # Metal allocations are slow, so freed buffers up to the activation bound stay cached for reuse; the
        # CPU's come from malloc, which the cache would only hide from the count
        mx.set_cache_limit(int(nbytes) if mx.default_device().type == mx.gpu else 0)

    @staticmethod
    def draft_dtype(device=None) -> "str | None":
        """The dtype a draft model computes in unless told: the checkpoint's."""
        return None

    def memory(self):
        return {"active": mx.get_active_memory() + mx.get_cache_memory(),
                "peak": mx.get_peak_memory() + mx.get_cache_memory()}

    def reset_peak(self):
        mx.reset_peak_memory()

    def available_memory(self):
        if mx.metal.is_available():
            return mx.metal.device_info()["max_recommended_working_set_size"] - mx.get_active_memory()
        return available_ram()

    # -- stages ------------------------------------------------------------------------------------
    def prepare(self, entry, tensors):
        return tensors  # the arrays view the read buffer as it is

    def from_raw(self, raw):
        a = self.as_stored(raw)
        if self.zero_copy:
            return a
        if self.dtype is not None and mx.issubdtype(a.dtype, mx.floating) and a.dtype != self.dtype:
            return a.astype(self.dtype)  # converted straight from the buffer, no copy in between
        # (astype to the dtype a tensor has is the tensor itself, a view of a buffer the pool then refills)
        if self._viewed(raw):  # a copy: the read buffer goes back to the pool right after loading
            a = mx.array(raw.data).view(a.dtype)
        return a

    def as_stored(self, raw):
        """A raw tensor in its stored dtype: a view of the read buffer (which it keeps), or a copy."""
        if self._viewed(raw):
            return raw.owner[raw.offset: raw.offset + raw.nbytes].view(RAW_DTYPES[raw.dtype]).reshape(raw.shape)
        a = mx.array(raw.data)
        return a.view(mx.bfloat16) if raw.dtype == "BF16" else a

    @staticmethod
    def _viewed(raw):
        return isinstance(raw.owner, mx.array) and raw.dtype in RAW_DTYPES

    def sanitize(self, arrays, layer):
        """mlx-lm's own sanitize on one stage (e.g. per-expert MoE weights -> stacked SwitchGLU weights).
        Some sanitizers look for layer 0's keys only, so a layer stage goes through as layer 0."""
        if not (self.mlx_arch.sanitize and hasattr(self.skeleton, "sanitize")):
            return arrays
        bias = self.mlx_arch.routing_bias  # kept past a sanitize that drops it
        kept = {k: arrays.pop(k) for k in list(arrays) if k.endswith("." + bias)} if bias else {}
        if layer is None or self.mlx_arch.sanitize_numbered:
            return {**self.skeleton.sanitize(arrays), **kept}
        ours, zero = f"{self.paths.layers}.{layer}.", f"{self.paths.layers}.0."
        out = self.skeleton.sanitize({zero + k[len(ours):] if k.startswith(ours) else k: a for k, a in arrays.items()})
        return {**{ours + k[len(zero):] if k.startswith(zero) else k: a for k, a in out.items()}, **kept}

    def load_stage(self, entry, tensors):
        layer = entry.layer
        arrays = {self.mlx_name(name): self.from_raw(raw) for name, raw in tensors.items()}
        nbytes = sum(a.nbytes for a in arrays.values())
        module = None
        embed = self.paths.embed_prefix
        if entry.kind == "head" and f"{self.paths.head}.weight" not in arrays:  # tied: the head is the embedding
            tied = {k[len(embed):]: arrays.pop(k) for k in list(arrays) if k.startswith(embed)}
            if "scales" in tied:
                gs, bits = module_params(self.qconfig, self.arch.embed)
                module = nn.QuantizedEmbedding(tied["scales"].shape[0], tied["scales"].shape[1] * gs, gs, bits)
            else:
                module = nn.Embedding(*tied["weight"].shape)
            module.update(tied)
            mx.eval(module.parameters())
        arrays = self.sanitize(arrays, layer)
        for n, a in arrays.items():
            placeholder = self.placeholders.get(n)
            check_placement(entry, n, a.shape, None if placeholder is None else placeholder.shape,
                            f"mlx-lm's {type(self.skeleton).__module__}")
        if entry.name not in self.complete:
            check_complete(entry, arrays, self.owned(entry, tied=module is not None),
                           f"mlx-lm's {type(self.skeleton).__module__}")
            self.complete.add(entry.name)
        self.skeleton.load_weights(list(arrays.items()), strict=False)
        mx.eval(list(arrays.values()))
        if entry.kind == "layer":
            module = self.skeleton.layers[layer]
        return MLXStage(entry.kind, list(arrays), nbytes, module, layer)

    def owned(self, entry, tied=False):
        """The skeleton's parameters a stage fills: its layer's (less the routed experts, read apart), or the
        final norm's and the head's (unless the head is the embedding: its own module, made in load_stage)."""
        if entry.kind == "layer":
            prefixes = (f"{self.paths.layer_prefix}{entry.layer}.",)
            experts = f"{prefixes[0]}{self.arch.stacked_experts}." if self.arch.experts else None
        elif entry.kind == "head":
            prefixes, experts = (f"{self.paths.norm}.",) + (() if tied else (f"{self.paths.head}.",)), None
        else:
            return []
        return [n for n in self.placeholders if n.startswith(prefixes) and not (experts and n.startswith(experts))
                and not (self.unbiased and n.endswith("." + self.unbiased))]

    def free_stage(self, stage):
        self.skeleton.load_weights([(n, self.placeholders[n]) for n in stage.names], strict=False)
        stage.names, stage.module = [], None

    # -- routed experts (MoE): backends/mlx_experts.py --------------------------------------------
    def stream_experts(self, layers, chunks):
        mlx_experts.stream_experts(self, layers, chunks)

    def load_expert(self, entry, expert, tensors):
        return mlx_experts.load_expert(self, entry, tensors)

    def expert_order(self, entry, expert):
        return None  # as the file lays them out: the stacked copy is made at compute time (mlx_experts.py)

    def expert_stacking(self, infos):
        return mlx_experts.stacking(self, infos)

    def free_expert(self, loaded):
        pass  # the arrays go with the cache's last reference

    # -- caches ------------------------------------------------------------------------------------
    def new_cache(self, batch_size, left_padding):
        """mlx-lm's own caches (its model's make_cache: convolution states), with this model's sliding-window
        layers in RotatingKVCaches that keep TRIM_SLACK tokens beyond the window, so a cache can be rolled
        back that far exactly."""
        pads = list(left_padding)
        caches = self.skeleton.make_cache() if hasattr(self.skeleton, "make_cache") else \
            [KVCache() for _ in range(self.num_layers)]
        caches = [mlx_adapters.windowed(c, self.window) if s else c for c, s in zip(caches, self.sliding)]
        batch = batch_size > 1 or any(pads)
        return mlx_adapters.Caches(mlx_adapters.batched(c, pads if batch else None) for c in caches)

    def cache_length(self, cache):
        return mlx_adapters.length(cache[0])

    def trim_cache(self, cache, keep):
        # per layer: a sweep cut short (Ctrl-C) leaves layers holding different lengths
        for c in cache:
            mlx_adapters.check_trim(c, keep, self.window)
        for c in cache:
            mlx_adapters.trim(c, keep)

    def cache_bytes(self, cache):
        return sum(a.nbytes for c in cache for a in mlx_adapters.arrays(c))

    def drop_cache_layer(self, cache, layer):
        mlx_adapters.empty_layer(cache[layer])

    def select_rows(self, cache, rows):
        for c in cache:
            mlx_adapters.select_rows(c, mx.array(rows))

    # -- steps -------------------------------------------------------------------------------------
    def begin_step(self, tokens, attention_mask, cache, all_positions=False, targets=None, attend=None,
                   positions=None):
        check_positions(self.position_table, attention_mask, positions)
        ids = mx.array(tokens.astype("int32"))
        step = MLXStep(ids, np.asarray(attention_mask), cache, all_positions or targets is not None,
                       None if targets is None else mx.array(np.asarray(targets).astype("int32")))
        if attend is not None:
            step.attend, step.positions = mx.array(np.asarray(attend, dtype=bool))[:, None], np.asarray(positions)[0]
        valid = step.attention_mask[:, -ids.shape[1]:] != 0
        if self.mlx_arch.zero_padding and not valid.all():
            step.valid = mx.array(valid)[..., None]
        return step

    def _mask(self, step, layer):
        """The attention mask of this step for the layer's type, made when a layer of that type first runs:
        from that layer's own cache, which then holds exactly the tokens before this step's (a long prompt
        runs in chunks, each chunk through a layer before the next)."""
        sliding = self.sliding[layer]
        if step.attend is not None:
            return step.attend
        if sliding not in step.masks:
            window = self.window if sliding else None
            array = self.mlx_arch.mask_array
            if step.cache is None:  # one sweep, nothing kept (scoring): the mask carries the left padding itself
                pads = np.argmax(step.attention_mask != 0, axis=1)
                if pads.any():
                    mask = create_causal_mask(step.tokens.shape[1], window_size=window, left_padding=mx.array(pads))
                else:
                    mask = create_attention_mask(step.tokens, window_size=window, return_array=array)
            else:  # the batch caches already know each row's left padding
                kv = mlx_adapters.kv_part(step.cache[layer])
                mask = create_attention_mask(step.tokens, kv, window_size=window, return_array=array)
            step.masks[sliding] = self._grouped(mask)
        return step.masks[sliding]

    @staticmethod
    def _positions(step):
        """(B, T) positions of this step's tokens: a tree's own, else each row's count of tokens before them (left
        padding not counted, as transformers counts them)."""
        if step.positions is not None:
            return step.positions[None]
        before = np.cumsum(step.attention_mask != 0, axis=1) - 1
        return np.maximum(before, 0)[:, -step.tokens.shape[1]:].astype(np.int32)

    def mlx_name(self, name: str) -> str:
        """A checkpoint tensor's name as mlx-lm's model names it (Arch.mlx_names): tensors are renamed so as they
        load, and modules are found by mlx-lm's names."""
        return renamed(name, self.arch.mlx_names)

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
            x = self._module(self.paths.embed)(step.tokens)
            if self.arch.positions:
                x = x + self._module(self.paths.positions)(mx.array(self._positions(step)))
            if self.arch.embed_scale:
                x = x * mx.array(self.args.hidden_size ** 0.5, x.dtype)
            if self.embed_multiplier is not None:
                x = x * self.embed_multiplier
            mx.eval(x)
        elif stage.kind == "layer":
            cache = step.cache[stage.layer] if step.cache is not None else None
            if step.valid is not None:
                x = mx.where(step.valid, x, 0.0)
            with mlx_adapters.explicit_positions(stage.module, step.positions):
                x = stage.module(x, mask=self._mask(step, stage.layer), cache=cache)
            # nothing lazy may keep weights alive
            mx.eval(x, *(mlx_adapters.arrays(cache) if cache is not None else ()))
        elif step.targets is not None:
            x = self._score(stage, x, step.targets)
        else:
            x = self._head(stage, x if step.all_positions else x[:, -1:, :])
            mx.eval(x)
        return x

    def _head(self, stage, x):
        h = self._module(self.paths.norm)(x)
        x = stage.module.as_linear(h) if stage.module is not None else self._module(self.paths.head)(h)
        if self.logit_multiplier is not None:
            x = x * self.logit_multiplier
        if self.logit_divisor is not None:
            x = x / self.logit_divisor
        return mx.tanh(x / self.softcap) * self.softcap if self.softcap else x

    def _score(self, stage, x, targets):
        """(B, T, 2): log p(target) and whether the target was the argmax, per position, computed a few
        positions at a time so the full (B, T, vocab) logits never exist."""
        step = max(1, SCORE_LOGITS // (x.shape[0] * self.args.vocab_size))
        parts = []
        for i in range(0, x.shape[1], step):
            logits = self._head(stage, x[:, i:i + step]).astype(mx.float32)
            t = targets[:, i:i + step]
            logp = mx.take_along_axis(logits, t[..., None], axis=-1)[..., 0] - mx.logsumexp(logits, axis=-1)
            greedy = (mx.argmax(logits, axis=-1) == t).astype(mx.float32)
            part = mx.stack([logp, greedy], axis=-1)
            mx.eval(part)
            parts.append(part)
        return mx.concatenate(parts, axis=1)

    def logits(self, x):
        return np.array(x.astype(mx.float32))

    # -- tree attention (speculative decoding: airmlx/speculative.py) ---------------------------
    def tree_attention_problem(self):
        """Why this model cannot verify a tree of tokens in one step (None when it can)."""
        if any(self.sliding):
            return "its sliding-window layers cannot drop a tree's other branches from their cache exactly"
        if self.mlx_arch.zero_padding:
            return "its attention convolves neighbouring positions, which a tree's branches are not"
        if self.mlx_arch.scales_by_offset:
            return f"mlx-lm's {self.mlx_arch.module} scales its queries by the cache's positions, not a tree's"
        if not mlx_adapters.rope_modules(self.skeleton.layers[0]) and not self.paths.positions:
            return f"mlx-lm's {self.mlx_arch.module} layers have no rotary embedding airmlx can give positions to"
        return None

    def keep_cache_positions(self, cache, positions):
        positions, start = kept_tail(positions)
        for c in cache:
            mlx_adapters.keep_positions(c, positions, start)

    # -- requests joining and leaving one batch (the server's engine; backends/mlx_batching.py) ----------
    def merge_caches(self, caches, lengths):
        return mlx_batching.merge(caches)

    def extract_cache(self, cache, row, length):
        return mlx_batching.extract(cache, row, length)
