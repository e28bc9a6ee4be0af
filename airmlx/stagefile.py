"""Stage files, whoever writes them (the safetensors sharder, the GGUF sharder, calibrated quantisation):
a stage's items written atomically with their checksum, the folder lock, which finished stages a folder can
reuse, and a full disk named in one line."""
import contextlib
import errno
import functools
import hashlib
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np

from . import quant
from .errors import AirmlxError, CheckpointError, CorruptShardError, InsufficientDiskSpaceError
from .manifest import MANIFEST_NAME, Manifest, StageEntry, file_checksum, fsync_dir, stage_file_problem
from .relayout import Dequantized, Derived, dequantized_rows, read_array
from .tensorfile import NUMPY_VIEWS, aligned_order, encode_header

PROGRESS_NAME = "progress.json"
LEGACY_DIR = "_converted"  # a pickle checkpoint's safetensors copy, made inside the shard folder
LOCK_NAME = ".airmlx.lock"
COPY_CHUNK = 64 << 20
STAGE_FILE = re.compile(r"^(embed|head|layer\.\d+(\.experts)?)\.safetensors(\.tmp)?$")
DISK_FULL = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}


def make_folder(folder: Path) -> None:
    """Create the shard folder (and its parents), or say in one line why it cannot be."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        names = {p.name for p in folder.iterdir()}
    except OSError as e:
        raise CheckpointError(f"{folder}: cannot make the shard folder there ({e.strerror or e}); choose another "
                              "place for it (--layer-shards-saving-path, or shard's OUT).") from None
    ours = {MANIFEST_NAME, PROGRESS_NAME} | {n for n in names if STAGE_FILE.match(n)}
    others = sorted(names - ours - {LOCK_NAME, LEGACY_DIR})
    if others and not names & ours:  # a shard folder, or one an interrupted run left, has one of ours
        raise CheckpointError(f"{folder}: holds files of its own ({', '.join(others[:3])}"
                              f"{', ...' if len(others) > 3 else ''}) and is not a shard folder; sharding would "
                              "overwrite its config.json. Choose a new or empty folder.")


@contextlib.contextmanager
def folder_lock(folder):
    """An exclusive lock on the shard folder: a second process sharding into it waits, then reuses the result."""
    try:
        import fcntl
    except ImportError:  # no flock on this platform
        yield
        return
    try:
        f = open(Path(folder) / LOCK_NAME, "a")
    except OSError as e:  # a read-only disk: only a finished folder of the same checkpoint opens there
        raise CheckpointError(f"{folder}: cannot write to the shard folder ({e.strerror or e}), which this needs: "
                              "only a finished folder of the same checkpoint, opened without verify or --hosts, is "
                              "read without writing; shard where airmlx can write (--layer-shards-saving-path, or "
                              "shard's OUT).") from None
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def quantized(t, info, qconfig):
    """Whether the sharder quantises tensor t: mlx-lm's rule, less the modules the config keeps unquantised."""
    return bool(qconfig) and qconfig.get(t.rpartition(".")[0]) is not False and \
        quant.quantizable(t, info.dtype, info.shape, qconfig["group_size"])


def say_ungrouped(infos, qconfig) -> None:
    """One line on stderr when the group size leaves some of the matrices the quantiser takes in full precision
    (rows that do not split into whole groups: mlx-lm's rule), so the folder's size is no surprise."""
    g = qconfig["group_size"]
    takes = [i for i in infos if qconfig.get(i.name.rpartition(".")[0]) is not False and
             quant.quantizable(i.name, i.dtype, (*i.shape[:-1], g), g)]
    left = [i for i in takes if i.shape[-1] % g]
    if left:
        smaller = [s for s in quant.SUPPORTED_GROUP_SIZES if s < g and all(i.shape[-1] % s == 0 for i in left)]
        hint = f"group size {smaller[-1]} (-g{smaller[-1]}) quantises them" if smaller else \
            "no group size airmlx supports divides them"
        print(f"airmlx: {len(left)} of {len(takes)} matrices stay unquantised: their rows do not split into groups "
              f"of {g} (e.g. {left[0].name}, {left[0].shape[-1]} wide); {hint}.", file=sys.stderr)


