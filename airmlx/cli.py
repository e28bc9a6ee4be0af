"""Command-line faces: shared model options and `python -m airmlx.generate` (`python -m airmlx.chat` is in
airmlx/chat.py)."""
import argparse
import sys
import time

from .demo import DEMO_MODEL  # noqa: F401  (re-exported: the CLIs' default model)
from .errors import AirmlxError
from .schedule import format_bytes


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad option in one line (exit status 2), like airmlx's other errors."""

    def error(self, message):
        self.exit(2, f"airmlx: {message}; see {self.prog} --help\n")


def add_model_options(parser):
    parser.add_argument("--model", default=None, help="model folder, hub id or shard folder (default: the bundled demo model)")
    parser.add_argument("--backend", default="auto", choices=["auto", "mlx", "torch"])
    parser.add_argument("--device", default=None, help="torch: cuda/cpu; mlx: gpu/cpu")
    parser.add_argument("--compression", default=None,
                        help="4bit or 8bit (group size 64), optionally -g32/-g128 and -gptq, e.g. 4bit-g32-gptq")
    parser.add_argument("--gguf-file", default=None, help="the .gguf file to use from a hub repo or folder")
    parser.add_argument("--memory-budget", default=None, help="bytes of weights kept in memory, e.g. 4GB")
    parser.add_argument("--layer-shards-saving-path", default=None, help="where the shard folder goes")
    parser.add_argument("--hf-token", default=None)
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run the checkpoint's own modelling/tokenizer code (torch backend, families transformers "
                             "lacks); read that code first")
    parser.add_argument("--profile", action="store_true",
                        help="record read / wait / load / compute time per stage and print the table")


def load_model(args):
    from .auto import AutoModel
    return AutoModel.from_pretrained(args.model or DEMO_MODEL, backend=args.backend, device=args.device,
                                     compression=args.compression, memory_budget=args.memory_budget,
                                     layer_shards_saving_path=args.layer_shards_saving_path, hf_token=args.hf_token,
                                     profiling_mode=getattr(args, "profile", False),
                                     trust_remote_code=getattr(args, "trust_remote_code", False),
                                     gguf_file=getattr(args, "gguf_file", None))


class PrintStreamer:
    """Prints text as tokens arrive (decoding the whole answer so far, so multi-token characters come out
    whole) and times the prompt and each new token."""

    def __init__(self, tokenizer, out=sys.stdout):
        self.tokenizer, self.out = tokenizer, out
        self.tokens, self.printed, self.times = [], "", []

    def put(self, value):
        self.times.append(time.perf_counter())
        if len(self.times) == 1:
            return  # the prompt
        self.tokens.extend(int(t) for t in value.reshape(-1))
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            self.out.write(text[len(self.printed):])
            self.out.flush()
            self.printed = text

    def end(self):
        self.out.write("\n")
        self.out.flush()


def stats_line(model, prompt_tokens, streamer, start):
    """Prompt tokens/s, generation tokens/s, bytes read per token, peak memory."""
    times = [start] + streamer.times[1:]
    prefill = times[1] - times[0] if len(times) > 1 else 0.0
    gen = len(times) - 2
    gen_tps = gen / (times[-1] - times[1]) if gen > 0 else 0.0
    steps = max(model.scheduler.steps, 1)
    mem = model.memory_stats()
    return (f"prompt: {prompt_tokens} tokens, {prompt_tokens / prefill if prefill else 0:.1f} tokens/s | "
            f"generation: {gen + 1} tokens, {gen_tps:.1f} tokens/s | "
            f"read {format_bytes(mem['bytes_read'] / steps)} per step | peak memory {format_bytes(mem['peak'])} | "
            f"{model.plan}")


def generate_main(argv=None):
    parser = ArgumentParser(prog="python -m airmlx.generate",
                            description="Generate text with a model streamed layer by layer.")
    add_model_options(parser)
    parser.add_argument("--prompt", default="The ", help="prompt text")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temp", type=float, default=0.0, help="0 means greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--chat-template", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    args = parser.parse_args(argv)
    try:
        model = load_model(args)
        tok = model.tokenizer
        if args.chat_template:
            ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        else:
            ids = tok(args.prompt)["input_ids"]
        streamer = PrintStreamer(tok)
        sys.stdout.write(args.prompt)
        start = time.perf_counter()
        model.generate([ids], max_new_tokens=args.max_tokens, do_sample=args.temp > 0,
                       temperature=args.temp or 1.0, top_p=args.top_p, seed=args.seed, streamer=streamer)
        print(stats_line(model, len(ids), streamer, start), file=sys.stderr)
        if args.profile:
            from .profile import report
            print(report(model.scheduler.records), file=sys.stderr)
        model.close()
        return 0
    except AirmlxError as e:
        print(f"airmlx: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
