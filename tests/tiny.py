"""Tiny random-weight checkpoints, built with transformers' own classes and save_pretrained."""
import torch
import transformers

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
}


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
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.to(dtype).save_pretrained(folder, **kwargs)
    save_tokenizer(folder, config.vocab_size)
    return model.float()


def save_tokenizer(folder, vocab_size):
    """A word-level tokenizer over tokens "w0".."w{n-1}" (w0 = pad, w1 = bos), enough for tools that want one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {f"w{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w2"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="w0", bos_token="w1",
                                         unk_token="w2").save_pretrained(folder)
