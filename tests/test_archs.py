"""Every registered architecture beyond the core three: streamed (tight budget) greedy output, last-step
logits and a two-prompt batch match transformers' own generate on the same fp32 random weights."""
import numpy as np
import pytest
import torch

from airmlx.errors import CacheTrimError, CheckpointError, UnsupportedArchitectureError

from tiny import BACKENDS, BATCH, NEW_TOKENS, PROMPT, assert_last_logits_match, load, reference_generate

ARCHS = ["qwen3", "phi3", "glm4", "smollm3", "olmo2", "olmo3", "phi", "ernie4_5", "helium", "hunyuan_v1_dense",
         "stablelm", "nemotron", "seed_oss", "starcoder2", "gemma", "granite", "cohere", "cohere2", "apertus",
         "exaone4", "glm", "ministral3", "gpt_neox", "gpt2", "gptj", "gpt_bigcode", "mixtral", "qwen2_moe", "qwen3_moe",
         "deepseek_v2", "deepseek_v3", "glm4_moe", "glm4_moe_lite", "olmoe", "phimoe", "ernie4_5_moe", "granitemoe",
         "exaone_moe", "laguna", "dots1", "mellum", "minimax_m2", "gpt_oss", "gemma2", "gemma3_text"]
# mlx-lm's math for these differs from transformers' (exact GELU against the tanh approximation), so on MLX they
# are held to mlx-lm's own model on the same weights (test_mlx_matches_mlx_lm_where_its_math_differs)
MLX_LM_MATH = ["starcoder2", "gemma", "gpt_neox", "gpt_bigcode"]
CASES = [(arch, backend) for arch in ARCHS for backend in BACKENDS if not (backend == "mlx" and arch in MLX_LM_MATH)]


@pytest.mark.parametrize("arch, backend", CASES, ids=[f"{a}-{b}" for a, b in CASES])
def test_streamed_matches_transformers(checkpoints, tmp_path, arch, backend):
    folder, ref = checkpoints(arch)
    want, want_batch = reference_generate(ref, PROMPT), reference_generate(ref, BATCH)
    with load(folder, tmp_path, backend, "tight") as model:
        assert model.plan.streamed and len(model.plan.resident) < len(model.plan.stage_bytes)
        assert model.generate(torch.tensor(PROMPT), max_new_tokens=NEW_TOKENS).tolist() == want

        assert_last_logits_match(model, ref, want)

        batched = model.generate(BATCH, max_new_tokens=NEW_TOKENS)
    assert [row[-NEW_TOKENS:] for row in batched] == [row[-NEW_TOKENS:] for row in want_batch]


@pytest.mark.parametrize("arch, dropout", [("llama", {"attention_dropout": 0.5}),
                                           ("phi", {"resid_pdrop": 0.5, "embd_pdrop": 0.5})])
def test_a_configs_dropout_never_runs(checkpoints, tmp_path, arch, dropout):
    """transformers' from_config builds a model that is training: the torch backend's skeleton ran the config's
    dropout at random (microsoft/phi-2 ships resid_pdrop 0.1)."""
    folder, ref = checkpoints(arch, **dropout)
    with load(folder, tmp_path, "torch", "tight") as model:
        assert model.generate(torch.tensor(PROMPT), max_new_tokens=NEW_TOKENS).tolist() == reference_generate(ref, PROMPT)


@pytest.mark.parametrize("arch, written", [("gemma2", {}), ("gemma3_text", {"sliding_window_pattern": 2}),
                                           ("cohere2", {"sliding_window_pattern": 4})])
