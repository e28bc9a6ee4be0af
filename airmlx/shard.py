"""Checkpoint folder -> shard folder: manifest.json plus one safetensors file per stage.

Tensors are copied as byte ranges straight from the source files, so no stage is ever held in memory
and bf16/fp16/fp32 pass through untouched. Every file is written as NAME.tmp, fsynced and renamed;
progress.json records finished stages so an interrupted run resumes; the manifest is written last.
"""
import argparse
import contextlib
import errno
import hashlib
import json
import math
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm  # text bars everywhere: tqdm.auto wants ipywidgets in notebooks

from . import quant
from .archs import arch_for, expert_index, stage_layout
from .errors import AirmlxError, CheckpointError, CorruptShardError, InsufficientDiskSpaceError
from .manifest import MANIFEST_NAME, Manifest, StageEntry, fsync_dir, write_atomic
from .tensorfile import DTYPE_SIZES, aligned_order, encode_header, read_header

PROGRESS_NAME = "progress.json"
LOCK_NAME = ".airmlx.lock"
COPY_CHUNK = 64 << 20
AUX_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
             "chat_template.jinja", "chat_template.json")
STAGE_FILE = re.compile(r"^(embed|head|layer\.\d+(\.experts)?)\.safetensors(\.tmp)?$")
DISK_FULL = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}


def load_config(src):
    path = Path(src) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{src}: no config.json; point airmlx at a Hugging Face model folder.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); re-download the model.")


def weight_files(src, allow_pickle=False):
    """The source's safetensors files, in a stable order. Refuses pickle checkpoints without the opt-in."""
    src = Path(src)
    index = src / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (src / n).is_file()]
        if missing:
            raise CheckpointError(f"{src}: files listed in model.safetensors.index.json are missing: {missing}; "
                                  "the download is incomplete.")
        return [src / n for n in names]
    files = sorted(src.glob("*.safetensors"))
    if files:
        return files
    bins = sorted(src.glob("*.bin"))
    if bins and not allow_pickle:
        raise CheckpointError(
            f"{src} holds only legacy PyTorch pickle files ({bins[0].name}, ...). Loading pickle can run "
            "arbitrary code; pass allow_pickle=True (--allow-pickle) to convert them, or use a safetensors checkpoint.")
    if bins:
        return bins
    raise CheckpointError(f"{src}: no *.safetensors weights found; is this a model folder?")


def source_tensors(files):
    """{tensor name: (file, data_start, TensorInfo)} over all source files."""
    tensors = {}
    for path in files:
        try:
            data_start, infos, _ = read_header(path, fix="download the checkpoint again.")
        except CorruptShardError as e:
            raise CheckpointError(str(e)) from None
        for name, info in infos.items():
            if name in tensors:
                raise CheckpointError(f"tensor {name!r} appears in both {tensors[name][0].name} and {path.name}.")
            tensors[name] = (path, data_start, info)
    return tensors


def fingerprint(files, config, quantization=None):
    """What the shard folder was made from; any change means the folder is rebuilt."""
    return {
        "files": [{"name": p.name, "size": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns} for p in files],
        "config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest(),
        "quantization": quantization,
    }


def file_checksum(path):
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(COPY_CHUNK):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


