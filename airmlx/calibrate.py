"""Calibrated quantisation: GPTQ-style error-compensating rounding into MLX's affine layout.

Plain rounding quantises every weight on its own. GPTQ (Frantar et al., 2022) quantises a linear layer's
input columns one at a time and spreads each column's rounding error over the columns not yet quantised, in
proportion to how the layer's inputs co-vary (the inverse of H = sum of x x^T over calibration inputs), so the
layer's *outputs* on real text move as little as possible. The result is ordinary MLX affine data: per group
of `group_size` columns a scale and a bias (MLX's min/max rule on the error-updated weights, rounded to the
storage dtype) and packed codes, which both backends run unchanged.

The inputs come from a small calibration text that ships with the package (airmlx/texts/calibration.txt),
run stage by stage while sharding: a layer's Hessians are collected with its float weights, its linears are
quantised, and the next layer sees this layer's output *with the quantised weights*, so memory holds one stage
plus the calibration activations and one Hessian per distinct linear input.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np

from . import quant
from .relayout import read_array

CALIBRATION_TEXT = Path(__file__).parent / "texts" / "calibration.txt"
DAMP = 0.01  # of the mean diagonal, added to H: keeps the inverse well-conditioned
BLOCK = 32  # columns whose errors are spread one by one; the rest of the matrix gets them in one product


def group_params(w, bits, storage):
    """For each row of w (rows, group_size): MLX's float32 scale and bias (which pick the codes, as in
    mx.quantize) and the same rounded to `storage` (what the shard holds, so what the error is measured with)."""
    groups = rounded(w, storage)[:, None, :]
    scale, bias = (a[:, 0] for a in quant.affine_params(groups, bits))
    return scale, bias, rounded(scale, storage), rounded(bias, storage)


def rounded(w32, storage):
    """float32 values rounded to `storage` (what MLX quantises when the weights are stored that way)."""
    return quant.to_float32(quant.from_float32(w32, storage), storage)


def inverse_factor(h):
    """The upper Cholesky factor U of H^-1 (H^-1 = U^T U): row c says how column c's rounding error is spread
    over the columns after it. torch's LAPACK calls are many times faster than numpy's here."""
    import torch
    t = torch.from_numpy(h)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(t)), upper=True).float().numpy()


def gptq(w, hessian, group_size=64, bits=4, storage="float16", damp=DAMP):
    """Quantise w (rows, cols) with GPTQ given H (cols, cols) = sum of x x^T of its inputs. Returns
    (wq uint32, scales, biases) in MLX's affine layout, scales and biases in `storage`."""
    w = np.array(w, dtype=np.float32)
    rows, cols = w.shape
    h = np.array(hessian, dtype=np.float64)
    dead = np.diag(h) == 0  # an input that is always zero: its weights do not matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h[np.diag_indices(cols)] += damp * np.mean(np.diag(h))
    n_groups, n_bins = cols // group_size, (1 << bits) - 1
    codes = np.zeros((rows, cols), np.uint8)
    scales = np.zeros((rows, n_groups), np.float32)
    biases = np.zeros_like(scales)
    exact = np.zeros((2, rows, n_groups), np.float32)  # MLX's unrounded scale and bias: they pick the codes
    u = inverse_factor(h)
    for b0 in range(0, cols, BLOCK):
        b1 = min(b0 + BLOCK, cols)
        block, errors = w[:, b0:b1], np.zeros((rows, b1 - b0), np.float32)
        for j in range(b1 - b0):
            c = b0 + j
            g = c // group_size
            if c % group_size == 0:  # the group's columns hold every earlier error by now
                exact[0][:, g], exact[1][:, g], scales[:, g], biases[:, g] = group_params(
                    w[:, c:c + group_size], bits, storage)
            q = np.clip(np.rint((rounded(block[:, j], storage) - exact[1][:, g]) / exact[0][:, g]), 0, n_bins)
            codes[:, c] = q
            errors[:, j] = (block[:, j] - (scales[:, g] * q + biases[:, g])) / u[c, c]
            block[:, j + 1:] -= np.outer(errors[:, j], u[c, c + 1:b1])
        w[:, b1:] -= errors @ u[b0:b1, b1:]
    wq = quant._pack(codes, bits)
    return wq, quant.from_float32(scales, storage), quant.from_float32(biases, storage)