def test_a_config_json_without_layer_types_gets_transformers_own(tmp_path, arch, written):
    """Configs written before transformers listed layer_types (Command R7B's and Gemma 3's on the hub give a
    sliding_window_pattern, Gemma 2's alternate by rule) ran every layer as full attention: MLX's tokens went
    wrong past the window and a batch failed on both backends."""
    import json

    from tiny import make_checkpoint
    ref = make_checkpoint(tmp_path / "src", arch)
    path = tmp_path / "src" / "config.json"
    config = json.loads(path.read_text())
    del config["layer_types"]
    path.write_text(json.dumps({**config, **written}))
    want, want_batch = reference_generate(ref, PROMPT), reference_generate(ref, BATCH)
    for backend in BACKENDS:
        with load(tmp_path / "src", tmp_path / backend, backend, "tight") as model:
            assert model.generate(torch.tensor(PROMPT), max_new_tokens=NEW_TOKENS).tolist() == want
            batched = model.generate(BATCH, max_new_tokens=NEW_TOKENS)
        assert [row[-NEW_TOKENS:] for row in batched] == [row[-NEW_TOKENS:] for row in want_batch]


def test_layer_types_leave_the_config_as_it_was_and_refuse_one_transformers_cannot_read():
    import copy

    from airmlx.archs import layer_types
    from airmlx.backends.base import with_layer_types
    config = {"model_type": "gemma2", "num_hidden_layers": 2, "sliding_window": 8,
              "rope_scaling": {"rope_type": "linear", "factor": 2.0}}
    before = copy.deepcopy(config)
    assert layer_types(with_layer_types(config)) == ["sliding_attention", "full_attention"] and config == before
    with pytest.raises(CheckpointError, match="transformers' gemma2 config cannot read it .*which layers slide"):
        with_layer_types({**config, "num_attention_heads": "four", "head_dim": "x"})


def test_a_tied_heads_own_bias_is_kept(checkpoints, tmp_path):
    """ERNIE 4.5 with use_bias: the head is the embedding, plus a bias of its own, which the sharder dropped
    with the head's weight (torch: a meta tensor; MLX ran without it, silently). mlx-lm's tied head has no
    bias, so MLX refuses it in one line."""
    folder, ref = checkpoints("ernie4_5_moe", use_bias=True)
    assert ref.config.tie_word_embeddings and ref.lm_head.bias is not None
    with load(folder, tmp_path / "torch", "torch", "tight") as model:
        assert model.generate(torch.tensor(PROMPT), max_new_tokens=NEW_TOKENS).tolist() == \
            reference_generate(ref, PROMPT)
    with pytest.raises(CheckpointError, match="lm_head.bias' has no place in mlx-lm"):
        with load(folder, tmp_path / "mlx", "mlx", "tight") as model:
            model.generate(torch.tensor(PROMPT), max_new_tokens=2)


def test_mlx_refuses_a_checkpoint_that_leaves_a_modules_parameter_unfilled(checkpoints, tmp_path):
    """mlx-lm's phimoe has attention and head biases whatever the config says: a checkpoint without them ran
    with MLX's random initial biases, silently (found adding phimoe)."""
    folder, _ = checkpoints("phimoe", attention_bias=False, lm_head_bias=False)
    with pytest.raises(CheckpointError, match=r"stage layer.000: the checkpoint has no .*self_attn.k_proj.bias.* "
                                              r"mlx-lm's mlx_lm.models.phimoe needs; config.json does not match"):
        with load(folder, tmp_path, "mlx", "tight") as model:
            model.generate(torch.tensor(PROMPT), max_new_tokens=2)


