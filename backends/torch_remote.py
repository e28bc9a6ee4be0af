"""Checkpoints that ship their own modelling code (config.json auto_map) on the torch backend: the config and
the meta-device skeleton come from that code through transformers' AutoConfig / AutoModelForCausalLM with
trust_remote_code=True, and only when the user passed it."""
import inspect
from pathlib import Path

from airmlx.errors import UnsupportedArchitectureError


def code_files(config):
    """The .py files config.json's auto_map names (values are "module.Class", "repo--module.Class" or lists)."""
    names = set()
    for value in (config.get("auto_map") or {}).values():
        for ref in value if isinstance(value, (list, tuple)) else [value]:
            if ref:
                names.add(ref.split("--")[-1].rpartition(".")[0] + ".py")
    return sorted(names)


def remote_config(config, arch, trust_remote_code, code_dir):
    """The checkpoint's own transformers config object; refuses unless trust_remote_code and the code is there."""
    files = code_files(config)
    if not trust_remote_code:
        raise UnsupportedArchitectureError(
            f"model_type {arch.model_type!r} has no transformers module: its checkpoints ship their own modelling "
            f"code ({', '.join(files) or 'named by config.json auto_map'}). The torch backend runs that code only "
            "with trust_remote_code=True (--trust-remote-code), after you have read it: it runs with your "
            f"rights. backend='mlx' runs this model without it (mlx-lm's module).")
    missing = [f for f in files if code_dir is None or not (Path(code_dir) / f).is_file()]
    if not files or missing:
        raise UnsupportedArchitectureError(
            f"trust_remote_code=True, but {code_dir or 'the shard folder'} lacks the checkpoint's modelling code "
            f"({', '.join(missing) if files else 'config.json has no auto_map'}); copy those .py files from the "
            "model's original folder into it (or delete it and shard again), or use backend='mlx'.")
    from transformers import AutoConfig
    hf_config = AutoConfig.from_pretrained(code_dir, trust_remote_code=True)
    for key in ("quantization", "quantization_config"):  # mlx-lm's keys; transformers has no quantiser for them
        if hasattr(hf_config, key):
            delattr(hf_config, key)
    return hf_config


def shared_rotary(skeleton, arch):
    """The model-level rotary embedding, once the checkpoint's own code is seen to be laid out as transformers'
    own decoders are (older remote code keeps one per attention layer, or calls layers otherwise)."""
    base = arch.layers.rpartition(".")[0]
    try:
        rotary, layer = skeleton.get_submodule(base + ".rotary_emb"), skeleton.get_submodule(arch.layers + ".0")
    except AttributeError:
        rotary = layer = None
    if rotary is None or "config" not in inspect.signature(type(rotary)).parameters or \
            "position_embeddings" not in (params := set(inspect.signature(layer.forward).parameters)) or \
            not params & {"cache", "past_key_values"}:
        raise UnsupportedArchitectureError(
            f"{type(skeleton).__name__} (the checkpoint's own code) is not laid out as transformers' own decoders "
            f"are: a {base}.rotary_emb built from the config, layers taking position_embeddings and a "
            "cache; the torch backend runs only those. Use backend='mlx'.")
    return rotary
