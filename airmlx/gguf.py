"""GGUF files (llama.cpp, Ollama, LM Studio) as a source for the sharder.

The file is read with the `gguf` package (tensors stay memory-mapped; a stage's tensors are converted when
that stage is written, so memory holds one stage). Everything that is not bytes comes from transformers' own
GGUF support: the config (`AutoConfig.from_pretrained(..., gguf_file=)`), the tokenizer and chat template
(`AutoTokenizer`), the GGUF -> Hugging Face tensor names (`get_gguf_hf_weights_map` on a meta-device model) and
the per-architecture tensor fix-ups (its `TENSOR_PROCESSORS`: e.g. llama.cpp's Q/K row permutation, Gemma's
norm offset). A fix-up that only reorders rows is applied to the raw blocks, so quantised tensors stay exact.

Tensor types:
- F32 / F16 / BF16: copied byte for byte (or their rows reordered).
- Q8_0, Q4_0, Q4_1, Q5_0, Q5_1: 32 weights per block, one fp16 scale (and, for _1, an fp16 minimum): MLX's
  affine layout with group size 32 holds them without loss: code = q (+ 128 for the signed Q8_0), scale = d,
  bias = -offset * d (Q8_0: -128 d, Q4_0: -8 d, Q5_0: -16 d) or m. Scales and biases stay float16 (a bias
  that float16 cannot hold exactly makes that tensor's scales and biases float32); dequantised in float32
  they give bit for bit what `gguf.quants.dequantize` gives (but for the sign of zero: gguf's d * (q - 8) is
  -0.0 where scale * q + bias is +0.0).
- Everything else (K-quants, IQ, ...): dequantised with `gguf.quants.dequantize` to the model's dtype.
With `compression=`, every quantisable weight is dequantised and quantised again as asked.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import shutil
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import quant
from .archs import arch_for, stage_layout, unquantized_modules
from .errors import (
    CheckpointError,
    CorruptShardError,
    InsufficientDiskSpaceError,
    OptionError,
    UnsupportedArchitectureError,
)
from .manifest import MANIFEST_NAME, Manifest, StageEntry, fsync_dir, same_source, write_atomic
from .tensorfile import DTYPE_SIZES, TensorInfo

GROUP_SIZE = 32  # the block size of every GGUF type kept quantised
EXACT_BITS = {"Q8_0": 8, "Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5}
FLOAT_TYPES = ("F32", "F16", "BF16")
STORAGE = quant.SAFETENSORS_DTYPES
# rope_freqs: llama 3's rope scaling factors, which transformers computes from the config instead
IGNORED_TENSORS = {"rope_freqs.weight"}
CONVERTER_VERSION = 1  # part of a shard folder's fingerprint: bump when the conversion changes


class GGUFError(CheckpointError):
    """A GGUF file airmlx cannot read or convert."""


def find_gguf(path, gguf_file: str | None = None) -> Path | None:
    """The .gguf file `path` names: the file itself, `gguf_file` inside the folder, or the one .gguf of a
    folder that has no config.json. None when `path` is not a GGUF source."""
    path = Path(path)
    if gguf_file:
        path = path / gguf_file if path.is_dir() else path
        if not path.is_file():
            raise GGUFError(f"{path}: no such GGUF file; check gguf_file.")
        return path
    if path.suffix == ".gguf" and not path.is_dir():
        return path
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    found = sorted(path.glob("*.gguf"))
    if len(found) > 1:
        raise GGUFError(f"{path} holds several GGUF files ({', '.join(p.name for p in found)}); "
                        "pass gguf_file='NAME.gguf' (--gguf-file) to pick one.")
    return found[0] if found else None


# --- blocks -> MLX affine --------------------------------------------------------------------------
def _nibbles(qs):
    """16 bytes per block -> 32 codes: the low nibbles are weights 0..15, the high nibbles 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def blocks_to_affine(raw: np.ndarray, qtype: str):
    """Raw GGUF blocks (..., bytes per row) of an exact type -> (wq uint32, scales, biases) in MLX's affine
    layout with group size 32. Scales and biases are float16 unless a bias does not fit it (then float32)."""
    bits = EXACT_BITS[qtype]
    import gguf
    block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]][1]
    blocks = np.ascontiguousarray(raw).reshape(*raw.shape[:-1], -1, block_bytes)
    f16 = lambda a: np.ascontiguousarray(a).view(np.float16)[..., 0].astype(np.float32)  # noqa: E731
    d = f16(blocks[..., 0:2])
    if qtype == "Q8_0":
        codes = (blocks[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        bias = -128 * d
    elif qtype == "Q4_0":
        codes, bias = _nibbles(blocks[..., 2:]), -8 * d
    elif qtype == "Q4_1":
        codes, bias = _nibbles(blocks[..., 4:]), f16(blocks[..., 2:4])
    else:  # Q5_0 / Q5_1: bit j of the 32-bit qh is weight j's fifth bit
        start = 2 if qtype == "Q5_0" else 4
        qh = np.ascontiguousarray(blocks[..., start:start + 4]).view("<u4")
        high = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)
        codes = _nibbles(blocks[..., start + 4:]) | (high << 4)
        bias = -16 * d if qtype == "Q5_0" else f16(blocks[..., 2:4])
    with np.errstate(over="ignore"):  # a bias beyond float16's range becomes inf, so the tensor keeps float32
        storage = np.float16 if np.array_equal(bias.astype(np.float16).astype(np.float32), bias) else np.float32
    wq = quant._pack(codes.reshape(*raw.shape[:-1], -1), bits)
    return wq, d.astype(storage), bias.astype(storage)


def dequantize(raw: np.ndarray, qtype: str) -> np.ndarray:
    """gguf's own dequantiser: any GGUF type it reads -> float32 of the logical shape (F64, which it does not
    read, converted here)."""
    import gguf
    if qtype == "F64":
        return np.ascontiguousarray(raw).view(np.float64).astype(np.float32)
    return gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype])


