"""Sharding survives SIGKILL at any moment, a full disk, a second process, damaged files and hostile input.

The long kill test is marked slow: run it with `python -m pytest -m slow tests/test_reliability.py`.
"""
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import airmlx
from airmlx import repair
from airmlx import sharder as shard_mod
from airmlx.errors import CheckpointError, CorruptShardError, InsufficientDiskSpaceError
from airmlx.manifest import Manifest, StageEntry, verify_folder, well_formed
from airmlx.store import ShardStore
from airmlx.tensorfile import DTYPE_SIZES, encode_header, parse_header, read_header

from tiny import make_checkpoint

SHARD = [sys.executable, "-m", "airmlx.shard"]
ENV = {k: v for k, v in os.environ.items() if not k.startswith("TQDM_")}  # the kill test times itself by the bar
FUZZ = settings(max_examples=300, deadline=5000, database=None, suppress_health_check=[HealthCheck.too_slow])


def folder_bytes(folder, skip=(".airmlx.lock",)):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file() and p.name not in skip}


def shard_cli(*args):
    return subprocess.run([*SHARD, *map(str, args)], capture_output=True, text=True, timeout=300)


def timed_clean_run(src, out):
    """Shard src into out in a subprocess; return (seconds until the progress bar shows, seconds writing)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([*SHARD, str(src), str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
    proc.stderr.read(1)
    t1 = time.perf_counter()
    proc.communicate(timeout=300)
    assert proc.returncode == 0
    return t1 - t0, time.perf_counter() - t1


def kill_and_rerun(tmp_path, kills, seed, **model):
    """SIGKILL `python -m airmlx.shard SRC OUT` at `kills` random moments, rerunning each time: a folder
    without a manifest never loads, one with a manifest is complete, and every finished folder matches an
    uninterrupted run byte for byte. Returns the number of finished stage files at each kill."""
    src, clean, out = tmp_path / "src", tmp_path / "clean", tmp_path / "out"
    make_checkpoint(src, "llama", max_shard_size="1MB", **model)
    startup, writing = timed_clean_run(src, clean)
    want = folder_bytes(clean)
    rng = random.Random(seed)
    landed, finished = [], 0
    while len(landed) < kills:
        proc = subprocess.Popen([*SHARD, str(src), str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                env=ENV)
        if rng.random() < 0.15:  # some kills during start-up: reading headers, taking the lock
            time.sleep(rng.uniform(0, startup))
        else:  # most while stages are written: the bar appears just before the first one
            proc.stderr.read(1)
            time.sleep(rng.uniform(0, 1.2 * writing))
        proc.send_signal(signal.SIGKILL)
        err = proc.communicate(timeout=300)[1].decode(errors="replace")
        if proc.returncode == 0:  # it finished before the kill
            assert folder_bytes(out) == want
            finished += 1
            shutil.rmtree(out)
            continue
        assert proc.returncode == -signal.SIGKILL, err
        landed.append(len(list(out.glob("*.safetensors"))) if out.exists() else -1)
        if (out / "manifest.json").exists():
            ShardStore(out)
            assert verify_folder(out) == []
            # a kill between the manifest and the progress file's removal leaves only that file behind
            assert {k: v for k, v in folder_bytes(out).items() if k != "progress.json"} == want
        else:
            with pytest.raises(CorruptShardError):
                ShardStore(out)
    done = shard_cli(src, out)
    assert done.returncode == 0, done.stderr
    assert folder_bytes(out) == want
    return landed


def test_sigkill_at_random_moments_never_leaves_a_loadable_partial_folder(tmp_path):
    landed = kill_and_rerun(tmp_path, kills=20, seed=1234, hidden_size=128, intermediate_size=512,
                            num_hidden_layers=24)
    assert len(set(landed)) >= 5, landed  # the kills hit many different stages


@pytest.mark.slow
def test_sigkill_50_times_on_a_bigger_model(tmp_path):
    landed = kill_and_rerun(tmp_path, kills=50, seed=99, hidden_size=192, intermediate_size=768,
                            num_hidden_layers=48)
    assert len(set(landed)) >= 10, landed


# Writes past RLIMIT_FSIZE fail with EFBIG (SIGXFSZ ignored so it does not kill the child), like a full disk.
DISK_FULL_CHILD = """
import json, resource, signal, sys
from airmlx import sharder as shard
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
try:
    shard.shard_checkpoint(sys.argv[2], sys.argv[3], delete_original=True, progress=False)