def stage_items(tensor_names, sources, qconfig=None):
    """What a stage file holds, in file order: (name, dtype, shape, payload) where payload is a source byte
    range (path, start, end) to copy, or, for tensors quantised on the way, a numpy array (or, for a fused
    expert's transposed part, a function that makes one)."""
    items = []
    for t in tensor_names:
        src, data_start, info = sources[t]
        if quantized(t, info, qconfig):
            storage, view = quant.FLOAT_VIEWS[info.dtype]
            w = read_array(src, data_start, info, view)
            items += quantized_items(t, *quant.quantize(w, qconfig["group_size"], qconfig["bits"], dtype=storage),
                                     info.dtype)
        elif isinstance(info, Dequantized):  # written a few rows at a time
            items.append((t, info.dtype, info.shape, functools.partial(dequantized_rows, src, data_start, info)))
        elif isinstance(info, Derived):  # made when written, so a stage's experts are never all held
            items.append((t, info.dtype, info.shape,
                          functools.partial(read_array, src, data_start, info, NUMPY_VIEWS[info.dtype])))
        else:
            items.append((t, info.dtype, info.shape, (src, data_start + info.start, data_start + info.end)))
    return in_file_order(items)


def quantized_items(name: str, wq, scales, biases, dtype: str) -> list:
    """A weight quantised to MLX's affine layout as stage items: its codes, scales and biases (in `dtype`)."""
    base = name[: -len(".weight")]
    return [(name, "U32", wq.shape, wq), (base + ".scales", dtype, scales.shape, scales),
            (base + ".biases", dtype, biases.shape, biases)]


def in_file_order(items: list) -> list:
    """Stage items (name, dtype, shape, payload) in the order a stage file holds them (aligned_order)."""
    by_name = {i[0]: i for i in items}
    return [by_name[n] for n, _, _ in aligned_order([i[:3] for i in items])]


def write_stage(out, name, kind, index, items, fds, parts=None, keep=True):
    """Write one stage's items into out/NAME.safetensors (atomically) and return its manifest entry.
    keep=False: another host's stage (--hosts): only its size and checksum, no file."""
    header, _ = encode_header([i[:3] for i in items], {"format": "pt", "airmlx_stage": name})
    path = Path(out) / f"{name}.safetensors"
    tmp = path.with_name(path.name + ".tmp") if keep else Path(os.devnull)
    h = hashlib.sha256(header)
    size = len(header)
    try:
        with open(tmp, "wb") as f:
            f.write(header)
            for t, _, _, payload in items:
                if callable(payload):
                    payload = payload()
                if not isinstance(payload, tuple):  # an array, or pieces of one in order
                    for piece in [payload] if isinstance(payload, np.ndarray) else payload:
                        data = np.ascontiguousarray(piece).data
                        f.write(data)
                        h.update(data)
                        size += data.nbytes
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
                    size += len(chunk)
            if keep:
                f.flush()
                os.fsync(f.fileno())
    except BaseException:
        if keep:
            tmp.unlink(missing_ok=True)  # give a full disk its space back; a kill leaves the .tmp, never read
        raise
    if keep:
        os.replace(tmp, path)
        fsync_dir(out)
    return StageEntry(name=name, kind=kind, index=index, file=path.name, nbytes=size,
                      checksum="sha256:" + h.hexdigest(), tensors=[i[0] for i in items], parts=parts)


def reusable(out, entries, verify):
    """Finished stages whose files are still intact (size always; checksum when verify)."""
    return {e.name: e for e in entries if stage_file_problem(Path(out) / e.file, e, checksum=verify) is None}


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


def finished_folder(out, source) -> "Manifest | None":
    """The manifest of a finished one-host shard folder made from `source` (its fingerprint) whose stage files
    have their sizes: such a folder is reused without writing anything, so it may sit on a read-only disk."""
    try:
        manifest = Manifest.load(out)
    except CorruptShardError:
        return None
    if manifest.source != source or manifest.pipeline is not None or (Path(out) / PROGRESS_NAME).exists():
        return None
    return manifest if len(reusable(out, manifest.stages, False)) == len(manifest.stages) else None


def complete_folder(out, verify=False):
    """True when out holds a manifest whose stage files all have their recorded sizes (and checksums)."""
    try:
        manifest = Manifest.load(out)
    except CorruptShardError:
        return False
    held = manifest.held_stages()
    return len(reusable(out, held, verify)) == len(held)


def delete_sources(out, manifest, files, what):
    """Remove the source files a shard folder was made from (and their hub-cache blobs), but only once every
    stage reads back intact; `what` names them in the error."""
    bad = [e.file for e in manifest.held_stages() if file_checksum(Path(out) / e.file) != e.checksum]
    if bad:
        raise CorruptShardError(f"{out}: stages {bad} do not match their checksums after writing; "
                                f"{what} NOT deleted. Shard again.")
    for path in map(Path, files):
        target = path.resolve()  # hub cache files are symlinks to blobs: free the blob too
        path.unlink()
        if target != path and target.exists():
            target.unlink()