def test_multi_token_prediction_layers_are_left_out(tmp_path):
    """DeepSeek-V3 and GLM-4.5 checkpoints carry num_nextn_predict_layers layers after the decoder's (layer 61
    of DeepSeek-V3) for multi-token prediction, which neither transformers nor mlx-lm runs: the sharder
    refused their tensors as belonging to no stage."""
    from safetensors.torch import load_file, save_file

    from tiny import make_checkpoint
    ref = make_checkpoint(tmp_path / "src", "deepseek_v3", num_nextn_predict_layers=1)
    weights = load_file(tmp_path / "src" / "model.safetensors")
    last = ref.config.num_hidden_layers - 1
    extra = {k.replace(f"layers.{last}.", f"layers.{last + 1}."): v.clone() for k, v in weights.items()
             if f"layers.{last}." in k}
    extra.update({f"model.layers.{last + 1}.eh_proj.weight": torch.zeros(64, 128),
                  f"model.layers.{last + 1}.enorm.weight": torch.ones(64)})
    save_file({**weights, **extra}, tmp_path / "src" / "model.safetensors", metadata={"format": "pt"})
    for backend in BACKENDS:
        with load(tmp_path / "src", tmp_path / backend, backend, "tight") as model:
            assert model.generate(torch.tensor(PROMPT), max_new_tokens=NEW_TOKENS).tolist() == \
                reference_generate(ref, PROMPT)


@pytest.mark.parametrize("arch", MLX_LM_MATH)
def test_mlx_matches_mlx_lm_where_its_math_differs_from_transformers(checkpoints, tmp_path, arch):
    from mlx_lm.utils import load_model
    folder, hf = checkpoints(arch)
    # transformers 5 writes rope_parameters, which mlx-lm's own loading does not read (airmlx does)
    rope = getattr(hf.config, "rope_parameters", None) or {"rope_theta": None}
    # gpt_neox: mlx-lm reads the old names Pythia's configs have; gpt_bigcode: mlx-lm cannot take a null n_inner
    ref, _ = load_model(folder, model_config={"rope_theta": rope["rope_theta"], "rotary_emb_base": rope["rope_theta"],
                                              "rotary_pct": rope.get("partial_rotary_factor"),
                                              "n_inner": 4 * hf.config.hidden_size})
    assert_streamed_matches_mlx_lm(folder, tmp_path, ref)


MLX_ONLY = ["internlm2", "internlm3", "qwen", "baichuan_m1"]


def mlx_reference(model, rows):
    """Greedy tokens from mlx-lm's own model, resident, each prompt alone."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache
    out = []
    for row in rows:
        cache, ids, seq = make_prompt_cache(model), mx.array([row]), list(row)
        for _ in range(NEW_TOKENS):
            logits = model(ids, cache=cache)[:, -1]
            seq.append(int(mx.argmax(logits, axis=-1).item()))
            ids = mx.array([[seq[-1]]])
        out.append(seq)
    return out, np.array(logits.astype(mx.float32))


def assert_streamed_matches_mlx_lm(folder, tmp_path, ref):
    """Streamed on MLX: greedy tokens, last-step logits (1e-4) and a batch as mlx-lm's own model `ref` gives them."""
    want, want_logits = mlx_reference(ref, PROMPT)
    with load(folder, tmp_path, "mlx", "tight") as model:
        assert model.plan.streamed
        assert model.generate(torch.tensor(PROMPT), max_new_tokens=NEW_TOKENS).tolist() == want
        seq = np.array([want[0][:-1]])
        ours = model.step(seq, np.ones_like(seq), model.new_cache(1, [0]))
        assert np.abs(ours - want_logits).max() / np.abs(want_logits).max() < 1e-4
        batched = model.generate(BATCH, max_new_tokens=NEW_TOKENS)
    assert [row[-NEW_TOKENS:] for row in batched] == [row[-NEW_TOKENS:] for row in mlx_reference(ref, BATCH)[0]]


@pytest.mark.parametrize("arch", MLX_ONLY)
def test_remote_code_family_matches_mlx_lm(tmp_path, arch):
    import airmlx

    from tiny import make_mlx_checkpoint
    ref = make_mlx_checkpoint(tmp_path / "ckpt", arch)
    want, _ = mlx_reference(ref, PROMPT)
    assert len(set(want[0][len(PROMPT[0]):])) > 2  # not one token over and over
    assert_streamed_matches_mlx_lm(tmp_path / "ckpt", tmp_path, ref)
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    if arch in CONFIG_MAPPING:  # transformers 5 runs internlm3 itself (tests/test_remote_code.py)
        return
    with pytest.raises(UnsupportedArchitectureError, match="only with trust_remote_code=True.*backend='mlx'"):
        airmlx.AutoModel.from_pretrained(tmp_path / "shards", backend="torch")


