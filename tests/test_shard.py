"""Sharder: layout, byte-exact copies, resume, rebuild, disk check, delete_original, pickle refusal, CLI."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import airmlx
from airmlx import sharder as shard_mod
from airmlx.errors import (
    CheckpointError,
    CorruptShardError,
    InsufficientDiskSpaceError,
    ModelNotFoundError,
    UnsupportedArchitectureError,
)
from airmlx.manifest import Manifest, file_checksum
from airmlx.store import ShardStore

from tiny import make_checkpoint, make_mlx_checkpoint


def tensors_of(folder):
    """{name: tensor} over every safetensors file in folder (torch reads bf16)."""
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(f, framework="pt") as st:
            for k in st.keys():
                out.setdefault(k, []).append(st.get_tensor(k))
    return out


def folder_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file() and p.name != ".airmlx.lock"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_multi_file_source_is_copied_exactly(tmp_path, dtype):
    src = tmp_path / "src"
    make_checkpoint(src, "llama", dtype=dtype, max_shard_size="60KB")
    assert (src / "model.safetensors.index.json").is_file() and len(list(src.glob("*.safetensors"))) > 3
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    assert len({index[k] for k in index if k.startswith("model.layers.1.")}) > 1  # a layer spans files
    out = airmlx.shard_checkpoint(src, tmp_path / "out", progress=False)
    manifest = Manifest.load(out)
    assert [s.name for s in manifest.stages] == ["embed", "layer.000", "layer.001", "layer.002", "layer.003", "head"]
    source, sharded = tensors_of(src), tensors_of(out)
    assert set(sharded) == set(source)  # names unchanged, nothing dropped
    for name, (tensor,) in source.items():
        (copy,) = sharded[name]
        assert copy.dtype == dtype and torch.equal(copy, tensor)
    for stage in manifest.stages:
        assert file_checksum(out / stage.file) == stage.checksum
        assert (out / stage.file).stat().st_size == stage.nbytes
        assert all(t.startswith("model.layers.") for t in stage.tensors) == (stage.kind == "layer")
    assert (out / "config.json").read_bytes() == (src / "config.json").read_bytes()
    assert manifest.architecture == "llama" and manifest.format_version == 1
    assert {f["name"] for f in manifest.source["files"]} == {p.name for p in src.glob("*.safetensors")}


def test_tied_head_carries_the_embedding(tmp_path):
    make_checkpoint(tmp_path / "src", "qwen2")
    out = airmlx.shard_checkpoint(tmp_path / "src", tmp_path / "out", progress=False)
    head = next(s for s in Manifest.load(out).stages if s.name == "head")
    assert sorted(head.tensors) == ["model.embed_tokens.weight", "model.norm.weight"]


def test_interrupted_sharding_resumes_to_identical_bytes(tmp_path, monkeypatch):
    src = tmp_path / "src"
    make_checkpoint(src, "llama", max_shard_size="60KB")
    airmlx.shard_checkpoint(src, tmp_path / "clean", progress=False)

    real_write, calls = shard_mod.write_stage, []

    def failing_write(*args, **kwargs):
        if len(calls) == 3:
            raise KeyboardInterrupt("injected between stages")
        calls.append(args[1])
        return real_write(*args, **kwargs)

    monkeypatch.setattr(shard_mod, "write_stage", failing_write)
    with pytest.raises(KeyboardInterrupt):
        airmlx.shard_checkpoint(src, tmp_path / "resumed", progress=False)
    assert not (tmp_path / "resumed" / "manifest.json").exists()
    with pytest.raises(CorruptShardError, match="unfinished"):
        ShardStore(tmp_path / "resumed")
    with pytest.raises(CorruptShardError, match="unfinished shard folder"):
        airmlx.AutoModel.from_pretrained(tmp_path / "resumed", backend="torch")

    rewritten = []
    monkeypatch.setattr(shard_mod, "write_stage", lambda *a, **k: rewritten.append(a[1]) or real_write(*a, **k))
    airmlx.shard_checkpoint(src, tmp_path / "resumed", progress=False)
    assert set(rewritten).isdisjoint(calls) and len(rewritten) == 6 - len(calls)  # finished stages reused
    assert folder_bytes(tmp_path / "resumed") == folder_bytes(tmp_path / "clean")


def test_truncated_stage_file_is_named(tmp_path):
    make_checkpoint(tmp_path / "src", "llama")
    out = airmlx.shard_checkpoint(tmp_path / "src", tmp_path / "out", progress=False)
    victim = out / "layer.002.safetensors"
    victim.write_bytes(victim.read_bytes()[:-100])
    with pytest.raises(CorruptShardError, match="layer.002.safetensors"):
        airmlx.AutoModel.from_pretrained(out, backend="torch")


def test_damaged_header_is_named(tmp_path):
    make_checkpoint(tmp_path / "src", "llama")
    out = airmlx.shard_checkpoint(tmp_path / "src", tmp_path / "out", progress=False)
    victim = out / "layer.001.safetensors"
    data = bytearray(victim.read_bytes())
    data[12] = ord("#")  # inside the JSON header, size unchanged
    victim.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match="layer.001.safetensors"):
        ShardStore(out)


def test_changed_source_is_rebuilt_not_reused(tmp_path, capsys):
    src = tmp_path / "src"
    make_checkpoint(src, "llama", seed=0)
    out = airmlx.shard_checkpoint(src, tmp_path / "out", progress=False)
    first = folder_bytes(out)
    assert airmlx.shard_checkpoint(src, out, progress=False) == out and folder_bytes(out) == first  # unchanged: reused
    make_checkpoint(src, "llama", seed=1)
    airmlx.shard_checkpoint(src, out, progress=False)
    assert "different checkpoint; rebuilding" in capsys.readouterr().err
    assert folder_bytes(out)["layer.000.safetensors"] != first["layer.000.safetensors"]
    assert tensors_of(out).keys() == tensors_of(src).keys()
    for name, (t,) in tensors_of(src).items():
        assert torch.equal(tensors_of(out)[name][0], t)
    # the same checkpoint at another compression was "made from a different checkpoint" (a QA pass)
    airmlx.shard_checkpoint(src, out, compression="8bit", progress=False)
    assert "made with another compression; rebuilding" in capsys.readouterr().err


def test_a_finished_shard_folder_on_a_read_only_disk_opens(tmp_path, monkeypatch):
    """Regression (QA): a finished folder in a read-only HF_HOME failed with a traceback, because reusing it took
    the folder's lock, which opens a file for writing. Now a finished folder of the same checkpoint is reused
    without writing anything, and one that would need writing says so in one line."""
    import errno
    src = tmp_path / "src"
    make_checkpoint(src, "llama")
    out = airmlx.shard_checkpoint(src, tmp_path / "out", progress=False)
    real_open = open

    def read_only(path, mode="r", *args, **kwargs):  # the folder's files cannot be opened for writing
        if Path(path).parent == out and any(m in mode for m in "wax+"):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, mode, *args, **kwargs)
    monkeypatch.setattr("builtins.open", read_only)
    with airmlx.AutoModel.from_pretrained(src, backend="torch", layer_shards_saving_path=out) as model:
        assert len(model.generate([[5, 17, 33]], max_new_tokens=3)[0]) == 6
    with pytest.raises(CheckpointError, match="cannot write to the shard folder .*Read-only"):
        airmlx.shard_checkpoint(src, out, compression="8bit", progress=False)


def test_a_group_size_that_leaves_matrices_unquantised_says_so(tmp_path, capsys):
    src = tmp_path / "src"
    make_checkpoint(src, "llama")  # hidden 64, intermediate 160: down_proj's rows split into groups of 32, not 64
    out = airmlx.shard_checkpoint(src, tmp_path / "g64", compression="4bit", progress=False)
    err = capsys.readouterr().err
    left = [n for n in tensors_of(out) if n.endswith(".weight") and n.replace(".weight", ".scales") not in tensors_of(out)
            and len(tensors_of(src)[n][0].shape) == 2]
    assert left and all("down_proj" in n for n in left)
    assert f"airmlx: {len(left)} of " in err and "groups of 64 (e.g. model.layers.0.mlp.down_proj.weight, 160 wide)" in err
    airmlx.shard_checkpoint(src, tmp_path / "g32", compression="4bit-g32", progress=False)
    assert "unquantised" not in capsys.readouterr().err


def test_not_enough_disk_space(tmp_path, monkeypatch):
    make_checkpoint(tmp_path / "src", "llama")
    monkeypatch.setattr(shard_mod.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(InsufficientDiskSpaceError, match=r"needs [\d,]+ bytes but only 1,000 are free"):
        airmlx.shard_checkpoint(tmp_path / "src", tmp_path / "out", progress=False)
    assert not list((tmp_path / "out").glob("*.safetensors"))


def test_delete_original_only_after_success(tmp_path, monkeypatch):
    src = tmp_path / "src"
    make_checkpoint(src, "llama", max_shard_size="60KB")
    weights = sorted(p.name for p in src.glob("*.safetensors"))

    def boom(*a, **k):
        raise OSError("disk went away")

    monkeypatch.setattr(shard_mod, "write_stage", boom)
    with pytest.raises(OSError):
        airmlx.shard_checkpoint(src, tmp_path / "out", delete_original=True, progress=False)
    assert sorted(p.name for p in src.glob("*.safetensors")) == weights
    monkeypatch.undo()

    out = airmlx.shard_checkpoint(src, tmp_path / "out", delete_original=True, progress=False)
    assert not list(src.glob("*.safetensors")) and not (src / "model.safetensors.index.json").exists()
    assert (src / "config.json").exists()
    assert airmlx.shard_checkpoint(src, out, progress=False) == out  # the shard folder still serves
    with airmlx.AutoModel.from_pretrained(src, backend="torch", layer_shards_saving_path=out) as model:
        assert len(model.generate([3, 4, 5], max_new_tokens=3)) == 6


def test_pickle_checkpoint_needs_opt_in(tmp_path):
    src = tmp_path / "src"
    model = make_checkpoint(src, "llama")
    for f in src.glob("*.safetensors"):
        f.unlink()
    torch.save(model.state_dict(), src / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="allow_pickle=True"):
        airmlx.shard_checkpoint(src, tmp_path / "out", progress=False)
    out = airmlx.shard_checkpoint(src, tmp_path / "out", allow_pickle=True, progress=False)
    assert not (out / "_converted").exists()
    sharded = tensors_of(out)
    for name, t in model.state_dict().items():
        if name != "lm_head.weight" or "lm_head.weight" in sharded:
            assert torch.equal(sharded[name][0], t)


def test_unsupported_architecture_lists_supported(tmp_path):
    src = tmp_path / "src"
    make_checkpoint(src, "llama")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "model_type": "rwkv"}))
    with pytest.raises(UnsupportedArchitectureError,
                       match="'rwkv' is not supported.*llama, .*mistral, .*qwen2, qwen2_moe, qwen3"):
        airmlx.AutoModel.from_pretrained(src, backend="torch")


def test_cli_shards_and_verifies(tmp_path):
    make_checkpoint(tmp_path / "src", "llama")
    run = lambda *args: subprocess.run([sys.executable, "-m", "airmlx.shard", *map(str, args)],
                                       capture_output=True, text=True)
    done = run(tmp_path / "src", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("out")
    assert run("--verify", tmp_path / "out").returncode == 0
    victim = tmp_path / "out" / "layer.003.safetensors"
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    bad = run("--verify", tmp_path / "out")
    assert bad.returncode == 1 and "layer.003" in bad.stderr
    missing = run(tmp_path / "nope", tmp_path / "out2")
    assert missing.returncode == 2 and "nope" in missing.stderr and "Traceback" not in missing.stderr
    later = run(tmp_path / "src", "--compression", "4bit", tmp_path / "out4")  # OUT after an option: it was refused
    assert later.returncode == 0 and Manifest.load(tmp_path / "out4").quantization["bits"] == 4, later.stderr


def pickle_checkpoint(src, sharded_index):
    """A legacy pickle checkpoint as Trainer leaves it: the weights (one pytorch_model.bin, or two files and
    pytorch_model.bin.index.json) beside training_args.bin and optimizer.bin, which are pickled objects."""
    import argparse
    model = make_checkpoint(src, "llama")
    for f in src.glob("*.safetensors"):
        f.unlink()
    state = model.state_dict()
    if sharded_index:
        names = sorted(state)
        parts = {"pytorch_model-00001-of-00002.bin": names[:len(names) // 2],
                 "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
        for file, keys in parts.items():
            torch.save({k: state[k] for k in keys}, src / file)
        weight_map = {k: file for file, keys in parts.items() for k in keys}
        (src / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    else:
        torch.save(state, src / "pytorch_model.bin")
    torch.save(argparse.Namespace(learning_rate=2e-5, output_dir=str(src)), src / "training_args.bin")
    torch.save(argparse.Namespace(state={}), src / "optimizer.bin")
    return state


@pytest.mark.parametrize("sharded_index", [False, True], ids=["pytorch_model.bin", "index"])
def test_pickle_checkpoint_skips_trainer_files(tmp_path, sharded_index):
    src = tmp_path / "finetune"
    state = pickle_checkpoint(src, sharded_index)
    out = airmlx.shard_checkpoint(src, tmp_path / "out", allow_pickle=True, progress=False)
    sharded = tensors_of(out)
    for name, t in state.items():
        if name != "lm_head.weight" or "lm_head.weight" in sharded:
            assert torch.equal(sharded[name][0], t)
    assert {f["name"] for f in Manifest.load(out).source["files"]} <= {
        "pytorch_model.bin", "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"}


def as_mistral_inference(state):
    """The same weights under mistral-inference's names, as consolidated.safetensors holds them."""
    names = {"model.embed_tokens.": "tok_embeddings.", "model.norm.": "norm.", "lm_head.": "output.",
             "model.layers.": "layers.", "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
             "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1",
             "mlp.down_proj": "feed_forward.w2", "mlp.up_proj": "feed_forward.w3",
             "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm"}
    out = {}
    for name, t in state.items():
        for hf, theirs in names.items():
            name = name.replace(hf, theirs)
        out[name] = t.contiguous()
    return out


