"""Checkpoint folder -> shard folder: manifest.json plus one safetensors file per stage.

Tensors are copied as byte ranges straight from the source files, so no stage is ever held in memory
and bf16/fp16/fp32 pass through untouched. Every file is written as NAME.tmp, fsynced and renamed;
progress.json records finished stages so an interrupted run resumes; the manifest is written last.
`python -m airmlx.shard` is the command-line face (airmlx/shard.py).
"""
import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm  # text bars everywhere: tqdm.auto wants ipywidgets in notebooks

from . import quant
from .archs import (
    ARCHS,
    LANGUAGE_MODELS,
    arch_for,
    expert_index,
    from_mlx_names,
    stage_layout,
    unquantized_modules,
    with_base_prefix,
)
from .errors import CheckpointError, CorruptShardError, InsufficientDiskSpaceError, OptionError
from .hf_config import with_standard_names
from .manifest import MANIFEST_NAME, Manifest, StageEntry, fsync_dir, same_source, write_atomic
from .multimodal import (
    SOURCE_CONFIG,
    WRAPPED,
    language_model_config,
    language_model_tensor,
    processor_chat_template,
)
from .relayout import (
    FP8_SCALES,
    Dequantized,
    Derived,
    conv1d_as_linear,
    dequantized_fp8,
    per_expert_quantization,
    quant_method,
    read_array,
    read_bytes,
    split_fused_experts,
    split_stacked_experts,
)
from .stagefile import (
    LEGACY_DIR,
    PROGRESS_NAME,
    STAGE_FILE,
    complete_folder,
    delete_sources,
    disk_full_named,
    finished_folder,
    folder_lock,
    make_folder,
    quantized,
    reusable,
    say_ungrouped,
    stage_items,
    write_stage,
)
from .tensorfile import DTYPE_SIZES, NUMPY_VIEWS, read_header

# files the source carries besides its weights that the shard folder needs: config, tokenizer (whatever its
# files are called: tokenizer.json, qwen.tiktoken, vocab.txt, ...), chat template, the checkpoint's own code
AUX_SUFFIXES = (".json", ".jinja", ".model", ".txt", ".tiktoken", ".py", ".vocab")
NOT_AUX = re.compile(r"^(model\.safetensors\.index\.json|pytorch_model\.bin\.index\.json|manifest\.json|"
                     r"progress\.json|airmlx_sharded\.json|README.*|LICENSE.*|.*\.md)$")
# left in a source folder whose weights delete_original removed: the shard folder they went to
SHARDED_NAME = "airmlx_sharded.json"
# Trainer and optimizer state saved beside pickle weights: never model weights
NOT_WEIGHTS = re.compile(r"^(training_args|optimizer|scheduler|rng_state.*|scaler)\.(bin|pt)$")
# mistral-inference's copy of the weights (other tensor names), shipped beside the HF files in mistralai repos
MISTRAL_INFERENCE = re.compile(r"^consolidated.*\.safetensors$")


def load_config(src):
    path = Path(src) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{src}: no config.json; point airmlx at a Hugging Face model folder.")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); re-download the model.")
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: holds a JSON {type(config).__name__}, not an object of settings; "
                              "re-download the model.")
    if config.get("model_type") in LANGUAGE_MODELS:
        return checked_sizes(language_model_config(config), path)  # transformers' config class fills in defaults
    filled = with_standard_names(config)
    if filled is not config:  # derived by transformers' config class: the folder's fingerprint is of config.json
        filled[SOURCE_CONFIG] = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    return checked_sizes(filled, path)


SIZES = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "vocab_size")


def checked_sizes(config: dict, path) -> dict:
    """config, where the sizes every stage is laid out by are whole numbers (a string or null: one line)."""
    for key in SIZES:
        value = config.get(key)
        if key in config and not (key == "num_key_value_heads" and value is None) and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise CheckpointError(f"{path}: {key} is {json.dumps(value)[:40]}; it must be a whole number >= 1.")
    return config


