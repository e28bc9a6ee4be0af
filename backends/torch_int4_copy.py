"""torch on the CPU: a copy of the streamed 4-bit stages with their Linear codes already in torch's int4 layout.

Streaming a 4-bit stage otherwise repacks its codes from MLX's layout at every load (torch_quant.repack_int4),
which costs more than the stage's compute on a small CPU. The copy, FOLDER/torch-int4/STAGE.safetensors, is
written once, the first time torch on the CPU streams the stage, and then mapped like a bf16 stage file (its
codes copied out of the mapping, no repacking). It is the stage file byte for byte except the packed codes,
which take the bytes the MLX codes took, so its header (names, dtypes, shapes, offsets) and size are the stage
file's, and the plan, the checks and the memory accounting stay as they are. index.json records the size and
modification time of each stage file a copy was made from; a copy whose stage file changed since is written
again. Where the folder cannot be written or lacks the room, the stages are repacked at every load as before
(a warning says why).
"""
import contextlib
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
    copies missing or out of date. Returns the names of the stages now read from a copy."""
    wanted = copies_wanted(backend, store, names)
    if not wanted:
        return set()
    folder = store.folder / COPY_DIR
    try:
        with folder_lock(store.folder):
            index = _read_index(folder)
            stale = [n for n in wanted if index.get(n) != _source_stamp(store, n) or not (folder / _file(store, n)).is_file()]
            if stale:
                need = sum(store.stages[n].nbytes for n in stale)
                folder.mkdir(exist_ok=True)
                free = shutil.disk_usage(folder).free
                if free < need + (64 << 20):
                    raise OSError(f"{need:,} bytes are needed there and {free:,} are free")
                for name in tqdm(stale, desc="torch int4 layout (once)", unit="stage", leave=False,
                                 disable=len(stale) < 2):
                    _write_copy(store, name, wanted[name], folder / _file(store, name))
                    index[name] = _source_stamp(store, name)
                    _write_index(folder, index)
    except OSError as e:
        log.warning("airmlx: no torch int4 layout copy in %s (%s); 4-bit stages are repacked at every load.",
                    folder, e)
        return set()
    used = set()
    for name in wanted:
        try:
            store.use_copy(name, folder / _file(store, name))
            used.add(name)
        except (OSError, AirmlxError) as e:  # damaged since: repacked at every load until written again
            log.warning("airmlx: %s", e)
            with contextlib.suppress(OSError):
                _write_index(folder, {k: v for k, v in _read_index(folder).items() if k != name})
    return used


def _file(store, name) -> str:
    return Path(store.stages[name].file).name


def _source_stamp(store, name) -> list:
    st = (store.folder / store.stages[name].file).stat()
    return [st.st_size, st.st_mtime_ns]


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
    """The stage file with the codes of `bases` repacked in place, written atomically."""
    blob = np.frombuffer(bytearray((store.folder / store.stages[name].file).read_bytes()), dtype=np.uint8)
    start, infos = store.data_start(name), store.tensor_infos(name)
    for base in bases:
        info = infos[base + ".weight"]
        codes = blob[start + info.start: start + info.end].view(np.uint32).reshape(info.shape)
        blob[start + info.start: start + info.end] = torch_quant.repack_int4(codes).numpy().reshape(-1)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(blob.data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)