def test_convolution_state_trims(tmp_path):
    """baichuan_m1's convolution state goes back with its KV cache (a chat edit, a Ctrl-C) or says it cannot."""
    from tiny import make_mlx_checkpoint
    # a window wider than the test: a sliding window that has dropped tokens cannot go back exactly
    make_mlx_checkpoint(tmp_path / "ckpt", "baichuan_m1", sliding_window=64)
    n = len(PROMPT[0])
    with load(tmp_path / "ckpt", tmp_path, "mlx", "tight") as model:
        cache = model.new_cache()
        seq = model.generate(PROMPT, past_key_values=cache, max_new_tokens=NEW_TOKENS)[0]
        keep = n + 5  # back into the answer: each decode step's state was kept
        model.trim_cache(cache, keep)
        assert model.cache_length(cache) == keep
        ours = model.step(np.array([seq[keep:keep + 1]]), np.ones((1, keep + 1)), cache)
        fresh = np.array([seq[:keep + 1]])
        want = model.step(fresh, np.ones_like(fresh), model.new_cache())
        assert np.abs(ours - want).max() / np.abs(want).max() < 1e-4
        with pytest.raises(CacheTrimError, match="convolution state cannot go back 12 tokens.*/reset"):
            model.trim_cache(cache, 3)  # inside the prompt: one prefill step, one state
        model.trim_cache(cache, 0)
        assert model.cache_length(cache) == 0
        ours = model.step(np.array(PROMPT), np.ones((1, n)), cache)
        assert np.abs(ours - model.step(np.array(PROMPT), np.ones((1, n)), model.new_cache())).max() < 1e-5


def test_compression_keeps_the_normalised_head(tmp_path):
    """mlx-lm normalises baichuan_m1's lm_head in sanitize, but not a quantised one: compression leaves it."""
    import mlx.core as mx

    import airmlx
    from airmlx.manifest import Manifest

    from tiny import make_mlx_checkpoint
    ref = make_mlx_checkpoint(tmp_path / "ckpt", "baichuan_m1")
    want = np.array(ref(mx.array(PROMPT))[:, -1])
    out = airmlx.shard_checkpoint(tmp_path / "ckpt", tmp_path / "q8", compression="8bit", progress=False)
    manifest = Manifest.load(out)
    assert manifest.config["quantization"]["lm_head"] is False
    assert "model.layers.0.self_attn.W_pack.scales" in manifest.stages[1].tensors
    assert "lm_head.scales" not in manifest.stages[-1].tensors
    with airmlx.AutoModel.from_pretrained(out, backend="mlx") as model:
        ours = model.step(np.array(PROMPT), np.ones_like(PROMPT), model.new_cache())
    assert np.abs(ours - want).max() / np.abs(want).max() < 0.05


def test_a_config_mlx_lms_module_cannot_build_is_refused_in_one_line(checkpoints, tmp_path):
    """Qwen2-MoE without a shared expert (shared_expert_intermediate_size 0) raised ZeroDivisionError from inside
    mlx-lm's module; transformers runs it, so the torch backend does."""
    from airmlx.errors import BackendError
    folder, ref = checkpoints("qwen2_moe", shared_expert_intermediate_size=0)
    with pytest.raises(BackendError, match="mlx-lm's qwen2_moe module cannot be built from this config.json"):
        load(folder, tmp_path / "mlx", "mlx")
    with load(folder, tmp_path / "torch", "torch") as model:
        assert model.generate(torch.tensor(PROMPT), max_new_tokens=NEW_TOKENS).tolist() == reference_generate(ref, PROMPT)


