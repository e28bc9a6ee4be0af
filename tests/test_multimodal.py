"""Image-text checkpoints (Gemma 3, Mistral Small 3.1, Qwen2-VL, Qwen2.5-VL, Qwen3-VL) run as their language
model: on text, streamed greedy output, last-step logits and a batch match transformers' own image-text model on
the same random weights."""
import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import airmlx
from airmlx.errors import AirmlxError
from airmlx.manifest import Manifest
from airmlx.multimodal import language_model_tensor

from tiny import (
    ARCH_CONFIGS,
    BACKENDS,
    BASE,
    BATCH,
    NEW_TOKENS,
    PROMPT,
    assert_last_logits_match,
    load,
    reference_generate,
    save_tokenizer,
)

MROPE = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 2, 2]}  # of head_dim 16's 8 frequencies
# kind: (config class, model class, the text model's registered type and its config type, vision config, extra)
# Gemma 3 and Qwen2(.5)-VL 3B tie their head to the embedding; Mistral Small 3.1 and Qwen3-VL have heads of their own
KINDS = {
    "gemma3": (transformers.Gemma3Config, transformers.Gemma3ForConditionalGeneration, "gemma3_text", "gemma3_text",
               dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                    patch_size=14), {"mm_tokens_per_image": 4}),
    "mistral3": (transformers.Mistral3Config, transformers.Mistral3ForConditionalGeneration, "mistral", "mistral",
                 dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                      patch_size=14, head_dim=8), {"tie_word_embeddings": False}),
    "qwen2_vl": (transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration, "qwen2", "qwen2_vl_text",
                 dict(depth=1, embed_dim=16, hidden_size=64, num_heads=2, patch_size=14), {}),
    "qwen2_5_vl": (transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration, "qwen2",
                   "qwen2_5_vl_text", dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=64,
                                           patch_size=14, window_size=28, fullatt_block_indexes=[0]), {}),
    "qwen3_vl": (transformers.Qwen3VLConfig, transformers.Qwen3VLForConditionalGeneration, "qwen3", "qwen3_vl_text",
                 dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=64, patch_size=14,
                      deepstack_visual_indexes=[0], num_position_embeddings=16), {"tie_word_embeddings": False}),
    # its experts fused: the sharder splits them into Qwen3-MoE's per-expert tensors
    "qwen3_vl_moe": (transformers.Qwen3VLMoeConfig, transformers.Qwen3VLMoeForConditionalGeneration, "qwen3_moe",
                     "qwen3_vl_moe_text", dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2,
                                               out_hidden_size=64, patch_size=14, deepstack_visual_indexes=[0],
                                               num_position_embeddings=16), {"tie_word_embeddings": False}),
}
TEXT = {kind: spec[2] for kind, spec in KINDS.items()}


def make_image_text_checkpoint(folder, kind):
    """A random image-text model of `kind` saved as transformers saves it (as released: Gemma 3 and Mistral 3 as
    language_model.model.*, vision_tower.*, multi_modal_projector.*; Qwen2.5-VL as model.*, visual.*; Qwen3-VL
    as model.language_model.*, model.visual.*); returns the model."""
    config_cls, model_cls, arch, text_type, vision, extra = KINDS[kind]
    text = {**BASE, **ARCH_CONFIGS[arch][1], "model_type": text_type}
    if kind == "qwen3_vl_moe":  # gate_up_proj (48, 64), not square: which way it is stored shows
        text["moe_intermediate_size"] = 24
    if kind.startswith("qwen"):  # multimodal rotary positions (Qwen3-VL's interleaved)
        text["rope_parameters"] = {**MROPE, **({"mrope_interleaved": True} if kind.startswith("qwen3") else {})}
    config = config_cls(text_config=text, vision_config=vision, **extra)
    torch.manual_seed(0)
    model = model_cls(config).eval()
    model.save_pretrained(folder)
    save_tokenizer(folder, BASE["vocab_size"])
    return model


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_an_image_text_checkpoint_runs_as_its_language_model(tmp_path, kind, backend):
    folder = tmp_path / "src"
    ref = make_image_text_checkpoint(folder, kind)
    names = load_file(folder / "model.safetensors")
    assert any(language_model_tensor(n) is None for n in names)  # the vision tower's
    want, want_batch = reference_generate(ref, PROMPT), reference_generate(ref, BATCH)
    with load(folder, tmp_path, backend, "tight") as model:
        assert model.config["model_type"] == TEXT[kind] and model.plan.streamed
        assert model.generate(torch.tensor(PROMPT), max_new_tokens=NEW_TOKENS).tolist() == want
        assert_last_logits_match(model, ref, want)
        batched = model.generate(BATCH, max_new_tokens=NEW_TOKENS)
    assert [row[-NEW_TOKENS:] for row in batched] == [row[-NEW_TOKENS:] for row in want_batch]
    stored = [t for stage in Manifest.load(tmp_path / "shards").stages for t in stage.tensors]
    assert stored and not [t for t in stored if "vision" in t or "visual" in t or "projector" in t
                           or "language_model" in t]


