"""The server's engine: one thread owns the model, and every sweep runs every active request's new tokens.

A sweep is one read of the streamed weights, and it costs the same for 1 request or 32, so the engine puts
all of them in it (model.step_many: each stage is loaded once and runs every step context before the next
is read). The decoding requests are the rows of one left-padded batch with one cache; the requests admitted
at this sweep boundary are prefilled in the same sweep, those with fresh prompts together as one left-padded
batch, those continuing a kept conversation each on that cache. After the sweep they join the decoding
batch (model.merge_caches). A request leaves when it finishes or its client goes away: its row is taken out
(model.select_cache_rows) and its conversation, extracted, is kept for a later request that starts with it
(a chat client resending the conversation feeds only what is new). Models whose caches cannot be merged
(sliding windows, convolution states) decode each admitted batch on its own cache, still one sweep for all.

With a draft model (the model's own, from --draft-model), a request alone in the engine, decoding and with
nobody waiting, decodes speculatively instead (airmlx/speculative.py): the draft proposes, one sweep verifies,
several tokens come out of it. The next sweep after another request arrives is a shared one again.

On a pipeline over several hosts that splits its work into micro-batches (model.micro_batch_count), the
requests are spread over that many lanes, each with its own groups: a lane's sweep starts while the other
ranks work on the lanes before it, and once its tokens are back the requests that arrived meanwhile join it.

Memory: a request may grow to prompt + max_tokens tokens of KV cache, and a batch to rows x its furthest
reach, padding included. What every request and kept cache can reach must fit `kv_allowance`; requests that
do not fit wait in a bounded queue, beyond which submit() raises QueueFullError.
"""
import logging
import math
import threading
import time
from collections import OrderedDict, deque

import numpy as np

from .errors import CacheTrimError, GenerationError, ModelClosedError
from .generation import sample
from .requests import Delta, Failed, Finished, Group, QueueFullError, Request, RequestError, Sampling, charge
from .session import common_prefix, stop_token_ids
from .speculative import speculation_cap, speculative_generate
from .textstream import TextStream
from .units import format_bytes

__all__ = ["Delta", "Engine", "Failed", "Finished", "QueueFullError", "Request", "RequestError", "Sampling",
           "default_kv_allowance"]
log = logging.getLogger("airmlx.server")
GATHER_S = 0.02  # how long an idle engine waits after a request arrives for others sent with it


