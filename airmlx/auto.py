"""AutoModel.from_pretrained: resolve the model, shard it once, pick a backend, return an AirModel."""
import os
import platform
import sys
from pathlib import Path

from .archs import arch_for
from .draft import quantised_copy
from .errors import BackendError, BudgetError, CheckpointError, CorruptShardError, DraftModelError, OptionError
from .generation import check_flags
from .hub import default_shard_dir, gone_local_gguf, is_hub_id, resolve_model
from .manifest import MANIFEST_NAME, Manifest
from .model import AirModel
from .pipeline import launched_framework
from .pipeline_link import DEFAULT_TIMEOUT
from .plan import DEFAULT_PREFILL_STEP, check_prefill_step
from .quant import COMPRESSION_SPELLING, COMPRESSIONS, compression_config
from .sharder import shard_checkpoint, sharded_into
from .spec_measure import check_num_draft_tokens
from .stagefile import PROGRESS_NAME, complete_folder
from .units import parse_bytes

BACKENDS = ("auto", "mlx", "torch")
UNLIMITED = 1 << 60  # a draft's own budget: everything resident


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
    return backend_class(name)(manifest, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                               code_dir=code_dir)


def backend_class(name: str):
    """The class of backend `name` ("mlx" | "torch"), or a BackendError saying what to install."""
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
    return Backend


# what to use instead of the AirLLM / transformers from_pretrained() arguments people try
FROM_PRETRAINED_HINTS = {
    "max_seq_len": "the context is the model's own (config.json); generate(max_new_tokens=) bounds a reply",
    "torch_dtype": "use dtype= ('float16', 'bfloat16' or 'float32')",
    "device_map": "use device= ('cuda', 'cpu'; MLX: 'gpu', 'cpu'); the budget decides what stays resident",
    "load_in_4bit": "use compression='4bit'", "load_in_8bit": "use compression='8bit'",
    "token": "use hf_token=", "revision": "pass a local folder, or a hub id at its default revision"}


