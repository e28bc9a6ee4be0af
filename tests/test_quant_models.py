"""Quantised shards: ours (compression=) and mlx-lm's (mlx_lm.convert), streamed on both backends."""
import glob
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx_lm import convert
from mlx_lm import load as mlx_load
from mlx_lm.models.cache import make_prompt_cache
from safetensors.numpy import load_file

import airmlx
from airmlx.archs import rope_config
from airmlx.errors import BackendError, CheckpointError, OptionError
from airmlx.manifest import Manifest

from tiny import make_checkpoint, minimum_budget

PROMPT = [5, 17, 33, 2, 9, 60, 7, 41, 12]
# every linear's input splits into whole groups of 64, and its output into blocks of 64 rows (the int4 kernel's on
# AVX-512 CPUs)
SIZE = dict(intermediate_size=128, num_key_value_heads=4)


def mlx_lm_greedy(model, n):
    """Greedy tokens from an mlx-lm model held resident, with mlx-lm's own cache."""
    cache = make_prompt_cache(model)
    tokens, out = mx.array([PROMPT]), []
    for _ in range(n):
        logits = model(tokens, cache=cache)[:, -1]
        nxt = int(mx.argmax(logits, axis=-1).item())
        out.append(nxt)
        tokens = mx.array([[nxt]])
    return PROMPT + out


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """An fp32 HF checkpoint and the 8-bit mlx-community-style folder mlx_lm.convert makes from it."""
    root = tmp_path_factory.mktemp("q")
    make_checkpoint(root / "hf", "llama", **SIZE)
    # mlx-lm reads rope settings only from top-level keys, which transformers 5 no longer writes
    config = json.loads((root / "hf" / "config.json").read_text())
    theta, scaling = rope_config(config)
    (root / "hf" / "config.json").write_text(json.dumps({**config, "rope_theta": theta, "rope_scaling": scaling}))
    convert(str(root / "hf"), str(root / "mlx8"), quantize=True, q_bits=8, q_group_size=64, dtype="float32")
    return root


def test_our_8bit_shards_are_bit_identical_to_mlx_lm_convert(converted, tmp_path):
    out = airmlx.shard_checkpoint(converted / "hf", tmp_path / "q8", compression="8bit", progress=False)
    ours = {}
    for f in glob.glob(str(out / "*.safetensors")):
        ours.update(load_file(f))
    theirs = {}
    for f in glob.glob(str(converted / "mlx8" / "*.safetensors")):
        theirs.update(load_file(f))
    quantized = [k for k in theirs if k.endswith(".scales")]
    assert len(quantized) == 4 * 7 + 2  # every linear of every layer, the embedding and the head
    for k in quantized:
        base = k[: -len(".scales")]
        for part in (".weight", ".scales", ".biases"):
            assert np.array_equal(ours[base + part], theirs[base + part]), base + part
    assert Manifest.load(out).quantization == {"group_size": 64, "bits": 8, "mode": "affine"}