@functools.cache
def readable(qtype: str) -> bool:
    """Whether dequantize reads a GGUF type (gguf's package reads most; not Q8_1, Q8_K, the integer types)."""
    import gguf
    if qtype == "F64":
        return True
    kind = gguf.GGMLQuantizationType[qtype]
    try:
        dequantize(np.zeros((1, gguf.GGML_QUANT_SIZES[kind][1]), np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


# --- the file, as transformers sees it ----------------------------------------------------------------
@dataclass
class GGUFTensor:
    """One Hugging Face tensor and where it comes from: a GGUF tensor, maybe one expert of a stacked one,
    maybe with its rows reordered, maybe through a value-changing fix-up (`process`)."""
    name: str
    gguf_name: str
    qtype: str
    shape: tuple  # logical, row-major: what the shard holds
    offset: int  # absolute file offset of its bytes
    nbytes: int
    source: object  # the reader's tensor
    expert: int | None = None
    rows: np.ndarray | None = None  # row order (None: as stored)
    process: object = None  # float32 array -> float32 array, when the fix-up changes values
    stored: tuple = None  # the shape in the file, where the fix-up changes it

    def raw(self):
        data = self.source.data if self.expert is None else self.source.data[self.expert]
        return data if self.rows is None else data[self.rows]

    def float32(self):
        w = dequantize(np.asarray(self.raw()), self.qtype).reshape(self.stored or self.shape)
        return self.process(w) if self.process else w


def row_order(processor, name, rows):
    """What transformers' processor does to GGUF tensor `name` with `rows` rows, found by running it on the
    rows' indices: None (nothing), the new row order (e.g. llama's Q/K un-permutation), or False (it changes
    values, e.g. Gemma's norm - 1, or the shape)."""
    probe = np.arange(rows, dtype=np.float64)[:, None]
    fixed = np.asarray(processor.process(weights=probe.copy(), name=name).weights)
    if fixed.shape != probe.shape or not np.array_equal(np.sort(fixed[:, 0]), probe[:, 0]):
        return False
    order = fixed[:, 0].astype(np.int64)
    return None if np.array_equal(order, np.arange(rows)) else order


@contextlib.contextmanager
def reader_shared(path, reader):
    """transformers' GGUF functions open the file again with gguf.GGUFReader, which parses every metadata field
    (seconds for a large vocabulary); while this is active, opening `path` gives the reader airmlx already has."""
    import gguf
    original, path = gguf.GGUFReader, Path(path).resolve()

    def open_gguf_file(file, mode="r"):
        return reader if mode == "r" and Path(file).resolve() == path else original(file, mode)

    gguf.GGUFReader = open_gguf_file
    try:
        yield
    finally:
        gguf.GGUFReader = original


def _read_field(reader, key, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


class GGUFModel:
    """A GGUF file: its Hugging Face config, tokenizer and tensors (memory-mapped, converted on demand)."""

    def __init__(self, path):
        import gguf
        self.path = Path(path)
        try:
            self.reader = gguf.GGUFReader(self.path)
        except (ValueError, OSError, IndexError) as e:
            raise GGUFError(f"{self.path}: not a readable GGUF file ({str(e)[:200]}); download it again.") from None
        self.architecture = _read_field(self.reader, "general.architecture", "?")
        experts = _read_field(self.reader, f"{self.architecture}.expert_count", 0)
        if self.architecture == "llama" and experts:
            raise UnsupportedArchitectureError(
                f"{self.path.name}: GGUF architecture 'llama' with {experts} experts (Mixtral-style): transformers "
                "cannot read its experts from GGUF, so neither can airmlx; shard the Hugging Face checkpoint instead.")
        self.hf_config = self._transformers_config()
        self.config = self._config_dict()
        arch = arch_for(self.config)  # UnsupportedArchitectureError naming the model_type
        if arch.conv1d or arch.positions:  # transformers' GGUF reader lays GPT-2's out as Conv1D's, named its own way
            raise UnsupportedArchitectureError(
                f"{self.path.name}: GGUF architecture {self.architecture!r} (model_type {arch.model_type!r}) is not "
                "read from GGUF by airmlx; shard the Hugging Face checkpoint instead.")
        self.dtype = self._model_dtype()
        self.config["dtype"] = self.dtype
        self.tensors = self._map_tensors()

    def _transformers_config(self):
        from transformers import AutoConfig
        try:
            with reader_shared(self.path, self.reader):
                return AutoConfig.from_pretrained(self.path.parent, gguf_file=self.path.name)
        except ValueError as e:
            if "not supported" in str(e):
                raise UnsupportedArchitectureError(
                    f"{self.path.name}: GGUF architecture {self.architecture!r} is not one transformers can read "
                    "from GGUF, so airmlx cannot convert it; use the model's Hugging Face checkpoint.") from None
            raise GGUFError(f"{self.path}: transformers could not read its metadata ({str(e)[:200]}).") from None

    def _config_dict(self):
        return {k: v for k, v in self.hf_config.to_dict().items() if not k.startswith("_")}

    def _model_dtype(self):
        """The dtype of most of the file's matrices when they are float; float16 (the blocks' own scale type)
        when they are quantised."""
        common = Counter(t.tensor_type.name for t in self.reader.tensors if len(t.shape) >= 2).most_common(1)
        return {v: k for k, v in STORAGE.items()}.get(common[0][0], "float16") if common else "float16"

    def _map_tensors(self):
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor
        processor = TENSOR_PROCESSORS.get(self.architecture, TensorProcessor)(config=self.hf_config.to_dict())
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(self.hf_config)
        self.config["architectures"] = [type(skeleton).__name__]
        names = gguf_to_hf_names(self.architecture, self.config["num_hidden_layers"], skeleton.state_dict(),
                                 processor)
        tensors, unmapped = {}, []
        for t in self.reader.tensors:
            if t.name in IGNORED_TENSORS:
                continue
            # fused experts are keyed without ".weight", as transformers' MoE processors look them up
            hf = names.get(t.name) or names.get(t.name.removesuffix(".weight"))
            if hf is None:
                unmapped.append(t.name)
                continue
            for entry in self._entries(t, hf, processor):
                tensors[entry.name] = entry
        if unmapped:
            raise GGUFError(f"{self.path.name}: tensors {unmapped[:4]} have no place in transformers' "
                            f"{type(skeleton).__name__}; airmlx cannot convert this GGUF ({self.architecture}).")
        return tensors

    def _entries(self, t, hf, processor):
        """The Hugging Face tensors one GGUF tensor becomes (several for stacked MoE experts)."""
        shape = tuple(int(n) for n in reversed(t.shape))
        qtype = t.tensor_type.name
        if not readable(qtype):
            raise GGUFError(f"{self.path.name}: tensor {t.name} is stored as {qtype}, which the gguf package cannot "
                            "dequantise; use a GGUF file of another quantisation (Q4_K_M, Q8_0, ...).")
        if len(shape) == 3:  # stacked experts, e.g. blk.0.ffn_gate_exps -> ...mlp.experts.gate_up_proj
            proj = t.name.rsplit(".", 2)[-2].split("_")[1]  # ffn_gate_exps -> gate
            prefix = hf.rsplit(".", 1)[0]
            per = t.n_bytes // shape[0]
            return [GGUFTensor(f"{prefix}.{e}.{proj}_proj.weight", t.name, qtype, shape[1:],
                               int(t.data_offset) + e * per, per, t, expert=e) for e in range(shape[0])]
        entry = GGUFTensor(hf, t.name, qtype, shape, int(t.data_offset), int(t.n_bytes), t)
        order = row_order(processor, t.name, shape[0])
        if order is False:  # the fix-up changes values: it runs on the dequantised floats
            entry.process = lambda w, name=t.name: np.asarray(processor.process(weights=w, name=name).weights,
                                                             dtype=np.float32)
            if len(shape) == 1:  # small: run it to learn the shape it gives (e.g. (n,) -> (1, n))
                entry.stored, entry.shape = shape, tuple(entry.process(np.zeros(shape, np.float32)).shape)
        else:
            entry.rows = order
        return [entry]

    # -- what the shard folder gets --------------------------------------------------------------
    @staticmethod
    def _exact_bits(t: GGUFTensor):
        exact = t.qtype in EXACT_BITS and t.process is None and len(t.shape) == 2 and t.name.endswith(".weight")
        return EXACT_BITS[t.qtype] if exact else None

    @functools.cached_property
    def default_bits(self):
        """The most common bits among the tensors that can stay quantised (None if there are none)."""
        bits = Counter(b for t in self.tensors.values() if (b := self._exact_bits(t)))
        return bits.most_common(1)[0][0] if bits else None

    def kept_bits(self, t: GGUFTensor, qconfig=None):
        """Bits when tensor t stays quantised as it is in the file (MLX affine, group 32), else None.
        Routed experts stay quantised only with the default bits: MLX stacks them into one module whose
        per-module override would need MLX's own module name."""
        bits = None if qconfig else self._exact_bits(t)
        return None if bits and t.expert is not None and bits != self.default_bits else bits

    def quantization(self):
        """The mlx-lm style "quantization" entry for the tensors kept quantised, or None: the most common
        bits as the default, per-module overrides for the rest."""
        bits = {t.name[: -len(".weight")]: b for t in self.tensors.values() if (b := self.kept_bits(t))}
        if not bits:
            return None
        default = self.default_bits
        q = {"group_size": GROUP_SIZE, "bits": default, "mode": "affine"}
        q.update({m: {"group_size": GROUP_SIZE, "bits": b} for m, b in sorted(bits.items()) if b != default})
        return q

    def stage_items(self, tensor_names, qconfig=None, calibrator=None, stage=None):
        """What a stage file holds: (name, dtype, shape, payload) with payload a byte range of the GGUF file or
        a numpy array, as stagefile.write_stage takes them. calibrator: quantise stage = (name, kind) with it."""
        from .stagefile import in_file_order, quantized, quantized_items
        items = []
        storage = STORAGE[self.dtype]
        targets = [n for n in tensor_names if qconfig and
                   quantized(n, TensorInfo(n, storage, self.tensors[n].shape, 0, 0), qconfig)]
        done = {}
        if calibrator is not None:
            floats = {n: self.tensors[n].float32() for n in tensor_names}
            done = calibrator.quantize_stage(*stage, floats, targets)
        for name in tensor_names:
            t = self.tensors[name]
            if name in targets:
                wq, scales, biases = done.get(name) or quant.quantize(
                    quant.from_float32(t.float32(), self.dtype), qconfig["group_size"], qconfig["bits"], dtype=self.dtype)
                items += quantized_items(name, wq, scales, biases, storage)
            elif self.kept_bits(t, qconfig):
                wq, scales, biases = blocks_to_affine(np.asarray(t.raw()), t.qtype)
                items += quantized_items(name, wq, scales, biases, STORAGE[scales.dtype.name])
            elif t.qtype in FLOAT_TYPES and t.process is None:
                if t.rows is None:
                    items.append((name, t.qtype, t.shape, (self.path, t.offset, t.offset + t.nbytes)))
                else:
                    items.append((name, t.qtype, t.shape, np.ascontiguousarray(t.raw())))
            else:  # another block type, or a fix-up that changes values: float, in the model's dtype
                w = t.float32()
                kind = "F32" if t.qtype == "F32" or w.ndim == 1 else storage
                payload = w if kind == "F32" else quant.from_float32(w, self.dtype)
                items.append((name, kind, w.shape, payload))
        return in_file_order(items)

    def stage_bytes(self, tensor_names, qconfig=None):
        """Bytes a stage file will take (errs high)."""
        total = 1024
        for name in tensor_names:
            t = self.tensors[name]
            n = math.prod(t.shape)
            if qconfig and len(t.shape) == 2:
                total += n * qconfig["bits"] // 8 + 2 * 4 * n // qconfig["group_size"] + 300
            elif self.kept_bits(t):
                total += n * EXACT_BITS[t.qtype] // 8 + 2 * 4 * n // GROUP_SIZE + 300
            else:
                total += n * 4 + 100
        return total

    @functools.cached_property
    def tokenizer(self):
        """transformers' tokenizer built from the GGUF metadata (with its chat template)."""
        from transformers import AutoTokenizer
        with reader_shared(self.path, self.reader):
            return AutoTokenizer.from_pretrained(self.path.parent, gguf_file=self.path.name)

    def save_metadata(self, out, config):
        """config.json, generation_config.json and the tokenizer files (with the chat template), built by
        transformers from the GGUF metadata."""
        from transformers import GenerationConfig
        self.tokenizer.save_pretrained(out)
        generation = GenerationConfig.from_model_config(self.hf_config).to_dict()
        generation = {k: v for k, v in generation.items() if k.endswith("token_id") and v is not None}
        write_atomic(Path(out) / "generation_config.json", json.dumps(generation, indent=1).encode())
        write_atomic(Path(out) / "config.json", json.dumps(config, indent=1).encode())


def gguf_to_hf_names(architecture, num_layers, state_dict, processor):
    """{GGUF tensor name: Hugging Face name} for a model's parameters, as transformers' loader pairs them
    (get_gguf_hf_weights_map): gguf's own name table, with transformers' per-architecture processor for the
    names the table lacks (fused MoE experts). Built once: transformers rebuilds the table per submodule."""
    import gguf
    arch = next((k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == architecture), None)
    if arch is None:
        raise UnsupportedArchitectureError(f"GGUF architecture {architecture!r} is unknown to the installed gguf "
                                           "package; upgrade it: pip install -U gguf.")
    table = gguf.get_tensor_name_map(arch, num_layers)
    names = {}
    for hf in state_dict:
        hf = processor.preprocess_name(hf)
        base, dot, suffix = hf.rpartition(".") if hf.endswith((".weight", ".bias")) else (hf, "", "")
        found = table.get_name(base)
        if found is None:
            processor.perform_fallback_tensor_mapping(names, dot + suffix, "", hf)
        else:
            names[found + dot + suffix] = hf
    return names


@functools.lru_cache(maxsize=2)
def _open(path, size, mtime_ns):
    return GGUFModel(path)


def open_gguf(path) -> GGUFModel:
    """GGUFModel(path), kept for the next call while the file is unchanged (parsing the metadata and
    building transformers' name map takes seconds)."""
    st = Path(path).stat()
    return _open(Path(path).resolve(), st.st_size, st.st_mtime_ns)


def fingerprint(path, qconfig):
    """What a shard folder was made from: the file (name, size, mtime), the compression and this converter."""
    st = Path(path).stat()
    return {"files": [{"name": Path(path).name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}],
            "quantization": qconfig, "gguf_converter": CONVERTER_VERSION}


def shard_gguf(path, out, *, compression=None, progress=True, verify=False, delete_original=False) -> Path:
    """Shard the GGUF file `path` into `out` (see the module docstring); return `out`. Reuses a finished folder
    made from the same file with the same compression, resumes an interrupted one."""
    from tqdm import tqdm

    from .stagefile import (
        PROGRESS_NAME,
        STAGE_FILE,
        complete_folder,
        disk_full_named,
        finished_folder,
        folder_lock,
        make_folder,
        reusable,
        say_ungrouped,
        write_stage,
    )
    path, out = Path(path), Path(out)
    if not path.is_file():
        if complete_folder(out, verify):  # the GGUF was deleted after an earlier sharding
            return out
        raise GGUFError(f"{path}: no such GGUF file; check the path.")
    qconfig = quant.compression_config(compression) if compression else None
    fp = fingerprint(path, qconfig)
    if not verify and (made := finished_folder(out, fp)):  # reused without writing: a read-only disk opens
        delete_after_check(path, out, made, delete_original)
        return out
    model = open_gguf(path)  # before the shard folder is made: a refused file leaves nothing behind
    if qconfig and qconfig.get("method"):
        from .calibrate import check_dense
        check_dense(model.config, qconfig)
    make_folder(out)
    with folder_lock(out), contextlib.ExitStack() as cleanup:
        done = {}
        try:
            existing = Manifest.load(out)
        except CorruptShardError:
            existing = None
        if existing is not None and existing.source == fp:
            done = reusable(out, existing.stages, verify=verify)
            if len(done) == len(existing.stages):
                (out / PROGRESS_NAME).unlink(missing_ok=True)
                delete_after_check(path, out, existing, delete_original)
                return out
        made_from = existing and existing.extra.get("source_path")
        if existing is not None and existing.source != fp and made_from:
            if not same_source(Path(made_from), path):  # as for a checkpoint: another model's shards stay
                raise OptionError(f"{out} holds the shards of {made_from}, not of {path}; give each model a folder "
                                  f"of its own (or delete {out} first).")
        if existing is not None:
            print(f"airmlx: {out}: rebuilding " + ("damaged stages." if existing.source == fp else
                                                   "it (made from a different file)."), file=sys.stderr)
            (out / MANIFEST_NAME).unlink()
            fsync_dir(out)
        progress_path = out / PROGRESS_NAME
        if not done and progress_path.is_file():
            with contextlib.suppress(ValueError, TypeError, KeyError):
                saved = json.loads(progress_path.read_text())
                if saved.get("source") == fp:
                    done = reusable(out, [StageEntry(**e) for e in saved["stages"]], verify=True)

        config = dict(model.config)
        arch = arch_for(config)
        if qconfig:
            qconfig = {**qconfig, **dict.fromkeys(unquantized_modules(config), False)}
        layout = stage_layout(config, list(model.tensors))
        if qconfig:
            storage = STORAGE[model.dtype]
            say_ungrouped([TensorInfo(n, storage, t.shape, 0, 0) for n, t in model.tensors.items()], qconfig)
        sizes = {name: model.stage_bytes(ts, qconfig) for name, _, ts in layout}
        calibrated = bool(qconfig and qconfig.get("method"))
        if calibrated:
            done = {}  # each stage's calibration needs the ones before it: an interrupted run starts over
        need = sum(sizes[name] for name, _, _ in layout if name not in done) + (64 << 20)  # + tokenizer files
        free = shutil.disk_usage(out).free
        if need > free:
            raise InsufficientDiskSpaceError(
                f"{out}: sharding needs {need:,} bytes but only {free:,} are free; free "
                f"{need - free:,} bytes there or pass another layer_shards_saving_path.")
        calibrator = None
        if calibrated:
            from .calibrate import Calibrator
            calibrator = Calibrator(config, qconfig, model.tokenizer, model.dtype)
        fds = {}
        cleanup.callback(lambda: [os.close(fd) for fd in fds.values()])
        cleanup.enter_context(disk_full_named(out, lambda: sum(sizes[n] for n, _, _ in layout if n not in done)))
        bar = tqdm(total=sum(sizes[n] for n, _, _ in layout if n not in done), unit="B", unit_scale=True,
                   desc=f"sharding {path.name}", disable=not progress)  # what is written, not the disk's margin
        with bar:
            for index, (name, kind, tensor_names) in enumerate(layout):
                if name in done:
                    continue
                if kind == "experts":
                    items, parts = _expert_items(model, arch, tensor_names, qconfig)
                else:
                    items, parts = model.stage_items(tensor_names, qconfig, calibrator, (name, kind)), None
                done[name] = write_stage(out, name, kind, index, items, fds, parts)
                write_atomic(progress_path, json.dumps(
                    {"source": fp, "stages": [vars(e) for e in done.values()]}).encode())
                bar.update(sizes[name])

        quantization = qconfig or model.quantization()
        if quantization:
            config["quantization"] = quantization
        model.save_metadata(out, config)
        stages = [done[name] for name, _, _ in layout]
        for stale in out.iterdir():
            if STAGE_FILE.match(stale.name) and stale.name not in {s.file for s in stages}:
                stale.unlink()
        manifest = Manifest(architecture=config["model_type"], config=config, source=fp, stages=stages,
                            quantization=quantization,
                            extra={"source_path": str(path.resolve()), "gguf_architecture": model.architecture})
        manifest.save(out)
        progress_path.unlink(missing_ok=True)
        delete_after_check(path, out, manifest, delete_original)
    return out


def delete_after_check(path, out, manifest, delete_original):
    """delete_original: remove the GGUF file (and its hub-cache blob), only once every stage reads back intact."""
    from .stagefile import delete_sources
    if delete_original:
        delete_sources(out, manifest, [path], "the GGUF file was")


def _expert_items(model, arch, tensor_names, qconfig):
    """An experts stage, expert by expert, and each expert's [start, end) in the data section (as
    sharder.expert_items does for safetensors sources)."""
    from .archs import expert_index
    by_expert = {}
    for t in tensor_names:
        by_expert.setdefault(expert_index(arch, t), []).append(t)
    items, parts, pos = [], {}, 0
    for e in sorted(by_expert):
        group = model.stage_items(by_expert[e], qconfig)
        size = sum(math.prod(shape) * DTYPE_SIZES[dtype] for _, dtype, shape, _ in group)
        items += group
        parts[str(e)] = [pos, pos + size]
        pos += size
    return items, parts
