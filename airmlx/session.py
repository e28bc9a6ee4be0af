"""A conversation over one KV cache kept across turns: the library behind `python -m airmlx.chat`.

Each turn renders the whole conversation with the tokenizer's chat template, keeps the part of the cache
that matches the start of that rendering (trimming the rest: the template may tokenise an earlier answer
differently from how it was generated), and feeds only the tokens after it, so a turn costs its new tokens,
not the whole conversation. Ctrl-C stops the answer being written, trims the cache back to the last length
every layer is known to hold, and keeps the partial answer.
"""
import time
from dataclasses import dataclass, field

import numpy as np

from .errors import CacheTrimError, GenerationError
from .generation import check_sampling, check_seed, is_number
from .units import format_bytes

DEFAULT_MAX_TOKENS = 256


def stop_token_ids(model) -> list:
    """The ids that end an answer: the model's EOS ids (its generation config) and the tokenizer's."""
    eos = model.eos_token_id
    stops = {int(t) for t in np.atleast_1d(eos)} if eos is not None else set()
    if model.tokenizer.eos_token_id is not None:
        stops.add(int(model.tokenizer.eos_token_id))
    return sorted(stops)


def render_chat(tokenizer, messages: list, tools: list | None = None) -> list:
    """Messages as token ids through the tokenizer's chat template, ending with the prompt for the answer."""
    ids = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=True,
                                        tokenizer_kwargs={"verbose": False})  # past the context: the caller says so
    if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return [int(t) for t in ids]


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


def check_chat_options(max_tokens, temp, top_p, top_k=None):
    """The options given (None: unset, the model's generation_config.json decides) are valid."""
    if not isinstance(max_tokens, (int, np.integer)) or max_tokens < 1:
        raise GenerationError(f"max_tokens={max_tokens!r}: use a whole number >= 1.")
    if temp is not None and not is_number(temp):
        raise GenerationError(f"temp={temp!r}: use a number, 0 for greedy or a value > 0 to sample.")
    if temp is not None and temp < 0:
        raise GenerationError(f"temp={temp!r}: use 0 for greedy or a value > 0 to sample.")
    check_sampling(int(max_tokens), bool(temp), temp or 1.0, 1.0 if top_p is None else top_p,
                   0 if top_k is None else top_k)