def test_8bit_streamed_greedy_equals_mlx_lm_resident(converted, tmp_path):
    model, _ = mlx_load(str(converted / "mlx8"))
    want = mlx_lm_greedy(model, 16)
    out = airmlx.shard_checkpoint(converted / "hf", tmp_path / "q8", compression="8bit", progress=False)
    for backend in ("mlx", "torch"):  # torch holds the stages dequantised: its minimum is higher
        with airmlx.AutoModel.from_pretrained(out, backend=backend,
                                              memory_budget=int(1.5 * minimum_budget(out, backend))) as m:
            assert m.plan.streamed
            assert m.generate(PROMPT, max_new_tokens=16) == want


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_prequantized_mlx_checkpoint_streams_without_requantising(converted, tmp_path, backend):
    model, _ = mlx_load(str(converted / "mlx8"))
    want = mlx_lm_greedy(model, 12)
    out = airmlx.shard_checkpoint(converted / "mlx8", tmp_path / "pre", progress=False)
    theirs = {}
    for f in glob.glob(str(converted / "mlx8" / "*.safetensors")):
        theirs.update(load_file(f))
    ours = {}
    for f in glob.glob(str(out / "*.safetensors")):
        ours.update(load_file(f))
    assert all(np.array_equal(ours[k], v) for k, v in theirs.items())  # copied, not re-quantised
    with airmlx.AutoModel.from_pretrained(out, backend=backend,
                                          memory_budget=int(1.5 * minimum_budget(out, backend))) as m:
        assert m.plan.streamed
        assert m.generate(PROMPT, max_new_tokens=12) == want
    with pytest.raises(CheckpointError, match="already quantised"):
        airmlx.shard_checkpoint(converted / "mlx8", tmp_path / "again", compression="4bit", progress=False)


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_4bit_runs_on_both_backends_and_agrees(converted, tmp_path, backend):
    out = airmlx.shard_checkpoint(converted / "hf", tmp_path / "q4", compression="4bit", progress=False)
    with airmlx.AutoModel.from_pretrained(out, backend="mlx") as m:
        want = m.generate(PROMPT, max_new_tokens=12)
        ref_logits = m.logits([PROMPT])
    with airmlx.AutoModel.from_pretrained(out, backend=backend,
                                          memory_budget=int(1.5 * minimum_budget(out, backend))) as m:
        assert m.plan.streamed
        assert m.generate(PROMPT, max_new_tokens=12) == want
        got = m.logits([PROMPT])
    assert np.abs(got - ref_logits).max() / np.abs(ref_logits).max() < 1e-4


@pytest.mark.parametrize("arch", ["deepseek_v2", "deepseek_v3", "glm4_moe", "exaone_moe", "dots1", "laguna"])
def test_a_router_mlx_lm_keeps_as_an_array_stays_unquantised_and_4bit_streams_alike(tmp_path, arch):
    """Regression: the sharder quantised DeepSeek-V3's router (a 2-D .weight), which mlx-lm keeps as a plain
    array, so MLX refused the stage ("has shape (8, 16), the config implies (8, 64)")."""
    make_checkpoint(tmp_path / "hf", arch, moe_intermediate_size=64, **SIZE)
    out = airmlx.shard_checkpoint(tmp_path / "hf", tmp_path / "q4", compression="4bit", progress=False)
    with airmlx.AutoModel.from_pretrained(out, backend="mlx") as m:
        want, ref = m.generate(PROMPT, max_new_tokens=12), m.logits([PROMPT])
    for backend in ("mlx", "torch"):
        with airmlx.AutoModel.from_pretrained(out, backend=backend, memory_budget=minimum_budget(out, backend)) as m:
            assert m.plan.streamed
            assert m.generate(PROMPT, max_new_tokens=12) == want
            assert np.abs(m.logits([PROMPT]) - ref).max() / np.abs(ref).max() < 1e-4
    assert Manifest.load(out).config["quantization"]["model.layers.1.mlp.gate"] is False


def test_torch_quantised_gemma_and_a_tied_head_of_other_bits_agree_with_mlx(tmp_path):
    """Regressions: the torch backend's quantised embedding kept Gemma's embed_scale out (its forward is
    replaced), and a tied head dequantised the embedding with the default bits, not the embedding's own
    (mlx-lm's mixed recipes and GGUF files give the embedding more bits)."""
    make_checkpoint(tmp_path / "hf", "gemma3_text", tie_word_embeddings=True, **SIZE)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    theta, scaling = rope_config(config)
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "rope_theta": theta, "rope_scaling": scaling}))
    eight_bit_embedding = lambda path, module: {"group_size": 64, "bits": 8} if "embed" in path else True
    convert(str(tmp_path / "hf"), str(tmp_path / "mixed"), quantize=True, q_bits=4, q_group_size=64,
            dtype="float32", quant_predicate=eight_bit_embedding)
    out = airmlx.shard_checkpoint(tmp_path / "mixed", tmp_path / "q", progress=False)
    assert Manifest.load(out).config["quantization"]["model.embed_tokens"]["bits"] == 8
    with airmlx.AutoModel.from_pretrained(out, backend="mlx") as m:
        want, ref = m.generate(PROMPT, max_new_tokens=12), m.logits([PROMPT])
    with airmlx.AutoModel.from_pretrained(out, backend="torch") as m:
        assert m.generate(PROMPT, max_new_tokens=12) == want
        assert np.abs(m.logits([PROMPT]) - ref).max() / np.abs(ref).max() < 1e-4