class AutoModel:
    @classmethod
    def from_pretrained(cls, path_or_id: "str | Path", backend: str = "auto", device: str | None = None,
                        dtype: str | None = None, compression: str | None = None,
                        layer_shards_saving_path: "str | Path | None" = None,
                        memory_budget: "int | str | None" = None, prefetching: bool = True,
                        profiling_mode: bool = False, hf_token: str | None = None, delete_original: bool = False,
                        allow_pickle: bool = False, progress: bool = True,
                        trust_remote_code: bool = False, prefill_step_size: int = DEFAULT_PREFILL_STEP,
                        gguf_file: str | None = None, draft_model=None, num_draft_tokens: int | None = None,
                        pipeline_split: "str | list | None" = None,
                        pipeline_timeout: float | None = None, **unknown) -> AirModel:
        """A model streamed layer by layer from a shard folder made (once) from `path_or_id`: a local
        Hugging Face folder, a hub id, or an existing shard folder.

        trust_remote_code: run the checkpoint's own modelling (and tokenizer) code where it ships some
        (config.json auto_map) and transformers has no module for it; read that code first. The torch backend
        needs it for such families; backend='mlx' runs them with mlx-lm's modules instead.

        prefill_step_size: tokens (rows x positions) a stage runs at once; a longer prompt runs in chunks
        inside the same sweep (the model is still read once), which bounds a step's activations.

        GGUF: `path_or_id` a .gguf file or a folder holding one, or a folder / hub id with gguf_file='NAME.gguf'
        (only that file is downloaded); see airmlx/gguf.py.

        draft_model: speculative decoding (airmlx.speculative): a smaller model of the same tokenizer (path or
        hub id), an AirModel, or "4bit" / "8bit" for a quantised copy of this model (sharded once into its own
        folder). It is kept resident on the same backend, and its bytes come out of memory_budget.
        num_draft_tokens: the most draft tokens one sweep verifies (default: 64 in a tree, 16 in a chain).


        Launched by mlx.launch or torchrun on several ranks, the model is a pipeline (airmlx/pipeline.py): each
        rank streams its own range of stages. memory_budget may then list one budget per rank ("4GB,8GB");
        pipeline_split gives the stages per rank ("9,9", default: balanced by each rank's budget);
        pipeline_timeout: seconds a rank waits for a sign of life from the rank before it (default
        120). Outside such a launch both are refused: one process has no ranks. On ranks other
        than 0 this call runs their part until rank 0 closes the model, then exits the process."""
        if unknown:
            hints = "".join(f"; {k}: {FROM_PRETRAINED_HINTS[k]}" for k in sorted(unknown) if k in FROM_PRETRAINED_HINTS)
            raise OptionError(f"from_pretrained() got unsupported arguments {sorted(unknown)}{hints}.")
        for option, value, what in (("path_or_id", path_or_id, "a folder, file or hub id"),
                                    ("layer_shards_saving_path", layer_shards_saving_path, "a folder")):
            if not isinstance(value, (str, os.PathLike)) and (value is not None or option == "path_or_id"):
                raise OptionError(f"{option}={value!r}: give {what} as a string (or a Path).")
        check_flags(OptionError, prefetching=prefetching, profiling_mode=profiling_mode, progress=progress,
                    trust_remote_code=trust_remote_code, delete_original=delete_original, allow_pickle=allow_pickle)
        if compression is not None:
            compression_config(compression)  # raises for an unknown value
        launched = launched_framework()
        if launched is not None and backend not in ("auto", launched):
            raise BackendError(f"this process was started by {'mlx.launch' if launched == 'mlx' else 'torchrun'}, "
                               f"so its pipeline runs on the {launched} backend; use backend='{launched}' (or the "
                               "other framework's launcher).")
        if launched is None and (pipeline_split is not None or pipeline_timeout is not None):
            option = "pipeline_split" if pipeline_split is not None else "pipeline_timeout"
            raise OptionError(f"{option} is for a pipeline over ranks launched by mlx.launch or torchrun, and this "
                              "process was not launched so; leave it out, or launch the ranks (README, \"Several "
                              "hosts\").")
        if launched is None and isinstance(memory_budget, str) and "," in memory_budget:
            raise BudgetError(f"memory_budget {memory_budget!r} lists one budget per rank, for a pipeline launched by "
                              "mlx.launch or torchrun; in one process give one size, e.g. '4GB'.")
        # what would be refused only after a download and a sharding of hours is refused now
        for part in memory_budget.split(",") if isinstance(memory_budget, str) else [memory_budget]:
            if part is not None:
                parse_bytes(part)
        check_prefill_step(prefill_step_size)
        name = launched or pick_backend(backend)
        local = Path(str(path_or_id)).expanduser()
        if (local / MANIFEST_NAME).is_file():
            shard_dir = local  # already a shard folder
            if gguf_file:
                raise OptionError(f"gguf_file={gguf_file!r}: {local} is a shard folder, of one model already; "
                                  "gguf_file picks a .gguf from a hub repo or a folder of them.")
            if compression is not None and not same_compression(Manifest.load(local).quantization, compression):
                # quantised at shard time, as for a checkpoint: from the one this folder was made from
                shard_dir = quantised_copy(local, compression, progress, out=layer_shards_saving_path)
            elif layer_shards_saving_path is not None and Path(layer_shards_saving_path).expanduser().resolve() \
                    != local.resolve():
                raise OptionError(f"layer_shards_saving_path={str(layer_shards_saving_path)!r}: {local} is a shard "
                                  "folder already, so nothing is written there; leave it out (it says where a "
                                  "checkpoint's shards, or a compressed copy, go).")
        elif (local / PROGRESS_NAME).is_file() or (local / "embed.safetensors").is_file():
            raise CorruptShardError(f"{local} is an unfinished shard folder (no {MANIFEST_NAME}); finish it with "
                                    f"python -m airmlx.shard ORIGINAL_MODEL {local}")
        else:
            source_name = f"{path_or_id}/{gguf_file}" if gguf_file else path_or_id
            shard_dir = Path(layer_shards_saving_path or default_shard_dir(source_name, compression)).expanduser()
            if layer_shards_saving_path is not None:
                refuse_another_model(shard_dir, path_or_id, gguf_file, compression)
            # a hub model, or a GGUF deleted once sharded (delete_original), opens its finished folder as it is
            if not ((is_hub_id(str(path_or_id)) or gone_local_gguf(source_name)) and complete_folder(shard_dir)):
                src = resolve_model(path_or_id, hf_token=hf_token, allow_pickle=allow_pickle, progress=progress,
                                    gguf_file=gguf_file)
                try:
                    shard_checkpoint(src, shard_dir, delete_original=delete_original, allow_pickle=allow_pickle,
                                     compression=compression, progress=progress)
                except CheckpointError:
                    plain = sharded_into(src) or default_shard_dir(source_name)
                    if compression is None or not complete_folder(plain):
                        raise
                    # quantised from the weights that folder was made from: it says when delete_original removed
                    # them (and with them there, it shards as the call above did)
                    quantised_copy(plain, compression, progress, out=shard_dir)
        manifest = Manifest.load(shard_dir)
        arch_for(manifest.config)
        if launched is None and manifest.pipeline:
            hosts = len(manifest.pipeline["stages_per_host"])
            raise OptionError(f"{shard_dir} holds only host {manifest.pipeline['rank']}'s stages of a pipeline over "
                              f"{hosts} hosts (shard --hosts {hosts}); run it in that pipeline, launched by mlx.launch "
                              "or torchrun (README, \"Several hosts\"), or shard the model without --hosts for one "
                              "process.")
        backend_obj = make_backend(name, manifest, device, dtype, trust_remote_code, shard_dir)
        if launched is not None:
            if draft_model is not None:
                raise DraftModelError("a pipeline over several ranks does not speculate; leave out draft_model.")
            from .pipeline_model import open_launched
            return open_launched(launched, shard_dir, backend_obj, getattr(backend_obj, "device", None),
                                 memory_budget=memory_budget, split=pipeline_split,
                                 timeout=DEFAULT_TIMEOUT if pipeline_timeout is None else pipeline_timeout,
                                 prefetching=prefetching, profiling_mode=profiling_mode,
                                 trust_remote_code=trust_remote_code, prefill_step_size=prefill_step_size,
                                 progress=progress)
        draft, owned = None, False
        if draft_model is not None:
            check_num_draft_tokens(num_draft_tokens)
            draft, owned = load_draft(draft_model, shard_dir, name, device, dtype, hf_token, allow_pickle, progress,
                                      trust_remote_code, prefill_step_size)
        try:
            model = AirModel(shard_dir, backend_obj, memory_budget=memory_budget, prefetching=prefetching,
                             profiling_mode=profiling_mode, trust_remote_code=trust_remote_code,
                             prefill_step_size=prefill_step_size, draft=draft, num_draft_tokens=num_draft_tokens,
                             progress=progress)
        except BaseException:
            if owned:
                draft.close()
            raise
        model.owns_draft = owned
        return model