def test_a_config_transformers_cannot_read_is_refused_in_one_line_on_torch(tmp_path):
    """EXAONE 4's sliding_window_pattern written as letters with no layer_types: transformers' config class fails
    with ZeroDivisionError, which the torch backend raised as it was. (MLX runs it: without a window every layer
    is global, which mlx-lm's module reads from the config as it is.)"""
    backend = "torch"
    import json

    from tiny import make_checkpoint
    make_checkpoint(tmp_path / "src", "exaone4")
    path = tmp_path / "src" / "config.json"
    config = json.loads(path.read_text())
    del config["layer_types"]
    path.write_text(json.dumps({**config, "sliding_window_pattern": "LLLG", "sliding_window": None}))
    with pytest.raises(CheckpointError, match="config.json: transformers' exaone4 config cannot read it"):
        load(tmp_path / "src", tmp_path, backend)


def test_qwen3_vl_moe_normalises_its_routing_as_transformers_whatever_its_config_says(tmp_path):
    """Qwen3-VL-MoE's router always normalises its top-k weights; run as Qwen3-MoE, a config without
    norm_topk_prob (its class has no such field) did not, and MLX could not build the module."""
    from airmlx.sharder import load_config
    config = {"model_type": "qwen3_vl_moe", "text_config": {"hidden_size": 64, "num_hidden_layers": 2},
              "vision_config": {"depth": 1}}
    (tmp_path / "config.json").write_text(__import__("json").dumps(config))
    assert load_config(tmp_path)["norm_topk_prob"] is True


