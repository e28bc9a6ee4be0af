"""torch on the CPU: a copy of the streamed 4-bit stages with their Linear codes already in torch's int4 layout.

Streaming a 4-bit stage otherwise repacks its codes from MLX's layout at every load (torch_quant.repack_int4),
which costs more than the stage's compute on a small CPU. The copy, FOLDER/torch-int4/STAGE.safetensors, is
written once, the first time torch on the CPU streams the stage, and then mapped like a bf16 stage file (its
codes copied out of the mapping, no repacking). It is the stage file byte for byte except the packed codes,
which take the bytes the MLX codes took, so its header (names, dtypes, shapes, offsets) and size are the stage
file's, and the plan, the checks and the memory accounting stay as they are. index.json records what each copy
was made from (the stage file's checksum, size and modification time, the weights repacked, the layout's
version); a copy made from anything else is written again. Where the folder cannot be written or lacks the
room, the stages are repacked at every load as before (a warning says why).
"""
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
from tqdm import tqdm

from airmlx.errors import AirmlxError
from airmlx.stagefile import folder_lock

from . import torch_quant

COPY_DIR = "torch-int4"
INDEX = "index.json"
VERSION = 1  # of the copy's layout (repack_int4's); a copy of another version is written again
log = logging.getLogger("airmlx")


def copies_wanted(backend, store, names: list) -> dict:
    """{stage name: names of its weights that run on the int4 kernel} for the stages of `names` with any."""
    wanted = {}
    for name in names:
        entry = store.stages[name]
        bases = [t[: -len(".scales")] for t in store.tensor_infos(name) if t.endswith(".scales")]
        packed = [b for b in bases if torch_quant.packable_weight(backend, entry, b)]
        if packed:
            wanted[name] = packed
    return wanted


def use_copies(backend, store, names: list) -> set:
    """Point `store` at a torch-layout copy of each stage of `names` with packable 4-bit weights, writing the
    copies missing or out of date (under the folder's lock). Returns the names of the stages now read from a
    copy; the others keep repacking at every load."""
    wanted = copies_wanted(backend, store, names)
    if not wanted:
        return set()
    folder = store.folder / COPY_DIR
    stamps = {name: _stamp(store, name, bases) for name, bases in wanted.items()}
    if any(not _current(folder, _read_index(folder), store, n, stamps[n]) for n in wanted):
        try:
            with folder_lock(store.folder):
                _write_missing(store, folder, wanted, stamps)
        except OSError as e:
            log.warning("airmlx: no torch int4 layout copy of some stages in %s (%s); those are repacked at every "
                        "load.", folder, e)
    index, used = _read_index(folder), set()
    for name in wanted:
        if not _current(folder, index, store, name, stamps[name]):
            continue
        try:
            store.use_copy(name, folder / _file(store, name))
            used.add(name)
        except (OSError, AirmlxError) as e:  # damaged since it was written: repacked at every load meanwhile
            log.warning("airmlx: %s", e)
    return used


def _write_missing(store, folder: Path, wanted: dict, stamps: dict) -> None:
    index = _read_index(folder)  # again, under the lock: another process may have written them meanwhile
    stale = [n for n in wanted if not _current(folder, index, store, n, stamps[n])]
    if not stale:
        return
    folder.mkdir(exist_ok=True)
    need = sum(store.stages[n].nbytes for n in stale)
    free = shutil.disk_usage(folder).free
    if free < need + (64 << 20):
        raise OSError(f"{need:,} bytes are needed there and {free:,} are free")
    kept = {Path(e.file).name for e in store.manifest.stages}
    for old in folder.glob("*.safetensors*"):  # copies of stages the folder no longer has, half-written ones
        if old.name not in kept:
            old.unlink()
    for name in tqdm(stale, desc="torch int4 layout (once)", unit="stage", leave=False, disable=len(stale) < 2):
        index.pop(name, None)
        _write_index(folder, index)
        _write_copy(store, name, wanted[name], folder / _file(store, name))
        index[name] = stamps[name]
        _write_index(folder, index)


def _current(folder: Path, index: dict, store, name: str, stamp: dict) -> bool:
    path = folder / _file(store, name)
    return index.get(name) == stamp and path.is_file() and path.stat().st_size == store.stages[name].nbytes


def _file(store, name) -> str:
    return Path(store.stages[name].file).name


def _stamp(store, name: str, bases: list) -> dict:
    """What a copy was made from: the stage file (checksum, size, modification time), the weights repacked and
    the layout's version."""
    st = (store.folder / store.stages[name].file).stat()
    return {"version": VERSION, "checksum": store.stages[name].checksum, "size": st.st_size,
            "mtime_ns": st.st_mtime_ns, "repacked": sorted(bases)}


def _read_index(folder: Path) -> dict:
    try:
        return json.loads((folder / INDEX).read_text())
    except (OSError, ValueError):
        return {}


def _write_index(folder: Path, index: dict) -> None:
    tmp = folder / (INDEX + ".tmp")
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, folder / INDEX)


def _write_copy(store, name: str, bases: list, out: Path) -> None:
    """The stage file with the codes of `bases` repacked in place, written atomically; one stage in memory."""
    src = store.folder / store.stages[name].file
    blob = np.empty(src.stat().st_size, dtype=np.uint8)
    with open(src, "rb", buffering=0) as f:
        if f.readinto(blob) != len(blob):
            raise OSError(f"{src} ended early")
    start, infos = store.data_start(name), store.tensor_infos(name)
    for base in bases:
        info = infos[base + ".weight"]
        codes = blob[start + info.start: start + info.end].view(np.uint32).reshape(info.shape)
        blob[start + info.start: start + info.end] = torch_quant.repack_int4(codes).numpy().reshape(-1)
    tmp = out.with_name(out.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(blob.data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