def test_transformers_in_memory_names_and_a_quantised_copy_work_too(tmp_path):
    """transformers 5 names the parts model.language_model.* and lm_head in memory; a checkpoint saved that way
    runs the same, and so does a 4-bit copy of either."""
    folder = tmp_path / "src"
    ref = make_image_text_checkpoint(folder, "mistral3")
    in_memory = [("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
                 ("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector.")]

    def rename(name):
        old, new = next((o, n) for o, n in in_memory if name.startswith(o))
        return new + name[len(old):]
    tensors = {rename(n): t for n, t in load_file(folder / "model.safetensors").items()}
    save_file(tensors, folder / "model.safetensors")
    assert "model.language_model.layers.0.mlp.up_proj.weight" in tensors and "lm_head.weight" in tensors
    want = reference_generate(ref, PROMPT)
    with load(folder, tmp_path, "torch", "tight") as model:
        assert model.generate(torch.tensor(PROMPT), max_new_tokens=NEW_TOKENS).tolist() == want
    out = airmlx.shard_checkpoint(folder, tmp_path / "q", compression="4bit", progress=False)
    with airmlx.AutoModel.from_pretrained(out, backend="mlx") as model:
        assert len(model.generate(PROMPT, max_new_tokens=4)[0]) == len(PROMPT[0]) + 4


@pytest.mark.parametrize("change, error", [({"model_type": "rwkv"}, "model_type 'rwkv' is not supported"),
                                           ({"model_type": "no-such-model"}, "transformers' mistral3 config cannot")])
def test_a_language_model_airmlx_cannot_run_is_one_line(tmp_path, change, error):
    folder = tmp_path / "src"
    make_image_text_checkpoint(folder, "mistral3")
    config = json.loads((folder / "config.json").read_text())
    config["text_config"].update(change)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(AirmlxError, match=error) as refused:
        airmlx.shard_checkpoint(folder, tmp_path / "s", progress=False)
    assert "\n" not in str(refused.value) and not (tmp_path / "s").exists()


def test_a_transformers_upgrade_does_not_rebuild_the_folder(tmp_path, monkeypatch, capsys):
    """Regression (QA): the fingerprint hashed the language model's config as transformers derives it (its
    version and defaults included), so upgrading transformers rebuilt every image-text shard folder."""
    import transformers.configuration_utils as configuration
    folder = tmp_path / "src"
    make_image_text_checkpoint(folder, "gemma3")
    out = airmlx.shard_checkpoint(folder, tmp_path / "s", progress=False)
    written = {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")}
    monkeypatch.setattr(configuration, "__version__", "9.99.0")
    assert airmlx.shard_checkpoint(folder, out, progress=False) == out
    assert "rebuilding" not in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")} == written


def test_an_image_text_config_that_unties_a_checkpoint_without_a_head_is_refused(tmp_path):
    """transformers would run a random head; a text-only checkpoint so made is refused, and so is this one."""
    folder = tmp_path / "src"
    make_image_text_checkpoint(folder, "gemma3")  # tied: no head of its own
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    with pytest.raises(AirmlxError, match="says tie_word_embeddings is false but the checkpoint has no lm_head"):
        airmlx.shard_checkpoint(folder, tmp_path / "s", progress=False)


def test_an_untied_class_default_over_a_checkpoint_without_a_head_is_refused(tmp_path):
    """Regression (QA): Qwen3-VL's config class unties by default; with no outer flag in config.json and no head
    in the checkpoint transformers runs a random head, and airmlx tied it silently. Now it is refused."""
    folder = tmp_path / "src"
    config_cls, model_cls, arch, text_type, vision, _ = KINDS["qwen3_vl"]
    text = {**BASE, **ARCH_CONFIGS[arch][1], "model_type": text_type, "rope_parameters": MROPE}
    model_cls(config_cls(text_config=text, vision_config=vision, tie_word_embeddings=True)).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config.pop("tie_word_embeddings")
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(AirmlxError, match="says tie_word_embeddings is false but the checkpoint has no lm_head"):
        airmlx.shard_checkpoint(folder, tmp_path / "s", progress=False)


def test_a_chat_template_only_the_processor_has_reaches_the_tokenizer(tmp_path):
    """Regression (QA): a repo whose chat template is only in the processor's chat_template.json (which
    tokenizers do not read) could not chat; the shard folder gets it as chat_template.jinja."""
    folder = tmp_path / "src"
    make_image_text_checkpoint(folder, "mistral3")
    template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    assert not json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template")
    with airmlx.AutoModel.from_pretrained(folder, backend="torch", layer_shards_saving_path=tmp_path / "s") as model:
        assert model.tokenizer.chat_template == template
        assert (tmp_path / "s" / "chat_template.jinja").read_text() == template


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_experts_stored_either_way_run_as_per_expert_ones(tmp_path, backend):
    """Qwen3-VL-MoE's checkpoints fuse a layer's experts: released (experts, in, out), as transformers 5 saves them
    (experts, out, in). The sharder splits both into Qwen3-MoE's per-expert tensors; the tokens are the same."""
    folder = tmp_path / "src"
    ref = make_image_text_checkpoint(folder, "qwen3_vl_moe")
    want = reference_generate(ref, PROMPT)
    tensors = load_file(folder / "model.safetensors")
    fused = [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert fused and all(tensors[n].shape[1] != tensors[n].shape[2] for n in fused)
    save_file({n: t.transpose(1, 2).contiguous() if n in fused else t for n, t in tensors.items()},
              folder / "model.safetensors", metadata={"format": "pt"})
    with load(folder, tmp_path, backend, "tight") as model:
        experts = [s for s in model.store.manifest.stages if s.kind == "experts"]
        assert experts and all(".mlp.experts.0.gate_proj.weight" in " ".join(s.tensors) for s in experts)
        assert model.generate(torch.tensor(PROMPT), max_new_tokens=NEW_TOKENS).tolist() == want


def test_a_fused_experts_tensor_that_fits_no_layout_is_refused(tmp_path):
    folder = tmp_path / "src"
    make_image_text_checkpoint(folder, "qwen3_vl_moe")
    tensors = load_file(folder / "model.safetensors")
    name = next(n for n in tensors if n.endswith("experts.down_proj"))
    tensors[name] = tensors[name][:, :-1, :].contiguous()  # (experts, hidden - 1, intermediate)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(AirmlxError, match="fused experts tensor.*does not match its config"):
        airmlx.AutoModel.from_pretrained(folder, layer_shards_saving_path=tmp_path / "shards", progress=False)


def test_a_quantised_image_text_configs_module_settings_follow_the_renamed_modules():
    """Regression (QA): mlx-lm keys a module's own quantisation by its path, with no trailing dot; the head's,
    "language_model.lm_head", kept that name (the renames matched "language_model.lm_head." only), so a head
    quantised apart from the rest (a mixed-precision quant) was loaded with the model-wide bits."""
    from airmlx.multimodal import rename_quantization
    head, layer = {"group_size": 64, "bits": 8}, {"group_size": 64, "bits": 6}
    got = rename_quantization({"group_size": 64, "bits": 4, "language_model.lm_head": head,
                               "language_model.model.layers.0.mlp.down_proj": layer,
                               "model.language_model.layers.1.mlp.down_proj": False,
                               "vision_tower": False, "vision_tower.blocks.0.attn": False})
    assert got == {"group_size": 64, "bits": 4, "lm_head": head, "model.layers.0.mlp.down_proj": layer,
                   "model.layers.1.mlp.down_proj": False}