def test_4bit_shards_are_under_0_3_of_bf16(tmp_path):
    make_checkpoint(tmp_path / "bf16", "llama", dtype=torch.bfloat16, intermediate_size=256, vocab_size=512)
    plain = Manifest.load(airmlx.shard_checkpoint(tmp_path / "bf16", tmp_path / "p", progress=False)).total_bytes
    four = Manifest.load(airmlx.shard_checkpoint(tmp_path / "bf16", tmp_path / "q", compression="4bit",
                                                 progress=False)).total_bytes
    assert four <= 0.3 * plain, four / plain


def test_compression_of_a_shard_folder_quantises_the_checkpoint_it_was_made_from(converted, tmp_path):
    """Regression: compression= with a shard folder was ignored, and the model ran unquantised."""
    plain = airmlx.shard_checkpoint(converted / "hf", tmp_path / "plain", progress=False)
    with airmlx.AutoModel.from_pretrained(plain, backend="torch", compression="4bit", progress=False) as model:
        assert model.shard_dir == tmp_path / "plain-4bit" and model.store.manifest.quantization["bits"] == 4
        assert model.shard_bytes < 0.3 * Manifest.load(plain).total_bytes
    with airmlx.AutoModel.from_pretrained(tmp_path / "plain-4bit", backend="torch", compression="4bit") as model:
        assert model.shard_dir == tmp_path / "plain-4bit"  # already what was asked for
    with airmlx.AutoModel.from_pretrained(plain, backend="torch", compression="8bit",
                                          layer_shards_saving_path=tmp_path / "eight", progress=False) as model:
        assert model.shard_dir == tmp_path / "eight" and model.store.manifest.quantization["bits"] == 8


def test_unknown_compression_is_refused(converted):
    with pytest.raises(OptionError, match="'3bit'.*4bit"):
        airmlx.AutoModel.from_pretrained(converted / "hf", compression="3bit")


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_torch_dequantize_is_bit_exact_with_mlx(bits, dtype, group_size, monkeypatch):
    """Every width on torch's own ops (3, 5 and 6 bits, whose codes straddle bytes and words, went through numpy
    on the CPU, about 5 x slower), in blocks of 5 rows that do not divide the 37."""
    from airmlx.backends import torch_quant
    from airmlx.backends.torch_quant import dequantize_weight
    monkeypatch.setattr(torch_quant, "DEQUANT_ELEMENTS", 5 * 256)
    mx_dtype, torch_dtype = getattr(mx, dtype), getattr(torch, dtype)
    w = mx.array(np.random.default_rng(bits).normal(size=(37, 256)).astype(np.float32)).astype(mx_dtype)
    q, s, b = mx.quantize(w, group_size=group_size, bits=bits)
    want = mx.dequantize(q, s, b, group_size=group_size, bits=bits)

    def to_torch(a):  # bf16 travels as its bit pattern
        return torch.from_numpy(np.array(a.view(mx.uint16))).view(torch.bfloat16) if dtype == "bfloat16" \
            else torch.from_numpy(np.array(a))

    got = dequantize_weight(torch.from_numpy(np.array(q)), to_torch(s), to_torch(b), group_size, bits)
    assert got.dtype == torch_dtype and torch.equal(got.view(torch.int16) if dtype != "float32" else got,
                                                    to_torch(want).view(torch.int16) if dtype != "float32" else to_torch(want))


