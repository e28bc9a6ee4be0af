"""gpt-oss as released: its experts in mxfp4 (4-bit E2M1 codes, a power-of-two scale per 32), dequantised by the
sharder bit for bit as transformers dequantises them, then streamed as transformers runs the model."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_fp8 import assert_streams_as, shard_tensors
from transformers import AutoModelForCausalLM

import airmlx
from airmlx.errors import CheckpointError

from tiny import PROMPT, make_checkpoint

E2M1 = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6])


def to_mxfp4(w):
    """(..., out, in) float -> (codes (..., out, in / 32, 16) U8, the low nibble first; exponents (..., out, in / 32)
    U8, 127 for 2 ** 0), as OpenAI's quantiser lays them out."""
    groups = w.float().unflatten(-1, (-1, 32))
    exponent = torch.ceil(torch.log2(groups.abs().amax(-1).clamp(min=1e-30) / 6)).clamp(-127, 127)
    scaled = groups / torch.exp2(exponent)[..., None]
    codes = (scaled[..., None] - E2M1).abs().argmin(-1).to(torch.uint8)  # the nearest representable value
    return codes[..., 0::2] | (codes[..., 1::2] << 4), (exponent + 127).to(torch.uint8)


@pytest.fixture(scope="module")
def gpt_oss_mxfp4(tmp_path_factory):
    root = tmp_path_factory.mktemp("mxfp4")
    make_checkpoint(root / "bf16", "gpt_oss", dtype=torch.bfloat16)
    shutil.copytree(root / "bf16", root / "mxfp4")
    tensors = load_file(root / "mxfp4" / "model.safetensors")
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        codes, scales = to_mxfp4(tensors.pop(name).transpose(1, 2))  # transformers keeps them (in, out)
        tensors[name + "_blocks"], tensors[name + "_scales"] = codes, scales
    save_file(tensors, root / "mxfp4" / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((root / "mxfp4" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (root / "mxfp4" / "config.json").write_text(json.dumps(config))
    return root


def test_mxfp4_experts_are_sharded_as_transformers_dequantises_them_and_stream_its_tokens(gpt_oss_mxfp4, tmp_path):
    root = gpt_oss_mxfp4
    ref = AutoModelForCausalLM.from_pretrained(root / "mxfp4").eval()  # no triton: transformers dequantises
    theirs = ref.state_dict()
    shards = airmlx.shard_checkpoint(root / "mxfp4", tmp_path / "shards", progress=False)
    ours = shard_tensors(shards)
    assert not [n for n in ours if n.endswith(("_blocks", "_scales"))]
    checked = 0
    for layer in range(2):
        fused = f"model.layers.{layer}.mlp.experts."
        gate_up, down = theirs[fused + "gate_up_proj"], theirs[fused + "down_proj"]  # (E, in, out), bf16
        assert gate_up.dtype == torch.bfloat16
        for e in range(gate_up.shape[0]):
            mine = {k.rpartition(f".{e}.")[2]: v for k, v in ours.items() if k.startswith(f"{fused}{e}.")}
            assert torch.equal(mine["gate_proj.weight"], gate_up[e][:, 0::2].T)
            assert torch.equal(mine["up_proj.weight"], gate_up[e][:, 1::2].T)
            assert torch.equal(mine["down_proj.weight"], down[e].T)
            bias = theirs[fused + "gate_up_proj_bias"][e]
            assert torch.equal(mine["gate_proj.bias"], bias[0::2]) and torch.equal(mine["up_proj.bias"], bias[1::2])
            checked += 1
    assert checked == 8 and "quantization_config" not in json.loads((shards / "manifest.json").read_text())["config"]
    assert_streams_as(ref, shards)


def test_mxfp4_experts_on_mlx_equal_their_dequantised_copy(gpt_oss_mxfp4, tmp_path):
    """MLX on the CPU runs unquantised experts in float32: the mxfp4 checkpoint and transformers' bf16 copy of it
    give the same tokens."""
    root = gpt_oss_mxfp4
    AutoModelForCausalLM.from_pretrained(root / "mxfp4").save_pretrained(tmp_path / "copy")
    config = json.loads((tmp_path / "copy" / "config.json").read_text())
    config.pop("quantization_config", None)
    (tmp_path / "copy" / "config.json").write_text(json.dumps(config))
    outs = []
    for src in (root / "mxfp4", tmp_path / "copy"):
        with airmlx.AutoModel.from_pretrained(src, backend="mlx", dtype="float32", memory_budget="1MB",
                                              layer_shards_saving_path=tmp_path / f"{src.name}-shards") as model:
            outs.append(model.generate(PROMPT[0], max_new_tokens=12))
    assert outs[0] == outs[1]


def test_mlx_lms_gpt_oss_checkpoint_streams_as_transformers_runs_the_released_one(gpt_oss_mxfp4, tmp_path):
    """mlx-community's gpt-oss: mlx_lm.convert keeps the released experts' mxfp4 codes as its own mode 'mxfp4',
    stacked per projection under mlp.experts (gate and up apart, their biases beside them). The sharder splits
    them into each expert's tensors; torch dequantises them (torch_float_quant), MLX runs them quantised, and both
    give transformers' tokens on the released checkpoint (mlx-lm's own differ: it rounds the YaRN ramp's ends)."""
    from mlx_lm import convert
    convert(str(gpt_oss_mxfp4 / "mxfp4"), str(tmp_path / "mlx"))
    shards = airmlx.shard_checkpoint(tmp_path / "mlx", tmp_path / "shards", progress=False)
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["config"]["quantization"]["mode"] == "mxfp4" and manifest["extra"]["written_by"] == "mlx-lm"
    split = shard_tensors(shards)
    assert "model.layers.1.mlp.experts.3.up_proj.scales" in split and "model.layers.1.mlp.experts.3.up_proj.bias" in split
    # in float32: the released experts dequantise to bf16 values, which float32 holds exactly, and bf16 compute
    # in two frameworks parts within a few tokens on random weights
    ref = AutoModelForCausalLM.from_pretrained(gpt_oss_mxfp4 / "mxfp4").float().eval()
    with torch.no_grad():
        want = ref.generate(torch.tensor([PROMPT[0]]), max_new_tokens=12, do_sample=False, pad_token_id=0,
                            eos_token_id=None)[0].tolist()
    for backend in ("torch", "mlx"):
        with airmlx.AutoModel.from_pretrained(shards, backend=backend, memory_budget="1GB", dtype="float32") as probe:
            budget = probe.minimum_budget
        with airmlx.AutoModel.from_pretrained(shards, backend=backend, memory_budget=budget,
                                              dtype="float32") as model:
            assert model.plan.streamed and model.generate(PROMPT[0], max_new_tokens=12) == want, backend


def test_mxfp4_codes_take_transformers_values():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from airmlx.relayout import Mxfp4Part, read_array
    rng = np.random.default_rng(0)
    codes = torch.from_numpy(rng.integers(0, 256, (3, 4, 2, 16), dtype=np.uint8))
    exponents = torch.from_numpy(rng.integers(110, 140, (3, 4, 2), dtype=np.uint8))
    want = convert_moe_packed_tensors(codes, exponents)  # (3, 64, 4): transposed, bf16
    folder = Path(__import__("tempfile").mkdtemp())
    (folder / "c").write_bytes(codes.numpy().tobytes())
    (folder / "s").write_bytes(exponents.numpy().tobytes())
    for e in range(3):
        part = Mxfp4Part("w", "BF16", (4, 64), e * 128, (e + 1) * 128, rows=(0, 4), step=1,
                         scales=(folder / "s", 0, e * 8, (e + 1) * 8))
        got = torch.from_numpy(read_array(folder / "c", 0, part, np.uint16).view(np.int16)).view(torch.bfloat16)
        assert torch.equal(got, want[e].T)


def test_mxfp4_codes_without_their_scales_are_refused(gpt_oss_mxfp4, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(gpt_oss_mxfp4 / "mxfp4", folder)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.down_proj_scales"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"'model.layers.1.mlp.experts.down_proj_blocks' .* and its scales "
                                              r"\(none\) are not mxfp4 codes"):
        airmlx.shard_checkpoint(folder, tmp_path / "out", progress=False)


def test_a_stale_mxfp4_config_over_plain_experts_splits_them_as_plain(gpt_oss_mxfp4, tmp_path):
    """A checkpoint dequantised by a script that kept its quantization_config holds bf16 fused experts: they are
    split as any bf16 checkpoint's."""
    folder = tmp_path / "stale"
    shutil.copytree(gpt_oss_mxfp4 / "bf16", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "mxfp4"}}))
    stale = shard_tensors(airmlx.shard_checkpoint(folder, tmp_path / "a", progress=False))
    plain = shard_tensors(airmlx.shard_checkpoint(gpt_oss_mxfp4 / "bf16", tmp_path / "b", progress=False))
    assert stale.keys() == plain.keys() and all(torch.equal(stale[k], plain[k]) for k in plain)
    assert "model.layers.0.mlp.experts.3.up_proj.bias" in plain
