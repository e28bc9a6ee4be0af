"""`python -m airmlx.chat`: a multi-turn chat in the terminal with a model streamed layer by layer.

    python -m airmlx.chat [--model PATH_OR_HUB_ID] [--max-tokens 256] [--temp 0.7 --top-p 0.9 --top-k 20 --seed 1]
        [--system-prompt "..."] [--profile] [--backend ... --memory-budget 4GB ...]
    printf 'hi\\n/stats\\nq\\n' | python -m airmlx.chat      # piped: one turn per line, exits at EOF

The conversation itself (one KV cache across turns) is airmlx.session.ChatSession.
"""
import sys

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
from .errors import AirmlxError
from .hub import DEMO_MODEL
from .session import DEFAULT_MAX_TOKENS, ChatSession, check_chat_options

QUIT = ("/quit", "/exit", "/q", "q")
HELP = """commands:
  /help          this text
  /reset         start a new conversation (empties the KV cache)
  /stats         speed, bytes read per step, peak memory, the memory plan (and the profile with --profile)
  /quit, q       exit (so does Ctrl-D)
  Ctrl-C         stop the answer being written; the conversation goes on"""


class ChatUI:
    """The read-answer loop on text streams. Interactive (a terminal): a banner and a `>> ` prompt.
    Piped: no prompt, one turn per line, exits at EOF."""

    def __init__(self, session, name="", profile=False, stdin=None, stdout=None, stderr=None, interactive=None):
        self.session, self.name, self.profile = session, name, profile
        self.stdin, self.out, self.err = text_input(stdin or sys.stdin), stdout or sys.stdout, stderr or sys.stderr
        self.interactive = self.stdin.isatty() if interactive is None else interactive

    def say(self, text, stream=None):
        stream = stream or self.out
        stream.write(text + "\n")
        stream.flush()

    def read(self):
        """The next line, or None at EOF."""
        if self.interactive:
            try:
                return input(">> ")
            except EOFError:
                self.say("")
                return None
        line = self.stdin.readline()
        return None if line == "" else line

    def run(self):
        s = self.session
        if self.interactive:
            try:
                import readline  # noqa: F401  (line editing and history for input())
            except ImportError:
                pass
            self.say(f"airmlx chat: {self.name} on {s.model.backend_name} | {s.model.plan}")
            self.say("type a message; /help for commands, /quit or Ctrl-D to exit")
        while True:
            try:
                line = self.read()
            except KeyboardInterrupt:  # at the prompt: a fresh line, not an exit
                self.say("\n(/quit or Ctrl-D to exit)", self.err)
                continue
            if line is None:
                break
            query = line.strip()
            if not query:
                continue
            if query in QUIT:
                break
            if query == "/reset":
                s.reset()
                self.say("(new conversation)", self.err)
            elif query == "/help":
                self.say(HELP)
            elif query == "/stats":
                self.say(s.stats())
                if self.profile:
                    self.say(s.model.profile_report(show=False))
            elif query.split()[0] in ("/reset", "/help", "/stats", *QUIT) and query.startswith("/"):
                self.say(f"{query.split()[0]} takes nothing after it; /help lists the commands", self.err)
            elif query.startswith("/") and " " not in query:
                self.say(f"unknown command {query}; /help lists the commands", self.err)
            else:
                self.answer(query)
        if self.profile:
            self.say(s.model.profile_report(show=False), self.err)
        return 0

    def answer(self, query):
        try:
            turn = self.session.send(query, PrintStreamer(self.session.tokenizer, self.out))
        except AirmlxError as e:  # the conversation goes on (a bad input, a model file that changed, ...)
            self.say(f"airmlx: {e}", self.err)
            return
        except KeyboardInterrupt:  # outside generation (rendering, decoding): nothing was streamed
            self.say("\n(stopped)", self.err)
            return
        if turn.interrupted:
            self.say("")
            self.say("(stopped)", self.err)


def build_parser():
    parser = ArgumentParser(prog="python -m airmlx.chat",
                            description="Chat with a model streamed layer by layer; one KV cache across turns.")
    add_model_options(parser)
    parser.add_argument("--max-tokens", "-m", type=whole_number(1), default=DEFAULT_MAX_TOKENS,
                        help=f"most tokens per answer (default {DEFAULT_MAX_TOKENS})")
    add_sampling_options(parser)
    parser.add_argument("--seed", type=whole_number(0), default=None,
                        help="seed for sampling (answers repeat with the same seed)")
    parser.add_argument("--system-prompt", default=None,
                        help="system message at the start of every conversation (\"\" is an empty one, which "
                        "replaces a template's default)")
    return parser


@face
def main(argv=None, stdin=None, stdout=None, stderr=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_sampling_options(parser, args)
    check_chat_options(args.max_tokens, args.temp, args.top_p, args.top_k)
    with load_model(args) as model:
        session = ChatSession(model, system_prompt=args.system_prompt, max_tokens=args.max_tokens,
                              temp=args.temp or 0.0, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
        name = args.model or f"the demo model ({DEMO_MODEL.name})"
        return ChatUI(session, name=name, profile=args.profile, stdin=stdin, stdout=stdout, stderr=stderr).run()


if __name__ == "__main__":
    sys.exit(main())
