"""Rebuilding a shard folder's damaged stages from the checkpoint its manifest records
(`python -m airmlx.shard --repair FOLDER`; the check itself is manifest.verify_folder)."""
import shlex
from pathlib import Path

from .errors import CheckpointError, CorruptShardError
from .manifest import Manifest
from .sharder import checkpoint_fingerprint, reusable, shard_checkpoint, weight_files


def repair_stages(folder, progress=True):
    """Rebuild a shard folder's damaged stages from the checkpoint its manifest records; return their names."""
    folder = Path(folder)
    manifest = Manifest.load(folder)
    held = manifest.held_stages()  # a folder sharded for several hosts holds one host's stages
    intact = reusable(folder, held, verify=True)  # every held stage's checksum, once
    bad = [e.name for e in held if e.name not in intact]
    if not bad:
        return []
    src = manifest.extra.get("source_path")
    qconfig = manifest.source.get("quantization")
    try:
        if src and src.endswith(".gguf"):  # GGUF hook: its own fingerprint (airmlx/gguf.py)
            from .gguf import fingerprint as gguf_fingerprint
            same = gguf_fingerprint(src, qconfig) == manifest.source
        else:
            # allow_pickle: the fingerprint must match, so only files the user already opted in to convert are read
            files = weight_files(src, allow_pickle=True) if src else []
            same = bool(files) and checkpoint_fingerprint(Path(src), files, qconfig) == manifest.source
    except (CheckpointError, OSError):
        same = False
    if not same:
        raise CorruptShardError(
            f"{folder}: stages {bad} are damaged and the checkpoint they were made from ({src or 'not recorded'}) "
            f"is gone or has changed, so they cannot be rebuilt; shard the model again: "
            f"python -m airmlx.shard MODEL {shlex.quote(str(folder))}")
    compression = qconfig and {k: qconfig[k] for k in ("bits", "group_size", "method") if k in qconfig}
    hosts = manifest.pipeline or {"stages_per_host": [1], "rank": 0}
    shard_checkpoint(src, folder, allow_pickle=True, compression=compression, progress=progress, verify=True,
                     hosts=len(hosts["stages_per_host"]), rank=hosts["rank"],
                     pipeline_split=hosts["stages_per_host"] if manifest.pipeline else None)
    return bad