def test_consolidated_safetensors_beside_hf_weights_is_ignored(tmp_path):
    from safetensors.torch import save_file
    src = tmp_path / "Mistral-tiny"
    model = make_checkpoint(src, "mistral")
    want = tensors_of(airmlx.shard_checkpoint(src, tmp_path / "plain", progress=False))
    # what mistralai repos ship beside the HF files: the weights again, in mistral-inference's layout
    save_file(as_mistral_inference(model.state_dict()), str(src / "consolidated.safetensors"))
    (src / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 4}))
    assert not (src / "model.safetensors.index.json").exists()  # no index to say which files are the weights
    out = airmlx.shard_checkpoint(src, tmp_path / "out", progress=False)
    assert {f["name"] for f in Manifest.load(out).source["files"]} == {"model.safetensors"}
    got = tensors_of(out)
    assert set(got) == set(want) and all(torch.equal(got[k][0], want[k][0]) for k in want)


QWEN_TOKENIZER_PY = '''
from transformers import PreTrainedTokenizer

VOCAB_FILES_NAMES = {"vocab_file": "qwen.tiktoken"}


class QWenTokenizer(PreTrainedTokenizer):
    """A stand-in for Qwen-1's tokenizer: the same vocab_files_names mechanism, a word vocabulary."""
    vocab_files_names = VOCAB_FILES_NAMES

    def __init__(self, vocab_file, **kw):
        self.vocab = dict(line.split("=") for line in open(vocab_file).read().split())  # TypeError when missing
        self.words = {int(v): k for k, v in self.vocab.items()}
        super().__init__(**kw)

    @property
    def vocab_size(self):
        return len(self.vocab)

    def get_vocab(self):
        return {k: int(v) for k, v in self.vocab.items()}

    def _tokenize(self, text):
        return text.split()

    def _convert_token_to_id(self, token):
        return int(self.vocab[token])

    def _convert_id_to_token(self, index):
        return self.words[index]

    def convert_tokens_to_string(self, tokens):
        return " ".join(tokens)
'''


