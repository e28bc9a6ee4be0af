"""Train the tiny Llama-architecture demo model that ships inside airmlx.

The corpus is text that ships with CPython itself (``pydoc_data.topics``), so
the whole thing is reproducible offline:

    python scripts/train_demo_model.py --out airmlx/demo_model --minutes 25 --seed 0

Steps: build corpus -> train byte-level BPE -> train LlamaForCausalLM on one CPU
thread under a wall-clock budget -> held-out perplexity -> save + model card.
"""
import os

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # tokenizers' trainer: one core
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import json
import math
import platform
import pydoc_data.topics
import time

import torch
import torch.nn.functional as F
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from airmlx.corpus import HELD_OUT_EVERY, normalise

SPECIALS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] | trim + eos_token + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--out", default="airmlx/demo_model")
p.add_argument("--minutes", type=float, default=25.0, help="hard wall-clock budget for training")
p.add_argument("--seed", type=int, default=0)
p.add_argument("--steps", type=int, default=None, help="fix the step count (default: fit to budget)")
p.add_argument("--vocab", type=int, default=2048)
p.add_argument("--hidden", type=int, default=192)
p.add_argument("--layers", type=int, default=6)
p.add_argument("--batch", type=int, default=8)
p.add_argument("--seq", type=int, default=256)
p.add_argument("--lr", type=float, default=2e-3)
p.add_argument("--dropout", type=float, default=0.2, help="embedding/residual dropout, training only")
p.add_argument("--eval-every", type=int, default=100)
p.add_argument("--init-from", default=None,
               help="start from a trained model of the same width (e.g. airmlx/demo_model): its embedding, norm "
                    "and head, and its layers spread over --layers (each repeated), as depth up-scaling does")
args = p.parse_args()

t_start = time.time()
torch.manual_seed(args.seed)
torch.set_num_threads(1)
os.makedirs(args.out, exist_ok=True)
log_lines = []


def log(msg):
    line = f"[{time.time() - t_start:7.1f}s] {msg}"
    print(line, flush=True)
    log_lines.append(line)


# 1. Corpus: Python's own reference documentation, sorted by topic for determinism; the split is
# airmlx.demo's, so the held-out perplexity airmlx measures later is on the same text.
keys = sorted(pydoc_data.topics.topics)
docs = {k: normalise(pydoc_data.topics.topics[k]) for k in keys}
val_keys = keys[::HELD_OUT_EVERY]
train_keys = [k for k in keys if k not in val_keys]
# Tiny chat-format examples (training topics only) so the chat template is not alien to the model.
chats = []
for k in train_keys:
    title, _, body = docs[k].partition("\n")
    first_para = body.strip("*= \n").split("\n\n")[0].strip()
    chats.append([{"role": "user", "content": f"What is {title.strip()}?"},
                  {"role": "assistant", "content": first_para}])
n_chars = lambda ks: sum(len(docs[k]) for k in ks)
log(f"corpus: {len(keys)} topics, train {len(train_keys)} ({n_chars(train_keys)} chars), "
    f"val {len(val_keys)} ({n_chars(val_keys)} chars): {val_keys}")