def weight_files(src, allow_pickle=False):
    """The source's safetensors files, in a stable order. Refuses pickle checkpoints without the opt-in."""
    src = Path(src)
    index = src / "model.safetensors.index.json"
    if index.is_file():
        names = index_files(index)
        missing = [n for n in names if not (src / n).is_file()]
        if missing:
            raise CheckpointError(f"{src}: files listed in model.safetensors.index.json are missing: {missing}; "
                                  "the download is incomplete.")
        return [src / n for n in names]
    files = sorted(src.glob("*.safetensors"))
    hf_layout = [f for f in files if not MISTRAL_INFERENCE.match(f.name)]
    if files:
        return hf_layout or files
    bins = pickle_files(src)
    if bins and not allow_pickle:
        raise CheckpointError(
            f"{src} holds only legacy PyTorch pickle files ({bins[0].name}, ...). Loading pickle can run "
            "arbitrary code; pass allow_pickle=True (--allow-pickle) to convert them, or use a safetensors checkpoint.")
    if bins:
        return bins
    if (folder := sharded_into(src)) is not None:
        raise CheckpointError(f"{src}: its weights were deleted once sharded into {folder} (delete_original=True); "
                              f"open that folder instead (from_pretrained('{folder}')); a compressed copy needs the "
                              "original weights again.")
    raise CheckpointError(f"{src}: no *.safetensors weights found; is this a model folder?")