@contextlib.contextmanager
def folder_lock(folder):
    """An exclusive lock on the shard folder: a second process sharding into it waits, then reuses the result."""
    try:
        import fcntl
    except ImportError:  # no flock on this platform
        yield
        return
    with open(Path(folder) / LOCK_NAME, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def quantized(t, info, qconfig):
    """Whether the sharder quantises tensor t: mlx-lm's rule, less the modules the config keeps unquantised."""
    return bool(qconfig) and qconfig.get(t.rpartition(".")[0]) is not False and \
        quant.quantizable(t, info.dtype, info.shape, qconfig["group_size"])


def stage_items(tensor_names, sources, qconfig=None):
    """What a stage file holds, in file order: (name, dtype, shape, payload) where payload is a source byte
    range (path, start, end) to copy, or, for tensors quantised on the way, a numpy array."""
    items = []
    for t in tensor_names:
        src, data_start, info = sources[t]
        if quantized(t, info, qconfig):
            storage, view = quant.FLOAT_VIEWS[info.dtype]
            with open(src, "rb", buffering=0) as f:
                f.seek(data_start + info.start)
                w = np.frombuffer(f.read(info.nbytes), dtype=view).reshape(info.shape)
            wq, scales, biases = quant.quantize(w, qconfig["group_size"], qconfig["bits"], dtype=storage)
            base = t[: -len(".weight")]
            items += [(t, "U32", wq.shape, wq), (base + ".scales", info.dtype, scales.shape, scales),
                      (base + ".biases", info.dtype, biases.shape, biases)]
        else:
            items.append((t, info.dtype, info.shape, (src, data_start + info.start, data_start + info.end)))
    by_name = {i[0]: i for i in items}
    return [by_name[n] for n, _, _ in aligned_order([i[:3] for i in items])]


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


def write_stage(out, name, kind, index, items, fds, parts=None):
    """Write one stage's items into out/NAME.safetensors (atomically) and return its manifest entry."""
    header, _ = encode_header([i[:3] for i in items], {"format": "pt", "airmlx_stage": name})
    path = Path(out) / f"{name}.safetensors"
    tmp = path.with_name(path.name + ".tmp")
    h = hashlib.sha256(header)
    try:
        with open(tmp, "wb") as f:
            f.write(header)
            for t, _, _, payload in items:
                if isinstance(payload, np.ndarray):
                    data = np.ascontiguousarray(payload).data
                    f.write(data)
                    h.update(data)
                    continue
                src, pos, end = payload
                fd = fds.get(src) or fds.setdefault(src, os.open(src, os.O_RDONLY))
                while pos < end:
                    chunk = os.pread(fd, min(COPY_CHUNK, end - pos), pos)
                    if not chunk:
                        raise CheckpointError(f"{src}: file ends early while reading {t!r}; re-download it.")
                    f.write(chunk)
                    h.update(chunk)
                    pos += len(chunk)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)  # give a full disk its space back; a kill leaves the .tmp, which is never read
        raise
    os.replace(tmp, path)
    fsync_dir(out)
    return StageEntry(name=name, kind=kind, index=index, file=path.name, nbytes=path.stat().st_size,
                      checksum="sha256:" + h.hexdigest(), tensors=[i[0] for i in items], parts=parts)


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


def reusable(out, entries, verify):
    """Finished stages whose files are still intact (size always; checksum when verify)."""
    ok = {}
    for e in entries:
        path = Path(out) / e.file
        if path.is_file() and path.stat().st_size == e.nbytes and (not verify or file_checksum(path) == e.checksum):
            ok[e.name] = e
    return ok


@contextlib.contextmanager
def disk_full_named(out, bytes_left):
    """Turn a write that fails for lack of space into an error naming the folder and the bytes still needed."""
    try:
        yield
    except OSError as e:
        if isinstance(e, AirmlxError) or e.errno not in DISK_FULL:
            raise
        raise InsufficientDiskSpaceError(
            f"{out}: a write failed ({os.strerror(e.errno)}): sharding needs {bytes_left():,} more bytes there and "
            f"{shutil.disk_usage(out).free:,} are free; free space (or raise the file size limit, ulimit -f) or "
            "pass another layer_shards_saving_path, then run again: finished stages are kept.") from None


