"""What the server's engine takes and gives: a Request (prompt ids in, events out through its emit()), the
events (Delta, then Finished or Failed), its Sampling, the errors that refuse one, and the Group of requests
that share one cache."""
import itertools
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .errors import AirmlxError, GenerationError
from .generation import check_sampling, check_seed, is_int


class RequestError(AirmlxError, ValueError):
    """A request the engine cannot take; `status` is the HTTP status that says so."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.param, self.retry_after = status, param, retry_after


class QueueFullError(RequestError):
    """Every place in the waiting queue is taken."""


@dataclass
class Delta:
    """New text and the tokens behind it (with logprobs: (token, logprob, [(token, logprob)] most likely))."""
    text: str
    tokens: list
    logprobs: list = field(default_factory=list)


@dataclass
class Finished:
    reason: str  # "stop" (EOS or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int
    reused_tokens: int  # prompt tokens taken from a kept cache, not computed again


@dataclass
class Failed:
    message: str
    status: int = 500


@dataclass
class Sampling:
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self):
        try:  # model.generate's own checks, as the API's 400s
            check_sampling(0, self.do_sample, self.temperature, self.top_p, self.top_k)
            check_seed(self.seed)
        except GenerationError as e:
            raise RequestError(str(e), param=str(e).partition("=")[0]) from None



_ids = itertools.count(1)


class Request:
    """One completion: prompt ids in, Delta events out through emit(), then Finished or Failed."""

    def __init__(self, prompt: list, max_tokens: int, sampling: Sampling, emit: Callable, stop: list | None = None,
                 logprobs: int | None = None, continues: bool = False):
        """continues: the answer's text goes on from the prompt's (a completion's), rather than standing alone (a
        chat's reply)."""
        if not is_int(max_tokens) or max_tokens < 1:
            raise RequestError(f"max_tokens={max_tokens!r}: use a whole number >= 1.", param="max_tokens")
        if not len(prompt) or not all(is_int(t) and t >= 0 for t in prompt):
            raise RequestError("the prompt must be a non-empty list of token ids (whole numbers >= 0).", param="prompt")
        self.id = next(_ids)
        self.prompt, self.max_tokens, self.sampling, self.emit = list(prompt), max_tokens, sampling, emit
        self.stop, self.logprobs, self.continues = list(stop or []), logprobs, continues
        self.rng = np.random.default_rng(sampling.seed)
        self.headroom = 0  # positions a speculative sweep may add to its cache beyond the reach (set by the engine)
        self.tokens = []  # generated so far (a final stop token included)
        self.cached = 0  # tokens its cache (its row of the batch's cache) holds, padding not counted
        self.feed = []  # tokens the next sweep runs: the prompt (or what a kept cache lacks), then the last sampled
        self.reused = 0
        self.cancelled = self.closed = False
        self.text = None  # a TextStream, made by the engine
        self.submitted = time.perf_counter()

    @property
    def reach(self) -> int:
        """The most tokens its cache can hold."""
        return len(self.prompt) + self.max_tokens + self.headroom

    def cancel(self) -> None:
        """The client went away: the request leaves the batch at the next sweep boundary."""
        self.cancelled = True

    def close(self, event) -> None:
        """Send the last event, once."""
        if not self.closed:
            self.closed = True
            self.emit(event)


@dataclass
class Group:
    """Requests sharing one cache, one row each, right-aligned (left-padded). `main`: the decoding batch
    others join; `fresh`: admitted at this sweep boundary (it joins the main batch after its prefill);
    `lane`: the micro-batch it sweeps in, on a pipeline that splits the requests (else 0)."""
    cache: object
    rows: list
    main: bool = False
    fresh: bool = True
    lane: int = 0


def charge(rows: list, length: int) -> int:
    """Tokens a group of these rows over a cache of `length` can reach: each row's reach plus its padding,
    for every row (a batch is as long as its furthest row)."""
    width = length + max(len(r.feed) for r in rows)
    return len(rows) * max(width - r.cached - len(r.feed) + r.reach for r in rows)
