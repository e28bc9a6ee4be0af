"""MoE checkpoints that store a layer's routed experts stacked, (experts, ...) per projection, as mlx-lm's
SwitchGLU holds them (mlx-community's, written by mlx_lm.convert): the sharder splits them into each expert's
own tensors, so they stream after routing, and both backends run them as mlx-lm does."""
import json

import mlx.core as mx
import pytest
from mlx_lm import convert
from mlx_lm import load as mlx_load
from mlx_lm.models.cache import make_prompt_cache

import airmlx
from airmlx.archs import ARCHS, rope_config
from airmlx.errors import CheckpointError
from airmlx.store import ShardStore

from tiny import BACKENDS, NEW_TOKENS, PROMPT, minimum_budget

EXPERTS = 4  # tests/tiny.py's MoE configs


def mlx_lm_greedy(folder):
    model, _ = mlx_load(str(folder))
    cache, ids, out = make_prompt_cache(model), mx.array(PROMPT), list(PROMPT[0])
    for _ in range(NEW_TOKENS):
        out.append(int(mx.argmax(model(ids, cache=cache)[:, -1], axis=-1).item()))
        ids = mx.array([[out[-1]]])
    return out


def mlx_community(checkpoints, tmp_path, arch, quantize):
    """An HF checkpoint of arch through mlx_lm.convert; quantised, its experts' down projections get 4 bits
    where the rest get 8 (a per-module setting, as mixed-precision conversions write them)."""
    folder, _ = checkpoints(arch, intermediate_size=64)
    config = json.loads((folder / "config.json").read_text())
    # mlx-lm reads rope settings and Qwen3-MoE's expert count only where transformers 4 wrote them
    theta, scaling = rope_config(config)
    if arch == "qwen3_moe":
        config["num_experts"] = config["num_local_experts"]
    hf = tmp_path / "hf"
    hf.mkdir()
    for f in folder.iterdir():
        (hf / f.name).write_bytes(f.read_bytes())
    (hf / "config.json").write_text(json.dumps({**config, "rope_theta": theta, "rope_scaling": scaling}))

    def bits(path, module, *_):
        return {"group_size": 32, "bits": 4} if path.endswith("switch_mlp.down_proj") else True

    convert(str(hf), str(tmp_path / "mlx"), quantize=quantize, q_bits=8, q_group_size=32, dtype="float32",
            quant_predicate=bits if quantize else None)
    return tmp_path / "mlx"


@pytest.mark.parametrize("quantize", [False, True], ids=["float32", "8bit-4bit"])
@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_stacked_experts_stream_apart_and_match_mlx_lm(checkpoints, tmp_path, arch, quantize):
    src = mlx_community(checkpoints, tmp_path, arch, quantize)
    stored = json.loads((src / "config.json").read_text())
    switch = f"model.layers.0.{ARCHS[arch].stacked_experts}.down_proj"
    assert stored.get("quantization", {}).get(switch) == ({"group_size": 32, "bits": 4} if quantize else None)
    want = mlx_lm_greedy(src)
    shards = airmlx.shard_checkpoint(src, tmp_path / "shards", progress=False)
    store = ShardStore(shards)
    down = "w2" if arch == "mixtral" else "down_proj"
    experts = next(s for s in store.manifest.stages if s.name == "layer.000.experts")
    assert sorted(experts.parts) == [str(e) for e in range(EXPERTS)]
    assert f"model.layers.0.{ARCHS[arch].experts}.3.{down}.weight" in experts.tensors
    assert not any("switch_mlp" in t for s in store.manifest.stages for t in s.tensors)
    if quantize:  # each expert's down projection keeps its 4 bits (torch reads them by the expert's name)
        assert store.manifest.quantization[f"model.layers.1.{ARCHS[arch].experts}.2.{down}"]["bits"] == 4
    for backend in BACKENDS:
        with airmlx.AutoModel.from_pretrained(shards, backend=backend,
                                              memory_budget=minimum_budget(shards, backend)) as model:
            assert model.generate(PROMPT, max_new_tokens=NEW_TOKENS)[0] == want, backend
            assert model.memory_stats()["expert_bytes_read"] > 0  # streamed after routing, not in the layer


def test_stacked_experts_of_another_count_are_refused(checkpoints, tmp_path):
    src = mlx_community(checkpoints, tmp_path, "mixtral", False)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "num_local_experts": EXPERTS + 1}))
    with pytest.raises(CheckpointError, match=r"switch_mlp.*\(5 experts, \.\.\.\) as config.json counts them"):
        airmlx.shard_checkpoint(src, tmp_path / "shards", progress=False)