def shard_checkpoint(src, out, *, delete_original=False, allow_pickle=False, compression=None, progress=True,
                     verify=False):
    """Shard the checkpoint folder `src` into `out`; return `out`. Reuses a matching folder, resumes an
    interrupted one, rebuilds one made from a different source. verify=True checks the checksums of the
    stages it would reuse and rebuilds the damaged ones."""
    src, out = Path(src), Path(out)
    from .gguf import find_gguf, shard_gguf  # GGUF hook: a .gguf file, or a folder holding one, is another source
    if (gguf_path := find_gguf(src)) is not None:
        return shard_gguf(gguf_path, out, compression=compression, progress=progress, verify=verify,
                          delete_original=delete_original)
    if not src.is_dir():
        raise CheckpointError(f"{src}: not a folder; give the path of a Hugging Face model folder.")
    config = load_config(src)
    arch = arch_for(config)
    qconfig = quant.compression_config(compression) if compression else None
    if qconfig and arch.unquantized:  # mlx-lm's per-module convention: False keeps a module unquantised
        qconfig = {**qconfig, **dict.fromkeys(arch.unquantized, False)}
    if qconfig and "quantization" in config:
        raise CheckpointError(f"{src} is already quantised ({config['quantization']}); shard it without compression.")
    try:
        files = originals = weight_files(src, allow_pickle)
    except CheckpointError:
        if complete_folder(out, verify):  # the originals were deleted after an earlier sharding
            return out
        raise
    out.mkdir(parents=True, exist_ok=True)
    with folder_lock(out), contextlib.ExitStack() as cleanup:
        if files[0].suffix == ".bin":
            from .legacy import convert_pickle_checkpoint
            files = convert_pickle_checkpoint(files, out / "_converted")
            cleanup.callback(shutil.rmtree, out / "_converted", True)
        sources = source_tensors(files)
        layout = stage_layout(config, list(sources))
        fp = fingerprint(originals, config, qconfig)

        done = {}
        progress_path = out / PROGRESS_NAME
        try:
            existing = Manifest.load(out)
        except CorruptShardError:
            existing = None
        if existing is not None and existing.source == fp:
            done = reusable(out, existing.stages, verify=verify)
            if len(done) == len(layout):
                progress_path.unlink(missing_ok=True)  # left behind when a run was killed right after the manifest
                finish_delete(src, out, originals, existing, delete_original)
                return out
            print(f"airmlx: {out}: rebuilding damaged or missing stages "
                  f"{[s.name for s in existing.stages if s.name not in done]}.", file=sys.stderr)
        elif existing is not None:
            print(f"airmlx: {out} was made from a different checkpoint; rebuilding it.", file=sys.stderr)
        if existing is not None:
            (out / MANIFEST_NAME).unlink()
            fsync_dir(out)
        if not done and progress_path.is_file():
            try:
                saved = json.loads(progress_path.read_text())
                if saved.get("source") == fp:
                    done = reusable(out, [StageEntry(**e) for e in saved["stages"]], verify=True)
            except (ValueError, TypeError, KeyError):
                pass  # an unreadable progress file only costs a full rebuild

        sizes = {name: stage_bytes(ts, sources, qconfig) for name, _, ts in layout}
        need = sum(sizes[name] for name, _, _ in layout if name not in done)
        free = shutil.disk_usage(out).free
        if need > free:
            raise InsufficientDiskSpaceError(
                f"{out}: sharding needs {need:,} bytes but only {free:,} are free; free "
                f"{need - free:,} bytes there or pass another layer_shards_saving_path.")
        calibrator = None
        if qconfig and qconfig.get("method"):  # calibration hook: see airmlx/calibrate.py
            from . import calibrate
            calibrator = calibrate.for_checkpoint(src, config, qconfig, sources)
            done = {}  # each stage's calibration needs the ones before it: an interrupted run starts over
        fds = {}
        cleanup.callback(lambda: [os.close(fd) for fd in fds.values()])
        # the checkpoint's own modelling / tokenizer code (config.json auto_map) comes along, to run only on request
        aux_files = AUX_FILES + tuple(sorted(p.name for p in src.glob("*.py")))
        small_files = sum((src / a).stat().st_size for a in aux_files if (src / a).is_file()) + (1 << 20)  # + manifest
        cleanup.enter_context(disk_full_named(out, lambda: small_files + sum(
            sizes[name] for name, _, _ in layout if name not in done)))
        bar = tqdm(total=need, unit="B", unit_scale=True, desc=f"sharding {src.name}", disable=not progress)
        with bar:
            for index, (name, kind, tensor_names) in enumerate(layout):
                if name in done:
                    continue
                if kind == "experts":
                    items, parts = expert_items(arch, tensor_names, sources, qconfig)
                elif calibrator:
                    items, parts = calibrate.checkpoint_stage_items(calibrator, name, kind, tensor_names, sources,
                                                                    qconfig), None
                else:
                    items, parts = stage_items(tensor_names, sources, qconfig), None
                done[name] = write_stage(out, name, kind, index, items, fds, parts)
                write_atomic(progress_path, json.dumps(
                    {"source": fp, "stages": [vars(e) for e in done.values()]}).encode())
                bar.update(sizes[name])

        for aux in aux_files:
            if (src / aux).is_file():
                write_atomic(out / aux, (src / aux).read_bytes())
        stages = [done[name] for name, _, _ in layout]
        for stale in out.iterdir():
            if STAGE_FILE.match(stale.name) and stale.name not in {s.file for s in stages}:
                stale.unlink()
        if qconfig:  # the mlx-lm convention: the config says how its weights are quantised
            config = {**config, "quantization": qconfig}
        manifest = Manifest(architecture=config["model_type"], config=config, source=fp, stages=stages,
                            quantization=config.get("quantization"), extra={"source_path": str(src.resolve())})
        manifest.save(out)
        progress_path.unlink(missing_ok=True)
        finish_delete(src, out, originals, manifest, delete_original)
    return out