def refuse_another_model(shard_dir: Path, path_or_id, gguf_file, compression) -> None:
    """A layer_shards_saving_path that holds the shards of another model, or of this one at another
    compression, is an error: a hub id would open that model as it is, a local checkpoint would overwrite
    it. A newer revision of the same repo or files is still resharded there."""
    try:
        manifest = Manifest.load(shard_dir)
    except CorruptShardError:
        return  # nothing finished there: sharding starts or resumes it
    made_from = manifest.extra.get("source_path")
    other, what = False, "another model"
    if made_from:
        made = Path(made_from)
        repo = next((p[len("models--"):].replace("--", "/") for p in made.parts if p.startswith("models--")), None)
        what = repo or made_from
        if is_hub_id(str(path_or_id)):
            other = repo != str(path_or_id) or (gguf_file is not None and not same_file(
                cached_hub_file(str(path_or_id), gguf_file), made))
        else:
            given = resolve_model(path_or_id, gguf_file=gguf_file)  # local: the folder or .gguf it names
            other = not (same_file(given, made) or made.suffix == ".gguf" and given.is_dir() and any(
                same_file(g, made) for g in given.glob("*.gguf")))
    applied = manifest.source.get("quantization")
    other_compression = bool(applied) != bool(compression) or (
        bool(compression) and not same_compression(applied, compression))
    if other or other_compression:
        held = f"{applied['bits']}-bit" if applied else "unquantised"
        raise OptionError(f"layer_shards_saving_path {shard_dir} holds the {held} shards of {what}, not "
                          f"{path_or_id}{f' ({gguf_file})' if gguf_file else ''} "
                          f"{f'as {compression}' if compression else 'unquantised'}; give each model and "
                          "compression a folder of its own (leave the path out for one under $HF_HOME/airmlx); to "
                          "run what it holds, pass that folder as the model.")


