"""AutoModel.from_pretrained: resolve the model, shard it once, pick a backend, return an AirModel."""
import platform
import sys
from pathlib import Path

from .archs import arch_for
from .errors import BackendError, CorruptShardError
from .hub import default_shard_dir, is_hub_id, resolve_model
from .manifest import MANIFEST_NAME, Manifest
from .model import AirModel
from .pipeline import launched_framework
from .pipeline_link import DEFAULT_TIMEOUT
from .plan import DEFAULT_PREFILL_STEP
from .quant import compression_config
from .sharder import PROGRESS_NAME, complete_folder, shard_checkpoint

BACKENDS = ("auto", "mlx", "torch")


def pick_backend(backend: str = "auto") -> str:
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


def make_backend(name: str, manifest: Manifest, device=None, dtype=None, trust_remote_code: bool = False,
                 code_dir=None):
    """The backend `name` ("mlx" | "torch") for a shard folder's manifest; both are built the same way."""
    try:
        import airmlx.backends  # noqa: F401
    except ModuleNotFoundError as e:
        if e.name != "airmlx.backends":
            raise
        raise BackendError("airmlx is not installed: its backends (the backends/ folder) become importable as "
                           "airmlx.backends only through the package; run pip install -e . in the clone.") from None
    if name == "mlx":
        try:
            from .backends.mlx_backend import MLXBackend as Backend
        except ImportError as e:
            raise BackendError(f"the MLX backend needs mlx and mlx-lm ({e}); pip install mlx mlx-lm "
                               "(mlx[cpu] on Linux), or use backend='torch'.") from None
    else:
        try:
            from .backends.torch_backend import TorchBackend as Backend
        except ImportError as e:
            raise BackendError(f"the torch backend needs torch and transformers ({e}); pip install torch "
                               "transformers, or use backend='mlx'.") from None
    return Backend(manifest, device=device, dtype=dtype, trust_remote_code=trust_remote_code, code_dir=code_dir)


class AutoModel:
    @classmethod
    def from_pretrained(cls, path_or_id: "str | Path", backend: str = "auto", device: str | None = None,
                        dtype: str | None = None, compression: str | None = None,
                        layer_shards_saving_path: "str | Path | None" = None,
                        memory_budget: "int | str | None" = None, prefetching: bool = True,
                        profiling_mode: bool = False, hf_token: str | None = None, delete_original: bool = False,
                        allow_pickle: bool = False, progress: bool = True,
                        trust_remote_code: bool = False, prefill_step_size: int = DEFAULT_PREFILL_STEP,
                        pipeline_split: "str | list | None" = None,
                        pipeline_timeout: float = DEFAULT_TIMEOUT) -> AirModel:
        """A model streamed layer by layer from a shard folder made (once) from `path_or_id`: a local
        Hugging Face folder, a hub id, or an existing shard folder.

        trust_remote_code: run the checkpoint's own modelling (and tokenizer) code where it ships some
        (config.json auto_map) and transformers has no module for it; read that code first. The torch backend
        needs it for such families; backend='mlx' runs them with mlx-lm's modules instead.

        prefill_step_size: tokens (rows x positions) a stage runs at once; a longer prompt runs in chunks
        inside the same sweep (the model is still read once), which bounds a step's activations.

        Launched by mlx.launch or torchrun on several ranks, the model is a pipeline (airmlx/pipeline.py): each
        rank streams its own range of stages. memory_budget may then list one budget per rank ("4GB,8GB");
        pipeline_split gives the stages per rank ("9,9", default: balanced by each rank's budget);
        pipeline_timeout: seconds a rank waits for a sign of life from the rank before it. On ranks other
        than 0 this call runs their part until rank 0 closes the model, then exits the process."""
        if compression is not None:
            compression_config(compression)  # raises for an unknown value
        launched = launched_framework()
        if launched is not None and backend not in ("auto", launched):
            raise BackendError(f"this process was started by {'mlx.launch' if launched == 'mlx' else 'torchrun'}, "
                               f"so its pipeline runs on the {launched} backend; use backend='{launched}' (or the "
                               "other framework's launcher).")
        name = launched or pick_backend(backend)
        local = Path(str(path_or_id)).expanduser()
        if (local / MANIFEST_NAME).is_file():
            shard_dir = local  # already a shard folder
        elif (local / PROGRESS_NAME).is_file() or (local / "embed.safetensors").is_file():
            raise CorruptShardError(f"{local} is an unfinished shard folder (no {MANIFEST_NAME}); finish it with "
                                    f"python -m airmlx.shard ORIGINAL_MODEL {local}")
        else:
            shard_dir = Path(layer_shards_saving_path or default_shard_dir(path_or_id, compression))
            if not (is_hub_id(str(path_or_id)) and complete_folder(shard_dir)):
                src = resolve_model(path_or_id, hf_token=hf_token, allow_pickle=allow_pickle, progress=progress)
                shard_checkpoint(src, shard_dir, delete_original=delete_original, allow_pickle=allow_pickle,
                                 compression=compression, progress=progress)
        manifest = Manifest.load(shard_dir)
        arch_for(manifest.config)
        backend_obj = make_backend(name, manifest, device, dtype, trust_remote_code, shard_dir)
        if launched is not None:
            from .pipeline_model import open_launched
            return open_launched(launched, shard_dir, backend_obj, getattr(backend_obj, "device", None),
                                 memory_budget=memory_budget, split=pipeline_split, timeout=pipeline_timeout,
                                 prefetching=prefetching, profiling_mode=profiling_mode,
                                 trust_remote_code=trust_remote_code, prefill_step_size=prefill_step_size)
        return AirModel(shard_dir, backend_obj, memory_budget=memory_budget, prefetching=prefetching,
                        profiling_mode=profiling_mode, trust_remote_code=trust_remote_code,
                        prefill_step_size=prefill_step_size)
