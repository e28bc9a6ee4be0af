"""Tiny GGUF files for the tests, written with the gguf package from tiny random transformers models.

The metadata keys come from transformers' own GGUF table (inverted), the tensor names from gguf's name table;
the two layout changes llama.cpp's converter makes (the Q/K row permutation of llama, Gemma's norm + 1) are
applied here, so transformers' reader undoes them.
"""
import gguf
import numpy as np
import torch
from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

from tiny import ARCH_CONFIGS, BASE

T = gguf.GGMLQuantizationType
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3",
             "gemma2": "gemma2", "gemma3_text": "gemma3", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe",
             "stablelm": "stablelm", "starcoder2": "starcoder2", "nemotron": "nemotron"}
# the name transformers' metadata table uses for each (mistral: a llama GGUF whose general.name says mistral)
TABLE = {"mistral": "mistral", "gemma3_text": "gemma3", "qwen2_moe": "qwen2_moe", "qwen3_moe": "qwen3_moe"}
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# a byte-level vocabulary: three special tokens, then printable characters ("Ġ" is the space)
VOCAB = ["<|pad|>", "<|im_start|>", "<|im_end|>", "Ġ", "Ċ"] + [chr(c) for c in range(33, 124)]

# every exact block type and a float type somewhere in each model
MIXED = {"attn_q": T.Q4_0, "attn_k": T.Q4_1, "attn_v": T.Q8_0, "attn_output": T.Q5_0, "attn_qkv": T.Q4_1,
         "ffn_gate": T.Q5_1, "ffn_up": T.Q8_0, "ffn_down": T.Q4_1, "token_embd": T.Q8_0, "output": T.F16,
         "ffn_gate_exps": T.Q4_0, "ffn_up_exps": T.Q4_0, "ffn_down_exps": T.Q4_0, "ffn_gate_inp": T.F32,
         "ffn_gate_shexp": T.Q8_0, "ffn_up_shexp": T.Q8_0, "ffn_down_shexp": T.Q8_0}


# sizes transformers' GGUF reader cannot take from the metadata, so the model must have its defaults
GGUF_DEFAULTS = {"qwen3": dict(head_dim=128), "qwen3_moe": dict(head_dim=128, moe_intermediate_size=768),
                 "qwen2_moe": dict(moe_intermediate_size=1408, shared_expert_intermediate_size=5632)}


def make_model(arch, seed=0, **overrides):
    config_cls, extra = ARCH_CONFIGS[arch]
    overrides = {**GGUF_DEFAULTS.get(arch, {}), **overrides}
    config = config_cls(**{**BASE, **extra, "vocab_size": len(VOCAB), "eos_token_id": 2, **overrides})
    torch.manual_seed(seed)
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # norms start at 1.0; perturb them so a misplaced norm weight shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def config_value(config, key):
    if key == "rope_theta":
        params = config.rope_parameters
        return params.get("full_attention", params)["rope_theta"]
    return getattr(config, key, None)


def permute_for_llama_cpp(w, n_head):
    """llama.cpp stores llama's Q and K rows interleaved per head (its rotary layout)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def encode(w, qtype):
    """float32 -> what GGUFWriter.add_tensor takes for qtype."""
    if qtype == T.F32:
        return np.ascontiguousarray(w, dtype=np.float32)
    if qtype == T.F16:
        return w.astype(np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(w, dtype=np.float32), qtype)


def q6_k_blocks(rows, cols, seed=0):
    """Random Q6_K data (gguf cannot quantise to K-quants): random codes and sub-scales, small block scales."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (rows, cols // 256, 210), dtype=np.uint8)
    blocks[..., 208:210] = np.full((rows, cols // 256, 1), 2e-3, np.float16).view(np.uint8)
    return blocks.reshape(rows, -1)


def gguf_tensors(model, types):
    """(gguf name, array, qtype) for every tensor of a transformers model, as llama.cpp's converter lays them out."""
    config = model.config
    arch = GGUF_ARCH[config.model_type]
    enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    table = gguf.get_tensor_name_map(enum, config.num_hidden_layers)
    out = []
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        w = t.float().numpy()
        base, _, suffix = name.rpartition(".")
        if base.endswith("mlp.experts") or name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            layer = name.split(".")[2]
            if name.endswith("gate_up_proj"):
                gate, up = np.split(w, 2, axis=1)
                out += [(f"blk.{layer}.ffn_gate_exps.weight", gate), (f"blk.{layer}.ffn_up_exps.weight", up)]
            else:
                out.append((f"blk.{layer}.ffn_down_exps.weight", w))
            continue
        gguf_name = table.get_name(base) + "." + suffix
        if arch == "llama" and ".attn_q." in gguf_name:
            w = permute_for_llama_cpp(w, config.num_attention_heads)
        if arch == "llama" and ".attn_k." in gguf_name:
            w = permute_for_llama_cpp(w, config.num_key_value_heads)
        if arch.startswith("gemma") and "norm.weight" in gguf_name:
            w = w + 1
        if "ffn_gate_inp_shexp" in gguf_name:
            w = w.reshape(-1)
        out.append((gguf_name, w))
    return [(n, w, types(n, w)) for n, w in out]


def default_types(name, w):
    kind = name.split(".")[-2] if name.startswith("blk.") else name.split(".")[0]
    qtype = MIXED.get(kind, T.F32) if w.ndim >= 2 else T.F32
    return qtype if qtype in (T.F32, T.F16) or w.shape[-1] % 32 == 0 else T.F16


def write_gguf(path, model, types=default_types, name="tiny", overrides=None):
    """Write `model` as a GGUF file at `path`. types(gguf name, float32 array) -> GGMLQuantizationType;
    overrides: {gguf name: (raw uint8 blocks, qtype)} replaces a tensor's data (e.g. a K-quant)."""
    config = model.config
    arch = GGUF_ARCH[config.model_type]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("mistral-" + name if config.model_type == "mistral" else name)
    for key, hf_key in GGUF_CONFIG_MAPPING[TABLE.get(config.model_type, arch)].items():
        value = config_value(config, hf_key) if isinstance(hf_key, str) else None
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, int):
            writer.add_uint32(f"{arch}.{key}", value)
        elif isinstance(value, float):
            writer.add_float32(f"{arch}.{key}", value)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(VOCAB)
    writer.add_token_types([3, 3, 3] + [1] * (len(VOCAB) - 3))
    writer.add_token_scores([0.0] * len(VOCAB))  # no merges: transformers then orders merges by score
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    writer.add_chat_template(CHAT_TEMPLATE)
    for gguf_name, w, qtype in gguf_tensors(model, types):
        if overrides and gguf_name in overrides:
            raw, qtype = overrides[gguf_name]
            writer.add_tensor(gguf_name, raw, raw_dtype=qtype)
        elif qtype in (T.F32, T.F16):
            writer.add_tensor(gguf_name, encode(w, qtype))
        else:
            writer.add_tensor(gguf_name, encode(w, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