HUB_LIKE = [  # (arch, made with, then config.json edited: None deletes the key)
    # EXAONE 4.0 1.2B: no window, every layer global, its pattern still written as letters: MLX's module read the
    # letters and made windowed caches of no size
    ("exaone4", {"sliding_window": None, "layer_types": ["full_attention"] * 4}, {"sliding_window_pattern": "LLLG"}),
    # head_dim left out: transformers' GLM-4 and Ministral 3 classes default it to 128, not hidden / heads
    ("glm", {"head_dim": 128}, {"head_dim": None}),
    ("ministral3", {"head_dim": 128}, {"head_dim": None}),
    # a window in Ministral 3's config applies to every layer, as in Mistral's
    ("ministral3", {"sliding_window": 4}, {}),
    # StarCoder-like configs written by transformers 4 (no num_key_value_heads), here with an MLP of its own width,
    # an untied head and the exact GELU mlx-lm's module runs
    ("gpt_bigcode", {"n_inner": 96, "tie_word_embeddings": False, "activation_function": "gelu"},
     {"num_key_value_heads": None, "intermediate_size": None}),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch, made, edited", HUB_LIKE, ids=[f"{a}-{list(e) or list(m)}" for a, m, e in HUB_LIKE])
def test_hub_like_configs_run_as_transformers_reads_them(tmp_path, backend, arch, made, edited):
    """Regressions (QA) of this stop's architectures: configs as the hub has them, against transformers."""
    import json

    from tiny import make_checkpoint
    ref = make_checkpoint(tmp_path / "src", arch, **made)
    path = tmp_path / "src" / "config.json"
    config = {**json.loads(path.read_text()), **edited}
    path.write_text(json.dumps({k: v for k, v in config.items() if not (k in edited and v is None)}))
    want, want_batch = reference_generate(ref, PROMPT), reference_generate(ref, BATCH)
    with load(tmp_path / "src", tmp_path, backend, "tight") as model:
        assert model.generate(torch.tensor(PROMPT), max_new_tokens=NEW_TOKENS).tolist() == want
        batched = model.generate(BATCH, max_new_tokens=NEW_TOKENS)
    assert [row[-NEW_TOKENS:] for row in batched] == [row[-NEW_TOKENS:] for row in want_batch]


def test_gpt_neox_checkpoints_causal_mask_buffers_are_left_out(checkpoints, tmp_path):
    """Pythia's checkpoints (before transformers 4.3x) carry each layer's causal mask and masked_bias as buffers,
    which no framework loads: the sharder leaves them out, and the torch backend names the head lm_head, where
    the checkpoint says embed_out."""
    from safetensors.torch import load_file, save_file

    from airmlx.manifest import Manifest
    folder, ref = checkpoints("gpt_neox")
    src = tmp_path / "src"
    src.mkdir()
    for f in folder.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    tensors = load_file(src / "model.safetensors")
    for layer in range(4):
        tensors[f"gpt_neox.layers.{layer}.attention.bias"] = torch.ones(1, 1, 256, 256, dtype=torch.bool).tril()
        tensors[f"gpt_neox.layers.{layer}.attention.masked_bias"] = torch.tensor(-1e9)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    with load(src, tmp_path, "torch", "tight") as model:
        assert model.generate(torch.tensor(PROMPT), max_new_tokens=NEW_TOKENS).tolist() == reference_generate(ref, PROMPT)
    stored = [t for stage in Manifest.load(tmp_path / "shards").stages for t in stage.tensors]
    assert "embed_out.weight" in stored and "gpt_neox.layers.0.attention.dense.bias" in stored
    assert not [t for t in stored if t.endswith(("attention.bias", "attention.masked_bias"))]


@pytest.mark.parametrize("arch, config, says", [
    ("gpt_neox", {"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0,
                                      "partial_rotary_factor": 0.25}}, "no rotary scaling"),
    ("gpt_neox", {"intermediate_size": 192}, "its MLP fixed at 4 x hidden_size"),
    ("gpt_neox", {"attention_bias": False}, "biases in every attention projection"),
    ("mellum", {"mlp_layer_types": ["dense", "sparse", "sparse"]}, "no dense MLP layers"),
    ("gpt_bigcode", {"multi_query": False}, "queries, keys and values in three blocks"),
    ("gpt2", {"n_inner": 96}, "its MLP fixed at 4 x hidden_size"),
    ("gptj", {"rope_parameters": {"rope_type": "default", "rope_theta": 50000.0}}, "rotary positions of base 10000"),
    ("gpt2", {"tie_word_embeddings": False}, "a head tied to the embedding"),
    ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "attention scores scaled by 1 / sqrt"),
    ("gptj", {"activation_function": "relu"}, "a GELU MLP only"),
    ("gpt_bigcode", {"scale_attn_weights": False}, "attention scores scaled by 1 / sqrt")])
def test_what_mlx_lms_module_cannot_run_is_refused_and_torch_runs_it(tmp_path, arch, config, says):
    """Regressions (QA): gpt_neox's rotary scaling ran unscaled on MLX without a word; the others blamed the
    checkpoint for what mlx-lm's module lacks."""
    from airmlx.errors import BackendError

    from tiny import make_checkpoint
    folder = tmp_path / "src"
    ref = make_checkpoint(folder, arch, **config)
    with pytest.raises(BackendError, match=f"mlx-lm's {arch} module has {says}.*use backend='torch'"):
        load(folder, tmp_path / "mlx", "mlx")
    with load(folder, tmp_path / "torch", "torch") as model:
        assert model.generate(torch.tensor(PROMPT), max_new_tokens=NEW_TOKENS).tolist() == reference_generate(ref, PROMPT)


