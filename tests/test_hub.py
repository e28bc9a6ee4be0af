"""Model resolution through huggingface_hub, offline: local folders, the cache, and clear failures."""
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import constants

import airmlx
from airmlx.errors import BackendError, ModelNotFoundError
from airmlx.hub import default_shard_dir, resolve_model


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def fake_cache(src, repo_id):
    """Lay out a model in the hub cache exactly as snapshot_download leaves it."""
    repo = f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = Path(constants.HF_HUB_CACHE) / repo
    shutil.copytree(src, root / "snapshots" / commit)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)


def fake_hub(monkeypatch, repo, local):
    """huggingface_hub.snapshot_download as the hub answers for a repo holding the files of folder `repo`
    (patterns applied by huggingface_hub's own filter), downloading into `local`; returns the calls' arguments."""
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects
    asked = []

    def snapshot_download(repo_id, allow_patterns=None, ignore_patterns=None, token=None, **kwargs):
        asked.append(dict(repo_id=repo_id, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))
        local.mkdir(exist_ok=True)
        for name in filter_repo_objects([p.name for p in repo.iterdir()], allow_patterns=allow_patterns,
                                        ignore_patterns=ignore_patterns):
            shutil.copyfile(repo / name, local / name)
        return str(local)

    def get_safetensors_metadata(repo_id, token=None, **kwargs):  # the headers, as the hub's range requests read
        asked.append(dict(repo_id=repo_id, headers=True))
        files = {}
        for path in repo.glob("*.safetensors"):
            with open(path, "rb") as f:
                header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
            tensors = {n: SimpleNamespace(dtype=t["dtype"]) for n, t in header.items() if n != "__metadata__"}
            files[path.name] = SimpleNamespace(tensors=tensors)
        return SimpleNamespace(files_metadata=files)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "get_safetensors_metadata", get_safetensors_metadata)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return asked


def test_local_folder_resolves_to_itself(tmp_path):
    assert resolve_model(tmp_path) == tmp_path


