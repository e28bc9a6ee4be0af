"""transformers' own config classes over a config.json dict: the defaults and derived settings (layer_types,
an image-text model's text_config) that transformers would run with and config.json may leave out."""
import copy

from .errors import CheckpointError


def transformers_config(config: dict):
    """transformers' config object for `config` (left as it was; mlx-lm's quantisation keys are not given to
    it), or a one-line CheckpointError where transformers cannot read it."""
    from transformers import AutoConfig
    plain = copy.deepcopy({k: v for k, v in config.items() if k not in ("quantization", "quantization_config")})
    try:
        return AutoConfig.for_model(**plain)
    except Exception as e:  # the config class's own checks raise what they like
        detail = " ".join(str(e).split())
        detail = detail if len(detail) <= 200 else detail[:200] + "..."  # an unknown type lists every known one
        raise CheckpointError(f"config.json: transformers' {config.get('model_type')} config cannot read it "
                              f"({detail})") from None


# the names airmlx reads a config by; GPT-2-style configs.json use their own (n_layer, n_embd, n_head, n_positions),
# which transformers' config class maps to these (its attribute_map)
STANDARD_NAMES = ("num_hidden_layers", "hidden_size", "num_attention_heads", "max_position_embeddings")


def with_standard_names(config: dict) -> dict:
    """config with the standard names filled in where config.json uses its family's own, as transformers reads
    them: those of its attribute_map, and then the MLP's width from n_inner (4 x hidden where null or left out)
    and the key/value heads from multi_query (StarCoder), over whatever config.json says of these two, and
    tie_word_embeddings, left out, as the config class's default (GPT-2's ties). config unchanged where no
    standard name is missing and it has no n_inner or multi_query."""
    if all(k in config for k in STANDARD_NAMES) and not {"n_inner", "multi_query"} & config.keys():
        return config
    from transformers import CONFIG_MAPPING
    model_type = config.get("model_type")
    config_class = CONFIG_MAPPING[model_type] if model_type in CONFIG_MAPPING else None
    aliases = getattr(config_class, "attribute_map", {})
    filled = dict(config)
    for name in STANDARD_NAMES:
        if name not in filled and aliases.get(name) in config:
            filled[name] = config[aliases[name]]
    if ("n_inner" in config or hasattr(config_class, "n_inner")) and "hidden_size" in filled:
        filled["intermediate_size"] = config.get("n_inner") or 4 * filled["hidden_size"]
    if "tie_word_embeddings" not in config and config_class is not None:
        filled["tie_word_embeddings"] = config_class().tie_word_embeddings
    if "multi_query" in config and "num_attention_heads" in filled:
        filled["num_key_value_heads"] = 1 if config["multi_query"] else filled["num_attention_heads"]
    return filled
