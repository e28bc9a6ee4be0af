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
