"""Copies of stage files in a backend's own layout: FOLDER/LAYOUT/STAGE.safetensors (torch on a CPU: "torch-int4",
its int4 kernel's layout of 4-bit codes; backends/torch_quant.py).

A copy is written once, the first time the backend streams the stage, and then read instead of the stage file
(store.use_copy): nothing is transformed per load. It is the stage file byte for byte except the tensors the
backend transforms, whose bytes keep their size and place (a group of tensors that lie back to back in the file
is transformed as one span: torch writes a weight's scales and biases as its kernel's stacked scales and zeros),
so its header (names, dtypes, shapes, offsets) and size are the stage file's, and the plan, the checks and the
memory accounting stay as they are. LAYOUT/index.json records what each copy was made from (the stage file's
checksum, size and modification time, the tensors transformed, the layout's version); a copy made from anything
else is written again. Where the folder cannot be written or lacks the room, that stage is read as it is (a
warning says why). The backend says which tensors and how; this module does the files, so a backend never
opens one.
"""
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .errors import AirmlxError
from .stagefile import folder_lock
from .tensorfile import NUMPY_VIEWS

INDEX = "index.json"
log = logging.getLogger("airmlx")


def use_copies(store, layout: str, wanted: dict, transform, version: int, progress: bool = True) -> set:
    """Point `store` at a copy in `layout` of each stage in `wanted` ({stage: groups of tensor names to
    transform, each a tuple of tensors back to back in the file}), writing the copies missing or out of date
    (under the folder's lock). transform(names, arrays): the group's new bytes (as many as its span has).
    Returns the stages now read from a copy. progress: a bar while two or more copies are written."""
    if not wanted:
        return set()
    folder = store.folder / layout
    stamps = {name: _stamp(store, name, tensors, version) for name, tensors in wanted.items()}
    if any(not _current(folder, _read_index(folder), store, n, stamps[n]) for n in wanted):
        try:
            with folder_lock(store.folder):
                _write_missing(store, folder, wanted, stamps, transform, progress)
        except OSError as e:
            log.warning("airmlx: no %s copy of some stages in %s (%s); those are read as they are (the backend "
                        "converts them at every load).", layout, folder, e)
    index, used = _read_index(folder), set()
    for name in wanted:
        if not _current(folder, index, store, name, stamps[name]):
            continue
        try:
            store.use_copy(name, folder / _file(store, name))
            used.add(name)
        except (OSError, AirmlxError) as e:  # damaged since it was written: read as it is meanwhile
            log.warning("airmlx: %s", e)
    return used


def _write_missing(store, folder: Path, wanted: dict, stamps: dict, transform, progress: bool) -> None:
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
    for name in tqdm(stale, desc=f"{folder.name} copy (once)", unit="stage", leave=False,
                     disable=not progress or len(stale) < 2):
        index.pop(name, None)
        _write_index(folder, index)
        _write_copy(store, name, wanted[name], transform, folder / _file(store, name))
        index[name] = stamps[name]
        _write_index(folder, index)


def _current(folder: Path, index: dict, store, name: str, stamp: dict) -> bool:
    path = folder / _file(store, name)
    return index.get(name) == stamp and path.is_file() and path.stat().st_size == store.stages[name].nbytes


def _file(store, name) -> str:
    return Path(store.stages[name].file).name


def _stamp(store, name: str, tensors: list, version: int) -> dict:
    """What a copy was made from: the stage file (checksum, size, modification time), the tensors transformed
    and the layout's version."""
    st = (store.folder / store.stages[name].file).stat()
    return {"version": version, "checksum": store.stages[name].checksum, "size": st.st_size,
            "mtime_ns": st.st_mtime_ns, "transformed": sorted("+".join(group) for group in tensors)}


def _read_index(folder: Path) -> dict:
    try:
        return json.loads((folder / INDEX).read_text())
    except (OSError, ValueError):
        return {}


def _write_index(folder: Path, index: dict) -> None:
    tmp = folder / (INDEX + ".tmp")
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, folder / INDEX)


def span(infos: dict, group: tuple) -> "tuple[int, int] | None":
    """(start, end) of a group of tensors that lie back to back in this order in a stage file, else None."""
    for a, b in zip(group, group[1:]):
        if infos[a].end != infos[b].start:
            return None
    return infos[group[0]].start, infos[group[-1]].end


def _write_copy(store, name: str, groups: list, transform, out: Path) -> None:
    """The stage file with `groups` of tensors transformed in place, written atomically; one stage in memory."""
    src = store.folder / store.stages[name].file
    blob = np.empty(src.stat().st_size, dtype=np.uint8)
    with open(src, "rb", buffering=0) as f:
        if f.readinto(blob) != len(blob):
            raise OSError(f"{src} ended early")
    start, infos = store.data_start(name), store.tensor_infos(name)
    for group in groups:
        first, end = span(infos, group)
        views = [blob[start + infos[t].start: start + infos[t].end].view(NUMPY_VIEWS[infos[t].dtype])
                 .reshape(infos[t].shape) for t in group]
        blob[start + first: start + end] = np.asarray(transform(group, views)).reshape(-1).view(np.uint8)
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
