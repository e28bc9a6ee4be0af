"""New tokens as text pieces safe to send, with stop strings found across token boundaries.

The whole continuation is decoded at every token (a character split over several tokens comes out whole,
and a stop string split over several tokens is found once its last piece arrives). The end of the text
that could be the start of a stop string is held back until it cannot; the stop string itself is never
sent, as OpenAI's API does.
"""
import contextlib


class TextStream:
    def __init__(self, tokenizer, stops: list | None = None, lock=None):
        self.tokenizer, self.stops = tokenizer, [s for s in (stops or []) if s]
        self.lock = lock or contextlib.nullcontext()
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.tokens, self.text, self.sent = [], "", 0

    def add(self, token: int) -> tuple:
        """(text to send now, whether a stop string ended the text)."""
        self.tokens.append(int(token))
        with self.lock:
            self.text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        start = max(0, self.sent - self.hold)
        found = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if found:
            end = max(min(found), self.sent)
            self.text = self.text[:end]  # the answer ends before the stop string
            return self._take(end), True
        safe = len(self.text) - self._stop_start()
        while safe > self.sent and self.text[safe - 1] == "\ufffd":  # a character whose bytes are still coming
            safe -= 1
        return self._take(safe), False

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