def test_qwen_tiktoken_tokenizer_end_to_end(tmp_path, monkeypatch, hf_modules):
    """Qwen-1 keeps its vocabulary in qwen.tiktoken, read by its own tokenizer code: the shard folder gets the
    file, the tokenizer loads from it, and without it the error is airmlx's, with the fix."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    src = tmp_path / "Qwen-7B-Chat"
    ref = make_mlx_checkpoint(src, "qwen")
    for f in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]:  # what Qwen-1 ships instead:
        (src / f).unlink(missing_ok=True)
    (src / "qwen.tiktoken").write_text("".join(f"w{i}={i}\n" for i in range(96)))
    (src / "tokenization_qwen.py").write_text(QWEN_TOKENIZER_PY)
    (src / "tokenizer_config.json").write_text(json.dumps(
        {"auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]}, "tokenizer_class": "QWenTokenizer"}))
    model = airmlx.AutoModel.from_pretrained(src, backend="mlx", trust_remote_code=True,
                                             layer_shards_saving_path=tmp_path / "shards")
    assert (model.shard_dir / "qwen.tiktoken").read_bytes() == (src / "qwen.tiktoken").read_bytes()
    tok = model.tokenizer
    assert type(tok).__name__ == "QWenTokenizer"
    ids = tok("w5 w17 w33 w2")["input_ids"]
    assert ids == [5, 17, 33, 2]
    out = model.generate(ids, max_new_tokens=6)
    want = [int(t) for t, _ in generate_step(mx.array(ids), ref, max_tokens=6)]  # mlx-lm's greedy tokens
    assert out[len(ids):] == want
    assert tok.decode(out[len(ids):]) == " ".join(f"w{t}" for t in want)
    model.close()

    (model.shard_dir / "qwen.tiktoken").unlink()
    with airmlx.AutoModel.from_pretrained(model.shard_dir, backend="mlx", trust_remote_code=True) as broken:
        with pytest.raises(ModelNotFoundError, match=r"no usable tokenizer files \(TypeError: .*copy the model's "
                                                     r"tokenizer files into this folder"):
            broken.tokenizer


def test_a_head_stored_apart_from_a_tied_embedding_runs_as_transformers_runs_it(tmp_path, capsys):
    """Regression (QA): config.json ties the head to the embedding but the checkpoint holds an lm_head.weight of
    other values. transformers runs the stored head (and warns); airmlx dropped it and answered otherwise."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM
    src = tmp_path / "src"
    make_checkpoint(src, "qwen2", tie_word_embeddings=True)
    tensors = load_file(src / "model.safetensors")
    tensors["lm_head.weight"] = torch.randn_like(tensors["model.embed_tokens.weight"])
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    prompt = [5, 17, 33, 2, 9, 60, 7, 41, 12]
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    want = ref.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False)[0, len(prompt):].tolist()
    out = airmlx.shard_checkpoint(src, tmp_path / "out", progress=False)
    assert "holds a head of other values; it runs untied" in capsys.readouterr().err
    assert Manifest.load(out).config["tie_word_embeddings"] is False
    for backend in ("torch", "mlx"):
        with airmlx.AutoModel.from_pretrained(out, backend=backend, dtype="float32") as m:
            assert m.generate(prompt, max_new_tokens=10)[len(prompt):] == want, backend
    # the same values under both names (as torch .bin checkpoints save a tied head) stay tied
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    out = airmlx.shard_checkpoint(src, tmp_path / "tied", progress=False)
    assert Manifest.load(out).config["tie_word_embeddings"] is True