# 2. Tokenizer: byte-level BPE trained on the training split only.
bpe = Tokenizer(models.BPE())
bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
bpe.decoder = decoders.ByteLevel()
bpe.train_from_iterator(
    [docs[k] for k in train_keys],
    trainers.BpeTrainer(vocab_size=args.vocab, special_tokens=SPECIALS, show_progress=False,
                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
)
bpe.post_processor = processors.TemplateProcessing(  # tokenizer(text) prepends <|bos|>, like Llama
    single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B", special_tokens=[("<|bos|>", SPECIALS.index("<|bos|>"))])
tokenizer = PreTrainedTokenizerFast(
    tokenizer_object=bpe, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>",
    additional_special_tokens=SPECIALS[3:], model_max_length=512, clean_up_tokenization_spaces=False,
    padding_side="left",  # decoder-only: pad on the left for batched generation
)
tokenizer.chat_template = CHAT_TEMPLATE
bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
encode = lambda text: bpe.encode(text, add_special_tokens=False).ids
assert tokenizer("def ")["input_ids"] == [bos] + encode("def ")
chat_ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                         tokenize=True, return_dict=True)["input_ids"]
assert tokenizer.decode(chat_ids) == "<|bos|><|user|>\nhi<|eos|>\n<|assistant|>\n", tokenizer.decode(chat_ids)


stream = lambda texts: torch.tensor([i for t in texts for i in [bos] + encode(t) + [eos]], dtype=torch.long)
train_ids = torch.cat([stream([docs[k] for k in train_keys])] + [
    torch.tensor(encode(tokenizer.apply_chat_template(c, tokenize=False))) for c in chats])
val_ids = stream([docs[k] for k in val_keys])
log(f"tokenizer: vocab {len(tokenizer)}, train {len(train_ids)} tokens, val {len(val_ids)} tokens")

# 3. Model: a small Llama with grouped-query attention, float32.
config = LlamaConfig(
    vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=int(args.hidden * 8 / 3),
    num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-5, initializer_range=0.02,
    tie_word_embeddings=False, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, dtype="float32",
)
model = LlamaForCausalLM(config)
if args.init_from:  # a deeper sibling: layer i starts as the source's layer i * source layers // layers
    source = LlamaForCausalLM.from_pretrained(args.init_from, dtype=torch.float32)
    assert source.config.hidden_size == args.hidden and source.config.vocab_size == len(tokenizer), \
        "--init-from needs a model of the same width and vocabulary"
    own = model.state_dict()
    for name, tensor in source.state_dict().items():
        if ".layers." not in name:
            own[name].copy_(tensor)
    src_layers = source.config.num_hidden_layers
    for i, layer in enumerate(model.model.layers):
        layer.load_state_dict(source.model.layers[i * src_layers // args.layers].state_dict())
    log(f"initialised from {args.init_from} ({src_layers} layers spread over {args.layers})")
n_params = sum(p.numel() for p in model.parameters())
log(f"model: {config.num_hidden_layers} layers, hidden {config.hidden_size}, ffn {config.intermediate_size}, "
    f"heads {config.num_attention_heads}/{config.num_key_value_heads} kv, {n_params:,} params")


# Embedding + residual-branch dropout (training only) via hooks, so the saved model stays a plain Llama.
# The corpus is tiny (~130k tokens, seen ~25 times), so this regularisation matters a lot.
def drop_hook(module, inputs, output):
    if isinstance(output, tuple):
        return (F.dropout(output[0], args.dropout, module.training),) + output[1:]
    return F.dropout(output, args.dropout, module.training)


for m in [model.model.embed_tokens] + [m for layer in model.model.layers for m in (layer.self_attn, layer.mlp)]:
    m.register_forward_hook(drop_hook)


@torch.no_grad()
def val_loss():
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(val_ids) - 1, args.seq):
        chunk = val_ids[i:i + args.seq + 1].unsqueeze(0)
        logits = model(input_ids=chunk[:, :-1]).logits
        total += F.cross_entropy(logits[0], chunk[0, 1:], reduction="sum").item()
        count += chunk.shape[1] - 1
    model.train()
    return total / count


# 4. Training: AdamW, linear warm-up then cosine decay to 10%, random windows of the train stream.
decay = [p for p in model.parameters() if p.dim() >= 2]  # matrices; norms get no weight decay
no_decay = [p for p in model.parameters() if p.dim() < 2]
opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                        lr=args.lr, betas=(0.9, 0.95))
budget, warmup = args.minutes * 60, 100
total_steps = args.steps or 10**9  # fitted to the budget after the timed warm-up unless --steps is given
gen = torch.Generator().manual_seed(args.seed)
t_train, tokens_seen, step, best = time.time(), 0, 0, (float("inf"), None, 0)
model.train()
while step < total_steps:
    if time.time() - t_train > budget:
        log(f"wall-clock budget of {args.minutes} min reached at step {step}; stopping")
        break
    if step == warmup and args.steps is None:  # lr does not depend on total_steps during warm-up
        per_step = (time.time() - t_train) / step
        total_steps = int(step + 0.97 * (budget - (time.time() - t_train)) / (per_step * 1.02))
        log(f"{per_step:.2f}s/step -> schedule fitted to {total_steps} steps")
    lr_scale = min(1.0, (step + 1) / warmup)
    if step >= warmup and total_steps < 10**9:
        lr_scale = 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total_steps - warmup))))
    for g in opt.param_groups:
        g["lr"] = args.lr * lr_scale
    starts = torch.randint(0, len(train_ids) - args.seq - 1, (args.batch,), generator=gen)
    batch = torch.stack([train_ids[s:s + args.seq + 1] for s in starts])
    logits = model(input_ids=batch[:, :-1]).logits
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    step += 1
    tokens_seen += batch[:, 1:].numel()
    if step % 25 == 0:
        log(f"step {step}/{total_steps if total_steps < 10**9 else '?'} loss {loss.item():.3f} "
            f"lr {args.lr * lr_scale:.2e} {tokens_seen / (time.time() - t_train):.0f} tok/s")
    if step % args.eval_every == 0:
        vl = val_loss()
        log(f"step {step} val loss {vl:.3f} ppl {math.exp(vl):.1f}")
        if vl < best[0]:
            best = (vl, {k: v.clone() for k, v in model.state_dict().items()}, step)
train_seconds = time.time() - t_train  # (the dropout hooks are inert from here on: model.eval())

# 5. Evaluation, samples, saving.
final = val_loss()
if best[1] is not None and best[0] < final:
    log(f"final val loss {final:.3f} worse than step {best[2]} ({best[0]:.3f}); restoring that checkpoint")
    model.load_state_dict(best[1])
    final = best[0]
