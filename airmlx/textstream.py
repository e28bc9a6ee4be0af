"""New tokens as text pieces safe to send, with stop strings found across token boundaries.

The whole continuation is decoded at every token (a character split over several tokens comes out whole,
and a stop string split over several tokens is found once its last piece arrives). The end of the text
that could be the start of a stop string is held back until it cannot; the stop string itself is never
sent, as OpenAI's API does. The text leaves special tokens out, so a stop string that is a special token
("<|im_end|>") is found as that token.

Text that continues a prompt (a completion, not a chat's reply) is decoded after the prompt's last tokens:
sentencepiece tokenizers (Llama 2, Mistral) drop the space a word starts with when it starts the text decoded,
so "The capital of France is" would go on "Paris" rather than " Paris".
"""
import contextlib

CONTEXT_TOKENS = 4  # a prompt's last tokens that new text is decoded after, when it continues the prompt


class TextStream:
    def __init__(self, tokenizer, stops: list | None = None, lock=None, context: list | None = None):
        """context: the tokens the text continues (a prompt's), or none for text that stands alone."""
        self.tokenizer, self.stops = tokenizer, [s for s in (stops or []) if s]
        self.lock = lock or contextlib.nullcontext()
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.tokens, self.text, self.sent = [], "", 0
        self.context = [int(t) for t in (context or [])[-CONTEXT_TOKENS:]]
        with self.lock:
            self.lead = self.tokenizer.decode(self.context, skip_special_tokens=True) if self.context else ""
            added = getattr(self.tokenizer, "added_tokens_decoder", None) or {}
            self.stop_ids = {i for i, t in added.items() if getattr(t, "special", False) and t.content in self.stops}

    def add(self, token: "int | list") -> tuple:
        """(text to send now, whether a stop string ended the text) after one new token or several."""
        new = [int(t) for t in (token if isinstance(token, list) else [token])]
        stopped = next((i for i, t in enumerate(new) if t in self.stop_ids), None)
        self.tokens.extend(new[:stopped])
        with self.lock:
            self.text = self._decode()
        start = max(0, self.sent - self.hold)
        found = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if found:
            end = max(min(found), self.sent)
            self.text = self.text[:end]  # the answer ends before the stop string
            return self._take(end), True
        if stopped is not None:  # the text ends before the special token, all of it sent
            return self._take(len(self.text)), True
        safe = len(self.text) - self._stop_start()
        while safe > self.sent and self.text[safe - 1] == "\ufffd":  # a character whose bytes are still coming
            safe -= 1
        return self._take(safe), False

    def _decode(self) -> str:
        if self.context:
            text = self.tokenizer.decode(self.context + self.tokens, skip_special_tokens=True)
            if text.startswith(self.lead):
                return text[len(self.lead):]
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True)

    def _stop_start(self) -> int:
        """Characters at the end of the text that a stop string could begin with (held back until they
        cannot). A character whose bytes are still coming (U+FFFD at the end) could be any."""
        stem = self.text.rstrip("\ufffd")
        partial = len(self.text) - len(stem)
        for n in range(min(self.hold, len(stem) - self.sent), 0, -1):
            if any(s.startswith(stem[-n:]) and (not partial or len(s) > n) for s in self.stops):
                return n + partial
        return partial

    def flush(self) -> str:
        """The text held back, at the end of the answer."""
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        if end <= self.sent:
            return ""
        piece, self.sent = self.text[self.sent:end], end
        return piece
