"""How mlx-lm runs each architecture here: its module, the workarounds it needs (MLX_ARCHS), what of a config it
cannot run (MLX_LIMITS), and its ModelArgs made from a Hugging Face config (mlx_args)."""
import functools
import inspect
import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from airmlx.archs import layer_types, rope_config
from airmlx.errors import CheckpointError
from airmlx.hf_config import transformers_config


@dataclass(frozen=True)
class MLXArch:
    """How mlx-lm runs an architecture, and the workarounds its modules need here."""
    module: str  # mlx_lm.models.<module>
    sanitize: bool = True  # run mlx-lm's sanitize on each stage (False where it mutates the model)
    # sanitize a layer's stage under its own number, where mlx-lm's loops over every layer by the config (a
    # dense layer 0 would skip a MoE layer's renames), not as layer 0
    sanitize_numbered: bool = False
    mask_array: bool = False  # the attention needs a mask array, not the "causal" shortcut
    # zero left-padded positions before each layer: its attention also reads the position before (a
    # convolution), so padding would leak into a row's first token
    zero_padding: bool = False
    # (ModelArgs key, HF config key) where transformers renamed a key mlx-lm reads (or config.json leaves it null)
    config_aliases: tuple = ()
    config_defaults: tuple = ()  # (ModelArgs key, value) that mlx-lm requires and transformers' configs leave out
    # mlx-lm's module rotates every dimension of a head where transformers rotates this default fraction of it
    # (or the config's partial_rotary_factor): the backend gives each layer a RoPE over that part
    partial_rotary: float = None
    scales_by_offset: bool = False  # the attention scales queries by the cache's positions, which a tree's are not
    moe_layers_key: str = None  # a list of booleans mlx-lm reads: which layers are MoE (transformers' mlp_layer_types)
    pattern_letters: bool = False  # sliding_window_pattern as letters, "LLLG" (local, global), as EXAONE 4's configs have it
    rotary_dim: bool = False  # mlx-lm reads the rotated dimensions of a head as rotary_dim (from partial_rotary_factor)
    # the tensor of a MoE block holding the routing bias mlx-lm's module leaves out (its sanitize drops it): the
    # backend keeps it and routes with it, as transformers does (routing_bias)
    routing_bias: str = None


