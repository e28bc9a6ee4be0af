"""AutoModel.from_pretrained: resolve the model, shard it once, pick a backend, return an AirModel."""
import platform
import sys
from pathlib import Path

from .archs import arch_for
from .errors import BackendError, CorruptShardError
from .hub import default_shard_dir, is_hub_id, resolve_model
from .manifest import MANIFEST_NAME, Manifest
from .model import AirModel
from .quant import compression_config
from .shard import PROGRESS_NAME, complete_folder, shard_checkpoint

BACKENDS = ("auto", "mlx", "torch")


def pick_backend(backend="auto"):
    """MLX on Apple silicon, otherwise torch (CUDA when present, else CPU)."""
    if backend not in BACKENDS:
        raise BackendError(f"backend {backend!r} is unknown; use one of {', '.join(BACKENDS)}.")
    if backend != "auto":
        return backend
    if sys.platform == "darwin" and platform.machine() == "arm64":
        try:
            import mlx.core  # noqa: F401
            return "mlx"
        except ImportError:
            pass
    return "torch"


def make_backend(name, config, device=None, dtype=None, tensor_names=(), trust_remote_code=False, shard_dir=None):
    if name == "mlx":
        try:
            from .backends.mlx_backend import MLXBackend
        except ImportError as e:
            raise BackendError(f"the MLX backend needs mlx and mlx-lm ({e}); pip install mlx mlx-lm, "
                               "or use backend='torch'.") from None
        return MLXBackend(config, device=device, dtype=dtype, tensor_names=tensor_names)
    from .backends.torch_backend import TorchBackend
    return TorchBackend(config, device=device, dtype=dtype, tensor_names=tensor_names,
                        trust_remote_code=trust_remote_code, code_dir=shard_dir)


class AutoModel:
    @classmethod
    def from_pretrained(cls, path_or_id, backend="auto", device=None, dtype=None, compression=None,
                        layer_shards_saving_path=None, memory_budget=None, prefetching=True,
                        profiling_mode=False, hf_token=None, delete_original=False, allow_pickle=False,
                        progress=True, trust_remote_code=False, gguf_file=None):
        """A model streamed layer by layer from a shard folder made (once) from `path_or_id`: a local
        Hugging Face folder, a hub id, or an existing shard folder.

        trust_remote_code: run the checkpoint's own modelling (and tokenizer) code where it ships some
        (config.json auto_map) and transformers has no module for it; read that code first. The torch backend
        needs it for such families; backend='mlx' runs them with mlx-lm's modules instead.

        GGUF: `path_or_id` a .gguf file or a folder holding one, or a folder / hub id with gguf_file='NAME.gguf'
        (only that file is downloaded); see airmlx/gguf.py."""
        if compression is not None:
            compression_config(compression)  # raises for an unknown value
        name = pick_backend(backend)
        local = Path(str(path_or_id)).expanduser()
        if (local / MANIFEST_NAME).is_file():
            shard_dir = local  # already a shard folder
        elif (local / PROGRESS_NAME).is_file() or (local / "embed.safetensors").is_file():
            raise CorruptShardError(f"{local} is an unfinished shard folder (no {MANIFEST_NAME}); finish it with "
                                    f"python -m airmlx.shard ORIGINAL_MODEL {local}")
        else:
            name = f"{path_or_id}/{gguf_file}" if gguf_file else path_or_id
            shard_dir = Path(layer_shards_saving_path or default_shard_dir(name, compression))
            if not (is_hub_id(str(path_or_id)) and complete_folder(shard_dir)):
                src = resolve_model(path_or_id, hf_token=hf_token, allow_pickle=allow_pickle, progress=progress,
                                    gguf_file=gguf_file)
                shard_checkpoint(src, shard_dir, delete_original=delete_original, allow_pickle=allow_pickle,
                                 compression=compression, progress=progress)
        manifest = Manifest.load(shard_dir)
        arch_for(manifest.config)
        names = [t for s in manifest.stages for t in s.tensors]
        backend_obj = make_backend(name, manifest.config, device, dtype, names, trust_remote_code, shard_dir)
        model = AirModel(shard_dir, backend_obj, memory_budget=memory_budget,
                         prefetching=prefetching, profiling_mode=profiling_mode)
        model.trust_remote_code = trust_remote_code
        return model