ppl = math.exp(final)
log(f"held-out perplexity {ppl:.2f} (uniform baseline {len(tokenizer)}), {step} steps, "
    f"{tokens_seen:,} tokens, {train_seconds / 60:.1f} min")

model.eval()
model.generation_config = GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=pad,
                                           max_new_tokens=64, do_sample=False)
samples = {}
for prompt in ["The", "A function", "   def f("]:  # no trailing space: BPE words carry their leading space
    enc = tokenizer(prompt, return_tensors="pt")  # starts with <|bos|>
    out_ids = model.generate(**enc, max_new_tokens=48, do_sample=False)
    samples[prompt] = tokenizer.decode(out_ids[0, 1:], skip_special_tokens=True)
    log(f"sample {prompt!r}: {samples[prompt]!r}")

model.save_pretrained(args.out, safe_serialization=True)
tokenizer.save_pretrained(args.out, save_jinja_files=False)  # chat template inside tokenizer_config.json
cfg_path = os.path.join(args.out, "tokenizer_config.json")  # make it loadable by transformers 4.x and 5.x
tok_cfg = json.load(open(cfg_path))
tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
tok_cfg["additional_special_tokens"] = tok_cfg.pop("extra_special_tokens", SPECIALS[3:])
json.dump(tok_cfg, open(cfg_path, "w"), indent=2)
special = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIALS}
cmd = (f"python scripts/train_demo_model.py --out {args.out} --minutes {args.minutes:g} --seed {args.seed}"
       + (f" --steps {args.steps}" if args.steps else "")
       + "".join(f" --{k.replace('_', '-')} {getattr(args, k)}" for k in ("hidden", "layers", "lr", "init_from")
                 if getattr(args, k) != p.get_default(k)))
card = f"""# airmlx demo model

A tiny Llama-architecture language model trained from scratch, on one CPU thread, on Python's own
reference documentation. It ships inside `airmlx` so the library works offline with no model
download. It is a toy: it writes Python-documentation-flavoured text, not useful answers.

**Architecture.** `LlamaForCausalLM`, float32, {n_params:,} parameters: {config.num_hidden_layers} layers, hidden
{config.hidden_size}, SwiGLU intermediate {config.intermediate_size}, {config.num_attention_heads} attention heads / {config.num_key_value_heads} key-value heads (GQA),
RoPE (theta {config.rope_parameters['rope_theta']:g}), {config.max_position_embeddings} max positions, vocab {config.vocab_size}, untied input/output embeddings.

**Tokenizer.** Byte-level BPE (`tokenizers`, ByteLevel pre-tokenizer/decoder, no prefix space) trained
on the training split; `tokenizer(text)` prepends `<|bos|>`. Special tokens:
{", ".join(f"`{t}`={i}" for t, i in special.items())}. The chat template renders `<|bos|>`, then
`<|role|>\\ncontent<|eos|>\\n` per message, then `<|assistant|>\\n` if `add_generation_prompt=True`.

**Data.** `pydoc_data.topics.topics` from the Python {platform.python_version()} standard library ({len(keys)} topics sorted
by key, trailing whitespace stripped), plus one "What is <title>?" chat example per training topic.
Every 20th topic is held out ({", ".join(val_keys)}). Train {len(train_ids):,} tokens, validation {len(val_ids):,}.

**Training.** {f"Initialised from `{args.init_from}` (its layers spread over {args.layers}, each repeated). " if args.init_from else ""}AdamW (lr {args.lr:g}, betas 0.9/0.95, weight decay 0.1), {warmup} warm-up steps then cosine
decay to 10%, batch {args.batch} x {args.seq} tokens, embedding/residual dropout {args.dropout:g}, gradient clip 1.0,
seed {args.seed}, torch {torch.__version__}, transformers {transformers.__version__}: {step} steps, {tokens_seen:,} tokens,
{train_seconds / 60:.1f} min (budget {args.minutes:g} min). The checkpoint with the lowest validation loss (checked
every {args.eval_every} steps and at the end) is kept.

**Evaluation.** Held-out token-level perplexity **{ppl:.2f}** (uniform baseline {config.vocab_size}).
Greedy sample for the prompt `"The"`:

```
{samples["The"]}
```

**Reproduce** (add `--steps {step}` to replay this exact schedule; otherwise the step count is fitted to
the budget from the speed of the warm-up steps, so it depends on the machine and its load):

    {cmd}

**Licence.** The training text is Python's own documentation, (c) Python Software Foundation, under
the PSF License Agreement; the weights are derived from it and are distributed on the same terms.
"""
with open(os.path.join(args.out, "README.md"), "w") as f:
    f.write(card)
with open(os.path.join(args.out, "training_log.txt"), "w") as f:
    f.write("\n".join(log_lines) + "\n")
size_mb = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out)) / 1e6
log(f"saved to {args.out} ({size_mb:.1f} MB); special tokens {json.dumps(special)}")
