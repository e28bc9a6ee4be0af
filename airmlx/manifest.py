"""The shard-folder format: manifest.json <-> a versioned dataclass. A folder without a manifest is unfinished."""
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import CorruptShardError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"


@dataclass
class StageEntry:
    name: str  # "embed", "layer.007", "head"
    kind: str  # "embed" | "layer" | "head"
    index: int  # position in the sweep
    file: str
    nbytes: int
    checksum: str  # "sha256:<hex>" of the whole file
    tensors: list


@dataclass
class Manifest:
    architecture: str
    config: dict
    source: dict  # fingerprint of the checkpoint this folder was made from
    stages: list
    quantization: dict = None
    format_version: int = FORMAT_VERSION
    extra: dict = field(default_factory=dict)

    @property
    def total_bytes(self):
        return sum(s.nbytes for s in self.stages)

    def to_json(self):
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text, where="manifest.json"):
        try:
            raw = json.loads(text)
            if raw.get("format_version") != FORMAT_VERSION:
                raise CorruptShardError(
                    f"{where}: shard format version {raw.get('format_version')!r}, this airmlx reads "
                    f"version {FORMAT_VERSION}; delete the folder and shard the model again.")
            raw["stages"] = [StageEntry(**s) for s in raw["stages"]]
            manifest = cls(**raw)
        except CorruptShardError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise CorruptShardError(f"{where}: malformed manifest ({e}); delete the folder and shard the model again.")
        if not isinstance(manifest.config, dict) or not manifest.stages:
            raise CorruptShardError(f"{where}: manifest has no config or no stages; shard the model again.")
        return manifest

    def save(self, folder):
        write_atomic(Path(folder) / MANIFEST_NAME, self.to_json().encode())

    @classmethod
    def load(cls, folder):
        path = Path(folder) / MANIFEST_NAME
        if not path.is_file():
            raise CorruptShardError(f"{folder}: no {MANIFEST_NAME}, so this shard folder is unfinished; "
                                    "run the sharding again to complete it.")
        return cls.from_json(path.read_text(), where=str(path))


def fsync_dir(folder):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # some platforms cannot open directories; the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path, data):
    """Write bytes to path.tmp, fsync, rename over path: readers see the old file or the new one, never half."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