def complete_folder(out, verify=False):
    """True when out holds a manifest whose stage files all have their recorded sizes (and checksums)."""
    try:
        manifest = Manifest.load(out)
    except CorruptShardError:
        return False
    return len(reusable(out, manifest.stages, verify)) == len(manifest.stages)


def finish_delete(src, out, originals, manifest, delete_original):
    """delete_original: remove the source weights, but only after every stage reads back intact."""
    if not delete_original:
        return
    bad = [e.file for e in manifest.stages if file_checksum(Path(out) / e.file) != e.checksum]
    if bad:
        raise CorruptShardError(f"{out}: stages {bad} do not match their checksums after writing; "
                                "the original weights were NOT deleted. Shard again.")
    for path in originals:
        target = path.resolve()  # hub cache files are symlinks to blobs: free the blob too
        path.unlink()
        if target != path and target.exists():
            target.unlink()
    index = Path(src) / "model.safetensors.index.json"
    index.unlink(missing_ok=True)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m airmlx.shard",
                                     description="Split a Hugging Face checkpoint into one file per layer.")
    parser.add_argument("src", help="model folder, hub id or .gguf file")
    parser.add_argument("out", nargs="?", help="shard folder (default: under the Hugging Face cache)")
    parser.add_argument("--delete-original", action="store_true",
                        help="delete the source weight files once every stage is written and verified")
    parser.add_argument("--allow-pickle", action="store_true", help="convert legacy pickle .bin checkpoints")
    parser.add_argument("--hf-token", default=None, help="token for gated hub models")
    parser.add_argument("--compression", default=None,
                        help="quantise linear and embedding weights (MLX affine layout): 4bit or 8bit (group size "
                             "64), optionally -g32/-g128 and -gptq (calibrated), e.g. 4bit-g32-gptq")
    parser.add_argument("--gguf-file", default=None, help="the .gguf file to use from a hub repo or folder")
    parser.add_argument("--verify", action="store_true", help="check every stage's checksum of an existing shard folder (SRC)")
    parser.add_argument("--repair", action="store_true",
                        help="with --verify: rebuild damaged stages from the checkpoint the folder was made from")
    args = parser.parse_args(argv)
    from .hub import default_shard_dir, resolve_model
    from .repair import repair_stages, verify_folder
    try:
        if args.repair:
            fixed = repair_stages(args.src)
            print(f"{args.src}: {f'rebuilt {fixed}' if fixed else 'OK'}")
            return 0
        if args.verify:
            problems = verify_folder(args.src)
            for p in problems:
                print(p, file=sys.stderr)
            print(f"{args.src}: {'OK' if not problems else f'{len(problems)} damaged stage(s)'}")
            return 1 if problems else 0
        src = resolve_model(args.src, hf_token=args.hf_token, gguf_file=args.gguf_file)
        out = args.out or default_shard_dir(f"{args.src}/{args.gguf_file}" if args.gguf_file else args.src,
                                            args.compression)
        shard_checkpoint(src, out, delete_original=args.delete_original, allow_pickle=args.allow_pickle,
                         compression=args.compression)
        print(out)
        return 0
    except AirmlxError as e:
        print(f"airmlx: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
