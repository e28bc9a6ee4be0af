"""The shard-folder format: manifest.json <-> a versioned dataclass. A folder without a manifest is unfinished."""
import hashlib
import json
import os
import shlex
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
    # "experts" stages: expert number (as a string) -> [start, end) of its tensors' bytes in the data section
    parts: dict = None

    @property
    def layer(self):
        """The decoder layer's number, for layer and experts stages ("layer.007" -> 7); None otherwise."""
        return int(self.name.split(".")[1]) if self.kind in ("layer", "experts") else None


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

    @property
    def pipeline(self) -> "dict | None":
        """Which host holds what, in a folder sharded for several hosts (python -m airmlx.shard --hosts N
        --rank R): {"stages_per_host": [n0, n1, ...], "rank": R}. Host r runs n_r consecutive stages of the
        sweep (a layer's experts go with the layer); this folder holds host R's files. None: every stage."""
        return self.extra.get("pipeline")

    def held_stages(self) -> list:
        """The stages whose files this folder holds: every stage, or its host's range."""
        if not self.pipeline:
            return list(self.stages)
        return host_ranges(self.stages, self.pipeline["stages_per_host"])[self.pipeline["rank"]]

    def to_json(self):
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text, where="manifest.json"):
        try:
            raw = json.loads(text)
            if raw.get("format_version") != FORMAT_VERSION:
                raise CorruptShardError(
                    f"{where}: shard format version {raw.get('format_version')!r:.40}, this airmlx reads "
                    f"version {FORMAT_VERSION}; delete the folder and shard the model again.")
            raw["stages"] = [StageEntry(**s) for s in raw["stages"]]
            manifest = cls(**raw)
        except CorruptShardError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as e:
            raise CorruptShardError(f"{where}: malformed manifest ({type(e).__name__}: {str(e)[:200]!r}); "
                                    "delete the folder and shard the model again.") from None
        if not well_formed(manifest):
            raise CorruptShardError(f"{where}: manifest has missing or mistyped fields (config, stages, file "
                                    "names, sizes); delete the folder and shard the model again.")
        return manifest

    def save(self, folder):
        write_atomic(Path(folder) / MANIFEST_NAME, self.to_json().encode())

    @classmethod
    def load(cls, folder):
        path = Path(folder) / MANIFEST_NAME
        if not path.is_file():
            raise CorruptShardError(f"{folder}: no {MANIFEST_NAME}, so this shard folder is unfinished; "
                                    "run the sharding again to complete it.")
        return cls.from_json(path.read_bytes(), where=str(path))


def host_ranges(stages: list, per_host: list) -> list:
    """The stage entries of each host: per_host[r] consecutive sweep stages each (embed, layers, head), with
    the experts stage of each of its layers."""
    sweep = [s for s in stages if s.kind != "experts"]
    if sum(per_host) != len(sweep) or any(n < 1 for n in per_host):
        raise CorruptShardError(f"a pipeline split of {list(per_host)} stages per host does not cover the "
                                f"model's {len(sweep)} stages; give every host at least one and {len(sweep)} in all.")
    experts = {s.layer: s for s in stages if s.kind == "experts"}
    ranges, start = [], 0
    for n in per_host:
        ranges.append([e for s in sweep[start:start + n] for e in ([s, experts[s.layer]] if s.layer in experts
                                                                    and s.kind == "layer" else [s])])
        start += n
    return ranges


def well_formed(m):
    """Every field has its type, and stage files are plain names inside the folder (no paths)."""
    stages_ok = isinstance(m.stages, list) and bool(m.stages) and all(
        isinstance(s.name, str) and isinstance(s.kind, str) and type(s.index) is int
        and isinstance(s.file, str) and s.file == Path(s.file).name and s.file not in ("", ".", "..")
        and "\0" not in s.file and type(s.nbytes) is int and s.nbytes >= 0 and isinstance(s.checksum, str)
        and isinstance(s.tensors, list) and all(isinstance(t, str) for t in s.tensors)
        and (s.parts is None or isinstance(s.parts, dict) and all(
            isinstance(k, str) and isinstance(r, list) and len(r) == 2 and all(type(x) is int for x in r)
            and 0 <= r[0] <= r[1] for k, r in s.parts.items())) for s in m.stages)
    pipeline = m.extra.get("pipeline") if isinstance(m.extra, dict) else None
    pipeline_ok = pipeline is None or (
        isinstance(pipeline, dict) and isinstance(pipeline.get("stages_per_host"), list)
        and all(type(n) is int for n in pipeline["stages_per_host"]) and type(pipeline.get("rank")) is int
        and 0 <= pipeline["rank"] < len(pipeline["stages_per_host"]))
    return (stages_ok and pipeline_ok and len({s.name for s in m.stages}) == len(m.stages)
            and isinstance(m.architecture, str) and isinstance(m.config, dict) and isinstance(m.source, dict)
            and isinstance(m.quantization, (dict, type(None))) and isinstance(m.extra, dict)
            and type(m.format_version) is int)


CHECKSUM_CHUNK = 64 << 20


def file_checksum(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(CHECKSUM_CHUNK):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def stage_file_problem(path, entry: StageEntry, checksum: bool = False) -> "str | None":
    """The one integrity check of a stage file against its manifest entry (the store, --verify and the
    sharder's resume all use it): what is wrong with it, or None when it is intact."""
    path = Path(path)
    if not path.is_file():
        return "is missing"
    size = path.stat().st_size
    if size != entry.nbytes:
        return f"has {size} bytes, the manifest says {entry.nbytes} (truncated or replaced)"
    if checksum and file_checksum(path) != entry.checksum:
        return "does not match its checksum (damaged)"
    return None


def verify_folder(folder) -> list:
    """One line per damaged stage (file missing, wrong size, failing its checksum), naming the file and the fix."""
    folder = Path(folder)
    problems = []
    for e in Manifest.load(folder).held_stages():
        what = stage_file_problem(folder / e.file, e, checksum=True)
        if what:
            problems.append(f"stage {e.name}: file {folder / e.file} {what}; {repair_hint(folder)}")
    return problems


def repair_hint(folder):
    """The command that rebuilds a shard folder's damaged stages."""
    return f"rebuild it with: python -m airmlx.shard --repair {shlex.quote(str(folder))}"


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


def same_source(made_from: Path, src: Path) -> bool:
    """Whether a folder made from `made_from` may be rebuilt from `src`: the same checkpoint folder or file (its
    files may have changed since), or another revision of the same repo in the hub cache."""
    if made_from.resolve() == Path(src).resolve():
        return True
    repo = [next((p for p in path.parts if p.startswith("models--")), None) for path in (made_from, Path(src).resolve())]
    return repo[0] is not None and repo[0] == repo[1]
