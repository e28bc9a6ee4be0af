"""`python -m airmlx.chat`: a multi-turn chat with a model streamed layer by layer.

One KV cache lives across turns. Each turn renders the whole conversation with the tokenizer's chat
template, keeps the part of the cache that matches the start of that rendering (trimming the rest: the
template may tokenise an earlier answer differently from how it was generated), and feeds only the tokens
after it, so a turn costs its new tokens, not the whole conversation. Ctrl-C stops the answer being written,
trims the cache back to the last length every layer is known to hold, and keeps the partial answer.

    python -m airmlx.chat [--model PATH_OR_HUB_ID] [--max-tokens 256] [--temp 0.7 --top-p 0.9 --seed 1]
        [--system-prompt "..."] [--profile] [--backend ... --memory-budget 4GB ...]
    printf 'hi\\n/stats\\nq\\n' | python -m airmlx.chat      # piped: one turn per line, exits at EOF
"""
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from .cli import DEMO_MODEL, ArgumentParser, PrintStreamer, add_model_options, load_model, stats_line
from .errors import AirmlxError, GenerationError
from .generate import check_sampling
from .schedule import format_bytes

DEFAULT_MAX_TOKENS = 256
QUIT = ("/quit", "/exit", "/q", "q")
HELP = """commands:
  /help          this text
  /reset         start a new conversation (empties the KV cache)
  /stats         speed, bytes read per step, peak memory, the memory plan (and the profile with --profile)
  /quit, q       exit (so does Ctrl-D)
  Ctrl-C         stop the answer being written; the conversation goes on"""


@dataclass
class Turn:
    """One answer: its text and tokens, what it cost, and whether Ctrl-C cut it short."""
    text: str
    tokens: list  # the answer's token ids as generated (a final stop token included)
    prompt_tokens: int  # tokens fed this turn: the rendered conversation minus what the cache already held
    reused_tokens: int  # tokens of the rendered conversation taken from the cache
    interrupted: bool = False
    start: float = 0.0
    times: list = field(default_factory=list)  # perf_counter() at the prompt and at each new token


class _Tap:
    """A streamer that records the new tokens and their times, then passes everything on."""

    def __init__(self, inner=None):
        self.inner, self.tokens, self.times = inner, [], []

    def put(self, value):
        self.times.append(time.perf_counter())
        if len(self.times) > 1:  # the first put is the prompt
            self.tokens.extend(int(t) for t in np.asarray(value).reshape(-1))
        if self.inner is not None:
            self.inner.put(value)

    def end(self):
        if self.inner is not None:
            self.inner.end()


