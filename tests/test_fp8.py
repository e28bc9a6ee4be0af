"""fp8 checkpoints with block scales (DeepSeek-V3, Qwen3-FP8, MiniMax-M2): the sharder writes their weights
dequantised, bit for bit as transformers dequantises them, and the streamed model generates what transformers'
own load of the fp8 checkpoint generates."""
import glob
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import airmlx
from airmlx.errors import CheckpointError
from airmlx.relayout import FP8_VALUES
from airmlx.sharder import refuse_foreign_quantization

from tiny import PROMPT, make_checkpoint

LINEAR = re.compile(r"^model\.layers\.\d+\..*(proj|experts\.\d+\.\w+)\.weight$")


def to_fp8(w, block, fp8=torch.float8_e4m3fn):
    """w as fp8 codes and one float32 scale per block (the last blocks partial), as DeepSeek's quantiser makes them."""
    rows, cols = w.shape
    grid = (-(-rows // block[0]), -(-cols // block[1]))
    scale = torch.empty(grid)
    codes = torch.empty(rows, cols, dtype=fp8)
    top = torch.finfo(fp8).max
    for i in range(grid[0]):
        for j in range(grid[1]):
            part = w[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]].float()
            scale[i, j] = part.abs().max().clamp(min=1e-12) / top
            codes[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]] = (part / scale[i, j]).to(fp8)
    return codes, scale


def dequantized(codes, scale, block, dtype=torch.bfloat16):
    """The reference: each code's value times its block's scale in float32, rounded to dtype (transformers'
    _dequantize_fp8_weight, which also takes partial blocks)."""
    rows, cols = codes.shape
    full = scale.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return (codes.float() * full).to(dtype)