def check_text(text: str, what: str) -> None:
    """Text a tokenizer can take: bytes that are not UTF-8 (kept by Python as lone surrogates when it reads a
    terminal or a pipe) are refused in one line; the tokenizers raised a TypeError on them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise GenerationError(f"{what} is not UTF-8 text (byte {ord(text[e.start]) & 0xFF:#04x} at character "
                              f"{e.start}); give it as UTF-8.") from None


class ChatSession:
    """A conversation with `model` over one KV cache kept across turns.

    session = ChatSession(model, system_prompt="Be brief.")
    turn = session.send("What is a list?", streamer=airmlx.cli.PrintStreamer(model.tokenizer))
    session.messages   # the conversation so far, as chat-template messages
    session.reset()    # a new conversation, an empty cache
    """

    def __init__(self, model, system_prompt: str | None = None, max_tokens: int = DEFAULT_MAX_TOKENS,
                 temp: float | None = None, top_p: float | None = None, top_k: int | None = None,
                 seed: int | None = None):
        """temp: 0 is greedy, > 0 samples at that temperature; temp, top_p, top_k left at None follow the
        model's generation_config.json, then transformers' defaults, as model.generate() does."""
        check_chat_options(max_tokens, temp, top_p, top_k)
        check_seed(seed)
        if system_prompt is not None and not isinstance(system_prompt, str):
            raise GenerationError(f"system_prompt={system_prompt!r}: give a string (or None for none).")
        if system_prompt is not None:
            check_text(system_prompt, "the system prompt")
        if not all(hasattr(model, name) for name in ("tokenizer", "generate", "new_cache")):
            raise GenerationError(f"ChatSession({type(model).__name__}): give it a model from "
                                  "AutoModel.from_pretrained(...).")
        self.model, self.tokenizer = model, model.tokenizer
        if not getattr(self.tokenizer, "chat_template", None):
            raise GenerationError(f"the tokenizer in {model.shard_dir} has no chat template, so it cannot chat; "
                                  "use a chat/instruct model, or python -m airmlx.generate for plain completion.")
        self.system_prompt, self.max_tokens = system_prompt, max_tokens
        self.temp, self.top_p, self.top_k = temp, top_p, top_k
        self.seed = seed
        self.stop_tokens = stop_token_ids(model)
        self.last = None  # the last Turn
        self.reset()

    def reset(self):
        """A new conversation: only the system prompt, an empty cache, and the seed's sampling from its start."""
        self.rng = np.random.default_rng(self.seed)
        # an empty system prompt is one too (it replaces a template's default), as generate --system-prompt "" has it
        self.messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt is not None else []
        self.cache = self.model.new_cache()
        self.cached = []  # the token ids whose keys and values the cache holds, in order

    def cache_length(self) -> int:
        return self.model.cache_length(self.cache)

    def render(self, messages=None):
        """The conversation as token ids, ending with the template's prompt for the assistant's answer."""
        return render_chat(self.tokenizer, self.messages if messages is None else messages)

    def send(self, text: str, streamer=None) -> Turn:
        """Add a user message, stream the answer into `streamer` (put/end), add the answer; return the Turn.

        Feeds only the tokens after the longest prefix of the rendered conversation that the cache already
        holds. On KeyboardInterrupt the answer so far is kept (in the history too) and the cache is trimmed
        to the tokens every layer has certainly processed; the Turn says interrupted=True."""
        if not isinstance(text, str):  # a template would render None or a list as their Python text
            raise GenerationError(f"send() takes the user's message as a string, not {type(text).__name__}.")
        check_text(text, "the message")
        messages = self.messages + [{"role": "user", "content": text}]
        ids = self.render(messages)
        limit = self.model.config.get("max_position_embeddings")
        if limit and len(ids) >= limit:
            raise GenerationError(f"the conversation has {len(ids)} tokens, the model's context is {limit}; "
                                  "/reset to start a new one.")
        keep = self._roll_back(min(common_prefix(self.cached, ids), len(ids) - 1))  # feed at least one token
        new = ids[keep:]
        max_new = min(self.max_tokens, limit - len(ids)) if limit else self.max_tokens
        tap = _Tap(streamer)
        turn = Turn("", tap.tokens, len(new), keep, start=time.perf_counter(), times=tap.times)
        try:
            self.model.generate([new], past_key_values=self.cache, max_new_tokens=max_new,
                                do_sample=None if self.temp is None else self.temp > 0,
                                temperature=self.temp or None, top_p=self.top_p, top_k=self.top_k,
                                eos_token_id=self.stop_tokens or None, streamer=tap,
                                seed=int(self.rng.integers(2**63)) if self.seed is not None else None)
            consistent = self.cache_length()
        except KeyboardInterrupt:
            # Each new token was sampled from a sweep that finished: the cache certainly holds the prompt
            # and every answer token but the last one seen. A sweep cut short left some layers longer.
            turn.interrupted = True
            consistent = keep + len(new) + len(tap.tokens) - 1 if tap.tokens else keep
            consistent = self._roll_back(consistent)
        self.cached = (ids + tap.tokens)[:consistent]
        answer = list(tap.tokens)
        while answer and answer[-1] in self.stop_tokens:
            answer.pop()
        turn.text = self.tokenizer.decode(answer, skip_special_tokens=True)
        self.messages = messages + [{"role": "assistant", "content": turn.text}]
        self.last = turn
        return turn

    def _roll_back(self, keep: int) -> int:
        """Trim the cache to its first `keep` tokens; where that cannot be exact (sliding-window layers that
        no longer hold what it needs, a convolution state), start an empty cache instead, so the next feed
        recomputes the conversation. Returns the tokens the cache now holds."""
        if self.cache_length() > keep:
            try:
                self.model.trim_cache(self.cache, keep)
            except CacheTrimError:
                self.cache, keep = self.model.new_cache(), 0
        self.cached = self.cached[:keep]
        return keep

    def stats(self) -> str:
        """The stats line of the last answer (tokens/s, bytes read per step, peak memory, the plan) and the cache."""
        cache = (f"cache: {self.cache_length()} tokens ({format_bytes(self.model.cache_bytes(self.cache))}), "
                 f"{len(self.messages)} messages")
        if self.last is None or len(self.last.times) < 2:
            mem = self.model.memory_stats()
            what = "no answer yet" if self.last is None else "the last answer stopped before its first token"
            return f"{what} | {cache} | peak memory {format_bytes(mem['peak'])} | {self.model.plan}"
        return f"{self.model.stats_line(self.last.prompt_tokens, self.last.times, self.last.start)} | {cache}"