@pytest.mark.parametrize("quantized", [False, True], ids=["plain", "4bit"])
def test_a_gpt_neox_folder_mlx_lm_wrote_is_taken_back_to_transformers_names(tmp_path, quantized):
    """Regression (QA): mlx-community's gpt_neox folders name the tensors as mlx-lm does (model.h.N,
    model.embed_out); the sharder refused them as tensors of no stage."""
    import json
    import shutil

    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load_model

    from tiny import make_checkpoint
    make_checkpoint(tmp_path / "hf", "gpt_neox")
    config = {**json.loads((tmp_path / "hf" / "config.json").read_text()), "rotary_emb_base": 10000.0,
              "rotary_pct": 0.25}
    ref, _ = load_model(tmp_path / "hf", model_config={"rotary_emb_base": 10000.0, "rotary_pct": 0.25})
    if quantized:
        nn.quantize(ref, 64, 4)
        config["quantization"] = {"group_size": 64, "bits": 4}
    folder = tmp_path / "mlx"
    folder.mkdir()
    weights = dict(tree_flatten(ref.parameters()))
    assert "model.h.0.attention.query_key_value.weight" in weights
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "mlx"})
    (folder / "config.json").write_text(json.dumps(config))
    for f in (tmp_path / "hf").glob("*token*"):
        shutil.copy(f, folder)
    want, _ = mlx_reference(ref, [PROMPT[0]])
    tokens = {}
    for backend in BACKENDS:
        with load(folder, tmp_path / backend, backend, None if quantized else "tight") as model:
            tokens[backend] = model.generate(PROMPT, max_new_tokens=NEW_TOKENS)
    assert tokens["mlx"] == want and tokens["torch"] == want


def gpt2_as_first_released(tmp_path):
    """A random GPT-2 saved as the original checkpoints are (tensors without "transformer.", each layer's causal
    mask as a buffer, n_ctx in config.json), which mlx-lm's loading reads; (transformers' model, the folder)."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from tiny import make_checkpoint
    ref = make_checkpoint(tmp_path / "hf", "gpt2")
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    first = {name.removeprefix("transformer."): w for name, w in weights.items()}
    assert "h.0.attn.c_attn.weight" in first and "lm_head.weight" not in first
    for i in range(ref.config.n_layer):
        first[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 256, 256))
    folder = tmp_path / "first"
    folder.mkdir()
    save_file(first, folder / "model.safetensors", metadata={"format": "pt"})
    for f in (tmp_path / "hf").glob("*.json"):
        shutil.copy(f, folder)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "n_ctx": config["n_positions"]}))
    return ref, folder


def test_gpt2_checkpoints_as_first_released_and_as_mlx_lm_writes_them(tmp_path):
    """GPT-2's original checkpoints name the tensors without "transformer." (wte.weight, h.0.*) and carry each
    layer's causal mask as a buffer; mlx-lm's folders name them model.* with the Conv1D weights transposed to (out,
    in). Each gives transformers' tokens on both backends."""
    import shutil

    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load_model
    ref, first = gpt2_as_first_released(tmp_path)
    want = reference_generate(ref, PROMPT)
    mlx_ref, _ = load_model(first)  # mlx-lm reads this layout (its sanitize transposes the Conv1Ds)
    assert mlx_reference(mlx_ref, PROMPT)[0] == want
    (tmp_path / "mlx").mkdir()
    mx.save_safetensors(str(tmp_path / "mlx" / "model.safetensors"), dict(tree_flatten(mlx_ref.parameters())),
                        metadata={"format": "mlx"})
    for f in first.glob("*.json"):
        shutil.copy(f, tmp_path / "mlx")
    for folder in (first, tmp_path / "mlx"):
        for backend in BACKENDS:
            with load(folder, tmp_path / f"{folder.name}-{backend}", backend, "tight") as model:
                assert model.generate(PROMPT, max_new_tokens=NEW_TOKENS) == want, (folder.name, backend)