def common_prefix(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def check_chat_options(max_tokens, temp, top_p):
    if not isinstance(max_tokens, (int, np.integer)) or max_tokens < 1:
        raise GenerationError(f"max_tokens={max_tokens!r}: use a whole number >= 1.")
    if temp < 0:
        raise GenerationError(f"temp={temp!r}: use 0 for greedy or a value > 0 to sample.")
    check_sampling(int(max_tokens), temp > 0, temp or 1.0, top_p, 0)


class ChatSession:
    """A conversation with `model` over one KV cache kept across turns.

    session = ChatSession(model, system_prompt="Be brief.")
    turn = session.send("What is a list?", streamer=PrintStreamer(model.tokenizer))
    session.messages   # the conversation so far, as chat-template messages
    session.reset()    # a new conversation, an empty cache
    """

    def __init__(self, model, system_prompt=None, max_tokens=DEFAULT_MAX_TOKENS, temp=0.0, top_p=1.0, seed=None):
        check_chat_options(max_tokens, temp, top_p)
        self.model, self.tokenizer = model, model.tokenizer
        if not getattr(self.tokenizer, "chat_template", None):
            raise GenerationError(f"the tokenizer in {model.shard_dir} has no chat template, so it cannot chat; "
                                  "use a chat/instruct model, or python -m airmlx.generate for plain completion.")
        self.system_prompt, self.max_tokens, self.temp, self.top_p = system_prompt, max_tokens, temp, top_p
        self.rng = np.random.default_rng(seed)
        stops = {int(t) for t in np.atleast_1d(model.eos_token_id)} if model.eos_token_id is not None else set()
        if self.tokenizer.eos_token_id is not None:
            stops.add(int(self.tokenizer.eos_token_id))
        self.stop_tokens = sorted(stops)
        self.last = None  # the last Turn
        self.reset()

    def reset(self):
        """A new conversation: only the system prompt, an empty cache."""
        self.messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        self.cache = self.model.new_cache()
        self.cached = []  # the token ids whose keys and values the cache holds, in order

    @property
    def backend(self):
        return self.model.backend

    def cache_length(self):
        return self.backend.cache_length(self.cache)

    def render(self, messages=None):
        """The conversation as token ids, ending with the template's prompt for the assistant's answer."""
        ids = self.tokenizer.apply_chat_template(self.messages if messages is None else messages,
                                                 add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return [int(t) for t in ids]

    def send(self, text, streamer=None):
        """Add a user message, stream the answer into `streamer` (put/end), add the answer; return the Turn.

        Feeds only the tokens after the longest prefix of the rendered conversation that the cache already
        holds. On KeyboardInterrupt the answer so far is kept (in the history too) and the cache is trimmed
        to the tokens every layer has certainly processed; the Turn says interrupted=True."""
        messages = self.messages + [{"role": "user", "content": text}]
        ids = self.render(messages)
        limit = self.model.config.get("max_position_embeddings")
        if limit and len(ids) >= limit:
            raise GenerationError(f"the conversation has {len(ids)} tokens, the model's context is {limit}; "
                                  "/reset to start a new one.")
        keep = min(common_prefix(self.cached, ids), len(ids) - 1)  # feed at least one token
        if self.cache_length() > keep:
            self.backend.trim_cache(self.cache, keep)
        self.cached = self.cached[:keep]
        new = ids[keep:]
        max_new = min(self.max_tokens, limit - len(ids)) if limit else self.max_tokens
        sample = self.temp > 0
        tap = _Tap(streamer)
        turn = Turn("", tap.tokens, len(new), keep, start=time.perf_counter(), times=tap.times)
        try:
            self.model.generate([new], past_key_values=self.cache, max_new_tokens=max_new, do_sample=sample,
                                temperature=self.temp if sample else 1.0, top_p=self.top_p,
                                eos_token_id=self.stop_tokens or None,
                                seed=int(self.rng.integers(2**63)) if sample else None, streamer=tap)
            consistent = self.cache_length()
        except KeyboardInterrupt:
            # Each new token was sampled from a sweep that finished: the cache certainly holds the prompt
            # and every answer token but the last one seen. A sweep cut short left some layers longer.
            turn.interrupted = True
            consistent = keep + len(new) + len(tap.tokens) - 1 if tap.tokens else keep
            self.backend.trim_cache(self.cache, consistent)
        self.cached = (ids + tap.tokens)[:consistent]
        answer = list(tap.tokens)
        while answer and answer[-1] in self.stop_tokens:
            answer.pop()
        turn.text = self.tokenizer.decode(answer, skip_special_tokens=True)
        self.messages = messages + [{"role": "assistant", "content": turn.text}]
        self.last = turn
        return turn

    def stats(self):
        """The stats line of the last answer (tokens/s, bytes read per step, peak memory, the plan) and the cache."""
        cache = (f"cache: {self.cache_length()} tokens ({format_bytes(self.backend.cache_bytes(self.cache))}), "
                 f"{len(self.messages)} messages")
        if self.last is None or len(self.last.times) < 2:
            mem = self.model.memory_stats()
            what = "no answer yet" if self.last is None else "the last answer stopped before its first token"
            return f"{what} | {cache} | peak memory {format_bytes(mem['peak'])} | {self.model.plan}"
        return f"{stats_line(self.model, self.last.prompt_tokens, self.last, self.last.start)} | {cache}"


class ChatUI:
    """The read-answer loop on text streams. Interactive (a terminal): a banner and a `>> ` prompt.
    Piped: no prompt, one turn per line, exits at EOF."""

    def __init__(self, session, name="", profile=False, stdin=None, stdout=None, stderr=None, interactive=None):
        self.session, self.name, self.profile = session, name, profile
        self.stdin, self.out, self.err = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
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
            self.say(f"airmlx chat: {self.name} on {s.backend.name} | {s.model.plan}")
            self.say("type a message; /help for commands, /quit or Ctrl-D to exit")
        while True:
            try:
                line = self.read()
            except KeyboardInterrupt:  # at the prompt: a fresh line, not an exit
                self.say("\n(/quit or Ctrl-D to exit)")
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
                    from .profile import report
                    self.say(report(s.model.scheduler.records))
            elif query.startswith("/") and " " not in query:
                self.say(f"unknown command {query}; /help lists the commands", self.err)
            else:
                self.answer(query)
        if self.profile:
            from .profile import report
            self.say(report(s.model.scheduler.records), self.err)
        return 0

    def answer(self, query):
        try:
            turn = self.session.send(query, PrintStreamer(self.session.tokenizer, self.out))
        except GenerationError as e:
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
    parser.add_argument("--max-tokens", "-m", type=int, default=DEFAULT_MAX_TOKENS,
                        help=f"most tokens per answer (default {DEFAULT_MAX_TOKENS})")
    parser.add_argument("--temp", type=float, default=0.0, help="sampling temperature; 0 means greedy")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep this much probability")
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling (answers repeat with the same seed)")
    parser.add_argument("--system-prompt", default=None, help="system message at the start of every conversation")
    return parser


def main(argv=None, stdin=None, stdout=None, stderr=None):
    args = build_parser().parse_args(argv)
    err = stderr or sys.stderr
    try:
        check_chat_options(args.max_tokens, args.temp, args.top_p)
        model = load_model(args)
        with model:
            session = ChatSession(model, system_prompt=args.system_prompt, max_tokens=args.max_tokens,
                                  temp=args.temp, top_p=args.top_p, seed=args.seed)
            name = args.model or f"the demo model ({DEMO_MODEL.name})"
            return ChatUI(session, name=name, profile=args.profile, stdin=stdin, stdout=stdout, stderr=stderr).run()
    except AirmlxError as e:
        print(f"airmlx: {e}", file=err)
        return 2
    except KeyboardInterrupt:  # while loading
        print(file=err)
        return 130


if __name__ == "__main__":
    sys.exit(main())