def test_int4_repack_matches_torchs_own_layout():
    """4-bit Linears on a CPU run on torch's packed int4 kernel; the codes are repacked from MLX's layout
    with numpy byte operations, which must give what torch's own converter gives from the raw codes."""
    from airmlx.backends import torch_quant
    if not torch_quant.int4_kernel_ok():
        pytest.skip("this torch has no packed int4 CPU kernel (the backend dequantises instead)")
    gen = torch.Generator().manual_seed(1)
    block = torch_quant.int4_block()  # 32 rows, or 64 where torch packs for AVX-512
    for n, k in [(block, 64), (3 * block, 256), (512, 128)]:
        codes = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=gen)
        wq = (codes.reshape(n, k // 8, 8) << torch.arange(0, 32, 4, dtype=torch.int32)).sum(-1).to(torch.int32)
        assert torch.equal(torch_quant.repack_int4(wq), torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1))


def test_int4_prefill_dequantises_blocks_and_agrees_with_the_kernel(monkeypatch):
    """From INT4_KERNEL_ROWS input rows the packed weight is unpacked (unpack_int4 inverts repack_int4) and
    dequantised a block of rows at a time: the kernel's products, far faster for a prompt."""
    from airmlx.backends import torch_quant
    if not torch_quant.int4_kernel_ok():
        pytest.skip("this torch has no packed int4 CPU kernel (the backend dequantises instead)")
    gen = torch.Generator().manual_seed(2)
    n, k, group = 192, 256, 32
    codes = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=gen)
    wq = (codes.reshape(n, k // 8, 8) << torch.arange(0, 32, 4, dtype=torch.int32)).sum(-1).to(torch.int32)
    packed = torch_quant.repack_int4(wq)
    assert torch.equal(torch_quant.unpack_int4(packed).int(), codes)
    scales, biases = torch.rand(n, k // group, generator=gen), torch.rand(n, k // group, generator=gen)
    module = torch.nn.Linear(k, n, bias=False, device="meta")
    torch_quant.install_int4(module, packed, torch_quant.scales_and_zeros(scales, biases), group)
    monkeypatch.setattr(torch_quant, "DEQUANT_ELEMENTS", 64 * k)  # several blocks of rows
    x = torch.randn(3, 7, k, generator=gen)
    kernel = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, k), packed, group,
                                                        torch.stack([scales.t(), (biases + 8 * scales).t()], -1))
    exact = x.reshape(-1, k) @ (codes.reshape(n, -1, group) * scales[..., None] + biases[..., None]).reshape(n, k).t()
    y = module(x)
    assert y.shape == (3, 7, n) and x.shape[0] * x.shape[1] >= torch_quant.INT4_KERNEL_ROWS
    assert torch.allclose(y.reshape(-1, n), kernel, rtol=1e-5, atol=1e-4)
    assert torch.allclose(y.reshape(-1, n), exact, rtol=1e-5, atol=1e-4)


BLOCK_FAULTS = """
import resource, sys, torch
from airmlx.backends import torch_quant as tq
gen = torch.Generator().manual_seed(0)
n, k, group = 4096, 512, 32
wq = torch.randint(0, 256, (n, k), dtype=torch.int32, generator=gen).to(torch.uint8).view(torch.int32)  # 8-bit codes
scales, biases = torch.rand(n, k // group, generator=gen), torch.rand(n, k // group, generator=gen)
head = torch.nn.Linear(k, n, bias=False, device="meta")
tq.install_linear(head, wq, scales, biases, group, 8)
c4 = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=gen)
packed = tq.repack_int4((c4.reshape(n, k // 8, 8) << torch.arange(0, 32, 4, dtype=torch.int32)).sum(-1).to(torch.int32))
sz = tq.scales_and_zeros(scales, biases)
tq.DEQUANT_ELEMENTS = 256 * k  # blocks of 256 rows: 16 of them
x = torch.randn(1, 16, k, generator=gen)
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
runs = [lambda: head(x)] + ([lambda: tq.int4_dense(x[0], packed, sz, group)] if tq.int4_kernel_ok() else [])
for run in runs:
    run()
    before = faults()
    run()
    print(faults() - before, n * k * 4 // 4096)  # pages faulted in, pages of the whole weight in float32
"""


@pytest.mark.skipif(not airmlx.uses_glibc(), reason="glibc's MALLOC_MMAP_THRESHOLD_")
def test_a_quantised_weight_is_dequantised_into_one_block_per_call():
    """A quantised head dequantised a fresh block for each block of its rows, and int4_dense made four copies
    of each block (codes, minus 8, times scales, plus zeros): each a new allocation, so with glibc serving
    them from mappings, pages faulted in afresh (SmolLM2's head: 108 MB of faults a token). Now one block is
    filled in place and reused: a call faults in about one block, not the whole weight."""
    import os
    import subprocess
    import sys
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run([sys.executable, "-c", BLOCK_FAULTS], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    for line in done.stdout.splitlines():
        faults, weight_pages = map(int, line.split())
        # the head's weight is 8 of its blocks, int4_dense's 16: the whole weight (or 4 x it) was faulted in
        assert faults < weight_pages / 2, (faults, weight_pages)


DEQUANT_TEMPORARIES = """
import torch
from airmlx.backends import torch_quant as tq
n, k, group = 1024, 2048, 64
status = lambda key: int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) * 1024
for bits in (2, 3, 4, 5, 6, 8):
    for dtype in (torch.bfloat16, torch.float32):
        wq = torch.randint(-2**31, 2**31 - 1, (n, k * bits // 32), dtype=torch.int32)
        scales, biases = torch.rand(n, k // group).to(dtype), torch.rand(n, k // group).to(dtype)
        out = torch.ones(n, k, dtype=dtype)
        open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
        base = status("VmRSS")
        tq.dequantize_rows(wq, scales, biases, group, bits, out)
        print(bits, dtype, (status("VmHWM") - base) / (n * k), tq.dequant_bytes(bits, dtype.itemsize))
"""


@pytest.mark.skipif(not airmlx.uses_glibc() or not Path("/proc/self/clear_refs").exists(),
                    reason="glibc's MALLOC_MMAP_THRESHOLD_ and Linux's peak resident set")
def test_dequantising_a_block_makes_no_more_temporaries_than_the_plan_counts():
    """The plan counts dequant_bytes per weight of a block for the temporaries of dequantising it: measured in a
    process whose allocations are all given back (glibc's mmap threshold low), every affine width, the 3, 5 and 6
    bits whose codes straddle bytes included, makes no more."""
    import os
    import subprocess
    import sys
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run([sys.executable, "-c", DEQUANT_TEMPORARIES], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert len(lines) == 12
    for line in lines:
        print(line)  # bits, dtype, bytes a weight measured, counted: pytest -s shows them
        bits, dtype, measured, counted = line.split()
        assert float(measured) <= float(counted), line


def test_4bit_torch_stages_stay_packed(converted, tmp_path):
    """A streamed 4-bit stage holds its packed codes (about its file size), not a dequantised copy, and
    computes what the dequantised weights compute."""
    from airmlx.backends import torch_quant
    out = airmlx.shard_checkpoint(converted / "hf", tmp_path / "q4", compression="4bit", progress=False)
    with airmlx.AutoModel.from_pretrained(out, backend="torch", memory_budget="1GB") as m:
        got = m.logits([PROMPT])
        layer = m.plan.stages["layer.000"]
        packed = torch_quant.int4_kernel_ok()
        assert layer.held < 1.5 * layer.read if packed else layer.held > 3 * layer.read
        overridden = [mod for mod in m.backend.skeleton.modules() if "forward" in mod.__dict__]
        assert bool(overridden) == packed
    with airmlx.AutoModel.from_pretrained(out, backend="mlx") as m:
        want = m.logits([PROMPT])
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-4


def test_4bit_scaled_embedding_keeps_its_scale(tmp_path):
    """gemma3's embedding multiplies what it looks up by sqrt(hidden): torch's quantised lookup, which
    replaces the module's forward, scales the rows it dequantises as the module would."""
    make_checkpoint(tmp_path / "hf", "gemma3_text", **SIZE)
    out = airmlx.shard_checkpoint(tmp_path / "hf", tmp_path / "q4", compression="4bit", progress=False)
    with airmlx.AutoModel.from_pretrained(out, backend="torch") as m:
        got = m.logits([PROMPT])
    with airmlx.AutoModel.from_pretrained(out, backend="mlx") as m:
        want = m.logits([PROMPT])
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-4


def test_torch_streams_4bit_stages_from_a_copy_in_its_kernels_layout(converted, tmp_path, monkeypatch, caplog):
    """torch on the CPU writes the streamed 4-bit stages once in its int4 kernel's layout (FOLDER/torch-int4) and
    maps them: the same logits, bit for bit, as repacking at every load; a copy is reused, written again once its
    stage file changes, and without room for a copy that stage is repacked as before (the others keep theirs)."""
    from airmlx import stage_copies
    from airmlx.backends import torch_quant
    if not torch_quant.int4_kernel_ok():
        pytest.skip("this torch has no packed int4 CPU kernel")
    out = airmlx.shard_checkpoint(converted / "hf", tmp_path / "q4", compression="4bit", progress=False)
    budget = int(1.5 * minimum_budget(out, "torch"))
    copies = out / torch_quant.INT4_COPY

    def run(memory_budget):
        with airmlx.AutoModel.from_pretrained(out, backend="torch", memory_budget=memory_budget) as m:
            return m.logits([PROMPT]), m.generate(PROMPT, max_new_tokens=8), set(m.plan.streamed), \
                set(m.backend.int4_copies), {n: m.store.path(n) for n in m.backend.int4_copies}

    logits, tokens, streamed, used, paths = run(budget)
    assert used and used <= streamed
    assert {p.name for p in copies.glob("*.safetensors")} == {f"{n}.safetensors" for n in used}
    assert all(p.parent == copies for p in paths.values())
    stamps = {p.name: p.stat().st_mtime_ns for p in copies.glob("*.safetensors")}
    resident = run("1GB")  # nothing streams: nothing copied, every stage repacked once at load
    assert not resident[3] and (resident[0] == logits).all() and resident[1] == tokens
    layer = sorted(n for n in used if n.startswith("layer"))[0]
    source = out / f"{layer}.safetensors"
    source.write_bytes(source.read_bytes())  # the same bytes written again: a new modification time
    again = run(budget)
    assert (again[0] == logits).all() and again[3] == used
    stamps_after = {p.name: p.stat().st_mtime_ns for p in copies.glob("*.safetensors")}
    assert {n for n in stamps if stamps_after[n] != stamps[n]} == {f"{layer}.safetensors"}
    source.write_bytes(source.read_bytes())
    monkeypatch.setattr(stage_copies.shutil, "disk_usage", lambda path: shutil_usage(free=1000))
    with caplog.at_level("WARNING", logger="airmlx"):
        short = run(budget)
    assert short[3] == used - {layer} and (short[0] == logits).all() and short[1] == tokens  # the others still used
    assert "no torch-int4 copy" in caplog.text and "converts them at every load" in caplog.text


def shutil_usage(free):
    import collections
    return collections.namedtuple("usage", "total used free")(free, 0, free)


@pytest.mark.parametrize("other_dtype", [False, True], ids=["compute-dtype-as-stored", "another-compute-dtype"])
def test_a_copied_4bit_stage_computes_on_its_mapping(converted, tmp_path, other_dtype):
    """A stage read from the int4 layout copy is used as read: its packed codes, and its stacked scales and zeros
    where the copy holds them (scales stored in the compute dtype), are views of the mapping, kept until the
    stage is freed, so loading it makes nothing (it used to copy the codes out of the mapping and stack the
    scales at every load). In another compute dtype the scales are stacked at load, as before. The logits are
    the repacking path's, bit for bit."""
    from airmlx.backends import torch_quant
    if not torch_quant.int4_kernel_ok():
        pytest.skip("this torch has no packed int4 CPU kernel")
    out = airmlx.shard_checkpoint(converted / "hf", tmp_path / "q4", compression="4bit", progress=False)
    infos = airmlx.store.ShardStore(out).tensor_infos("layer.000")
    scales_dtype = next(info.dtype for name, info in infos.items() if name.endswith(".scales"))
    dtype = ("bfloat16" if scales_dtype == "F32" else "float32") if other_dtype else None
    with airmlx.AutoModel.from_pretrained(out, backend="torch", memory_budget="1GB", dtype=dtype) as m:
        want = m.logits([PROMPT])
        least = m.minimum_budget  # in this compute dtype
    with airmlx.AutoModel.from_pretrained(out, backend="torch", memory_budget=int(1.5 * least), dtype=dtype) as m:
        assert m.backend.int4_copies
        made, load = {}, m.backend.load_stage

        def recording(entry, tensors):
            stage = load(entry, tensors)
            made[entry.name] = (stage.nbytes, [mod.forward.args for mod in stage.overrides])
            return stage
        m.backend.load_stage = recording
        got = m.logits([PROMPT])
    assert (got == want).all()
    for name, groups in m.backend.int4_copies.items():
        nbytes, installed = made[name]
        pairs = [g for g in groups if len(g) == 2]
        assert bool(pairs) == (not other_dtype) and len(installed) == len(groups) - len(pairs)
        stacked_bytes = sum(s.numel() * s.element_size() for _, _, s, _ in installed)
        # in another dtype the norms are converted too; nothing else is made
        plain = [i for n, i in m.store.tensor_infos(name).items()
                 if not n.endswith((".scales", ".biases")) and n.rpartition(".")[0] + ".scales" not in m.store.tensor_infos(name)]
        converted_bytes = sum(np.prod(i.shape) * m.backend.dtype.itemsize for i in plain)
        assert nbytes == (stacked_bytes + converted_bytes if other_dtype else 0), (name, nbytes, stacked_bytes)


@pytest.mark.parametrize("src_dtype, compression", [(torch.float16, "8bit"), (torch.float16, "4bit"),
                                                    (torch.bfloat16, "4bit")])
def test_the_plan_counts_each_torch_stage_as_loaded(tmp_path, src_dtype, compression):
    """Regression (a QA pass): a quantised embedding or head kept quantised counted its scales and biases at
    their stored width, and the CPU loads them in float32: 6-11% of the stage uncounted."""
    make_checkpoint(tmp_path / "src", "llama", dtype=src_dtype, hidden_size=128, intermediate_size=256)
    out = airmlx.shard_checkpoint(tmp_path / "src", tmp_path / "q", compression=compression, progress=False)
    dtype = "float32" if src_dtype == torch.bfloat16 else None
    with airmlx.AutoModel.from_pretrained(out, backend="torch", memory_budget="1GB", dtype=dtype) as m:
        made, real = {}, m.backend.load_stage

        def load_stage(entry, tensors):
            before = m.backend._live
            loaded = real(entry, tensors)
            made[entry.name] = m.backend._live - before
            return loaded
        m.backend.load_stage = load_stage
        m.generate([5, 6, 7], max_new_tokens=2)
    assert {"embed", "head"} <= set(made)
    assert all(made[name] <= m.plan.stages[name].held for name in made), (made, m.plan.stages)


def test_the_ungrouped_note_names_a_group_size_that_fits_or_none(capsys):
    """Regression (QA): at -g32 the note still said a smaller group size "(e.g. -g32)" would quantise them."""
    from airmlx.stagefile import say_ungrouped
    from airmlx.tensorfile import TensorInfo
    wide = lambda width: [TensorInfo("model.layers.0.mlp.down_proj.weight", "BF16", (64, width), 0, 0),
                          TensorInfo("model.layers.0.mlp.up_proj.weight", "BF16", (width, 64), 0, 0)]
    say_ungrouped(wide(96), {"group_size": 64, "bits": 4})
    err = capsys.readouterr().err
    assert "1 of 2 matrices stay unquantised" in err and "group size 32 (-g32) quantises them" in err
    say_ungrouped(wide(24), {"group_size": 32, "bits": 4})
    assert "no group size airmlx supports divides them" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["mxfp4", "nvfp4", "mxfp8"])
def test_a_float_mode_mlx_lm_checkpoint_streams_like_mlx_lm_on_both_backends(converted, tmp_path, mode):
    """Regression (QA): an mlx_lm.convert --q-mode mxfp4 checkpoint (float codes, power-of-two scales, no biases)
    failed on torch with "'NoneType' object has no attribute 'data_ptr'"; torch now dequantises the float modes."""
    convert(str(converted / "hf"), str(tmp_path / mode), quantize=True, q_mode=mode, dtype="float32")
    model, _ = mlx_load(str(tmp_path / mode))
    want = mlx_lm_greedy(model, 8)
    shards = airmlx.shard_checkpoint(tmp_path / mode, tmp_path / "s", progress=False)
    assert Manifest.load(shards).config["quantization"]["mode"] == mode
    for backend in ("mlx", "torch"):
        with airmlx.AutoModel.from_pretrained(shards, backend=backend,
                                              memory_budget=minimum_budget(shards, backend)) as streamed:
            assert streamed.plan.streamed and streamed.generate(PROMPT, max_new_tokens=8) == want, backend


@pytest.mark.parametrize("mode", ["mxfp4", "nvfp4", "mxfp8"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_torch_dequantizes_float_modes_bit_exact_with_mlx(mode, dtype):
    from airmlx.backends.torch_quant import dequantize_weight
    # rows of very different magnitudes: the groups' scales span many exponents
    w = np.random.default_rng(3).normal(size=(32, 256)) * np.logspace(-6, 3, 32)[:, None]
    q, s = mx.quantize(mx.array(w.astype(np.float32)), mode=mode)
    want = mx.dequantize(q, s, mode=mode, dtype=getattr(mx, dtype))
    group, bits = 256 // s.shape[-1], 32 * q.shape[-1] // 256
    got = dequantize_weight(torch.from_numpy(np.array(q)), torch.from_numpy(np.array(s)), None, group, bits, mode,
                            getattr(torch, dtype))
    want = torch.from_numpy(np.array(want.view(mx.uint16 if dtype != "float32" else mx.float32)))
    assert got.dtype == getattr(torch, dtype)
    assert torch.equal(got.view(torch.int16) if dtype != "float32" else got,
                       want.view(torch.int16) if dtype != "float32" else want)


def test_a_quantisation_mode_torch_does_not_know_is_refused_when_the_model_opens():
    from airmlx.backends.torch_backend import check_modes
    check_modes({"group_size": 32, "bits": 4, "mode": "mxfp4", "model.layers.0.mlp.down_proj": {"bits": 8, "mode": "mxfp8"}})
    with pytest.raises(BackendError, match="mode 'newfp3', which the torch backend does not compute.*backend='mlx'"):
        check_modes({"group_size": 32, "bits": 4, "mode": "affine", "lm_head": {"bits": 3, "mode": "newfp3"}})
