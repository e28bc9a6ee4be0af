"""Registry: model_type -> how its checkpoint splits into stages, and which framework modules run them.

One entry per architecture. The model math lives in mlx-lm (``mlx_module``) and transformers (looked up
from the config's model_type); the backends' adapters only wire stages together.
"""
import re
from dataclasses import dataclass

from .errors import CheckpointError, UnsupportedArchitectureError


@dataclass(frozen=True)
class Arch:
    model_type: str
    mlx_module: str  # mlx_lm.models.<mlx_module>
    adapter: str = "decoder"  # the backends' adapter family: embed -> N decoder layers -> norm + head
    embed_prefix: str = "model.embed_tokens."
    layer_prefix: str = "model.layers."
    head_prefixes: tuple = ("model.norm.", "lm_head.")


ARCHS = {a.model_type: a for a in [
    Arch("llama", mlx_module="llama"),
    Arch("mistral", mlx_module="llama"),  # mlx-lm runs mistral checkpoints with its llama module
    Arch("qwen2", mlx_module="qwen2"),
]}

# Buffers some checkpoints carry that no framework loads.
IGNORED = re.compile(r"rotary_emb\.inv_freq$")


def arch_for(config):
    model_type = config.get("model_type")
    if model_type not in ARCHS:
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} is not supported by airmlx; supported: {', '.join(sorted(ARCHS))}.")
    return ARCHS[model_type]


def stage_name(kind, index=None, num_layers=0):
    if kind == "layer":
        return f"layer.{index:0{max(3, len(str(num_layers - 1)))}d}"
    return kind


def stage_layout(config, tensor_names):
    """Split a checkpoint's tensor names into stages, in sweep order: [(stage name, kind, [tensor names])].

    Tied embeddings: the head stage carries the embedding matrix too (under its own name), because the
    head reads all of it every step while the embedding stage only needs a few rows.
    """
    arch = arch_for(config)
    n = config["num_hidden_layers"]
    names = [t for t in tensor_names if not IGNORED.search(t)]
    embed = [t for t in names if t.startswith(arch.embed_prefix)]
    layers = [[] for _ in range(n)]
    head, stray = [], []
    layer_re = re.compile(re.escape(arch.layer_prefix) + r"(\d+)\.")
    for t in names:
        m = layer_re.match(t)
        if m and int(m.group(1)) < n:
            layers[int(m.group(1))].append(t)
        elif t.startswith(arch.head_prefixes):
            head.append(t)
        elif not t.startswith(arch.embed_prefix):
            stray.append(t)
    if stray:
        raise CheckpointError(f"{len(stray)} checkpoint tensors belong to no stage of a {arch.model_type} model "
                              f"(e.g. {stray[:3]}); is config.json's model_type right?")
    if not embed:
        raise CheckpointError(f"the checkpoint has no {arch.embed_prefix}* tensors; it is incomplete.")
    missing = [i for i, ts in enumerate(layers) if not ts]
    if missing:
        raise CheckpointError(f"the checkpoint has no tensors for decoder layers {missing[:5]} of {n}; "
                              "it is incomplete or config.json's num_hidden_layers is wrong.")
    has_head = any(t.startswith("lm_head.") for t in head)
    tied = config.get("tie_word_embeddings", not has_head)
    if not tied and not has_head:
        raise CheckpointError("config.json says tie_word_embeddings is false but the checkpoint has no "
                              "lm_head.weight; the checkpoint is incomplete.")
    if tied:
        head = [t for t in head if not t.startswith("lm_head.")] + embed
    stages = [("embed", "embed", embed)]
    stages += [(stage_name("layer", i, n), "layer", ts) for i, ts in enumerate(layers)]
    stages.append(("head", "head", head))
    return stages


def rope_config(config):
    """rope_theta and rope_scaling, whether the config has them top-level (transformers 4) or in
    rope_parameters (transformers 5 writes only that)."""
    params = config.get("rope_parameters") or {}
    theta = config.get("rope_theta", params.get("rope_theta"))
    scaling = config.get("rope_scaling")
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    return theta, scaling