def test_4bit_gpt2_is_mlx_lms_own_4bit_model_on_both_backends(tmp_path):
    """The sharder writes GPT-2's Conv1D weights (out, in) before it quantises them, in groups along their
    inputs, as mlx-lm does after its sanitize transposes them."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.utils import load_model

    import airmlx
    _, first = gpt2_as_first_released(tmp_path)
    mlx_ref, _ = load_model(first)
    nn.quantize(mlx_ref, 64, 4)
    seq = np.array(PROMPT)
    want = np.array(mlx_ref(mx.array(seq))[:, -1].astype(mx.float32))
    out = airmlx.shard_checkpoint(first, tmp_path / "q4", compression="4bit", progress=False)
    for backend in BACKENDS:
        with airmlx.AutoModel.from_pretrained(out, backend=backend, memory_budget="1GB") as model:
            got = model.step(seq, np.ones_like(seq), model.new_cache(1, [0]))
        assert np.abs(got - want).max() / np.abs(want).max() < 1e-5, backend


@pytest.mark.parametrize("backend", BACKENDS)
def test_positions_past_a_models_table_are_refused_in_one_line(tmp_path, backend):
    """Regression (QA): past n_positions, GPT-2's learned positions were read out of bounds (garbage on MLX, an
    IndexError in torch), as was GPT-J's rotary table in torch."""
    import airmlx
    from airmlx.errors import GenerationError

    from tiny import make_checkpoint
    for arch in ("gpt2", "gptj"):
        make_checkpoint(tmp_path / arch, arch, max_position_embeddings=16)
        with airmlx.AutoModel.from_pretrained(tmp_path / arch, backend=backend, progress=False,
                                              layer_shards_saving_path=tmp_path / f"{arch}-shards") as model:
            # as transformers: the last new token is never run, so 12 + 5 tokens use positions up to 15
            assert len(model.generate([list(range(3, 15))], max_new_tokens=5)[0]) == 17
            with pytest.raises(GenerationError, match="runs past the 16 positions .*lower max_new_tokens to 5 or less"):
                model.generate([list(range(3, 15))], max_new_tokens=6)
            with pytest.raises(GenerationError, match="input_ids has 17 positions, more than the model's context of 16"):
                model.logits([list(range(3, 20))])


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_gpt2_config_as_the_hub_has_it_runs_as_transformers_reads_it(tmp_path, backend):
    """Regressions (QA): openai-community/gpt2's config.json names no n_inner, tie_word_embeddings or dtype, and a
    checkpoint saved from a state dict carries lm_head.weight beside wte. transformers takes the MLP as 4 x hidden
    (airmlx's activation bound and torch's batch blocks were sized for none), ties the head (MLX refused the
    stray head) and computes in the stored dtype (MLX counted the KV cache as bfloat16)."""
    import json

    from safetensors.torch import load_file, save_file

    from tiny import make_checkpoint
    ref = make_checkpoint(tmp_path / "src", "gpt2")
    path = tmp_path / "src" / "config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in config.items() if k not in (
        "n_inner", "intermediate_size", "tie_word_embeddings", "dtype", "torch_dtype")}))
    weights = load_file(tmp_path / "src" / "model.safetensors")
    weights["lm_head.weight"] = weights["transformer.wte.weight"].clone()
    save_file(weights, tmp_path / "src" / "model.safetensors", metadata={"format": "pt"})
    with load(tmp_path / "src", tmp_path, backend, "tight") as model:
        assert model.config["intermediate_size"] == 4 * 64 and model.config["tie_word_embeddings"] is True
        assert model.config["dtype"] == "float32" and model.backend.itemsize == 4
        assert model.generate(PROMPT, max_new_tokens=NEW_TOKENS) == reference_generate(ref, PROMPT)


def test_a_config_with_both_namings_still_derives_the_mlp_and_kv_heads():
    """Review: a config.json carrying the standard names beside n_inner null and multi_query (re-saved by
    other tools) got no intermediate_size and a KV plan for every head."""
    from airmlx.hf_config import with_standard_names
    config = {"model_type": "gpt_bigcode", "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
              "max_position_embeddings": 32, "n_inner": None, "multi_query": True}
    filled = with_standard_names(config)
    assert filled["intermediate_size"] == 256 and filled["num_key_value_heads"] == 1
    plain = {k: v for k, v in config.items() if k not in ("n_inner", "multi_query")} | {"model_type": "llama"}
    assert with_standard_names(plain) is plain  # other families' configs are left as written