def fp8_copy(src, dst, block, pick=LINEAR.match, fp8=torch.float8_e4m3fn):
    """dst: src's checkpoint with each weight `pick` takes in fp8 with its weight_scale_inv; returns
    {name: the dequantised weight the shards must hold}."""
    shutil.copytree(src, dst)
    tensors = load_file(Path(dst) / "model.safetensors")
    expected = {}
    for name in list(tensors):
        if pick(name):
            codes, scale = to_fp8(tensors[name], block, fp8)
            tensors[name], tensors[name.removesuffix(".weight") + ".weight_scale_inv"] = codes, scale
            expected[name] = dequantized(codes, scale, block)
    save_file(tensors, Path(dst) / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((Path(dst) / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": list(block)}
    (Path(dst) / "config.json").write_text(json.dumps(config))
    return expected


def shard_tensors(folder):
    out = {}
    for f in glob.glob(str(Path(folder) / "*.safetensors")):
        out.update(load_file(f))
    return out


def assert_streams_as(ref, shards):
    """The shards, streamed on torch under a tight budget, give transformers' greedy tokens."""
    with torch.no_grad():
        want = ref.generate(torch.tensor([PROMPT[0]]), max_new_tokens=12, do_sample=False, pad_token_id=0,
                            eos_token_id=None)[0].tolist()
    with airmlx.AutoModel.from_pretrained(shards, backend="torch", memory_budget="1MB") as model:
        assert model.generate(PROMPT[0], max_new_tokens=12) == want


def test_fp8_codes_take_the_values_torch_gives_them():
    for name, dtype in [("F8_E4M3", torch.float8_e4m3fn), ("F8_E5M2", torch.float8_e5m2)]:
        theirs = torch.arange(256, dtype=torch.uint8).view(dtype).float().numpy()
        assert np.array_equal(FP8_VALUES[name], theirs, equal_nan=True), name


@pytest.fixture(scope="module")
def llama_fp8(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    make_checkpoint(root / "bf16", "llama", dtype=torch.bfloat16)
    expected = fp8_copy(root / "bf16", root / "fp8", (16, 16))
    return root, expected


def test_an_fp8_checkpoint_is_sharded_as_transformers_dequantises_it_and_streams_its_tokens(llama_fp8, tmp_path):
    root, expected = llama_fp8
    ref = AutoModelForCausalLM.from_pretrained(root / "fp8").eval()  # no GPU: transformers dequantises on load
    theirs = ref.state_dict()
    shards = airmlx.shard_checkpoint(root / "fp8", tmp_path / "shards", progress=False)
    ours = shard_tensors(shards)
    assert expected and not [n for n in ours if "scale_inv" in n]
    for name, want in expected.items():
        assert ours[name].dtype == torch.bfloat16 and torch.equal(ours[name], want), name
        assert torch.equal(ours[name], theirs[name]), name
    assert "quantization_config" not in json.loads((shards / "manifest.json").read_text())["config"]
    assert_streams_as(ref, shards)


def test_an_fp8_checkpoint_runs_on_mlx_as_its_dequantised_copy(llama_fp8, tmp_path):
    """The shards of the fp8 checkpoint and of its bf16 copy as transformers dequantises it hold the same weights,
    so MLX streams the same tokens from both."""
    root, _ = llama_fp8
    copy = AutoModelForCausalLM.from_pretrained(root / "fp8")
    copy.save_pretrained(tmp_path / "dequantised")
    config = json.loads((tmp_path / "dequantised" / "config.json").read_text())
    config.pop("quantization_config", None)
    (tmp_path / "dequantised" / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (root / "fp8" / name).is_file():
            shutil.copy(root / "fp8" / name, tmp_path / "dequantised" / name)
    outs = []
    for src in (root / "fp8", tmp_path / "dequantised"):
        with airmlx.AutoModel.from_pretrained(src, backend="mlx", memory_budget="1MB",
                                              layer_shards_saving_path=tmp_path / f"{src.name}-shards") as model:
            outs.append(model.generate(PROMPT[0], max_new_tokens=12))
    assert outs[0] == outs[1]


def test_partial_blocks_e5m2_and_one_scale_per_weight_are_dequantised_as_torch_does(tmp_path):
    """Blocks of 48 over 64 and 160 wide weights (the last ones partial, as DeepSeek-V3's 576-row kv_a_proj has),
    E5M2 codes, and a weight with a single scale; and a MoE checkpoint's experts."""
    make_checkpoint(tmp_path / "src", "deepseek_v3", dtype=torch.bfloat16)
    tensors = load_file(tmp_path / "src" / "model.safetensors")
    block, expected = (48, 48), {}
    for name in [n for n in tensors if LINEAR.match(n)]:
        w = tensors[name]
        if name.endswith("down_proj.weight"):
            codes, scale = to_fp8(w, w.shape)  # one scale for all of it
            expected[name] = dequantized(codes, scale, w.shape)
            scale = scale.reshape(1)
        else:
            fp8 = torch.float8_e5m2 if ".self_attn." in name else torch.float8_e4m3fn
            codes, scale = to_fp8(w, block, fp8)
            expected[name] = dequantized(codes, scale, block)
        tensors[name], tensors[name.removesuffix(".weight") + ".weight_scale_inv"] = codes, scale
    assert any(".experts." in n for n in expected) and any(t.dtype == torch.float8_e5m2 for t in tensors.values())
    save_file(tensors, tmp_path / "src" / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": list(block)}
    (tmp_path / "src" / "config.json").write_text(json.dumps(config))
    ours = shard_tensors(airmlx.shard_checkpoint(tmp_path / "src", tmp_path / "shards", progress=False))
    for name, want in expected.items():
        assert torch.equal(ours[name], want), name
    with airmlx.AutoModel.from_pretrained(tmp_path / "shards", backend="torch", memory_budget="1MB") as model:
        assert len(model.generate(PROMPT[0], max_new_tokens=3)) == len(PROMPT[0]) + 3


def test_an_fp8_checkpoint_can_be_sharded_4bit(llama_fp8, tmp_path):
    root, expected = llama_fp8
    shards = airmlx.shard_checkpoint(root / "fp8", tmp_path / "q4", compression="4bit", progress=False)
    ours = shard_tensors(shards)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert name in expected and ours[name].dtype == torch.uint32 and name.removesuffix(".weight") + ".scales" in ours
    with airmlx.AutoModel.from_pretrained(shards, backend="torch") as model:
        assert len(model.generate(PROMPT[0], max_new_tokens=3)) == len(PROMPT[0]) + 3


def broken(root, tmp_path, change):
    folder = tmp_path / "broken"
    shutil.copytree(root / "fp8", folder)
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("change, error", [
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight_scale_inv"),
     r"model.layers.1.mlp.up_proj.weight is stored in fp8 without its weight_scale_inv"),
    (lambda t: t.update({"model.layers.1.mlp.up_proj.weight_scale_inv": torch.ones(3, 3)}),
     r"model.layers.1.mlp.up_proj.weight \(160 x 64\) has weight_scale_inv of shape \[3, 3\] .*blocks of \[16, 16\]"),
    (lambda t: t.update({"model.norm.weight_scale_inv": torch.ones(1)}),
     r"model.norm.weight_scale_inv scales a weight that is not stored in fp8 \(BF16\)"),
    (lambda t: t.update({"model.layers.0.mlp.gone.weight_scale_inv": torch.ones(1)}),
     r"model.layers.0.mlp.gone.weight_scale_inv scales no weight"),
    (lambda t: t.update({"model.layers.1.mlp.up_proj.weight_scale_inv": torch.ones(1, dtype=torch.uint8)}),
     r"model.layers.1.mlp.up_proj.weight \(160 x 64\) has weight_scale_inv of shape \[1\] \(U8\)"),
    (lambda t: t.update({"model.layers.1.mlp.up_proj.input_scale": torch.ones(1)}),
     r"holds weights quantised with fp8 \(e.g. model.layers.1.mlp.up_proj.input_scale\), which airmlx does not read"),
    (lambda t: t.update({"model.layers.0.mlp.up_proj.weight": t["model.layers.0.mlp.up_proj.weight"].view(-1)}),
     r"model.layers.0.mlp.up_proj.weight is stored in fp8 with shape \[10240\]")],
    ids=["no scales", "wrong grid", "scales a plain weight", "scales nothing", "ue8m0 scale", "static activations",
                                                                     "not 2-D"])
def test_a_malformed_fp8_checkpoint_is_refused_in_one_line(llama_fp8, tmp_path, change, error):
    root, _ = llama_fp8
    with pytest.raises(CheckpointError, match=error):
        airmlx.shard_checkpoint(broken(root, tmp_path, change), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_the_hub_check_lets_fp8_blocks_through_and_refuses_other_formats():
    names = {"model.layers.0.mlp.down_proj.weight": "F8_E4M3", "model.layers.0.mlp.down_proj.weight_scale_inv": "F32"}
    refuse_foreign_quantization({"quantization_config": {"quant_method": "fp8"}}, names, "org/fp8")
    for config in ({}, {"quantization_config": {"quant_method": "compressed-tensors"}}):
        with pytest.raises(CheckpointError, match="airmlx does not read"):
            refuse_foreign_quantization(config, names, "org/other")


def test_a_damaged_stage_of_an_fp8_folder_is_repaired_from_the_checkpoint(llama_fp8, tmp_path):
    """Regression: `--repair` compared the folder's fingerprint with one of config.json as stored, while the
    sharder fingerprints the config it derives (here without the fp8 quantization_config it dequantised), so it
    said the checkpoint had changed and could not rebuild the stage."""
    from airmlx.repair import repair_stages
    root, _ = llama_fp8
    shards = airmlx.shard_checkpoint(root / "fp8", tmp_path / "shards", progress=False)
    before = (shards / "layer.001.safetensors").read_bytes()
    (shards / "layer.001.safetensors").write_bytes(before[:-16] + b"\xff" * 16)
    assert repair_stages(shards, progress=False) == ["layer.001"]
    assert (shards / "layer.001.safetensors").read_bytes() == before