def test_a_path_with_a_tilde_is_the_home_folder(tmp_path, monkeypatch):
    """Regression (QA): shard_checkpoint("~/x") made a folder named "~" in the working directory."""
    make_checkpoint(tmp_path / "src", "llama")
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    out = airmlx.shard_checkpoint("~/../src", "~/shards", progress=False)
    assert out == tmp_path / "home" / "shards" and (out / "manifest.json").is_file()
    assert not (tmp_path / "~").exists()
    with airmlx.AutoModel.from_pretrained(tmp_path / "src", backend="torch", layer_shards_saving_path="~/s2") as m:
        assert m.shard_dir == tmp_path / "home" / "s2"


def shard_cli(argv) -> int:
    from airmlx.shard import main
    try:
        return main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own errors
        return e.code


def test_cli_refuses_gguf_file_with_a_gguf_file_and_a_split_without_hosts(tmp_path, capsys):
    """Regression (QA): `shard FILE.gguf --gguf-file X` ignored X and sharded FILE into a folder named after
    FILE/X; `--pipeline-split` without `--hosts` was told `--hosts 1 --rank 0`, options not given."""
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert shard_cli([tmp_path / "m.gguf", tmp_path / "out", "--gguf-file", "x.gguf"]) == 2
    err = capsys.readouterr().err
    assert "m.gguf is a file itself" in err and "--gguf-file x.gguf" in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()
    assert shard_cli([tmp_path / "nope", tmp_path / "out", "--pipeline-split", "4,4"]) == 2
    err = capsys.readouterr().err
    assert "--pipeline-split splits the stages between the hosts of --hosts N" in err and err.count("\n") == 1, err


def test_delete_original_of_a_pickle_checkpoint_takes_its_index_too(tmp_path):
    """Regression (QA): delete_original removed model.safetensors.index.json but left pytorch_model.bin.index.json
    naming the deleted files, so sharding the folder again said its download was incomplete."""
    src = tmp_path / "finetune"
    pickle_checkpoint(src, sharded_index=True)
    airmlx.shard_checkpoint(src, tmp_path / "out", allow_pickle=True, delete_original=True, progress=False)
    assert not list(src.glob("pytorch_model*"))
    with pytest.raises(CheckpointError, match="its weights were deleted once sharded into .*out \\(delete_original"):
        airmlx.shard_checkpoint(src, tmp_path / "other", allow_pickle=True, progress=False)