def calibration_ids(tokenizer, seq_len=512, max_rows=8, extra_texts=()):
    """The calibration text (and any extra texts) as token rows of seq_len: (rows, seq_len) int64."""
    ids = []
    for t in [CALIBRATION_TEXT.read_text(), *extra_texts]:
        if len(ids) >= max_rows * seq_len:
            break
        ids += tokenizer(t, verbose=False)["input_ids"]
    if not ids:
        from .errors import CheckpointError
        raise CheckpointError("the checkpoint's tokenizer turns the calibration text into no tokens, so calibrated "
                              "compression has nothing to run; use plain rounding (e.g. '4bit'), or a checkpoint "
                              "whose tokenizer encodes text.")
    rows = min(max_rows, max(len(ids) // seq_len, 1))
    return np.array(ids[:rows * seq_len], dtype=np.int64).reshape(rows, -1)


def sink_weighted(x):
    """x (rows, positions, features) as float32, each row's first position weighted up to count as much as the
    rest of its row: attention sends most of every later position's weight to the first one (the "attention
    sink"), so an error in its keys and values reaches them all, yet its inputs there are small. Unweighted,
    GPTQ trades that position's accuracy for the others' and the model gets worse. The weight is at most the
    number of positions, and 1 where the first position's inputs already dominate (the huge activations some
    layers' MLPs have there): weighting those too would let it dictate the whole matrix."""
    x = x.float().clone()
    energy = (x * x).sum(-1)  # (rows, positions)
    weight = (energy[:, 1:].sum(-1) / energy[:, 0].clamp_min(1e-30)).clamp(1.0, float(x.shape[1]))
    x[:, 0] *= weight.sqrt()[:, None]  # squared in x x^T
    return x


def check_dense(config, qconfig):
    """Calibrated compression needs a dense model: routed experts are a one-line error."""
    from .archs import arch_for
    from .errors import OptionError
    if arch_for(config).experts:
        raise OptionError(f"calibrated compression ({qconfig['method']}) is for dense models, not "
                          f"{config['model_type']}'s routed experts; use plain rounding, e.g. '4bit'.")


class Calibrator:
    """Runs a model stage by stage on the calibration rows with transformers' own modules (the torch backend,
    on the CPU, in float32) and quantises each stage as it goes: GPTQ for every linear whose inputs it sees
    (a layer's projections, the output head), plain rounding for the rest (the embedding)."""

    def __init__(self, config, qconfig, tokenizer, storage, rows=16, seq_len=512):
        from .archs import arch_for
        from .backends.torch_backend import TorchBackend
        check_dense(config, qconfig)
        self.arch = arch_for(config)
        plain = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
        self.backend = TorchBackend(SimpleNamespace(config=plain, extra={}), device="cpu", dtype="float32")
        self.qconfig, self.storage = qconfig, storage
        from .backends.base import position_table
        from .corpus import corpus  # Python's documentation: more tokens than the shipped text alone
        seq_len = min(seq_len, position_table(self.arch, config) or seq_len)  # GPT-2's table may hold fewer
        ids = calibration_ids(tokenizer, seq_len=seq_len, max_rows=rows, extra_texts=corpus()[0])
        self.step = self.backend.begin_step(ids, np.ones_like(ids), None, all_positions=True)
        self.x = None

    def quantize_stage(self, name, kind, tensors, targets):
        """Stage `name` of `kind` ("embed", "layer", "head"): tensors, its {name: float32 array}; targets, the
        names to quantise. Returns {name: (wq, scales, biases)} and moves the calibration activations on."""
        import torch

        from .manifest import StageEntry
        index = int(name.split(".")[1]) if kind == "layer" else 0
        entry = StageEntry(name=name, kind=kind, index=index, file="", nbytes=0, checksum="", tensors=list(tensors))
        gs, bits = self.qconfig["group_size"], self.qconfig["bits"]
        hessians = {}
        if entry.kind == "layer":
            hessians = self._layer_hessians(entry, tensors, targets)
        elif entry.kind == "head" and self.x is not None:
            stage = self._load(entry, tensors)  # the whole stage (views of its float32 arrays): the norm is run
            with torch.inference_mode():
                h = self.backend.skeleton.get_submodule(self.arch.norm)(self.x).reshape(-1, self.x.shape[-1]).float()
            self.backend.free_stage(stage)
            for name in targets:  # the head's weight (or, tied, the embedding's copy the head stage holds)
                if name.startswith((self.arch.head + ".", self.arch.embed + ".")):
                    hessians[name] = (h.T @ h).numpy()
        results = {}
        for name in targets:
            w = tensors[name]
            if name in hessians:
                results[name] = gptq(w, hessians[name], gs, bits, self.storage)
            else:
                results[name] = quant.quantize(quant.from_float32(w, self.storage), gs, bits, dtype=self.storage)
        if entry.kind in ("embed", "layer"):  # the next stage sees this one's output with quantised weights
            quantised = dict(tensors)
            for name, (wq, s, b) in results.items():
                quantised[name] = quant.to_float32(quant.dequantize(wq, s, b, gs, bits, dtype=self.storage),
                                                    self.storage)
            stage = self._load(entry, quantised)
            self.x = self.backend.run_stage(stage, self.x, self.step)
            self.backend.free_stage(stage)
        return results

    def _load(self, entry, tensors):
        from .store import RawTensor
        raw = {n: RawTensor("F32", t.shape, np.ascontiguousarray(t, dtype=np.float32)) for n, t in tensors.items()}
        return self.backend.load_stage(entry, raw)

    def _layer_hessians(self, entry, tensors, targets):
        """Sum of x x^T of each target linear's inputs, with the layer's float weights."""
        import torch
        stage = self._load(entry, tensors)
        sums, products, hooks = {}, {}, []
        for path, (module, pname, _) in stage.params.items():
            if path in targets and pname == "weight" and isinstance(module, torch.nn.Linear):
                def hook(mod, args, path=path):
                    x = args[0]  # q, k and v (gate and up) read one tensor: one product; kept alive meanwhile
                    if id(x) not in products:
                        flat = sink_weighted(x).reshape(-1, x.shape[-1])
                        products[id(x)] = (x, flat.T @ flat)
                    sums[path] = products[id(x)][1]
                hooks.append(module.register_forward_pre_hook(hook))
        try:
            self.backend.run_stage(stage, self.x, self.step)
        finally:
            for h in hooks:
                h.remove()
            self.backend.free_stage(stage)
        return {path: s.numpy() for path, s in sums.items()}


def for_checkpoint(src, config, qconfig, sources):
    """A Calibrator for a Hugging Face checkpoint folder (its own tokenizer; scales in the matrices' dtype)."""
    from collections import Counter

    from transformers import AutoTokenizer
    kinds = Counter(info.dtype for _, _, info in sources.values() if len(info.shape) == 2 and info.dtype in quant.FLOAT_VIEWS)
    storage = quant.FLOAT_VIEWS[kinds.most_common(1)[0][0]][0] if kinds else "float32"
    return Calibrator(config, qconfig, AutoTokenizer.from_pretrained(src), storage)


def read_float32(source):
    """One safetensors tensor of the sharder's sources, as float32."""
    path, data_start, info = source
    storage, view = quant.FLOAT_VIEWS[info.dtype]
    return quant.to_float32(read_array(path, data_start, info, view), storage)


def checkpoint_stage_items(calibrator, name, kind, tensor_names, sources, qconfig):
    """A calibrated stage of a safetensors checkpoint, in stagefile.write_stage's item format."""
    from .stagefile import in_file_order, quantized, quantized_items, stage_items
    floats = {t: read_float32(sources[t]) for t in tensor_names if sources[t][2].dtype in quant.FLOAT_VIEWS}
    targets = [t for t in tensor_names if quantized(t, sources[t][2], qconfig)]
    results = calibrator.quantize_stage(name, kind, floats, targets)
    items = stage_items([t for t in tensor_names if t not in results], sources)
    dtype = quant.SAFETENSORS_DTYPES[calibrator.storage]
    for t, (wq, scales, biases) in results.items():
        items += quantized_items(t, wq, scales, biases, dtype)
    return in_file_order(items)