def same_file(a: "Path | None", b: Path) -> bool:
    """Whether a names b (links followed); True when a is None (not known here)."""
    return a is None or a.resolve() == b.resolve()


def cached_hub_file(repo: str, filename: str) -> "Path | None":
    """The hub cache's copy of a repo's file, or None when it holds none (then nothing can be compared)."""
    from huggingface_hub import try_to_load_from_cache
    found = try_to_load_from_cache(repo, filename)
    return Path(found) if isinstance(found, str) else None


def same_compression(quantization: "dict | None", compression) -> bool:
    """Whether a shard folder quantised as `quantization` (its manifest's) is what `compression` asks for."""
    want = compression_config(compression)
    return bool(quantization) and all(quantization.get(k) == want.get(k) for k in ("bits", "group_size", "method"))


def load_draft(spec, shard_dir: Path, backend: str, device=None, dtype=None, hf_token=None,
               allow_pickle: bool = False, progress: bool = True, trust_remote_code: bool = False,
               prefill_step_size: int = 512) -> tuple:
    """(the draft AirModel, whether it was loaded here and so belongs to the model): `spec` is an AirModel,
    a compression ("4bit", "8bit", "4bit-g32", ...: a quantised copy of the model in shard_dir), or a path or
    hub id."""
    if isinstance(spec, AirModel):
        return spec, False
    if not isinstance(spec, (str, Path)):
        raise DraftModelError(f"draft_model={spec!r}: pass a path, a hub id, an AirModel, or one of "
                              f"{sorted(COMPRESSIONS)} for a quantised copy of the model.")
    copy = isinstance(spec, str) and COMPRESSION_SPELLING.fullmatch(spec) and not Path(spec).exists()
    if copy:
        compression_config(spec)  # an OptionError for a spelling it does not take ("3bit", "4bit-g48")
        if same_compression(Manifest.load(shard_dir).quantization, spec):
            raise DraftModelError(f"the model is quantised as {spec} already, so its {spec} copy would be the "
                                  "model itself; use draft_model=PATH of a smaller model (or '4bit' for an 8-bit "
                                  "model).")
    source = quantised_copy(Path(shard_dir), spec, progress) if copy else spec
    # the draft's precision changes only how many proposals are accepted, never the output: it may compute in
    # whatever its backend runs fastest (bf16 on torch's CPU, where its int4 kernel is 7 x faster than in fp32)
    dtype = dtype or backend_class(backend).draft_dtype(device)

    def load(budget):
        return AutoModel.from_pretrained(source, backend=backend, device=device, dtype=dtype, memory_budget=budget,
                                         hf_token=hf_token, allow_pickle=allow_pickle, progress=progress,
                                         trust_remote_code=trust_remote_code, prefill_step_size=prefill_step_size)

    draft = load(UNLIMITED)
    plan = draft.plan
    if plan.expert_bytes:  # MoE: the expert cache would take all of an unlimited budget; size it to every expert
        draft.close()
        draft = load(plan.resident_bytes + plan.load_overhead + plan.expert_bytes * 4 // 3 + draft.minimum_budget)
    draft.plan.budget = draft.plan.total_bytes  # everything resident: its budget is what it holds
    return draft, True