def sharded_into(src) -> "Path | None":
    """The shard folder delete_original recorded in src when it removed src's weights, if it is still whole."""
    try:
        folder = Path(json.loads((Path(src) / SHARDED_NAME).read_text())["shard_folder"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return folder if complete_folder(folder) else None


def pickle_files(src):
    """Legacy pickle weights: those pytorch_model.bin.index.json names, else pytorch_model*.bin / model*.bin
    (never training_args.bin, optimizer.bin and other Trainer state)."""
    index = src / "pytorch_model.bin.index.json"
    if index.is_file():
        names = index_files(index)
        missing = [n for n in names if not (src / n).is_file()]
        if missing:
            raise CheckpointError(f"{src}: files listed in {index.name} are missing: {missing}; the download is "
                                  "incomplete.")
        return [src / n for n in names]
    return sorted(p for p in src.glob("*.bin") if p.name.startswith(("pytorch_model", "model"))
                  and not NOT_WEIGHTS.match(p.name))


def index_files(index: Path) -> list:
    """The weight files a checkpoint's index (model.safetensors.index.json, ...) names, sorted."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{index}: not a valid index ({type(e).__name__}: {e}); re-download the model.") from None
    if not all(isinstance(n, str) and n for n in names):
        raise CheckpointError(f"{index}: not a valid index (its weight_map names no files); re-download the model.")
    return names


def aux_files(src):
    """The source's small non-weight files that the shard folder copies."""
    return sorted(p.name for p in Path(src).iterdir() if p.is_file() and p.suffix in AUX_SUFFIXES
                  and not NOT_AUX.match(p.name) and not p.name.endswith(".safetensors"))


def source_tensors(files):
    """({tensor name: (file, data_start, TensorInfo)} over all source files, the files' metadata "format"s)."""
    tensors, formats = {}, set()
    for path in files:
        try:
            data_start, infos, metadata = read_header(path, fix="download the checkpoint again.")
        except CorruptShardError as e:
            raise CheckpointError(str(e)) from None
        for name, info in infos.items():
            if name in tensors:
                raise CheckpointError(f"tensor {name!r} appears in both {tensors[name][0].name} and {path.name}.")
            tensors[name] = (path, data_start, info)
        formats.add(metadata.get("format"))
    return tensors, formats


SPLIT_STACKED = "stacked experts"  # in the fingerprint of a checkpoint mlx-lm wrote whose experts the sharder splits


def fingerprint(files, config, quantization=None, written_by=None):
    """What the shard folder was made from; any change means the folder is rebuilt. A MoE checkpoint mlx-lm wrote
    is marked as one whose stacked experts are split (airmlx before 2026-12-03 kept them whole in their layers),
    so a folder made then is rebuilt; no other folder's fingerprint changes."""
    arch = ARCHS.get(config.get("model_type"))
    split = written_by == "mlx-lm" and arch is not None and arch.experts is not None
    return {
        "files": [{"name": p.name, "size": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns} for p in files],
        # an image-text checkpoint's: of its config.json, not of the language model's config transformers derives
        "config_sha256": config.get(SOURCE_CONFIG) or hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest(),
        "quantization": quantization,
        **({"relayout": SPLIT_STACKED} if split else {}),
    }


def checkpoint_fingerprint(src: Path, files: list, qconfig=None) -> dict:
    """The fingerprint shard_checkpoint gives a folder it makes from the checkpoint's weight `files` (repair
    compares it): of the config as the sharder derives it from the checked tensors (pickled files: as stored)."""
    config, written_by = load_config(src), None
    if files[0].suffix != ".bin":
        _, written_by, config = checked_sources(files, config, src)
    return fingerprint(files, config, qconfig, written_by)


def expert_items(arch, tensor_names, sources, qconfig=None):
    """An experts stage's items, expert by expert, and each expert's [start, end) in the data section."""
    by_expert = {}
    for t in tensor_names:
        by_expert.setdefault(expert_index(arch, t), []).append(t)
    items, parts, pos = [], {}, 0
    for e in sorted(by_expert):
        group = stage_items(by_expert[e], sources, qconfig)
        size = sum(math.prod(shape) * DTYPE_SIZES[dtype] for _, dtype, shape, _ in group)
        items += group
        parts[str(e)] = [pos, pos + size]
        pos += size
    return items, parts


def stage_bytes(tensor_names, sources, qconfig=None):
    """Bytes a stage file will take (an estimate that errs high: header room included)."""
    total = 1024
    for t in tensor_names:
        info = sources[t][2]
        if quantized(t, info, qconfig):
            rows, cols = info.shape
            groups = rows * cols // qconfig["group_size"]
            total += rows * cols * qconfig["bits"] // 8 + 2 * groups * DTYPE_SIZES[info.dtype] + 300
        else:
            total += info.nbytes + 100
    return total


@dataclass
class Job:
    """One sharding run: what is read, what is written, and what is already there."""
    src: Path
    out: Path
    config: dict
    qconfig: dict
    originals: list  # the source's weight files (the fingerprint; what delete_original removes)
    sources: dict = None  # tensor name -> (file, data start, TensorInfo)
    written_by: str = None  # "mlx-lm": its names are mlx-lm's where it renames beyond what checked_sources undoes
    layout: list = None  # [(stage name, kind, tensor names)] in sweep order
    fingerprint: dict = None
    done: dict = None  # stage name -> StageEntry already written and intact
    pipeline: dict = None  # --hosts N --rank R: {"stages_per_host": [...], "rank": R} (Manifest.pipeline)
    held: set = None  # the stages whose files this folder gets (all but with --hosts)

    @property
    def progress_path(self):
        return self.out / PROGRESS_NAME


# tensors of weights quantised in formats airmlx does not read: fp8 scales (DeepSeek-V3), GPTQ / AWQ packs,
# bitsandbytes' states, EXL2, HQQ and AQLM codes; mlx-lm's own (.scales, .biases) come with a "quantization"
# entry in config.json
FOREIGN_QUANTIZED = re.compile(r"\.(weight_scale_inv|weight_scale|input_scale|qweight|qzeros|g_idx|SCB|absmax|"
                               r"quant_map|nested_absmax|nested_quant_map|quant_state\.\w+|q_weight|q_scale|"
                               r"q_invperm|W_q|codes|codebooks)$")
FP8 = ("F8_E4M3", "F8_E5M2")


def refuse_foreign_quantization(config: dict, dtypes: dict, src) -> None:
    """A checkpoint whose tensors (name -> safetensors dtype, or None where unknown) are quantised in another
    format is refused in one line. A stale quantization_config over plain weights (DeepSeek's fp8-to-bf16
    script leaves it) is not, nor are fp8 weights with block scales, which the sharder dequantises."""
    if "quantization" in config:
        return
    method = quant_method(config)
    fp8 = method == "fp8"  # read: relayout.dequantized_fp8
    found = next((n for n, dtype in dtypes.items() if (FOREIGN_QUANTIZED.search(n) or dtype in FP8) and
                  not (fp8 and (n.endswith(FP8_SCALES) or dtype in FP8))), None)
    if found is not None:
        raise CheckpointError(f"{src} holds weights quantised {f'with {method}' if method else 'in another format'} "
                              f"(e.g. {found}), which airmlx does not read; use the model's bf16 or fp16 checkpoint "
                              "(airmlx quantises it with compression='4bit' or '8bit').")


def checked_sources(files, config: dict, src) -> tuple:
    """(source_tensors(files), once refuse_foreign_quantization has found none quantised in another format;
    "mlx-lm" where mlx-lm wrote the files, else None; the config the shard folder's manifest carries for them)."""
    sources, formats = source_tensors(files)
    if config.get(WRAPPED):  # an image-text checkpoint: its language model's tensors, named as that model's
        sources = {new: entry for name, entry in sources.items() if (new := language_model_tensor(name))}
    arch = ARCHS.get(config.get("model_type"))
    mlx_written = False
    if arch and arch.mlx_names and not any(n.startswith(arch.embed_prefix) for n in sources):  # mlx-lm wrote it?
        names = from_mlx_names(arch, sources)
        mlx_written = any(old != new for old, new in names.items())
        sources = {new: sources[old] for old, new in names.items()}
    if arch and not any(n.startswith(arch.embed_prefix) for n in sources):  # saved from the base model
        sources = {new: sources[old] for old, new in with_base_prefix(arch, sources).items()}
    sources = split_stacked_experts(arch, config, split_fused_experts(arch, config, sources))
    if not mlx_written:  # mlx-lm's linears are (out, in) already
        sources = conv1d_as_linear(arch, sources)
    sources = dequantized_fp8(config, sources, src)
    refuse_foreign_quantization(config, {n: info.dtype for n, (_, _, info) in sources.items()}, src)
    return sources, "mlx-lm" if "mlx" in formats else None, shard_config(config, sources)


def untied_where_stored_apart(config: dict, sources: dict) -> dict:
    """config, untied where it ties the head to the embedding but the checkpoint stores a head of other values:
    transformers then runs the stored head (and warns), and so does airmlx."""
    arch = ARCHS.get(config.get("model_type"))
    head, embed = (sources.get(f"{path}.weight") for path in (arch.head, arch.embed)) if arch else (None, None)
    if not config.get("tie_word_embeddings") or head is None or embed is None:
        return config
    if same_values(head, embed):
        return config
    print(f"airmlx: config.json ties {arch.head}.weight to {arch.embed}.weight, but the checkpoint holds a head of "
          "other values; it runs untied, as transformers runs it.", file=sys.stderr)
    return {**config, "tie_word_embeddings": False}


def shard_config(config: dict, sources: dict) -> dict:
    """The config the shard folder's manifest carries for these (checked) sources."""
    arch = ARCHS.get(config.get("model_type"))
    return per_expert_quantization(arch, plain_config(untied_where_stored_apart(config, sources), sources))


def plain_config(config: dict, sources: dict) -> dict:
    """config without the quantization_config of fp8 or mxfp4 weights the sharder dequantises: the shards hold plain
    ones."""
    if any(isinstance(info, Dequantized) for _, _, info in sources.values()):
        return {k: v for k, v in config.items() if k != "quantization_config"}
    return config


def same_values(a, b, chunk: int = 64 << 20) -> bool:
    """Whether two source tensors ((file, data start, TensorInfo)) hold the same values, read a chunk at a time
    (an embedding may be gigabytes)."""
    (apath, astart, ainfo), (bpath, bstart, binfo) = a, b
    if ainfo.shape != binfo.shape or ainfo.dtype != binfo.dtype:
        return False
    if isinstance(ainfo, Derived) or isinstance(binfo, Derived):
        view = NUMPY_VIEWS[ainfo.dtype]
        return np.array_equal(read_array(apath, astart, ainfo, view), read_array(bpath, bstart, binfo, view))
    size = ainfo.end - ainfo.start
    return all(np.array_equal(read_bytes(apath, astart + ainfo.start + at, min(chunk, size - at), np.uint8),
                              read_bytes(bpath, bstart + binfo.start + at, min(chunk, size - at), np.uint8))
               for at in range(0, size, chunk))


def quantization_for(config, compression, src):
    """The mlx-lm style quantisation config compression asks for, or None."""
    if not compression:
        return None
    if "quantization" in config:
        raise CheckpointError(f"{src} is already quantised ({config['quantization']}); shard it without compression.")
    qconfig = quant.compression_config(compression)
    if qconfig.get("method"):  # refused before the shard folder is made, not after it
        from .calibrate import check_dense
        check_dense(config, qconfig)
    # mlx-lm's per-module convention: False keeps a module unquantised
    return {**qconfig, **dict.fromkeys(unquantized_modules(config), False)}


def resume_state(job, verify):
    """Stages a previous run of the same checkpoint left intact (from its manifest or progress.json); the
    manifest of an incomplete or foreign folder is removed first, so the folder counts as unfinished."""
    try:
        existing = Manifest.load(job.out)
    except CorruptShardError:
        existing = None
    done = {}
    if existing is not None and existing.source == job.fingerprint and existing.pipeline == job.pipeline:
        done = reusable(job.out, existing.held_stages(), verify=verify)
        done.update({e.name: e for e in existing.stages if e.name not in job.held})  # other hosts': no files
        if len(done) == len(job.layout):
            job.progress_path.unlink(missing_ok=True)  # left behind when a run was killed right after the manifest
            return done, existing
        print(f"airmlx: {job.out}: rebuilding damaged or missing stages "
              f"{[s.name for s in existing.stages if s.name not in done]}.", file=sys.stderr)
    elif existing is not None:
        made_from = existing.extra.get("source_path")
        if made_from and not same_source(Path(made_from), job.src):
            raise OptionError(f"{job.out} holds the shards of {made_from}, not of {job.src}; give each model a folder "
                              f"of its own (or delete {job.out} first).")
        same_files = {**existing.source, "quantization": None} == {**job.fingerprint, "quantization": None}
        why = "with another compression" if same_files else "from a different checkpoint"
        if {**existing.source, "relayout": SPLIT_STACKED} == job.fingerprint:
            why = "by an earlier airmlx, which kept mlx-lm's stacked experts inside their layers"
        print(f"airmlx: {job.out} was made {why}; rebuilding it.", file=sys.stderr)
    if existing is not None:
        (job.out / MANIFEST_NAME).unlink()
        fsync_dir(job.out)
    if not done and job.progress_path.is_file():
        try:
            saved = json.loads(job.progress_path.read_text())
            if saved.get("source") == job.fingerprint:
                done = reusable(job.out, [StageEntry(**e) for e in saved["stages"]], verify=True)
        except (ValueError, TypeError, KeyError):
            pass  # an unreadable progress file only costs a full rebuild
    return done, None


def check_disk(job, sizes):
    """Refuse to start when the stages still to write do not fit the free space."""
    need = sum(size for name, size in sizes.items() if name not in job.done)
    free = shutil.disk_usage(job.out).free
    if need > free:
        raise InsufficientDiskSpaceError(
            f"{job.out}: sharding needs {need:,} bytes but only {free:,} are free; free "
            f"{need - free:,} bytes there or pass another layer_shards_saving_path.")
    return need


def write_stages(job, sizes, need, progress):
    """Write every stage not yet done, recording each in progress.json as it lands."""
    arch = arch_for(job.config)
    calibrator = None
    if job.qconfig and job.qconfig.get("method"):  # calibrated quantisation: see airmlx/calibrate.py
        from . import calibrate
        calibrator = calibrate.for_checkpoint(job.src, job.config, job.qconfig, job.sources)
    fds = {}
    bar = tqdm(total=need, unit="B", unit_scale=True, desc=f"sharding {job.src.name}", disable=not progress)
    try:
        with bar:
            for index, (name, kind, tensor_names) in enumerate(job.layout):
                if name in job.done:
                    continue
                if kind == "experts":
                    items, parts = expert_items(arch, tensor_names, job.sources, job.qconfig)
                elif calibrator:
                    items, parts = calibrate.checkpoint_stage_items(calibrator, name, kind, tensor_names, job.sources,
                                                                    job.qconfig), None
                else:
                    items, parts = stage_items(tensor_names, job.sources, job.qconfig), None
                job.done[name] = write_stage(job.out, name, kind, index, items, fds, parts, keep=name in job.held)
                write_atomic(job.progress_path, json.dumps(
                    {"source": job.fingerprint, "stages": [vars(e) for e in job.done.values()]}).encode())
                bar.update(sizes[name])
    finally:
        for fd in fds.values():
            os.close(fd)


def finalise(job):
    """Copy the small files, drop stale stage files, write the manifest last; return it."""
    for aux in aux_files(job.src):
        write_atomic(job.out / aux, (job.src / aux).read_bytes())
    if (template := processor_chat_template(job.src)) is not None:
        write_atomic(job.out / "chat_template.jinja", template.encode())
    stages = [job.done[name] for name, _, _ in job.layout]
    for stale in job.out.iterdir():
        if STAGE_FILE.match(stale.name) and stale.name not in {s.file for s in stages}:
            stale.unlink()
    config = with_stored_dtype(job.config, job.sources)
    if job.qconfig:  # the mlx-lm convention: the config says how its weights are quantised
        config = {**config, "quantization": job.qconfig}
    extra = {"source_path": str(job.src.resolve())}
    if job.written_by:
        extra["written_by"] = job.written_by
    if job.pipeline:
        extra["pipeline"] = job.pipeline
    manifest = Manifest(architecture=config["model_type"], config=config, source=job.fingerprint, stages=stages,
                        quantization=config.get("quantization"), extra=extra)
    manifest.save(job.out)
    job.progress_path.unlink(missing_ok=True)
    return manifest


def shard_checkpoint(src: "str | Path", out: "str | Path", *, delete_original: bool = False,
                     allow_pickle: bool = False, compression: "str | None" = None, progress: bool = True,
                     verify: bool = False, hosts: int = 1, rank: int = 0,
                     pipeline_split: "str | list | None" = None) -> Path:
    """Shard the checkpoint folder `src` into `out`; return `out`. Reuses a matching folder, resumes an
    interrupted one, rebuilds one made from a different source. verify=True checks the checksums of the
    stages it would reuse and rebuilds the damaged ones. hosts > 1: a pipeline (airmlx/pipeline.py) over
    that many hosts; `out` gets only the stage files of host `rank` (pipeline_split: stages per host, default
    balanced by bytes), and its manifest lists every stage and says which host holds what."""
    src, out = Path(src).expanduser(), Path(out).expanduser()
    from .gguf import find_gguf, shard_gguf  # a .gguf file, or a folder holding one, is another source
    if (gguf_path := find_gguf(src)) is not None:
        if hosts != 1 or pipeline_split is not None:
            raise CheckpointError(f"{gguf_path}: --hosts/--rank split only Hugging Face checkpoints; shard the whole "
                                  "GGUF on each host (python -m airmlx.shard FILE.gguf OUT): each rank still streams "
                                  "only its own range.")
        return shard_gguf(gguf_path, out, compression=compression, progress=progress, verify=verify,
                          delete_original=delete_original)
    if not src.is_dir():
        raise CheckpointError(f"{src}: not a folder; give the path of a Hugging Face model folder.")
    if (src / MANIFEST_NAME).is_file() and (src / "embed.safetensors").is_file():
        try:
            made_from = Manifest.load(src).extra.get("source_path")
        except CorruptShardError:
            made_from = None
        raise CheckpointError(f"{src} is an airmlx shard folder, not a checkpoint; shard the checkpoint it was made "
                              f"from{f' ({made_from})' if made_from else ''}, or open the folder as the model "
                              "(from_pretrained(FOLDER, compression=...) makes a quantised copy of it).")
    config = load_config(src)
    arch_for(config)  # an architecture airmlx does not run is said before anything else
    qconfig = quantization_for(config, compression, src)
    try:
        originals = weight_files(src, allow_pickle)
    except CheckpointError:
        if complete_folder(out, verify):  # the originals were deleted after an earlier sharding
            return out
        raise
    job = Job(src, out, config, qconfig, originals)
    pickled = originals[0].suffix == ".bin"
    if not pickled:  # before the shard folder is made: a refused checkpoint leaves nothing behind
        job.sources, job.written_by, config = checked_sources(originals, config, src)
        job.config = config
        made = not verify and hosts == 1 and pipeline_split is None and \
            finished_folder(out, fingerprint(originals, config, qconfig, job.written_by))
        if made:  # nothing written, no lock taken: a shard folder on a read-only disk opens
            finish_delete(src, out, originals, made, delete_original)
            return out
        sizes = share_stages(job, hosts, rank, pipeline_split)  # a bad --hosts, --rank or split: before the folder
    make_folder(out)
    with folder_lock(out), contextlib.ExitStack() as cleanup:
        if pickled:
            from .legacy import convert_pickle_checkpoint
            files = convert_pickle_checkpoint(originals, out / LEGACY_DIR)
            cleanup.callback(shutil.rmtree, out / LEGACY_DIR, True)
            job.sources, job.written_by, config = checked_sources(files, config, src)
            job.config = config
            sizes = share_stages(job, hosts, rank, pipeline_split)
        job.fingerprint = fingerprint(originals, config, qconfig, job.written_by)
        job.done, manifest = resume_state(job, verify)
        if manifest is None and qconfig and qconfig.get("method"):
            job.done = {}  # each stage's calibration needs the ones before it: an interrupted run starts over
        if manifest is None:
            if qconfig:
                say_ungrouped([info for _, _, info in job.sources.values()], qconfig)
            sizes = {name: size if name in job.held else 0 for name, size in sizes.items()}  # files written here
            need = check_disk(job, sizes)
            small = sum((src / a).stat().st_size for a in aux_files(src)) + (1 << 20)  # + the manifest
            with disk_full_named(out, lambda: small + sum(v for k, v in sizes.items() if k not in job.done)):
                write_stages(job, sizes, need, progress)
                manifest = finalise(job)
        finish_delete(src, out, originals, manifest, delete_original)
    return out


FLOAT_NAMES = quant.STORAGE_NAMES


def with_stored_dtype(config: dict, sources: dict) -> dict:
    """config with the dtype most of the checkpoint's floating-point bytes are stored in, where config.json names
    none (GPT-2's predate torch_dtype): both backends take their compute dtype and KV sizes from it."""
    if config.get("dtype") or config.get("torch_dtype"):
        return config
    stored = {}
    for _, _, info in sources.values():
        if info.dtype in FLOAT_NAMES:
            stored[info.dtype] = stored.get(info.dtype, 0) + info.nbytes
    return {**config, "dtype": FLOAT_NAMES[max(stored, key=stored.get)]} if stored else config


def share_stages(job, hosts, rank, split=None) -> dict:
    """Lay the checkpoint's tensors out in stages (job.layout) and give this host its share of them (job.pipeline,
    job.held: host_share); returns each stage's estimated file bytes."""
    job.layout = stage_layout(job.config, list(job.sources))
    sizes = {name: stage_bytes(ts, job.sources, job.qconfig) for name, _, ts in job.layout}
    job.pipeline, job.held = host_share(job.layout, sizes, hosts, rank, split)
    return sizes


def host_share(layout, sizes, hosts, rank, split=None):
    """(Manifest.pipeline record or None, names of the stages whose files this folder gets)."""
    if hosts == 1 and split is None:
        return None, {name for name, _, _ in layout}
    from .pipeline import check_split, even_split, parse_split
    if not isinstance(hosts, int) or hosts < 2 or not isinstance(rank, int) or not 0 <= rank < hosts:
        raise CheckpointError(f"--hosts {hosts} --rank {rank}: give 2 or more hosts and a rank from 0 to hosts - 1.")
    experts = {name.rsplit(".", 1)[0]: sizes[name] for name, kind, _ in layout if kind == "experts"}
    sweep = [(name, sizes[name] + experts.get(name, 0)) for name, kind, _ in layout if kind != "experts"]
    counts = parse_split(split, hosts) or even_split([size for _, size in sweep], hosts)
    entries = [StageEntry(name, kind, i, "", 0, "", []) for i, (name, kind, _) in enumerate(layout)]
    names = check_split(Manifest("", {}, {}, entries), counts)[rank]
    return {"stages_per_host": counts, "rank": rank}, set(names)


def finish_delete(src, out, originals, manifest, delete_original):
    """delete_original: remove the source weights, but only after every stage reads back intact."""
    if not delete_original:
        return
    delete_sources(out, manifest, originals, "the original weights were")
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        (Path(src) / index).unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # only a pointer for later calls: a read-only folder goes without
        write_atomic(Path(src) / SHARDED_NAME, json.dumps({"shard_folder": str(Path(out).resolve())}).encode())

