"""MoE checkpoints that store a layer's routed experts stacked, (experts, ...) per projection, as mlx-lm's
SwitchGLU holds them (mlx-community's, written by mlx_lm.convert): the sharder splits them into each expert's
own tensors, so they stream after routing, and both backends run them as mlx-lm does."""
import json

import pytest
from mlx_lm import convert

import airmlx
from airmlx.archs import ARCHS, routed_experts
from airmlx.errors import CheckpointError
from airmlx.store import ShardStore

from tiny import ARCH_CONFIGS, BACKENDS, NEW_TOKENS, PROMPT, minimum_budget, mlx_lm_greedy, mlx_lm_readable

FOUR_BITS = {"group_size": 32, "bits": 4}
# families whose mlx-lm checkpoints hold only what transformers' modules name (once the experts are split)
BOTH = ["mixtral", "qwen3_moe", "qwen2_moe", "olmoe", "phimoe", "minimax_m2", "granitemoe", "exaone_moe", "dots1",
        "mellum", "deepseek_v2", "glm4_moe", "ernie4_5_moe"]  # ERNIE: without its routing bias (torch: zeros)
# families mlx-lm renames or re-lays further (DeepSeek-V3's latent attention split into embed_q / unembed_out,
# Laguna's router): MLX runs them, torch says what to do
# (gpt-oss: mlx_lm.convert reads only the released mxfp4 layout, not the one transformers 5 saves; its mlx-lm
# checkpoint is tested from that in tests/test_mxfp4.py)
MLX_ONLY = ["deepseek_v3", "glm4_moe_lite", "laguna"]


def mlx_community(checkpoints, tmp_path, arch, quantize):
    """An HF checkpoint of arch through mlx_lm.convert; quantised, its experts' down projections get 4 bits
    where the rest get 8 (a per-module setting, as mixed-precision conversions write them)."""
    moe = {"moe_intermediate_size": 32} if "moe_intermediate_size" in ARCH_CONFIGS[arch][1] else {}
    folder, _ = checkpoints(arch, intermediate_size=64, **moe)  # the experts' rows split into groups of 32
    hf = mlx_lm_readable(folder, tmp_path / "hf", arch)

    def bits(path, module, *_):
        return FOUR_BITS if path.endswith(f"{ARCHS[arch].stacked_experts}.down_proj") else True

    convert(str(hf), str(tmp_path / "mlx"), quantize=quantize, q_bits=8, q_group_size=32, dtype="float32",
            quant_predicate=bits if quantize else None)
    return tmp_path / "mlx"


@pytest.mark.parametrize("quantize", [False, True], ids=["float32", "8bit-4bit"])
@pytest.mark.parametrize("arch", BOTH)
def test_stacked_experts_stream_apart_and_match_mlx_lm(checkpoints, tmp_path, arch, quantize):
    src = mlx_community(checkpoints, tmp_path, arch, quantize)
    stored = json.loads((src / "config.json").read_text())
    want = mlx_lm_greedy(src)
    shards = airmlx.shard_checkpoint(src, tmp_path / "shards", progress=False)
    store = ShardStore(shards)
    down = dict((switch, proj) for proj, switch in ARCHS[arch].expert_names).get("down_proj", "down_proj")
    experts = [s for s in store.manifest.stages if s.kind == "experts"]  # DeepSeek's first layers are dense
    assert experts and all(sorted(s.parts, key=int) == [str(e) for e in range(routed_experts(stored))]
                           for s in experts)
    last = experts[-1].layer
    assert f"model.layers.{last}.{ARCHS[arch].experts}.3.{down}.weight" in experts[-1].tensors
    assert not any(".switch_mlp." in t for s in store.manifest.stages for t in s.tensors)
    if quantize:  # each expert's down projection keeps its 4 bits (torch reads them by the expert's name)
        assert stored["quantization"][f"model.layers.{last}.{ARCHS[arch].stacked_experts}.down_proj"] == FOUR_BITS
        assert store.manifest.quantization[f"model.layers.{last}.{ARCHS[arch].experts}.2.{down}"] == FOUR_BITS
    for backend in BACKENDS:
        with airmlx.AutoModel.from_pretrained(shards, backend=backend,
                                              memory_budget=minimum_budget(shards, backend)) as model:
            assert model.generate(PROMPT, max_new_tokens=NEW_TOKENS)[0] == want, backend
            assert model.memory_stats()["expert_bytes_read"] > 0  # streamed after routing, not in the layer


def test_stacked_experts_of_another_count_are_refused(checkpoints, tmp_path):
    src = mlx_community(checkpoints, tmp_path, "mixtral", False)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "num_local_experts": 5}))
    with pytest.raises(CheckpointError, match=r"switch_mlp.*\(5 experts, \.\.\.\) as config.json counts them"):
        airmlx.shard_checkpoint(src, tmp_path / "shards", progress=False)


@pytest.mark.parametrize("arch", MLX_ONLY)
def test_stacked_experts_of_families_mlx_lm_renames_further_run_on_mlx(checkpoints, tmp_path, arch):
    src = mlx_community(checkpoints, tmp_path, arch, False)
    want = mlx_lm_greedy(src)
    shards = airmlx.shard_checkpoint(src, tmp_path / "shards", progress=False)
    assert any(s.kind == "experts" for s in ShardStore(shards).manifest.stages)
    with airmlx.AutoModel.from_pretrained(shards, backend="mlx", memory_budget=minimum_budget(shards, "mlx")) as model:
        assert model.generate(PROMPT, max_new_tokens=NEW_TOKENS)[0] == want
    # it blamed config.json
    with pytest.raises(CheckpointError, match="written by mlx-lm .*run it with backend='mlx', or use the model's "
                                              "Hugging Face checkpoint"):
        with airmlx.AutoModel.from_pretrained(shards, backend="torch") as model:
            model.generate(PROMPT, max_new_tokens=1)


def test_a_folder_made_before_the_split_is_rebuilt_and_a_damaged_stage_repaired(checkpoints, tmp_path, capsys):
    """Regression (stop 44's note): a shard folder an earlier airmlx made from such a checkpoint kept the experts
    inside their layers, and was reused as long as the checkpoint was unchanged (torch then refused it). Now its
    fingerprint lacks the split's mark, so it is rebuilt, saying why. And `--repair` compares the fingerprint the
    sharder gives (of the config it derives), so a damaged stage of such a folder is rebuilt from the checkpoint."""
    from airmlx.repair import repair_stages
    src = mlx_community(checkpoints, tmp_path, "mixtral", True)
    shards = airmlx.shard_checkpoint(src, tmp_path / "shards", progress=False)
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["source"].pop("relayout") == "stacked experts"  # as an earlier airmlx fingerprinted it
    (shards / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    airmlx.shard_checkpoint(src, shards, progress=False)
    assert "by an earlier airmlx, which kept mlx-lm's stacked experts inside their layers; rebuilding it" in \
        capsys.readouterr().err
    assert json.loads((shards / "manifest.json").read_text())["source"]["relayout"] == "stacked experts"
    experts = next(s for s in ShardStore(shards).manifest.stages if s.kind == "experts")
    data = bytearray((shards / experts.file).read_bytes())
    data[-16:] = b"\xff" * 16
    (shards / experts.file).write_bytes(bytes(data))
    assert repair_stages(shards, progress=False) == [experts.name]
    with airmlx.AutoModel.from_pretrained(shards, backend="torch", memory_budget=minimum_budget(shards, "torch")) as m:
        assert m.generate(PROMPT, max_new_tokens=NEW_TOKENS)[0] == mlx_lm_greedy(src)