def test_missing_local_path(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such folder"):
        resolve_model(f"{tmp_path}/nothing/here")


def test_hub_id_offline_and_not_cached(offline):
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE"):
        resolve_model("someone/not-downloaded")


def test_hub_id_from_cache_end_to_end(offline, checkpoints):
    folder, _ = checkpoints("qwen2")
    fake_cache(folder, "tiny-org/tiny-qwen")
    model = airmlx.AutoModel.from_pretrained("tiny-org/tiny-qwen", backend="torch")
    assert model.shard_dir == default_shard_dir("tiny-org/tiny-qwen")
    assert str(model.shard_dir).startswith(constants.HF_HOME) and model.shard_dir.name == "tiny-org--tiny-qwen"
    assert len(model.generate([3, 4], max_new_tokens=2)) == 4
    model.close()


def test_a_hub_id_reopens_its_own_folder_at_a_saving_path_and_refuses_another_models(offline, checkpoints, tmp_path):
    """layer_shards_saving_path with a hub id: the folder it made opens again (offline, without resolving);
    a folder another repo made is refused (it opened that model as it was)."""
    from airmlx.errors import OptionError
    folder, _ = checkpoints("qwen2")
    fake_cache(folder, "tiny-org/tiny-qwen")
    out = tmp_path / "mine"
    for _ in range(2):
        with airmlx.AutoModel.from_pretrained("tiny-org/tiny-qwen", backend="torch", layer_shards_saving_path=out) as m:
            assert m.shard_dir == out and len(m.generate([3, 4], max_new_tokens=2)) == 4
    with pytest.raises(OptionError, match="holds the unquantised shards of tiny-org/tiny-qwen, not tiny-org/other"):
        airmlx.AutoModel.from_pretrained("tiny-org/other", backend="torch", layer_shards_saving_path=out)
    snapshot = next((Path(constants.HF_HUB_CACHE) / "models--tiny-org--tiny-qwen" / "snapshots").iterdir())
    with airmlx.AutoModel.from_pretrained(snapshot, backend="torch", layer_shards_saving_path=out) as m:
        assert m.shard_dir == out  # the same checkpoint given by its path in the cache


def test_unknown_backend_and_device(checkpoints):
    folder, _ = checkpoints("llama")
    with pytest.raises(BackendError, match="backend 'jax' is unknown"):
        airmlx.AutoModel.from_pretrained(folder, backend="jax")
    if not torch.cuda.is_available():
        with pytest.raises(BackendError, match="no CUDA device"):
            airmlx.AutoModel.from_pretrained(folder, backend="torch", device="cuda")
    with pytest.raises(BackendError, match="not an MLX device"):
        airmlx.AutoModel.from_pretrained(folder, backend="mlx", device="tpu")


def test_hub_download_skips_mistral_inference_weights(checkpoints, tmp_path, monkeypatch):
    """mistralai repos hold the weights twice: the HF files and consolidated.safetensors (mistral-inference's
    layout). snapshot_download is asked for the first only (patterns applied by huggingface_hub's own filter)."""
    folder, _ = checkpoints("mistral")
    repo = tmp_path / "repo"  # the hub repo's files
    shutil.copytree(folder, repo)
    shutil.copyfile(folder / "model.safetensors", repo / "consolidated.safetensors")
    (repo / "consolidated.00.pth").write_bytes(b"pickle")
    (repo / "params.json").write_text("{}")
    asked = fake_hub(monkeypatch, repo, tmp_path / "snapshot")
    local = resolve_model("mistralai/Tiny-v0.1", allow_pickle=True)
    assert asked[-1]["repo_id"] == "mistralai/Tiny-v0.1"
    got = {p.name for p in local.iterdir()}
    assert "model.safetensors" in got and "tokenizer.json" in got and "params.json" in got
    assert not {"consolidated.safetensors", "consolidated.00.pth"} & got
    with airmlx.AutoModel.from_pretrained(local, backend="torch") as model:
        assert len(model.generate([3, 4], max_new_tokens=2)) == 4


@pytest.mark.parametrize("change, error", [
    ({"model_type": "rwkv"}, "model_type 'rwkv' is not supported"),
    ({"quantization_config": {"quant_method": "gptq"}}, r"holds weights quantised with gptq \(e.g. .*weight_scale_inv\)")])
def test_a_hub_model_airmlx_cannot_run_is_refused_before_its_weights_download(checkpoints, tmp_path, monkeypatch,
                                                                              change, error):
    """resolve_model downloaded every weight file (690 GB for deepseek-ai/DeepSeek-V3) before the sharder
    refused the architecture or the quantised weights: the config and the shard index now come first."""
    import json

    from airmlx.errors import AirmlxError
    folder, _ = checkpoints("llama")
    repo = tmp_path / "repo"
    shutil.copytree(folder, repo)
    config = json.loads((repo / "config.json").read_text())
    (repo / "config.json").write_text(json.dumps({**config, **change}))
    weight_map = {"model.layers.0.mlp.down_proj.weight": "model-1.safetensors",
                  "model.layers.0.mlp.down_proj.weight_scale_inv": "model-1.safetensors"}
    (repo / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    asked = fake_hub(monkeypatch, repo, tmp_path / "snapshot")
    with pytest.raises(AirmlxError, match=error):
        resolve_model("org/big")
    assert [a["allow_patterns"] for a in asked] == [["config.json", "*.index.json"]]


def test_a_one_file_hub_model_quantised_elsewhere_is_refused_before_its_weights_download(checkpoints, tmp_path,
                                                                                          monkeypatch):
    """A repo of one weights file has no index to name its tensors: their names and dtypes now come from the
    file's header (huggingface_hub's range requests), so fp8 weights are refused before the download, not after."""
    from safetensors.torch import load_file, save_file

    from airmlx.errors import CheckpointError
    folder, _ = checkpoints("llama")
    repo = tmp_path / "repo"
    shutil.copytree(folder, repo)
    tensors = load_file(repo / "model.safetensors")
    tensors["model.layers.0.mlp.down_proj.weight"] = tensors["model.layers.0.mlp.down_proj.weight"].to(
        torch.float8_e4m3fn)
    save_file(tensors, repo / "model.safetensors")
    asked = fake_hub(monkeypatch, repo, tmp_path / "snapshot")
    with pytest.raises(CheckpointError, match="quantised .*down_proj.weight"):
        resolve_model("org/one-file-fp8")
    assert [a.get("allow_patterns") for a in asked] == [["config.json", "*.index.json"], None]  # no weights
    save_file(load_file(folder / "model.safetensors"), repo / "model.safetensors")  # plain weights download
    assert (resolve_model("org/one-file") / "model.safetensors").is_file()


def test_a_hub_gguf_without_a_network_fails_at_once(tmp_path, monkeypatch):
    """Regression: a hub id with gguf_file= and no network retried for 24 s (hf_hub_download's backoff) before
    its error; a file the repo lacks is named."""
    import time

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused at once
    start = time.perf_counter()
    with pytest.raises(ModelNotFoundError, match="cannot be reached"):
        resolve_model("org/tiny-GGUF", gguf_file="tiny.Q4.gguf")
    assert time.perf_counter() - start < 10
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "tiny.Q4.gguf").write_bytes(b"GGUF")
    fake_cache(tmp_path / "repo", "org/tiny-GGUF")  # cached, but without the file asked for
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotFoundError, match="has no file other.gguf"):
        resolve_model("org/tiny-GGUF", gguf_file="other.gguf")
