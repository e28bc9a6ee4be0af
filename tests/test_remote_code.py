"""Checkpoints that ship their own modelling code: the torch backend runs them only with trust_remote_code=True
(and says so otherwise); internlm3, which transformers 5 runs itself, agrees with mlx-lm's module."""
import json

import numpy as np
import pytest
import torch

import airmlx
from airmlx.archs import ARCHS, Arch
from airmlx.errors import UnsupportedArchitectureError

from tiny import BATCH, NEW_TOKENS, PROMPT, assert_last_logits_match, load, reference_generate, stage_size

CONFIG_PY = """from transformers import LlamaConfig


class TinyRemoteConfig(LlamaConfig):
    model_type = "tinyremote"
"""
MODELING_PY = """from transformers import LlamaForCausalLM

from .configuration_tinyremote import TinyRemoteConfig


class TinyRemoteForCausalLM(LlamaForCausalLM):
    config_class = TinyRemoteConfig
"""
AUTO_MAP = {"AutoConfig": "configuration_tinyremote.TinyRemoteConfig",
            "AutoModelForCausalLM": "modeling_tinyremote.TinyRemoteForCausalLM"}


@pytest.fixture
def remote_checkpoint(tmp_path, monkeypatch, hf_modules):
    """A Llama checkpoint renamed to a model_type transformers lacks, with its own configuration and modelling
    code (subclasses of transformers' Llama), registered in airmlx as a remote-code family."""
    from airmlx.backends.mlx_archs import MLX_ARCHS, MLXArch
    from airmlx.backends.torch_backend import TORCH_ARCHS, TorchArch

    from tiny import make_checkpoint
    monkeypatch.setitem(ARCHS, "tinyremote", Arch("tinyremote", remote_code=True))
    monkeypatch.setitem(MLX_ARCHS, "tinyremote", MLXArch("llama"))
    monkeypatch.setitem(TORCH_ARCHS, "tinyremote", TorchArch())
    folder = tmp_path / "ckpt"
    make_checkpoint(folder, "llama")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="tinyremote", architectures=["TinyRemoteForCausalLM"], auto_map=AUTO_MAP)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_tinyremote.py").write_text(CONFIG_PY)
    (folder / "modeling_tinyremote.py").write_text(MODELING_PY)
    return folder


def test_torch_refuses_remote_code_unless_trusted(remote_checkpoint, tmp_path):
    with pytest.raises(UnsupportedArchitectureError, match=r"own modelling code \(configuration_tinyremote.py, "
                       r"modeling_tinyremote.py\).*only with trust_remote_code=True.*backend='mlx' runs"):
        airmlx.AutoModel.from_pretrained(remote_checkpoint, backend="torch", layer_shards_saving_path=tmp_path / "s")
    assert (tmp_path / "s" / "modeling_tinyremote.py").read_text() == MODELING_PY  # the code came along, unrun

    (tmp_path / "s" / "modeling_tinyremote.py").unlink()
    with pytest.raises(UnsupportedArchitectureError, match="lacks the checkpoint's modelling code "
                       r"\(modeling_tinyremote.py\); copy those .py files"):
        airmlx.AutoModel.from_pretrained(tmp_path / "s", backend="torch", trust_remote_code=True)


def test_trusted_remote_code_streams_like_transformers(remote_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM
    ref = AutoModelForCausalLM.from_pretrained(remote_checkpoint, trust_remote_code=True, dtype=torch.float32).eval()
    assert type(ref).__name__ == "TinyRemoteForCausalLM"
    want, want_batch = reference_generate(ref, PROMPT), reference_generate(ref, BATCH)
    shards = tmp_path / "shards"
    airmlx.shard_checkpoint(remote_checkpoint, shards, progress=False)
    budget = int(1.5 * stage_size(shards))
    with airmlx.AutoModel.from_pretrained(shards, backend="torch", memory_budget=budget,
                                          trust_remote_code=True) as model:
        assert type(model.backend.skeleton).__name__ == "TinyRemoteForCausalLM"
        assert model.plan.streamed
        assert model.generate(torch.tensor(PROMPT), max_new_tokens=NEW_TOKENS).tolist() == want
        assert_last_logits_match(model, ref, want)
        batched = model.generate(BATCH, max_new_tokens=NEW_TOKENS)
    assert [row[-NEW_TOKENS:] for row in batched] == [row[-NEW_TOKENS:] for row in want_batch]


def test_remote_code_laid_out_otherwise_is_refused(remote_checkpoint, tmp_path):
    """Older remote code (a rotary embedding per attention layer, say) gets a clear error, not a crash mid-sweep."""
    old_layout = "\n    def __init__(self, config):\n        super().__init__(config)\n" \
                 "        del self.model.rotary_emb\n"
    (remote_checkpoint / "modeling_tinyremote.py").write_text(MODELING_PY + old_layout)
    with pytest.raises(UnsupportedArchitectureError, match=r"TinyRemoteForCausalLM \(the checkpoint's own code\) "
                       r"is not laid out as transformers' own decoders are: a model.rotary_emb .*backend='mlx'"):
        airmlx.AutoModel.from_pretrained(remote_checkpoint, backend="torch", trust_remote_code=True,
                                         layer_shards_saving_path=tmp_path / "s")


def test_cli_passes_trust_remote_code():
    from airmlx.chat import build_parser
    assert build_parser().parse_args(["--trust-remote-code"]).trust_remote_code
    assert not build_parser().parse_args([]).trust_remote_code


def test_internlm3_on_torch_agrees_with_mlx_lm(tmp_path):
    """Recent transformers runs internlm3 checkpoints with its Llama modules (5.20 has no internlm3 module and
    the backend then asks for trust_remote_code): streamed on torch, no remote code."""
    pytest.importorskip("mlx_lm")
    from transformers import CONFIG_MAPPING
    if "internlm3" not in CONFIG_MAPPING:
        pytest.skip("this transformers has no internlm3 module (the torch backend asks for trust_remote_code)")
    from test_archs import mlx_reference

    from tiny import make_mlx_checkpoint
    ref = make_mlx_checkpoint(tmp_path / "ckpt", "internlm3")
    want, want_logits = mlx_reference(ref, PROMPT)
    with load(tmp_path / "ckpt", tmp_path, "torch", "tight") as model:
        assert model.plan.streamed
        assert model.generate(torch.tensor(PROMPT), max_new_tokens=NEW_TOKENS).tolist() == want
        seq = np.array([want[0][:-1]])
        ours = model.step(seq, np.ones_like(seq), model.new_cache(1, [0]))
        batched = model.generate(BATCH, max_new_tokens=NEW_TOKENS)
    assert np.abs(ours - want_logits).max() / np.abs(want_logits).max() < 1e-4
    assert [row[-NEW_TOKENS:] for row in batched] == [row[-NEW_TOKENS:] for row in mlx_reference(ref, BATCH)[0]]