MLX_ARCHS = {
    "llama": MLXArch("llama"),
    "mistral": MLXArch("llama"),  # mlx-lm runs mistral checkpoints with its llama module
    "qwen2": MLXArch("qwen2"),
    "qwen3": MLXArch("qwen3"),
    "phi3": MLXArch("phi3"),
    "glm4": MLXArch("glm4"),
    "smollm3": MLXArch("smollm3"),
    "olmo2": MLXArch("olmo2"),
    "olmo3": MLXArch("olmo3"),
    "phi": MLXArch("phi"),
    "ernie4_5": MLXArch("ernie4_5"),
    "helium": MLXArch("helium"),
    "hunyuan_v1_dense": MLXArch("hunyuan_v1_dense"),
    "stablelm": MLXArch("stablelm"),
    "nemotron": MLXArch("nemotron"),
    "seed_oss": MLXArch("seed_oss"),
    "starcoder2": MLXArch("starcoder2"),  # mlx-lm: exact GELU, transformers: the tanh approximation
    "gemma": MLXArch("gemma"),  # likewise
    "granite": MLXArch("granite"),
    "cohere": MLXArch("cohere"),
    "cohere2": MLXArch("cohere2"),
    # Apertus's configs on the hub carry these; transformers' own class writes none of them
    "apertus": MLXArch("apertus", config_defaults=(("mlp_bias", False), ("post_norm", False), ("qk_norm", True))),
    "exaone4": MLXArch("exaone4", pattern_letters=True),
    # GLM-4 (THUDM/glm-4-9b-chat-hf): half of each head rotates (ml-explore/mlx-lm#1698, not merged)
    "glm": MLXArch("glm", partial_rotary=0.5),
    "ministral3": MLXArch("ministral3", scales_by_offset=True),  # Llama 4's attention temperature
    # mlx-lm: model.h.N, model.embed_in, model.final_layer_norm, model.embed_out; rotary settings by their old names
    "gpt_neox": MLXArch("gpt_neox", config_aliases=(("rotary_emb_base", "rope_theta"),
                                                    ("rotary_pct", "partial_rotary_factor"))),
    # mlx-lm: model.wte, model.h.N, ...; its sanitize transposes tensors named as the original checkpoints name them,
    # which the sharder has done already
    "gpt2": MLXArch("gpt2", sanitize=False, config_aliases=(("n_ctx", "n_positions"),)),
    "gptj": MLXArch("gptj"),  # mlx-lm: model.wte, model.h.N, ...
    # mlx-lm: exact GELU, transformers: the tanh approximation (as for gpt2 and gptj the other way round, where a
    # config names the exact one); n_inner null means 4 x hidden
    "gpt_bigcode": MLXArch("gpt_bigcode", config_aliases=(("n_inner", "intermediate_size"),)),
    "mixtral": MLXArch("mixtral"),
    "qwen2_moe": MLXArch("qwen2_moe"),
    "deepseek_v2": MLXArch("deepseek_v2", mask_array=True),
    "deepseek_v3": MLXArch("deepseek_v3", mask_array=True),
    "glm4_moe": MLXArch("glm4_moe"),
    "glm4_moe_lite": MLXArch("glm4_moe_lite", mask_array=True),
    "olmoe": MLXArch("olmoe"),
    "phimoe": MLXArch("phimoe"),
    "ernie4_5_moe": MLXArch("ernie4_5_moe", routing_bias="moe_statics.e_score_correction_bias"),
    "granitemoe": MLXArch("granitemoe"),
    "exaone_moe": MLXArch("exaone_moe", moe_layers_key="is_moe_layer", sanitize_numbered=True),
    "laguna": MLXArch("laguna"),
    "dots1": MLXArch("dots1"),
    "mellum": MLXArch("mellum", config_aliases=(("num_experts", "num_local_experts"),)),
    # mlx-lm reads the rotated part of a head as rotary_dim (MiniMax-M2's own config.json has it); shared experts
    # it has none of
    "minimax_m2": MLXArch("minimax", rotary_dim=True,
                          config_defaults=(("shared_intermediate_size", 0),)),
    "gpt_oss": MLXArch("gpt_oss"),
    "qwen3_moe": MLXArch("qwen3_moe", config_aliases=(("num_experts", "num_local_experts"),)),
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
    mlx_arch = MLX_ARCHS[config["model_type"]]
    for mlx_key, hf_key in mlx_arch.config_aliases:
        if hf_key in cfg and cfg.get(mlx_key) is None:
            cfg[mlx_key] = cfg[hf_key]
    if mlx_arch.pattern_letters:  # from layer_types, which transformers derives from the pattern where it has one
        period = types[:types.index("full_attention") + 1] if "sliding_attention" in types else []
        cfg["sliding_window_pattern"] = "".join("L" if t == "sliding_attention" else "G" for t in period) or None
    if mlx_arch.moe_layers_key and isinstance(cfg.get("mlp_layer_types"), list):
        cfg.setdefault(mlx_arch.moe_layers_key, [t == "sparse" for t in cfg["mlp_layer_types"]])
    for key, value in mlx_arch.config_defaults:
        cfg.setdefault(key, value)
    if cfg.get("head_dim") is None and "head_dim" in inspect.signature(module.ModelArgs).parameters:
        cfg["head_dim"] = default_head_dim(config)
    if mlx_arch.rotary_dim and cfg.get("rotary_dim") is None:
        cfg["rotary_dim"] = int((cfg.get("head_dim") or default_head_dim(config)) * cfg.get("partial_rotary_factor", 1.0))
    return module.ModelArgs.from_dict(cfg)


def fixed_mlp_limit(config, key="intermediate_size"):
    """mlx-lm's GPT-NeoX, GPT-2 and GPT-J modules fix the MLP at 4 x hidden_size (None where the config's is)."""
    if config.get("intermediate_size", 4 * config["hidden_size"]) != 4 * config["hidden_size"]:
        return f"its MLP fixed at 4 x hidden_size (this config's {key} is {config['intermediate_size']})"
    return None


def neox_limits(config):
    """What mlx-lm's gpt_neox module cannot run, which transformers' can (None: nothing)."""
    _, scaling = rope_config(config)
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind != "default":
        return f"no rotary scaling (this config's is {kind!r})"
    unbiased = config.get("attention_bias") is False
    return fixed_mlp_limit(config) or \
        ("biases in every attention projection (this config's attention_bias is false)" if unbiased else None)


# transformers' GELUs: mlx-lm's GPT-2, GPT-J and StarCoder modules each run one of them whatever the config names
GELUS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu_accurate")


def gpt_limits(config, default_activation):
    """What mlx-lm's GPT-2-style modules (gpt2, gptj, gpt_bigcode) cannot run of a config: an activation other
    than a GELU, attention scores scaled otherwise than by 1 / sqrt(head_dim) (None: nothing)."""
    activation = config.get("activation_function", default_activation)
    if activation not in GELUS:
        return f"a GELU MLP only (this config's activation_function is {activation!r})"
    if config.get("scale_attn_by_inverse_layer_idx") or config.get("scale_attn_weights") is False:
        return "attention scores scaled by 1 / sqrt(head_dim) only (this config scales them otherwise)"
    return None


def gptj_limits(config):
    """What mlx-lm's gptj module cannot run, which transformers' can (None: nothing)."""
    theta, scaling = rope_config(config)
    if scaling or (theta or 10000.0) != 10000.0:
        return "rotary positions of base 10000 only, unscaled (this config's differ)"
    return fixed_mlp_limit(config, "n_inner") or gpt_limits(config, "gelu_new")


def gpt2_limits(config):
    """What mlx-lm's gpt2 module cannot run, which transformers' can (None: nothing)."""
    untied = config.get("tie_word_embeddings", True) is False
    return fixed_mlp_limit(config, "n_inner") or \
        ("a head tied to the embedding (this config's tie_word_embeddings is false)" if untied else None) or \
        gpt_limits(config, "gelu_new")


def bigcode_limits(config):
    """What mlx-lm's gpt_bigcode module cannot run, which transformers' can (None: nothing)."""
    if config.get("multi_query") is False:  # transformers interleaves each head's query, key and value in c_attn
        return "queries, keys and values in three blocks of c_attn, as multi-query attention has them (this " \
            "config's multi_query is false)"
    return gpt_limits(config, "gelu_pytorch_tanh")


# model_type -> what mlx-lm's module cannot run of a config transformers runs (refused, never run otherwise)
MLX_LIMITS = {
    "gpt_neox": neox_limits,
    "gpt2": gpt2_limits,
    "gptj": gptj_limits,
    "gpt_bigcode": bigcode_limits,
    "mellum": lambda config: "no dense MLP layers (this config's mlp_layer_types has 'dense')"
    if "dense" in (config.get("mlp_layer_types") or []) else None,
}


def default_head_dim(config):
    """transformers' head_dim where config.json leaves it out: its config class's default (128 for GLM-4 and
    Ministral 3), else hidden_size // num_attention_heads."""
    try:
        head_dim = getattr(transformers_config(config), "head_dim", None)
    except CheckpointError:
        head_dim = None
    return head_dim if isinstance(head_dim, int) else config["hidden_size"] // config["num_attention_heads"]


def rotate_part_of_heads(skeleton, config, default):
    """Each layer's RoPE over the first partial_rotary_factor of its head (interleaved, as transformers' GLM)."""
    fraction = config.get("partial_rotary_factor") or (config.get("rope_parameters") or {}).get(
        "partial_rotary_factor") or default
    theta, _ = rope_config(config)
    for layer in skeleton.layers:
        attention = layer.self_attn
        attention.rope = nn.RoPE(int(attention.head_dim * fraction), traditional=True, base=theta or 10000.0)


def untruncated_yarn(skeleton, config) -> None:
    """YaRN with truncate false in its rope settings (gpt-oss): mlx-lm rounds the ends of the frequency ramp to
    whole dimensions, transformers (and the model's own code) does not; each layer's YarnRoPE gets the ramp as
    transformers computes it (mlx-lm's formula, ends unrounded)."""
    theta, scaling = rope_config(config)
    if (scaling or {}).get("truncate", True) is not False:
        return
    base, factor = theta or 10000.0, scaling["factor"]
    original = scaling.get("original_max_position_embeddings", 4096)

    @functools.cache
    def freqs(dims):
        end = lambda rotations: dims * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))
        low, high = max(end(scaling.get("beta_fast", 32)), 0), min(end(scaling.get("beta_slow", 1)), dims - 1)
        extra = base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims)
        mask = 1.0 - mx.clip((mx.arange(dims // 2, dtype=mx.float32) - low) / (high - low if high > low else 0.001),
                             0, 1)
        return (factor * extra * extra) / (factor * extra * mask + extra * (1 - mask))
    for layer in skeleton.layers:
        rope = layer.self_attn.rope
        if hasattr(rope, "_freqs"):
            rope._freqs = freqs(rope.dims)


class BiasedErnieMoE(nn.Module):
    """ERNIE 4.5's MoE block as transformers runs it: the experts chosen by their softmax scores plus the routing
    bias (moe_statics.e_score_correction_bias), weighted by the scores alone. mlx-lm's module leaves the bias out,
    so with a trained checkpoint's bias it chose other experts. Given to mlx-lm's blocks by routing_bias."""

    def __call__(self, x: mx.array) -> mx.array:
        scores = self.gate_act(self.gate(x).astype(mx.float32))
        chosen = scores + self.moe_statics.e_score_correction_bias.reshape(-1).astype(mx.float32)
        inds = mx.stop_gradient(mx.argpartition(-chosen, kth=self.k - 1, axis=-1)[..., :self.k])
        weights = mx.take_along_axis(scores, inds, axis=-1)
        weights = weights / mx.maximum(weights.sum(axis=-1, keepdims=True), self.norm_min)
        y = self.switch_mlp(x, inds)
        y = (y * weights[..., None]).sum(axis=-2).astype(y.dtype)
        return y if self.shared_experts is None else y + self.shared_experts(x)


def routing_bias(skeleton, config, path) -> None:
    """Each MoE block (one with a switch_mlp) routes with a bias at `path` (MLXArch.routing_bias), zero until a
    stage fills it (a checkpoint mlx-lm wrote has none: mlx-lm routes without it, and so do zeros)."""
    for layer in skeleton.layers:
        block = layer.mlp
        if "switch_mlp" not in block:
            continue
        holder, name = path.rsplit(".", 1)
        block[holder] = nn.Module()
        block[holder][name] = mx.zeros((1, block.gate.weight.shape[0]), dtype=mx.float32)
        block.norm_min = config.get("moe_norm_min", 1e-12)
        block.__class__ = biased(type(block))


@functools.cache
def biased(block_class):
    return type("Biased" + block_class.__name__, (BiasedErnieMoE, block_class), {})