except Exception as e:
    print(json.dumps({"type": type(e).__name__, "message": str(e)}))
"""


def test_disk_full_mid_stage_is_clear_and_recoverable(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    make_checkpoint(src, "llama", max_shard_size="60KB")
    clean = airmlx.shard_checkpoint(src, tmp_path / "clean", progress=False)
    weights = {p.name: p.read_bytes() for p in src.glob("*.safetensors")}
    sizes = {s.name: s.nbytes for s in Manifest.load(clean).stages}
    limit = sizes["layer.000"] // 2
    assert sizes["embed"] < limit  # embed is written, layer.000 fails half-way through its file

    child = subprocess.run([sys.executable, "-c", DISK_FULL_CHILD, str(limit), str(src), str(out)],
                           capture_output=True, text=True, timeout=300)
    assert child.stdout.strip(), child.stderr
    error = json.loads(child.stdout)
    assert error["type"] == "InsufficientDiskSpaceError", error
    assert str(out) in error["message"] and "\n" not in error["message"]
    assert "needs" in error["message"] and "more bytes there" in error["message"]
    assert {p.name: p.read_bytes() for p in src.glob("*.safetensors")} == weights  # delete_original: nothing deleted
    assert not (out / "manifest.json").exists()
    with pytest.raises(CorruptShardError, match="unfinished"):
        ShardStore(out)
    finished = folder_bytes(out)
    assert "layer.000.safetensors" not in finished
    for name in finished:  # only whole stages under their final names
        if name.endswith(".safetensors"):
            assert finished[name] == (clean / name).read_bytes()

    (out / "layer.000.safetensors.tmp").write_bytes(b"half a stage")  # as a SIGKILL would leave it
    airmlx.shard_checkpoint(src, out, progress=False)
    assert folder_bytes(out) == folder_bytes(clean)


@pytest.mark.parametrize("code", ["ENOSPC", "EDQUOT"])
def test_no_space_error_names_folder_and_bytes(tmp_path, monkeypatch, code):
    import errno
    import os
    src, out = tmp_path / "src", tmp_path / "out"
    make_checkpoint(src, "llama")
    real_fsync, calls = os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if len(calls) == 5:  # a few stages in
            raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))
        return real_fsync(fd)

    monkeypatch.setattr(shard_mod.os, "fsync", fsync)
    with pytest.raises(InsufficientDiskSpaceError, match=r"needs [\d,]+ more bytes there") as info:
        airmlx.shard_checkpoint(src, out, delete_original=True, progress=False)
    assert str(out) in str(info.value)
    assert list(src.glob("*.safetensors")) and not (out / "manifest.json").exists()
    assert not list(out.glob("*.tmp"))  # the partial stage was removed, giving its space back
    monkeypatch.undo()
    airmlx.shard_checkpoint(src, out, progress=False)
    assert ShardStore(out).verify() == []


def blocked_on_lock(pids):
    """True once every pid waits for a file lock (Linux shows waiters as '->' lines in /proc/locks)."""
    if not Path("/proc/locks").exists():
        return False
    waiting = {int(line.split()[5]) for line in Path("/proc/locks").read_text().splitlines() if "->" in line}
    return set(pids) <= waiting


def test_two_processes_shard_one_folder(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    make_checkpoint(src, "llama", max_shard_size="60KB")
    clean = airmlx.shard_checkpoint(src, tmp_path / "clean", progress=False)
    out.mkdir()
    with shard_mod.folder_lock(out):  # hold the folder so that both processes are waiting for it at once
        procs = [subprocess.Popen([*SHARD, str(src), str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for _ in range(2)]
        deadline = time.monotonic() + 15  # without /proc/locks (or if it shows other pids), wait that long
        while time.monotonic() < deadline and not blocked_on_lock([p.pid for p in procs]):
            assert all(p.poll() is None for p in procs)
            time.sleep(0.02)
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    assert all(o.strip() == str(out) for o, _ in results)
    assert sorted("sharding" in e for _, e in results) == [False, True]  # one wrote, the other reused it
    assert folder_bytes(out) == folder_bytes(clean)


def flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_damaged_stages_are_named_and_repaired(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    make_checkpoint(src, "llama")
    airmlx.shard_checkpoint(src, out, progress=False)
    want = folder_bytes(out)
    assert Manifest.load(out).extra["source_path"] == str(src.resolve())
    flip(out / "layer.001.safetensors", -1)
    truncated = out / "layer.003.safetensors"
    truncated.write_bytes(truncated.read_bytes()[:-100])
    command = f"python -m airmlx.shard --repair {out}"
    with pytest.raises(CorruptShardError, match="stage layer.003: file .*layer.003.safetensors") as info:
        ShardStore(out)
    assert command in str(info.value)

    check = shard_cli("--verify", out)
    assert check.returncode == 1
    lines = check.stderr.strip().splitlines()
    assert len(lines) == 2 and all(line.endswith(command) for line in lines)
    assert "stage layer.001: file" in lines[0] and "layer.001.safetensors does not match its checksum" in lines[0]
    assert "stage layer.003: file" in lines[1] and "truncated" in lines[1]

    fixed = shard_cli("--repair", out)
    assert fixed.returncode == 0, fixed.stderr
    assert "rebuilt ['layer.001', 'layer.003']" in fixed.stdout
    assert folder_bytes(out) == want
    assert shard_cli("--verify", out).returncode == 0


def test_repair_needs_the_recorded_source(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    make_checkpoint(src, "llama")
    airmlx.shard_checkpoint(src, out, progress=False)
    want = folder_bytes(out)
    assert repair.repair_stages(out, progress=False) == []
    flip(out / "head.safetensors", 20)  # inside the header: sizes unchanged, only the checksum tells
    airmlx.shard_checkpoint(src, out, progress=False, verify=True)
    assert folder_bytes(out) == want

    flip(out / "embed.safetensors", -3)
    make_checkpoint(src, "llama", seed=1)  # the source changed since
    with pytest.raises(CorruptShardError, match=r"\['embed'\] are damaged .* gone or has changed.*shard the model"):
        repair.repair_stages(out, progress=False)
    shutil.rmtree(src)
    gone = shard_cli("--repair", out)
    assert gone.returncode == 2 and "gone or has changed" in gone.stderr
    assert f"python -m airmlx.shard MODEL {out}" in gone.stderr and "Traceback" not in gone.stderr


def test_corrupt_source_file_is_a_checkpoint_error(tmp_path):
    make_checkpoint(tmp_path / "src", "llama")
    victim = next((tmp_path / "src").glob("*.safetensors"))
    victim.write_bytes(victim.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="download the checkpoint again"):
        airmlx.shard_checkpoint(tmp_path / "src", tmp_path / "out", progress=False)


# --- fuzzing: malformed input raises airmlx's own error, never another exception, never hangs ---

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20)


def valid_manifest():
    stages = [StageEntry("embed", "embed", 0, "embed.safetensors", 100, "sha256:00", ["model.embed_tokens.weight"]),
              StageEntry("head", "head", 1, "head.safetensors", 80, "sha256:11", ["lm_head.weight"])]
    return json.loads(Manifest("llama", {"model_type": "llama"}, {"files": []}, stages,
                               extra={"source_path": "/x"}).to_json())


def mutate(value, draw):
    """Replace, drop or add one thing somewhere inside a JSON value."""
    if isinstance(value, (dict, list)) and value and draw(st.booleans()):
        key = draw(st.sampled_from(sorted(value) if isinstance(value, dict) else range(len(value))))
        value[key] = mutate(value[key], draw)
        return value
    action = draw(st.sampled_from(["replace", "drop", "add"]))
    if action == "drop" and isinstance(value, (dict, list)) and value:
        key = draw(st.sampled_from(sorted(value) if isinstance(value, dict) else range(len(value))))
        del value[key]
        return value
    if action == "add" and isinstance(value, dict):
        value[draw(st.text(max_size=8))] = draw(json_values)
        return value
    return draw(json_values)


def parses_or_raises_own_error(parse):
    try:
        result = parse()
    except CorruptShardError as e:
        assert "\n" not in str(e)
        return None
    return result


@FUZZ
@given(st.one_of(st.text(), st.binary(), json_values.map(json.dumps)))
def test_fuzz_manifest_arbitrary_text(text):
    parses_or_raises_own_error(lambda: Manifest.from_json(text))


@FUZZ
@given(st.data())
def test_fuzz_manifest_mutations(data):
    raw = mutate(valid_manifest(), data.draw)
    manifest = parses_or_raises_own_error(lambda: Manifest.from_json(json.dumps(raw)))
    if manifest is not None:
        assert well_formed(manifest) and manifest.total_bytes >= 0


def test_manifest_and_header_hostile_shapes_fail_fast():
    t0 = time.perf_counter()
    for text in ["[" * 200_000, '{"format_version": 1, "stages": ' + "[" * 200_000, "1" * 5000]:
        with pytest.raises(CorruptShardError):
            Manifest.from_json(text)
        with pytest.raises(CorruptShardError):
            parse_header(text.encode(), 0, "x.safetensors")
    bad_file = {"format_version": 1, **{k: v for k, v in valid_manifest().items() if k != "format_version"}}
    bad_file["stages"][0]["file"] = "../../etc/passwd"
    with pytest.raises(CorruptShardError, match="mistyped"):
        Manifest.from_json(json.dumps(bad_file))
    huge = {"t": {"dtype": "F32", "shape": [2**62] * 100_000, "data_offsets": [0, 4]}}
    with pytest.raises(CorruptShardError):
        parse_header(json.dumps(huge).encode(), 4, "x.safetensors")
    assert time.perf_counter() - t0 < 10


header_entries = st.fixed_dictionaries({
    "dtype": st.sampled_from(sorted(DTYPE_SIZES)) | json_values,
    "shape": st.lists(st.integers(-2, 6), max_size=3) | json_values,
    "data_offsets": st.lists(st.integers(-2, 200), min_size=2, max_size=2) | json_values,
})
headers = st.dictionaries(st.text(max_size=6), header_entries | json_values, max_size=4)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def valid_file_bytes():
    header, size = encode_header([("a", "F32", (2, 3)), ("b", "BF16", (5,))], {"format": "pt"})
    return header + bytes(range(size))


@FUZZ
@given(st.one_of(
    st.binary(max_size=300),
    headers.map(lambda h: json.dumps(h).encode()).flatmap(
        lambda blob: st.integers(0, 300).map(lambda n: struct.pack("<Q", len(blob)) + blob + bytes(n))),
    st.tuples(st.integers(0, 200), st.binary(min_size=1, max_size=4), st.integers(0, 300)).map(
        lambda m: (lambda f: f[:m[0]] + m[1] + f[m[0] + len(m[1]):m[2] + 100])(valid_file_bytes())),
))
def test_fuzz_safetensors_header(fuzz_dir, content):
    path = fuzz_dir / "fuzz.safetensors"
    path.write_bytes(content)
    result = parses_or_raises_own_error(lambda: read_header(path))
    if result is not None:  # what parses describes the file exactly
        data_start, infos, metadata = result
        assert isinstance(metadata, dict)
        assert sum(i.nbytes for i in infos.values()) == len(content) - data_start


@FUZZ
@given(headers, st.integers(0, 400))
def test_fuzz_parse_header(header, data_size):
    parses_or_raises_own_error(lambda: parse_header(json.dumps(header).encode(), data_size, "x.safetensors"))


def test_repair_checksums_each_stage_once_to_find_the_damage(tmp_path, monkeypatch):
    """Regression: finding the damaged stages checksummed every held stage once per stage (n² reads)."""
    from airmlx import stagefile
    src, out = tmp_path / "src", tmp_path / "out"
    make_checkpoint(src, "llama")
    airmlx.shard_checkpoint(src, out, progress=False)
    flip(out / "layer.001.safetensors", -1)
    checked = []
    real = stagefile.stage_file_problem
    monkeypatch.setattr(stagefile, "stage_file_problem",
                        lambda path, entry, checksum=False: checked.append(checksum) or real(path, entry, checksum))
    stages = len(Manifest.load(out).stages)
    assert repair.repair_stages(out, progress=False) == ["layer.001"]
    # once to find the damage, once more when shard_checkpoint(verify=True) decides what to keep
    assert 0 < checked.count(True) <= 2 * stages
