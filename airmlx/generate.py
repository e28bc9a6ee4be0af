"""`python -m airmlx.generate`: generate text with a model streamed layer by layer.

    python -m airmlx.generate [--model PATH_OR_HUB_ID] --prompt "..." (- reads stdin) [--max-tokens 64]
        [--temp 0.7 --top-p 0.9 --top-k 20 ...] [--chat-template [--system-prompt "..."]]
"""
import sys
import time

from .cli import (
    ArgumentParser,
    PrintStreamer,
    add_model_options,
    add_sampling_options,
    check_sampling_options,
    face,
    load_model,
    text_input,
    whole_number,
)
from .errors import GenerationError
from .session import check_text, render_chat, stop_token_ids


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m airmlx.generate",
                            description="Generate text with a model streamed layer by layer.")
    add_model_options(parser)
    parser.add_argument("--prompt", default="The ", help="prompt text, or - to read it from stdin (default: %(default)r)")
    parser.add_argument("--max-tokens", type=whole_number(1), default=64,
                        help="most new tokens (with the prompt, within the model's context; default %(default)s)")
    add_sampling_options(parser)
    parser.add_argument("--seed", type=whole_number(0), default=None,
                        help="seed for sampling, a whole number >= 0 (the same seed repeats, with a draft model too)")
    parser.add_argument("--chat-template", action="store_true",
                        help="wrap the prompt in the tokenizer's chat template (the reply prints alone)")
    parser.add_argument("--system-prompt", default=None,
                        help="a system message before the prompt (with --chat-template)")
    return parser


@face
def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_sampling_options(parser, args)
    if args.system_prompt is not None and not args.chat_template:
        parser.error("--system-prompt goes in the chat template: add --chat-template")
    if args.prompt == "-":  # as mlx_lm.generate reads it
        args.prompt = text_input(sys.stdin).read()
    check_text(args.prompt, "the prompt")
    if args.system_prompt is not None:
        check_text(args.system_prompt, "the system prompt")
    with load_model(args) as model:
        tok = model.tokenizer
        if args.chat_template:
            if not getattr(tok, "chat_template", None):
                raise GenerationError(f"the tokenizer in {model.shard_dir} has no chat template; leave out "
                                      "--chat-template to continue the prompt as plain text.")
            system = [{"role": "system", "content": args.system_prompt}] if args.system_prompt is not None else []
            ids = render_chat(tok, system + [{"role": "user", "content": args.prompt}])
        else:
            ids = tok(args.prompt, verbose=False)["input_ids"]  # past the context: our one line, not its warning
            if not ids:
                raise GenerationError(f"the prompt {args.prompt[:40]!r} is no tokens at all for this tokenizer; give "
                                      "some text (or --chat-template, whose turn markers are tokens).")
        context = model.config.get("max_position_embeddings")
        if context and len(ids) + args.max_tokens > context:
            room = (f"use --max-tokens {context - len(ids)} or a shorter prompt" if len(ids) < context
                    else "shorten the prompt")
            raise GenerationError(f"the prompt's {len(ids)} tokens and --max-tokens {args.max_tokens} go past the "
                                  f"model's context of {context} tokens; {room}.")
        # a completion reads on from its prompt, printed once generation starts; a chat's reply stands alone
        streamer = PrintStreamer(tok, prefix="" if args.chat_template else args.prompt)
        start = time.perf_counter()
        # a reply ends where airmlx.chat's and the server's do: at the model's EOS ids or the tokenizer's (some
        # checkpoints' generation config leaves out the end-of-turn token their tokenizer names)
        model.generate([ids], max_new_tokens=args.max_tokens, do_sample=bool(args.temp), temperature=args.temp or None,
                       top_p=args.top_p, top_k=args.top_k, seed=args.seed, streamer=streamer,
                       eos_token_id=stop_token_ids(model) if args.chat_template else None)
        print(model.stats_line(len(ids), streamer.times, start), file=sys.stderr)
        if args.profile:
            print(model.profile_report(show=False), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
