"""Image-text checkpoints whose language model airmlx runs on its own: text in, text out.

Gemma 3 (4B and larger), Mistral Small 3.1 / 3.2 and Qwen2-VL / Qwen2.5-VL / Qwen3-VL (dense and MoE) ship their language model
inside an image-text model (`Gemma3ForConditionalGeneration`, ...). The language model is an ordinary text-only
model of a registered architecture; the sharder takes its config (transformers' config class fills in what
config.json leaves to defaults) and its tensors, named as the text-only model names them, and leaves the vision
tower and the projector out. On text the output is the image-text model's own. The Qwen VL models' rotary
positions are multimodal (`mrope_section`: time, height and width each turn part of the dimensions), but for
text all three positions are the token's own, so they turn as Qwen2's / Qwen3's do.
"""
import hashlib
import json
import re
from pathlib import Path

from .archs import LANGUAGE_MODELS, renamed
from .errors import CheckpointError
from .hf_config import transformers_config

# what the image-text model's own modules do whatever its config says, set in the config of the model it runs as:
# Qwen3-VL-MoE's router always normalises its top-k weights, Qwen3-MoE's only with norm_topk_prob
AS_RUN = {"qwen3_vl_moe": {"norm_topk_prob": True}}
# where the language model's tensors sit: as released ("language_model.model."), as transformers 5 names them
# in memory ("model.language_model."); the head is "language_model.lm_head" or "lm_head"
RENAMES = (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
           ("model.language_model.", "model."))
OTHER_PARTS = re.compile(r"^(model\.)?(vision_tower|vision_model|multi_modal_projector|visual)\.")
# keys the language model's config keeps: the image-text model_type (the sharder renames the tensors), and the
# hash of config.json as written (the folder's fingerprint: transformers' defaults may change, the file has not)
WRAPPED = "airmlx_language_model_of"
SOURCE_CONFIG = "airmlx_config_json_sha256"
# what the image-text config holds for the whole model and its language model's config may lack
KEPT = ("dtype", "torch_dtype", "quantization", "quantization_config", "bos_token_id", "eos_token_id",
        "pad_token_id")


def language_model_config(config: dict) -> dict:
    """The config of the language model inside an image-text model's config (config unchanged for any other)."""
    if config.get("model_type") not in LANGUAGE_MODELS:
        return config
    try:
        whole = transformers_config(config)
    except CheckpointError as e:
        raise CheckpointError(f"{e}; fix config.json, or upgrade transformers if it is older than the model.") \
            from None
    text = whole.text_config.to_dict()
    # transformers ties the image-text model's head to the embedding by the outer config's flag (its class's
    # default where config.json has none: true for Gemma 3 and Mistral 3, false for Qwen3-VL) unless the checkpoint
    # holds a head of its own (Mistral Small 3.1 does): so the checkpoint decides here too, but an outer false
    # stays, and a checkpoint without a head is then refused as incomplete
    text.pop("tie_word_embeddings", None)
    if getattr(whole, "tie_word_embeddings", None) is False:
        text["tie_word_embeddings"] = False
    text.pop("transformers_version", None)
    if LANGUAGE_MODELS[config["model_type"]]:  # Qwen VL: a Qwen2 / Qwen3 on text (see above)
        text["model_type"] = LANGUAGE_MODELS[config["model_type"]]
        text.update(AS_RUN.get(config["model_type"], {}))
        for key in ("rope_parameters", "rope_scaling"):
            if isinstance(text.get(key), dict):
                text[key] = {k: v for k, v in text[key].items() if k not in ("mrope_section", "mrope_interleaved")}
                if text[key].get("rope_type", text[key].get("type")) in ("mrope", "default"):
                    text[key] = {**text[key], "rope_type": "default"}
                    text[key].pop("type", None)
    kept = {k: rename_quantization(config[k]) if k == "quantization" else config[k]
            for k in KEPT if config.get(k) is not None}
    written = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    return {**text, **kept, WRAPPED: config["model_type"], SOURCE_CONFIG: written}


def language_model_tensor(name: str) -> "str | None":
    """An image-text checkpoint's tensor name as the language model names it; None for the other parts'."""
    return None if OTHER_PARTS.match(name) else renamed(name, RENAMES)


def rename_quantization(quantization):
    """mlx-lm's quantisation config, its per-module entries renamed as the tensors are (the others dropped)."""
    if not isinstance(quantization, dict):
        return quantization
    out = {}
    for key, value in quantization.items():
        if isinstance(value, (dict, bool)):  # a module's own setting, keyed by its path
            key = language_model_tensor(key + ".")  # as a prefix, as the renames take it ("language_model.lm_head")
            if key is None:
                continue
            key = key[:-1]
        out[key] = value
    return out


def processor_chat_template(src) -> "str | None":
    """An image-text repo's chat template where only its processor has one (chat_template.json), which a tokenizer
    does not read: the shard folder gets it as chat_template.jinja, which tokenizers do read."""
    src = Path(src)
    if (src / "chat_template.jinja").is_file() or not (src / "chat_template.json").is_file():
        return None
    try:
        if json.loads((src / "tokenizer_config.json").read_text()).get("chat_template"):
            return None
    except (OSError, ValueError, AttributeError):
        pass
    try:
        template = json.loads((src / "chat_template.json").read_text()).get("chat_template")
    except (OSError, ValueError, AttributeError):
        return None
    return template if isinstance(template, str) and template else None