class Engine:
    """Owns `model` on its own thread. submit() requests from any thread; stop() fails every request still
    open and ends the thread; the caller closes the model."""

    def __init__(self, model, max_batch: int = 32, max_queue: int = 64, kv_allowance: int | None = None,
                 keep_caches: int = 4, log_prompts: bool = False, micro_batches: int | None = None):
        self.model, self.max_batch, self.max_queue = model, max_batch, max_queue
        self.lanes = model.micro_batch_count(max_batch, micro_batches)
        self.keep_caches, self.log_prompts = keep_caches, log_prompts
        self.tokenizer = model.tokenizer
        self.tokenizer_lock = threading.Lock()  # a fast tokenizer must not be used by two threads at once
        self.per_token = model.kv_bytes_per_token
        self.draft, self.headroom = getattr(model, "draft", None), 0
        if self.draft is not None:  # every cache may get a draft cache beside it, and a verify sweep's proposals
            self.per_token += self.draft.kv_bytes_per_token
            self.headroom = speculation_cap(model, self.draft, model.num_draft_tokens)[1]
        self.kv_allowance = kv_allowance if kv_allowance is not None else default_kv_allowance(model)
        least = (2 + self.headroom) * self.per_token  # a one-token prompt and one new token
        if self.kv_allowance < least:
            raise RequestError(f"a KV-cache allowance of {format_bytes(self.kv_allowance)} holds no request: a prompt "
                               f"of one token and one new token take {format_bytes(least)} of keys and values; give "
                               "the server at least that (--max-kv-bytes).")
        self.context = model.config.get("max_position_embeddings")
        self.pad = model.pad_token_id or 0
        self.stop_tokens = stop_token_ids(model)  # sorted; a few ids, so a list is as quick as a set
        self.cond = threading.Condition()
        self.waiting = deque()
        self.groups = []  # every admitted request, in its group
        self.kept = OrderedDict()  # id -> (token ids its cache holds, cache), least recently used first
        self.merging = True  # False once the model's caches turn out not to merge
        self.stopping = False
        self.sweeps = 0
        self.sweep_seconds = 0.0  # a running average
        self.rows_peak = 0  # the most requests one sweep has run
        self.disconnected = 0  # requests that left before they finished (their client went away)
        self.speculative_sweeps = self.speculative_tokens = 0
        self.thread = threading.Thread(target=self._run, name="airmlx-engine", daemon=True)
        self.thread.start()

    # -- any thread -------------------------------------------------------------------------------------
    def check(self, prompt_tokens: int, max_tokens: int, param: str = "prompt", fit: bool = False) -> int:
        """The max_tokens a request of this many prompt tokens gets (capped by the context, and with fit, a
        default the client did not ask for, by what the KV allowance holds), or RequestError."""
        if self.context and prompt_tokens >= self.context:
            raise RequestError(f"the prompt has {prompt_tokens} tokens, the model's context is {self.context}; "
                               "shorten it.", param=param)
        if self.context:
            max_tokens = min(max_tokens, self.context - prompt_tokens)
        room = self.kv_allowance // self.per_token - prompt_tokens - self.headroom
        if fit and room >= 1:
            max_tokens = min(max_tokens, room)
        need = (prompt_tokens + max_tokens + self.headroom) * self.per_token
        if need > self.kv_allowance:
            least = (prompt_tokens + 1 + self.headroom) * self.per_token  # with max_tokens 1
            what = "prompt + max_tokens" + (f" + the {self.headroom} draft tokens a sweep may verify, in the "
                                            "model's and the draft's caches" if self.headroom else "")
            fix = ("lower max_tokens or start" if least <= self.kv_allowance else "start") + \
                " the server with a larger --max-kv-bytes" + (" or a smaller --num-draft-tokens" if self.headroom else "")
            raise RequestError(f"this request may need {need} bytes of KV cache ({what}), more than the server's "
                               f"allowance of {self.kv_allowance}; {fix}.", param="max_tokens")
        return max_tokens

    def submit(self, request: Request) -> None:
        """Queue a request (it joins the next sweep that has room); QueueFullError when the queue is full, and
        RequestError for a prompt this model cannot take (its max_tokens capped by the context, as check())."""
        try:
            self.model.check_vocabulary(request.prompt)
        except GenerationError as e:
            raise RequestError(f"the prompt's {e}", param="prompt") from None
        request.max_tokens = self.check(len(request.prompt), request.max_tokens)
        request.text = TextStream(self.tokenizer, request.stop, self.tokenizer_lock,
                                  request.prompt if request.continues else None)
        request.headroom = self.headroom
        with self.cond:
            if self.stopping:
                raise RequestError("the server is shutting down; retry against a running one.", status=503)
            self._drop_gone()
            if len(self.waiting) >= self.max_queue:
                raise QueueFullError(f"all {self.max_batch} batch rows are busy and {self.max_queue} requests are "
                                     "waiting; retry later.", status=503, retry_after=self._retry_after())
            self.waiting.append(request)
            self.cond.notify()
        if self.log_prompts:
            with self.tokenizer_lock:
                log.info("request %d prompt: %r", request.id, self.tokenizer.decode(request.prompt))

    def stop(self, message: str = "the server is shutting down") -> None:
        """Fail every open request with `message` and end the engine thread at the next sweep boundary."""
        with self.cond:
            self.stopping = True
            for r in list(self.waiting) + self._active():
                r.close(Failed(message, 503))
            self.cond.notify_all()

    def join(self, timeout: float | None = None) -> None:
        self.thread.join(timeout)

    def stats(self) -> dict:
        with self.cond:
            self._drop_gone()
            return {"active": len(self._active()), "waiting": len(self.waiting), "sweeps": self.sweeps,
                    "rows_peak": self.rows_peak, "disconnected": self.disconnected,
                    "kv_allowance": self.kv_allowance, "kv_reserved": self._reserved(),
                    "kept_caches": len(self.kept), "sweep_seconds": round(self.sweep_seconds, 4),
                    "speculative_sweeps": self.speculative_sweeps, "speculative_tokens": self.speculative_tokens}

    def _retry_after(self) -> int:
        """Seconds until the request closest to done finishes, by the recent sweep time."""
        left = min((r.max_tokens - len(r.tokens) for r in self._active()), default=1)
        return max(1, math.ceil(left * (self.sweep_seconds or 1.0)))

    def _drop_gone(self) -> None:
        """Take the requests whose client went away while they waited off the queue (counted as disconnected)."""
        gone = [r for r in self.waiting if r.cancelled]
        for r in gone:
            self.waiting.remove(r)
        self.disconnected += sum(1 for r in gone if not r.closed)

    def _active(self) -> list:
        return [r for g in list(self.groups) for r in g.rows]

    def _reserved(self) -> int:
        """Bytes of KV cache what is admitted and kept can reach."""
        tokens = sum(charge(g.rows, self.model.cache_length(g.cache)) for g in list(self.groups))
        return (tokens + sum(len(ids) for ids, _ in self.kept.values())) * self.per_token

    # -- the engine thread ------------------------------------------------------------------------------
    def _run(self):
        while True:
            with self.cond:
                while not self.stopping and not self.waiting and not self.groups:
                    self.cond.wait()
                if not self.groups:  # idle until now: requests sent together arrive a few ms apart; batch them
                    self.cond.wait_for(lambda: self.stopping or len(self.waiting) >= self.max_batch, GATHER_S)
                if self.stopping:
                    break
                if self.lanes == 1:  # else each lane admits at its turn
                    self._admit()
            try:
                self._leave([r for r in self._active() if r.cancelled])
                if not self.groups and (self.lanes == 1 or not self.waiting):
                    continue
                lone = self._lone()
                if lone:
                    self._timed(self._speculate, lone)
                elif self.lanes > 1:
                    self._pipelined()
                else:
                    groups = list(self.groups)
                    self._timed(lambda: self._took(groups, self.model.step_many(self._items(groups))))
            except ModelClosedError:
                break
            except Exception as e:  # a broken shard, a backend error: these requests fail, the server goes on
                log.exception("sweep failed")
                for r in self._active():
                    r.close(Failed(f"the model failed: {type(e).__name__}: {e}", 500))
                self.groups = []
        self.stop()

    def _timed(self, sweep, *args):
        t0 = time.perf_counter()
        sweep(*args)
        self._count_sweep(time.perf_counter() - t0)

    def _count_sweep(self, seconds):
        self.sweep_seconds = seconds if not self.sweeps else 0.8 * self.sweep_seconds + 0.2 * seconds
        self.sweeps += 1

    def _admit(self, lane: int = 0, rows: int | None = None):
        """Move waiting requests into the next sweep (of `lane`, up to `rows` rows in it) while there are rows
        and KV room: those continuing a kept conversation on its cache, the others together as one left-padded
        batch. Where making or taking their caches fails (out of memory), those requests fail and the engine
        goes on."""
        queued = list(self.waiting)
        try:
            self._admit_rows(lane, rows)
        except Exception as e:
            log.exception("admitting requests failed")
            held = {id(r) for r in self.waiting} | {id(r) for g in self.groups for r in g.rows}
            for r in queued:  # off the queue and in no sweep: nothing else would ever answer them
                if id(r) not in held:
                    r.close(Failed(f"the model failed: {type(e).__name__}: {e}", 500))

    def _admit_rows(self, lane: int, rows: int | None):
        fresh = []
        room = self.max_batch if rows is None else rows - sum(len(g.rows) for g in self.groups if g.lane == lane)
        while self.waiting and len(self._active()) + len(fresh) < self.max_batch and room > 0:
            r = self.waiting[0]
            if r.cancelled or r.closed:
                self.waiting.popleft()
                self.disconnected += r.cancelled and not r.closed
                continue
            key, n = self._best_kept(r.prompt)
            r.cached, r.feed = n, r.prompt[n:]
            extra = r.reach if key is not None else charge(fresh + [r], 0) - (charge(fresh, 0) if fresh else 0)
            reserved = self._reserved() + (charge(fresh, 0) if fresh else 0) * self.per_token
            if key is not None:  # the kept cache it continues becomes its own: counted in its reach, not twice
                reserved -= len(self.kept[key][0]) * self.per_token
            if not self._make_room(reserved + extra * self.per_token, key):
                return self._start(fresh, lane)
            self.waiting.popleft()
            room -= 1
            cache = self._take_kept(key, n) if key is not None else None
            if cache is None:
                r.cached, r.feed = 0, r.prompt
                fresh.append(r)
            else:
                r.reused = n
                self.groups.append(Group(cache, [r], lane=lane))
        self._start(fresh, lane)

    def _make_room(self, need: int, key) -> bool:
        """Drop kept caches, least recently used first (but `key`, the one the request continues), until `need`
        bytes fit the allowance; False where they do not fit even then."""
        for oldest in [k for k in self.kept if k != key]:
            if need <= self.kv_allowance:
                break
            need -= len(self.kept.pop(oldest)[0]) * self.per_token
        return need <= self.kv_allowance

    def _start(self, fresh, lane):
        if fresh:
            width = max(len(r.feed) for r in fresh)
            cache = self.model.new_cache(len(fresh), [width - len(r.feed) for r in fresh])
            self.groups.append(Group(cache, fresh, lane=lane))

    def _best_kept(self, prompt):
        """(key, tokens) of the kept cache sharing the longest prefix with the prompt, or (None, 0). At least
        one prompt token is left to feed, for the logits of the first new token. A cache is taken only for
        at least half of what it holds (a conversation resent), not trimmed down to a shared system prompt
        or BOS, which would lose it for the conversation it holds."""
        best, best_len = None, 0
        for key, (ids, _) in self.kept.items():
            n = min(common_prefix(ids, prompt), len(prompt) - 1)
            if n > best_len and 2 * n >= len(ids):
                best, best_len = key, n
        return best, best_len

    def _take_kept(self, key, keep):
        ids, cache = self.kept.pop(key)
        if len(ids) > keep:
            try:
                self.model.trim_cache(cache, keep)
            except CacheTrimError:
                return None
        return cache

    def _items(self, groups) -> list:
        """A sweep's step for each group: its rows' new tokens (left-padded), their masks, its cache."""
        items = []
        for g in groups:
            length, width = self.model.cache_length(g.cache), max(len(r.feed) for r in g.rows)
            tokens = [[self.pad] * (width - len(r.feed)) + r.feed for r in g.rows]
            mask = [[0] * (length + width - r.cached - len(r.feed)) + [1] * (r.cached + len(r.feed)) for r in g.rows]
            items.append((np.array(tokens, dtype=np.int64), np.array(mask, dtype=np.int64), g.cache))
        self.rows_peak = max(self.rows_peak, sum(len(g.rows) for g in groups))
        return items

    def _took(self, groups, logits) -> None:
        """The sweep of these groups is back: a token for every row; those done leave, those prefilled join."""
        for g, out in zip(groups, logits):
            for r, row in zip(g.rows, out):
                r.cached += len(r.feed)
                self._next_token(r, row)
        self._leave([r for g in groups for r in g.rows if r.closed or r.cancelled])
        self._join({g.lane for g in groups})

    def _pipelined(self):
        """Sweeps of the requests split into lanes (micro-batches) on a pipeline: lane i's sweep starts while
        the other ranks work on the lanes before it, and once its tokens are back, with the requests admitted
        meanwhile (spread so the lanes stay even). Returns when no request is left, or one alone could
        speculate."""
        out = {}  # lane -> its groups, when its sweep started, and (once back) their logits
        lane = 0
        with self.model.overlapped():
            while not self.stopping:
                if lane in out:
                    groups, started, got = out.pop(lane)
                    self.model.wait_for(lambda: bool(got))
                    self._count_sweep(time.perf_counter() - started)
                    self._took(groups, got[0])
                with self.cond:
                    if not self.stopping:
                        self._admit(lane, -(-(len(self._active()) + len(self.waiting)) // self.lanes))
                self._leave([r for g in self.groups if g.lane == lane for r in g.rows if r.cancelled])
                if not out and (not self.groups or self._lone()):
                    return
                groups = [g for g in self.groups if g.lane == lane]
                if groups:
                    got = []
                    self.model.start_step_many(self._items(groups), got.append)
                    out[lane] = groups, time.perf_counter(), got
                lane = (lane + 1) % self.lanes

    def _lone(self):
        """The request to decode speculatively: alone in the engine, nobody waiting, decoding on a cache that
        holds just its tokens (no padding), no logprobs asked for. None otherwise, or without a draft."""
        if self.draft is None or self.waiting or len(self.groups) != 1 or len(self.groups[0].rows) != 1:
            return None
        g = self.groups[0]
        r = g.rows[0]
        if g.fresh or r.logprobs is not None or len(r.feed) != 1 or self.model.cache_length(g.cache) != r.cached:
            return None
        return r

    def _speculate(self, r):
        """One speculative round for the lone request: one target sweep, the tokens it accepted given out."""
        g, s, past = self.groups[0], r.sampling, r.cached
        out = speculative_generate(self.model, self.draft, np.array([r.feed]), np.ones((1, 1), dtype=np.int64),
                                   max_new_tokens=r.max_tokens - len(r.tokens), do_sample=s.do_sample,
                                   temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                                   eos_token_id=self.stop_tokens or None, rng=r.rng, cache=g.cache,
                                   past_length=past, history=(r.prompt + r.tokens)[:past], rounds=1,
                                   num_draft_tokens=self.model.num_draft_tokens, repeatable=s.seed is not None)
        new = out[0, 1:].tolist()
        self.rows_peak = max(self.rows_peak, 1)
        r.cached = past + len(new)  # its feed and every new token but the last
        given = 0
        while given < len(new) and not r.closed:
            self._take_token(r, new[given], None)
            given += 1
        self.speculative_sweeps += 1
        self.speculative_tokens += given  # not those after a stop string
        if given < len(new):  # a stop string ended it early: the cache keeps only what was given out
            try:
                self.model.trim_cache(g.cache, past + given)
                r.cached = past + given
            except CacheTrimError:  # it holds tokens past the stop: not kept for a later request
                self.groups.remove(g)
                return
        self._leave([r] if r.closed or r.cancelled else [])

    def _next_token(self, r, logits):
        if r.closed:  # failed by stop() while the sweep ran
            return
        s = r.sampling
        token = int(sample(logits[None], s.do_sample, s.temperature, s.top_k, s.top_p, r.rng)[0])
        self._take_token(r, token, self._logprobs(logits, token, r.logprobs) if r.logprobs is not None else None)

    def _take_token(self, r, token: int, logprobs):
        """Give a new token out: its text (stop strings held back), and Finished when it ends the request."""
        r.tokens.append(token)
        r.feed = [token]
        stop = token in self.stop_tokens
        piece, hit = ("", False) if stop else r.text.add(token)
        reason = "stop" if stop or hit else "length" if len(r.tokens) >= r.max_tokens else None
        if reason and not hit:  # text held back for a stop string that never came (or half a character)
            piece += r.text.flush()
        r.emit(Delta(piece, [token], [logprobs] if logprobs is not None else []))
        if reason:
            log.info("request %d: %d prompt tokens (%d reused), %d new, %s, %.2f s", r.id, len(r.prompt), r.reused,
                     len(r.tokens), reason, time.perf_counter() - r.submitted)
            r.close(Finished(reason, len(r.prompt), len(r.tokens), r.reused))

    @staticmethod
    def _logprobs(logits, token, top):
        lp = logits.astype(np.float64)
        lp = lp - (lp.max() + np.log(np.exp(lp - lp.max()).sum()))
        best = np.argpartition(-lp, top - 1)[:top] if top else []
        best = sorted(best, key=lambda t: -lp[t])
        return token, float(lp[token]), [(int(t), float(lp[t])) for t in best]

    def _leave(self, leaving):
        """Take these requests out of their group, keeping each one's conversation for later requests."""
        if not leaving:
            return
        gone = {id(r) for r in leaving}
        self.disconnected += sum(1 for r in leaving if r.cancelled and not r.closed)
        for g in list(self.groups):
            out = [i for i, r in enumerate(g.rows) if id(r) in gone]
            if not out:
                continue
            single = len(g.rows) == 1 and self.model.cache_length(g.cache) == g.rows[0].cached
            for i in out:
                r = g.rows[i]
                self._keep(r, g.cache if single else self.model.extract_cache(g.cache, i, r.cached))
            stay = [i for i, r in enumerate(g.rows) if id(r) not in gone]
            if not stay:
                self.groups.remove(g)
                continue
            self.model.select_cache_rows(g.cache, stay)
            g.rows = [g.rows[i] for i in stay]
            if self.merging and self.model.cache_length(g.cache) > max(r.cached for r in g.rows):
                trimmed = self.model.merge_caches([g.cache], [[r.cached for r in g.rows]])  # drop shared padding
                self.merging = trimmed is not None
                g.cache = trimmed or g.cache
        with self.cond:
            self.cond.notify_all()

    def _keep(self, r, cache):
        if cache is None or self.keep_caches <= 0 or not r.cached:
            return
        self.kept[r.id] = ((r.prompt + r.tokens)[:r.cached], cache)
        while len(self.kept) > self.keep_caches:
            self.kept.popitem(last=False)

    def _join(self, lanes):
        """Groups of these lanes just prefilled join their lane's main batch (one cache) while the allowance has
        room for the padding that adds; else, or when the caches cannot merge, they decode on their own cache."""
        for g in [g for g in self.groups if g.fresh and g.lane in lanes]:
            g.fresh = False
            main = next((m for m in self.groups if m.main and m.lane == g.lane), None)
            if not self.merging:
                continue
            if main is None:
                g.main = True
                continue
            lengths = [self.model.cache_length(main.cache), self.model.cache_length(g.cache)]
            before = charge(main.rows, lengths[0]) + charge(g.rows, lengths[1])
            after = charge(main.rows + g.rows, max(lengths))
            if self._reserved() + (after - before) * self.per_token > self.kv_allowance:
                continue
            merged = self.model.merge_caches([main.cache, g.cache], [[r.cached for r in main.rows],
                                                                     [r.cached for r in g.rows]])
            if merged is None:
                self.merging = False
                continue
            main.cache, main.rows = merged, main.rows + g.rows
            self.groups.remove(g)


def default_kv_allowance(model) -> int:
    """Half the memory the device has free once the model is loaded (what the weights' budget left over)."""
    return max(model.available_memory() // 2, 1)
