"""What the tests share: tiny random-weight checkpoints (built with transformers' and mlx-lm's own classes),
the reference comparisons, a Ctrl-C injected mid-sweep, and processes of selected cases started ahead."""
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import transformers

import airmlx
from airmlx.bench import save_tokenizer, word_tokenizer
from airmlx.store import ShardStore

ARCHS = ["llama", "mistral", "qwen2"]
BACKENDS = ["torch", "mlx"]

BASE = dict(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, initializer_range=0.15,
            pad_token_id=0, bos_token_id=1, eos_token_id=None)

ARCH_CONFIGS = {
    # Llama 3.1-style: llama3 rope scaling, untied head
    "llama": (transformers.LlamaConfig, dict(tie_word_embeddings=False, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "mistral": (transformers.MistralConfig, dict(tie_word_embeddings=False, sliding_window=None,
                                                 rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    # small Qwen2.5-style: qkv bias, tied embeddings
    "qwen2": (transformers.Qwen2Config, dict(tie_word_embeddings=True,
                                             rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "qwen3": (transformers.Qwen3Config, dict(head_dim=16, tie_word_embeddings=True)),  # q_norm / k_norm
    "phi3": (transformers.Phi3Config, dict(tie_word_embeddings=False)),  # fused qkv_proj, gate_up_proj
    "glm4": (transformers.Glm4Config, dict(head_dim=16, tie_word_embeddings=False, eos_token_id=None)),
    # no rotary positions in every fourth layer, tied embeddings
    "smollm3": (transformers.SmolLM3Config, dict(tie_word_embeddings=True)),
    # norms after attention and MLP, q / k norms over all heads
    "olmo2": (transformers.Olmo2Config, dict(tie_word_embeddings=False)),
    # OLMo 2 with three sliding-window layers in four: window 8, so the test prompts run past it
    "olmo3": (transformers.Olmo3Config, dict(tie_word_embeddings=False, sliding_window=8)),
    # LayerNorm, partial rotary, attention and MLP in parallel, a biased head, model.final_layernorm
    "phi": (transformers.PhiConfig, dict(tie_word_embeddings=False)),
    "ernie4_5": (transformers.Ernie4_5Config, dict(head_dim=16, tie_word_embeddings=True)),
    "helium": (transformers.HeliumConfig, dict(head_dim=16, tie_word_embeddings=False)),
    # q / k norms; NTK-alpha rope as Hunyuan's checkpoints carry it (MLX read no "type" from rope_parameters)
    "hunyuan_v1_dense": (transformers.HunYuanDenseV1Config, dict(head_dim=16, tie_word_embeddings=False, rope_parameters={
        "rope_type": "dynamic", "rope_theta": 10000.0, "alpha": 1000.0, "factor": 1.0})),
    "stablelm": (transformers.StableLmConfig, dict(tie_word_embeddings=False)),  # LayerNorm, partial rotary
    # LayerNorm1p (weight + 1), an ungated squared-ReLU MLP, partial rotary
    "nemotron": (transformers.NemotronConfig, dict(head_dim=16, tie_word_embeddings=False)),
    # qkv bias, residual dropout in its config (0.1), which must never run
    "seed_oss": (transformers.SeedOssConfig, dict(head_dim=16, tie_word_embeddings=False)),
    "starcoder2": (transformers.Starcoder2Config, dict(tie_word_embeddings=False)),  # LayerNorm, biases, GELU MLP
    # the sqrt(hidden) embedding scale, RMSNorm with weight + 1, tied head (smaller init as for gemma2)
    "gemma": (transformers.GemmaConfig, dict(head_dim=16, tie_word_embeddings=True, initializer_range=0.05)),
    # Granite 3's constants outside and inside the layers (granite-3.0-2b's values); untied, as with a tied head a
    # random Granite repeats the prompt's last token (the embedding multiplier's weight in the residual)
    "granite": (transformers.GraniteConfig, dict(tie_word_embeddings=False, embedding_multiplier=12.0,
                                                 logits_scaling=8.0, residual_multiplier=0.22,
                                                 attention_multiplier=0.015625)),
    # Command-R (+): LayerNorm, attention and MLP in parallel, interleaved rotary, q / k LayerNorms (Command R+),
    # logits times logit_scale
    "cohere": (transformers.CohereConfig, dict(tie_word_embeddings=True, logit_scale=0.25, use_qk_norm=True)),
    # Command R7B: three sliding-window layers (rotary) in four, one global (no rotary); window 8
    "cohere2": (transformers.Cohere2Config, dict(tie_word_embeddings=True, logit_scale=0.25, sliding_window=8,
                                                 layer_types=["sliding_attention"] * 3 + ["full_attention"])),
    # Apertus: xIELU activation, q / k norms, an ungated MLP, Llama 3.1's rope scaling
    "apertus": (transformers.ApertusConfig, dict(tie_word_embeddings=False)),
    # EXAONE 4.0 32B: three sliding-window layers (rotary) in four, one global (no rotary); window 8
    "exaone4": (transformers.Exaone4Config, dict(tie_word_embeddings=False, sliding_window=8,
                                                 layer_types=["sliding_attention"] * 3 + ["full_attention"])),
    # GLM-4 9B: interleaved rotary over half of each head, fused gate_up_proj
    "glm": (transformers.GlmConfig, dict(head_dim=16, tie_word_embeddings=False)),
    # Ministral 3: YaRN with Llama 4's attention temperature, which grows past original_max_position_embeddings
    # (8 here, so the test prompts reach it)
    "ministral3": (transformers.Ministral3Config, dict(head_dim=16, tie_word_embeddings=False, rope_parameters={
        "rope_type": "yarn", "rope_theta": 1e6, "factor": 16.0, "original_max_position_embeddings": 8,
        "llama_4_scaling_beta": 0.5, "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0})),
    # Pythia: LayerNorm, a quarter of each head rotary, attention and MLP in parallel, biases, exact GELU
    "gpt_neox": (transformers.GPTNeoXConfig, dict(intermediate_size=256, tie_word_embeddings=False,
                                                  layer_norm_eps=1e-5)),
    # GPT-2: learned positions, Conv1D linears (stored (in, out)), LayerNorm, the tanh GELU, tied head
    "gpt2": (transformers.GPT2Config, dict(n_inner=None, tie_word_embeddings=True)),
    # GPT-J: a quarter of each head rotary (interleaved), attention and MLP in parallel, the tanh GELU, a biased head
    "gptj": (transformers.GPTJConfig, dict(n_inner=None, rotary_dim=4, tie_word_embeddings=False)),
    # StarCoder: learned positions, multi-query attention, LayerNorm, biases, tanh GELU, tied head; n_inner null as in
    # SantaCoder's config (4 x hidden)
    "gpt_bigcode": (transformers.GPTBigCodeConfig, dict(n_inner=None, multi_query=True, tie_word_embeddings=True)),
    "mixtral": (transformers.MixtralConfig, dict(num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2,
                                                 intermediate_size=32, tie_word_embeddings=False)),
    # MiniMax-M2: sigmoid routing with a correction bias, q / k norms over all heads, half of each head rotated
    "minimax_m2": (transformers.MiniMaxM2Config, dict(num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2,
                                                      intermediate_size=32, head_dim=16, tie_word_embeddings=False,
                                                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                                       "partial_rotary_factor": 0.5})),
    # gpt-oss: attention sinks, a sliding-window layer and a full one, biased experts with gate and up alternating
    "gpt_oss": (transformers.GptOssConfig, dict(num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2,
                                                intermediate_size=32, head_dim=16, sliding_window=8,
                                                layer_types=["sliding_attention", "full_attention"],
                                                tie_word_embeddings=False,
                                                # YaRN as gpt-oss has it (truncate false), over this test's context
                                                rope_parameters={"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0,
                                                                 "beta_slow": 1.0, "truncate": False,
                                                                 "original_max_position_embeddings": 64,
                                                                 "rope_theta": 150000.0})),
    # Granite 3 MoE (granite-3.0-1b-a400m's multipliers): experts fused in the checkpoint, gate and up in one;
    # untied as granite
    "granitemoe": (transformers.GraniteMoeConfig, dict(num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2,
                                                       intermediate_size=24, tie_word_embeddings=False,
                                                       embedding_multiplier=12.0, logits_scaling=6.0,
                                                       residual_multiplier=0.22, attention_multiplier=0.015625)),
    # K-EXAONE: DeepSeek-V3's routing, a dense first layer, sliding-window layers with rotary, a global one without
    "exaone_moe": (transformers.ExaoneMoeConfig, dict(
        num_hidden_layers=3, first_k_dense_replace=1, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
        num_shared_experts=1, intermediate_size=64, sliding_window=8, head_dim=16, tie_word_embeddings=False,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"])),
    # poolside Laguna: a dense first layer, gated attention, a sliding-window layer and a full one, each with rotary
    # settings of its own (partial on the full one)
    "laguna": (transformers.LagunaConfig, dict(
        num_hidden_layers=2, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
        shared_expert_intermediate_size=16, intermediate_size=64, head_dim=16, sliding_window=8,
        tie_word_embeddings=False, layer_types=["sliding_attention", "full_attention"])),
    # dots.llm1: DeepSeek-V3's routing over grouped-query attention, a dense first layer
    "dots1": (transformers.Dots1Config, dict(
        num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
        moe_intermediate_size=16, intermediate_size=64, head_dim=16, tie_word_embeddings=False)),
    # sliding-window layers, each with rotary settings of its own (mlx-lm's module has no dense layers)
    "mellum": (transformers.MellumConfig, dict(
        num_hidden_layers=3, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, intermediate_size=64,
        head_dim=16, sliding_window=8, tie_word_embeddings=False,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"])),
    "qwen2_moe": (transformers.Qwen2MoeConfig, dict(num_hidden_layers=2, num_experts=4, num_experts_per_tok=2,
                                                    moe_intermediate_size=32, shared_expert_intermediate_size=64,
                                                    tie_word_embeddings=False)),
    "qwen3_moe": (transformers.Qwen3MoeConfig, dict(num_hidden_layers=2, num_experts=4, num_experts_per_tok=2,
                                                    moe_intermediate_size=32, head_dim=16, norm_topk_prob=True,
                                                    tie_word_embeddings=False)),
    # DeepSeek-V3: latent attention (q and kv low-rank, a decoupled rotary part), one dense layer first, then MoE
    # layers with a shared expert and grouped routing with its score-correction bias
    "deepseek_v3": (transformers.DeepseekV3Config, dict(
        num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
        moe_intermediate_size=16, n_group=2, topk_group=1, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=16, v_head_dim=16, num_key_value_heads=4, intermediate_size=64, tie_word_embeddings=False)),
    # DeepSeek-V2-Lite: latent attention without a low-rank q, softmax routing over all experts (greedy), YaRN
    # rope with its attention-scale correction (mlx-lm's module takes nothing else)
    "deepseek_v2": (transformers.DeepseekV2Config, dict(
        num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
        moe_intermediate_size=16, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16,
        v_head_dim=16, num_key_value_heads=4, intermediate_size=64, tie_word_embeddings=False, rope_parameters={
            "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
            "mscale": 0.707, "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1})),
    "olmoe": (transformers.OlmoeConfig, dict(num_hidden_layers=2, num_experts=4, num_experts_per_tok=2,
                                             intermediate_size=32, tie_word_embeddings=False)),
    # Phi-3.5-MoE: LayerNorm, biased attention and head, sparsemixer routing
    "phimoe": (transformers.PhimoeConfig, dict(num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2,
                                               intermediate_size=32, attention_bias=True, lm_head_bias=True,
                                               tie_word_embeddings=False)),
    # a dense first layer, shared experts
    "ernie4_5_moe": (transformers.Ernie4_5_MoeConfig, dict(
        num_hidden_layers=3, moe_num_experts=4, moe_k=2, moe_intermediate_size=32, moe_num_shared_experts=1,
        moe_layer_start_index=1, head_dim=16, intermediate_size=64, tie_word_embeddings=True)),
    # GLM-4.7-Flash: DeepSeek-V3's latent attention and routing
    "glm4_moe_lite": (transformers.Glm4MoeLiteConfig, dict(
        num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
        moe_intermediate_size=16, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16,
        v_head_dim=16, num_key_value_heads=4, intermediate_size=64, tie_word_embeddings=False)),
    # GLM-4.5: DeepSeek-V3's routing (one group here, as GLM-4.5 has) over grouped-query attention with partial
    # rotary, q / k norms and qkv bias
    "glm4_moe": (transformers.Glm4MoeConfig, dict(
        num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
        moe_intermediate_size=16, n_group=1, topk_group=1, head_dim=16, use_qk_norm=True, attention_bias=True,
        intermediate_size=64, tie_word_embeddings=False)),
    # sliding_window 8: the test prompts plus 16 new tokens run past it (and change the output);
    # smaller init: with the sqrt(hidden) embedding scale, 0.15 makes one token win every step
    "gemma2": (transformers.Gemma2Config, dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                                               initializer_range=0.05, final_logit_softcapping=30.0,
                                               attn_logit_softcapping=50.0, tie_word_embeddings=True)),
    "gemma3_text": (transformers.Gemma3TextConfig, dict(
        head_dim=16, query_pre_attn_scalar=16, sliding_window=8, tie_word_embeddings=True, initializer_range=0.05,
        layer_types=["sliding_attention", "full_attention"] * 2,
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})),
}


def word_tokenizer_with_special(token_id: int, content: str = "<|end|>", vocab_size=96):
    """The test models' word-level tokenizer ("w5 w17 ..."), with id `token_id` a special token `content` (as
    "<|im_end|>" is in Qwen's): decoded text leaves it out unless asked to keep special tokens."""
    tok = word_tokenizer(vocab_size, {token_id: content})
    tok.add_special_tokens({"additional_special_tokens": [content]})  # its own id: the word is in the vocabulary
    return tok


def sentencepiece_tokenizer(vocab_size=96):
    """A Llama 2 / Mistral style tokenizer (sentencepiece pieces, its decoder dropping the space that starts the
    text) over the test models' ids: <unk> <s> </s>, the bytes of "é" as <0xC3> <0xA9>, then "▁w5".."▁w{n-1}"
    (each a word after a space: "▁w7" decoded alone is "w7", after another token " w7")."""
    from transformers import LlamaTokenizer
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<0xC3>": 3, "<0xA9>": 4, **{f"▁w{i}": i for i in range(5, vocab_size)}}
    return LlamaTokenizer(vocab=vocab, merges=[])


def make_checkpoint(folder, arch="llama", dtype=torch.float32, seed=0, max_shard_size=None, **overrides):
    """Save a random model of `arch` to `folder`; return the transformers model (eval mode, fp32)."""
    config_cls, extra = ARCH_CONFIGS[arch]
    config = config_cls(**{**BASE, **extra, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # norms start at 1.0; perturb them so a misplaced norm weight shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            elif p.numel() and not p.any() and not name.endswith("e_score_correction_bias"):
                # biases start at zero (transformers' init): a backend that dropped or misplaced one would pass
                p.add_(torch.randn_like(p) * 0.05)
        # routing biases start at zero: DeepSeek-V3's (a buffer), ERNIE 4.5's (a parameter)
        for name, b in [*model.named_buffers(), *model.named_parameters()]:
            if name.endswith("e_score_correction_bias"):
                # positive: mlx-lm masks the groups not chosen with 0 where transformers uses -inf, which
                # differ only when an expert's score plus its bias is below 0
                b.add_(torch.rand_like(b) * 0.5)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.to(dtype).save_pretrained(folder, **kwargs)
    save_tokenizer(folder, config.vocab_size)
    return model.float()



# Families whose checkpoints ship their own modelling code: mlx-lm's module is the reference.
MLX_BASE = dict(hidden_size=64, num_hidden_layers=4, intermediate_size=160, num_attention_heads=4,
                num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=96, max_position_embeddings=256,
                rope_theta=10000.0, tie_word_embeddings=False)
MLX_CONFIGS = {
    "internlm2": dict(MLX_BASE, model_type="internlm2", bias=False),
    # head_dim as real internlm3 configs carry it (transformers' default is 128; mlx-lm derives it)
    "internlm3": dict(MLX_BASE, model_type="internlm3", bias=False, qkv_bias=False, head_dim=16),
    "qwen": dict(model_type="qwen", hidden_size=64, num_attention_heads=4, num_hidden_layers=4, kv_channels=16,
                 max_position_embeddings=256, layer_norm_epsilon=1e-6, intermediate_size=320, no_bias=True,
                 vocab_size=96),
    # sliding_window 8: the test prompts plus 16 new tokens run past it; the sliding layers have more kv heads
    "baichuan_m1": dict(MLX_BASE, model_type="baichuan_m1", sliding_window=8, sliding_window_layers=[0, 2],
                        conv_window=2, num_swa_attention_heads=4, num_swa_key_value_heads=4),
}


def make_mlx_checkpoint(folder, arch, seed=0, **overrides):
    """Save a random mlx-lm model of `arch` the way its family ships (config.json, model.safetensors with the
    family's tensor names, a tokenizer); return the mlx-lm model, resident, as the reference."""
    import importlib
    import json
    from pathlib import Path

    import mlx.core as mx
    from mlx.utils import tree_flatten

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {**MLX_CONFIGS[arch], **overrides}
    module = importlib.import_module(f"mlx_lm.models.{arch}")
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs.from_dict(config))
    weights = dict(tree_flatten(model.parameters()))
    for name, w in weights.items():
        if w.ndim == 2:  # mlx-lm's default init makes these tiny models repeat one token; larger weights don't
            weights[name] = 2.0 * w
        elif "norm" in name or "ln" in name:  # norms start at 1.0; perturb them so a misplaced one shows
            weights[name] = w + 0.1 * mx.random.normal(w.shape)
        elif "conv" in name:  # baichuan_m1's key/value convolution starts at zero: it would hide a wrong state
            weights[name] = mx.random.uniform(-1.0, 1.0, w.shape)
    # the reference loads them as mlx-lm does, through sanitize (baichuan_m1 normalises lm_head there)
    loaded = model.sanitize(dict(weights)) if hasattr(model, "sanitize") else weights
    model.load_weights(list(loaded.items()))
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "mlx"})
    (folder / "config.json").write_text(json.dumps(config))
    save_tokenizer(folder, config["vocab_size"])
    return model


PROMPT = [[5, 17, 33, 2, 9, 60, 7, 41, 12]]
BATCH = [[5, 17, 33, 2, 9, 60, 7, 41, 12], [8, 90, 10, 4]]
NEW_TOKENS = 16


def mlx_lm_readable(folder, dst, arch):
    """A copy of the HF checkpoint `folder` in `dst` that mlx_lm.convert and mlx_lm.load read: its config.json
    with the keys mlx-lm's ModelArgs name, where transformers 5 writes some under other names or none (the
    hub's config.json files carry them), as the MLX backend gives them."""
    import dataclasses
    import importlib
    import json
    from pathlib import Path

    from airmlx.backends.mlx_archs import MLX_ARCHS, mlx_args
    dst = Path(dst)
    dst.mkdir(parents=True)
    config = json.loads((Path(folder) / "config.json").read_text())
    args = dataclasses.asdict(mlx_args(config, importlib.import_module(f"mlx_lm.models.{MLX_ARCHS[arch].module}")))
    for f in Path(folder).iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    rope = {k: args[k] for k in ("rope_theta", "rope_scaling") if k in args}
    (dst / "config.json").write_text(json.dumps({**config, **{k: v for k, v in args.items() if config.get(k) is None},
                                                 **rope}))
    return dst


def mlx_lm_greedy(folder, rows=PROMPT, n=NEW_TOKENS):
    """Greedy tokens of the mlx-lm checkpoint in `folder`, held resident, with mlx-lm's own cache."""
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache
    model, _ = load(str(folder))
    cache, ids, out = make_prompt_cache(model), mx.array(rows), list(rows[0])
    for _ in range(n):
        out.append(int(mx.argmax(model(ids, cache=cache)[:, -1], axis=-1).item()))
        ids = mx.array([[out[-1]]])
    return out


def stage_size(folder):
    return max(s.nbytes for s in ShardStore(folder).manifest.stages)


def load(folder, tmp_path, backend, budget=None):
    shards = tmp_path / "shards"
    airmlx.shard_checkpoint(folder, shards, progress=False)
    if budget == "tight":  # one prefetch slot and room for half a layer more: every layer streams
        budget = int(2.5 * stage_size(shards))
    return airmlx.AutoModel.from_pretrained(shards, backend=backend, memory_budget=budget)


def minimum_budget(shards, backend):
    """The smallest budget the model runs under on this backend (what loading its stages takes there)."""
    with airmlx.AutoModel.from_pretrained(shards, backend=backend, memory_budget="1GB") as probe:
        return probe.minimum_budget


def assert_last_logits_match(model, ref, seq):
    """One prefill over the whole sequence: our last-position logits against transformers' (1e-4 relative)."""
    seq = np.array(seq)
    ours = model.step(seq, np.ones_like(seq), model.new_cache(1, [0]))
    with torch.no_grad():
        theirs = ref(torch.tensor(seq)).logits[:, -1].numpy()
    assert np.abs(ours - theirs).max() / np.abs(theirs).max() < 1e-4


def reference_generate(ref, rows):
    width = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    out = ref.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                       pad_token_id=0, eos_token_id=None)
    return out.tolist()


def interrupt_at(backend, nth):
    """Make the backend's nth run_stage call raise KeyboardInterrupt (a Ctrl-C mid-sweep); returns a
    function that restores it."""
    real, calls = backend.run_stage, []

    def run_stage(stage, x, ctx):
        calls.append(1)
        if len(calls) == nth:
            raise KeyboardInterrupt
        return real(stage, x, ctx)

    backend.run_stage = run_stage
    return lambda: setattr(backend, "run_stage", real)


SPECIALS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (  # the demo model's template
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] | trim + eos_token + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
CORPUS = ["What is a list? A list is a mutable sequence of items.", "The dict maps keys to values.",
          "def f(x): return x + 1", "for item in items: print(item)"] * 4


def make_chat_checkpoint(folder, arch="llama", **overrides):
    """A tiny random model (a Llama unless told) plus a byte-level BPE tokenizer with the demo model's chat
    template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|bos|>", eos_token="<|eos|>",
                                  pad_token="<|pad|>", additional_special_tokens=SPECIALS[3:])
    tok.chat_template = CHAT_TEMPLATE
    make_checkpoint(folder, arch, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                    bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **overrides)
    tok.save_pretrained(folder)
    return folder


AT_ONCE = 2  # processes of test cases run at once: most of each is importing the frameworks, on one core


def selected_params(request, test_file: str, tests: tuple) -> list:
    """The parameters (callspec.params) of this run's selected cases of `tests` (function names) in `test_file`."""
    here = Path(test_file)
    return [item.callspec.params for item in request.session.items
            if item.path == here and getattr(item, "originalname", None) in tests]


def selected_tests(request, test_file: str) -> set:
    """The function names of this run's selected tests in `test_file`."""
    here = Path(test_file)
    return {getattr(item, "originalname", item.name) for item in request.session.items if item.path == here}


@contextmanager
def started_ahead(keys, run):
    """{key: a future of run(*key)} for each key, AT_ONCE running at a time (run starts a process of its own, so
    what one holds is not another's: they share only time); those not started are cancelled on leaving. Work that
    must run on the main thread (seeded checkpoints) is done before."""
    with ThreadPoolExecutor(AT_ONCE) as pool:
        futures = {key: pool.submit(run, *key) for key in dict.fromkeys(keys)}
        try:
            yield futures
        finally:
            for future in futures.values():
                future.cancel()
