"""Speculative decoding: several tokens out of each read of the streamed model.

A resident draft model proposes tokens; the streamed target runs all of them in ONE sweep (the weights it
reads are the same for 1 or 64 positions) and keeps those its own decoding would have produced, plus its
own next token. Each round:

1. the OS is asked to start reading the target's first streamed stages (model.read_ahead), so the disk works
   while the draft catches up with the tokens it has not seen and grows a chain or a tree of proposals
   (airmlx/draft_tree.py), one draft call per level;
2. the target runs the pending tokens and every proposal in one sweep: a chain causally, a tree with a tree
   attention mask and each node at its depth's position (Backend.begin_step's attend / positions);
3. the proposals are checked against the target's own distribution (airmlx/acceptance.py): greedy output is
   token for token what plain greedy decoding gives, sampled output has the same distribution;
4. both caches keep only the accepted path: trimmed for a chain (exact on every architecture, sliding
   windows included), compacted (keep_cache_positions) for a tree, which models with sliding-window layers
   or convolutions cannot do exactly, so they speculate in chains.

One prompt at a time. A cache passed in (chat) is continued: the draft keeps its own cache beside it, matched
to the tokens the target's cache holds.
"""
import time
import weakref
from dataclasses import dataclass

import numpy as np

from .acceptance import sampling_probs, walk_greedy, walk_sampling
from .draft_tree import TREE_BRANCHING, Tree, ancestor_mask, grow
from .errors import CacheTrimError, GenerationError
from .generation import StopStrings, check_sampling, held_tokens, note_held
from .session import common_prefix
from .spec_measure import Totals, check_speculation

DEFAULT_TREE_TOKENS = 64  # most draft tokens a tree sweep verifies, unless num_draft_tokens says
DEFAULT_CHAIN_TOKENS = 16  # most draft tokens a chain sweep verifies, unless num_draft_tokens says


@dataclass
class DraftState:
    """The draft's side of a target cache that lives across generate() calls (a chat)."""
    draft: object
    cache: object  # the draft's own KV cache
    tokens: list  # the tokens it holds, in order


_STATES = weakref.WeakKeyDictionary()  # target cache -> DraftState


def choose_mode(target, draft, speculation: "str | None") -> str:
    """"chain" or "tree": as asked, else a tree where both models can verify one."""
    check_speculation(speculation)
    problems = [(name, m.tree_attention_problem) for name, m in (("the model", target), ("the draft", draft))]
    problem = next(((name, why) for name, why in problems if why), None)
    if speculation == "tree" and problem:
        raise GenerationError(f"tree speculation cannot run: {problem[0]} ({problem[1]}); use speculation='chain'.")
    return speculation or ("chain" if problem else "tree")


def speculation_cap(target, draft, num_draft_tokens: "int | None" = None, speculation: "str | None" = None) -> tuple:
    """(mode, the most draft tokens one verifying sweep runs): what a round may add to the target's cache."""
    mode = choose_mode(target, draft, speculation)
    cap = num_draft_tokens or (DEFAULT_TREE_TOKENS if mode == "tree" else DEFAULT_CHAIN_TOKENS)
    return mode, max(1, min(cap, target.prefill_step_size - 1))


def fitted(logits: np.ndarray, vocab: int) -> np.ndarray:
    """Draft logits over the target's vocabulary (a padded embedding may make them differ in width)."""
    if not vocab or logits.shape[-1] >= vocab:
        return logits[..., :vocab]
    pad = np.full((*logits.shape[:-1], vocab - logits.shape[-1]), -np.inf, dtype=logits.dtype)
    return np.concatenate([logits, pad], axis=-1)


def softmax(logits: np.ndarray) -> np.ndarray:
    x = np.exp(logits.astype(np.float64) - logits.max(-1, keepdims=True))
    return x / x.sum(-1, keepdims=True)


class DraftRunner:
    """The draft model during one generate() call: its cache kept in step with the tokens so far."""

    def __init__(self, draft, state: DraftState, measure, probs, vocab: int, tree: bool):
        self.draft, self.state, self.measure, self.probs, self.vocab, self.tree = (
            draft, state, measure, probs, vocab, tree)
        self.base, self.fed, self.seconds = [], [], 0.0

    def _run(self, tokens: list, last: int, attend=None, positions=None) -> np.ndarray:
        t0 = time.perf_counter()
        past = self.draft.cache_length(self.state.cache)
        logits = self.draft.step_logits(np.array([tokens]), np.ones((1, past + len(tokens)), dtype=np.int64),
                                        self.state.cache, last, attend, positions)[0]
        seconds = time.perf_counter() - t0
        self.measure.draft.add(len(tokens), seconds)
        self.seconds += seconds
        return self.probs(fitted(logits, self.vocab))

    def catch_up(self, seq: list) -> np.ndarray:
        """Run the tokens of `seq` the draft has not seen (at least the last); its distribution after them."""
        keep = min(common_prefix(self.state.tokens, seq), len(seq) - 1)
        if self.draft.cache_length(self.state.cache) > keep:
            try:
                self.draft.trim_cache(self.state.cache, keep)
            except CacheTrimError:  # a sliding window that no longer holds it: start the draft afresh
                self.state.cache, keep = self.draft.new_cache(), 0
        self.state.tokens = None  # unknown until the run has finished
        root = self._run(seq[keep:], 1)[-1]
        self.base, self.fed, self.state.tokens = list(seq), [], list(seq)
        return root

    def expand(self, tree, nodes: list) -> list:
        """Run one level of the tree; the draft's distribution after each of its nodes."""
        ctx = len(self.base)
        slot = {n: ctx + i for i, n in enumerate(self.fed + nodes)}
        attend = positions = None
        if self.tree:
            attend = ancestor_mask(tree, nodes, slot, ctx, ctx + len(self.fed) + len(nodes))
            positions = np.array([[ctx - 1 + tree.depths[n] for n in nodes]])
        self.state.tokens = None
        out = self._run([tree.tokens[n] for n in nodes], len(nodes), attend, positions)
        self.fed += nodes
        return list(out)

    def keep(self, pool_path: list, tokens: list) -> None:
        """Keep the accepted path (nodes of the grown tree, and their tokens) in the draft's cache."""
        at = {n: i for i, n in enumerate(self.fed)}
        kept = [at[n] for n in pool_path if n in at]  # the path's nodes the draft ran: a prefix of it
        ctx = len(self.base)
        try:
            if kept == list(range(len(kept))):
                self.draft.trim_cache(self.state.cache, ctx + len(kept))
            else:
                self.draft.keep_cache_positions(self.state.cache, list(range(ctx)) + [ctx + i for i in kept])
        except CacheTrimError:  # a convolution state kept only where a call ended: back to the root
            self.draft.trim_cache(self.state.cache, ctx)
            kept = []
        self.state.tokens = self.base + tokens[: len(kept)]


def draft_state(draft, cache, past_length: int, history: "list | None") -> tuple:
    """(the draft's state for this target cache, the tokens the target's cache holds or None if unknown:
    `history` when it is as long as the cache, else the cache's own record, generation.held_tokens)."""
    state = _STATES.get(cache) if cache is not None else None
    if state is None or state.draft is not draft or state.tokens is None:
        state = DraftState(draft, draft.new_cache(), [])
    if history is not None and len(history) == past_length:
        return state, list(history)
    return state, held_tokens(cache, past_length)


def speculative_generate(target, draft, ids: np.ndarray, mask: np.ndarray, *, max_new_tokens: int = 20,
                         do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                         eos_token_id=None, pad_token_id=None, streamer=None, rng=None, cache=None,
                         past_length: int = 0, stop_strings=None, tokenizer=None, speculation: "str | None" = None,
                         num_draft_tokens: "int | None" = None, history: "list | None" = None,
                         rounds: "int | None" = None, repeatable: bool = False) -> np.ndarray:
    """One prompt (1, T) -> (1, T + n), as generation.generate_tokens returns it, with the draft proposing and
    one target sweep per round verifying. With `cache` holding `past_length` tokens, ids are only the new
    ones and the cache grows by them and every new token but the last. history: the tokens that cache holds,
    when the caller knows them (the draft then sees them; else only a chat's own earlier calls are known).
    rounds: stop after this many sweeps (the server speculates a round at a time). repeatable: sampling with a
    seeded rng gives the same tokens each time (rounds sized by acceptance alone, not by measured times)."""
    check_sampling(max_new_tokens, do_sample, temperature, top_p, top_k)
    if ids.shape[0] != 1:
        raise GenerationError(f"speculative decoding runs one prompt at a time, not {ids.shape[0]}; generate them "
                              "one at a time, or pass draft_model=False.")
    stops = StopStrings(stop_strings, tokenizer) if stop_strings is not None else None
    mode, cap = speculation_cap(target, draft, num_draft_tokens, speculation)
    eos = set(np.atleast_1d(eos_token_id).tolist()) if eos_token_id is not None else set()
    greedy, rng = not do_sample, rng or np.random.default_rng()
    target_probs = (lambda x: sampling_probs(x, temperature, top_k, top_p)[0])
    draft_probs = softmax if greedy else (lambda x: sampling_probs(x, temperature, top_k, top_p))
    target.speculation.last = Totals()
    measure = target.speculation.untimed() if repeatable and not greedy else target.speculation
    if streamer is not None:
        streamer.put(ids)
    prompt = ids[0][mask[0] != 0].tolist()
    target_cache = cache if cache is not None else target.new_cache(1, [0])
    state, known = draft_state(draft, cache, past_length, history)
    seq = (known or []) + prompt  # what the draft sees: the target's tokens as far as they are known
    runner = DraftRunner(draft, state, measure, draft_probs, target.config.get("vocab_size") or 0, mode == "tree")
    limit = target.config.get("max_position_embeddings") or 1 << 62
    # a draft with learned positions (GPT-2's) runs none past its table, which may be shorter than the model's:
    # beyond it the model takes plain steps
    draft_limit = draft.backend.position_table or 1 << 62
    after, held, new = list(prompt), past_length, []  # after: the tokens after the past; held: in the cache
    try:
        while len(new) < max_new_tokens:
            pending, start = after[held - past_length:], held  # pending: never empty (the last token given out)
            runner.seconds = 0.0
            depth = min(max_new_tokens - len(new) - 1, limit - held - len(pending),  # more is never used
                        draft_limit - len(seq) + 1)  # the deepest level is never run through the draft
            # no room for a draft token (the last token of a call, the end of a position table): a plain step
            drafting = depth > 0 and measure.worth_a_round()
            if drafting:
                target.read_ahead()
                root = runner.catch_up(seq)
                tree, dists = grow(root, runner.expand, measure, cap=measure.round_cap(cap), depth=depth,
                                   branching=TREE_BRANCHING if mode == "tree" else 1, greedy=greedy, rng=rng)
            else:  # a plain step: the draft catches up at the next round
                tree, dists = Tree(), {}
            verify_s = time.perf_counter()
            logits = verify(target, target_cache, held, pending, tree)
            verify_s = time.perf_counter() - verify_s
            children = tree.children()
            if greedy:
                path, nxt, checks = walk_greedy(children, tree.tokens, lambda n: int(np.argmax(logits[n + 1])))
            else:
                path, nxt, checks = walk_sampling(children, tree.tokens, lambda n: target_probs(logits[n + 1]),
                                                  lambda n: dists[n], rng)
            measure.record_checks(checks, tree.probs, greedy)
            held = keep_path(target, target_cache, held, len(pending), path)
            if drafting:
                runner.keep([tree.origin[i] for i in path], [tree.tokens[i] for i in path])
            out, stop = [tree.tokens[i] for i in path] + [int(nxt)], False
            for emitted, token in enumerate(out, 1):
                new.append(token)
                after.append(token)
                seq.append(token)
                if streamer is not None:
                    streamer.put(np.array([token]))
                if token in eos or len(new) >= max_new_tokens or (
                        stops is not None and stops.rows_hit(np.array([new]))[0]):
                    stop = True
                    break
            if drafting:
                measure.verify.add(len(pending) + len(tree), verify_s)
                # accepted tokens after an EOS or a stop string are not given out: not counted as accepted
                measure.record_round(Totals(1, emitted, len(tree), min(len(path), emitted), runner.seconds, verify_s,
                                            len(tree)), len(pending))
            else:
                measure.record_plain(len(pending), verify_s)
            if stop or (rounds is not None and measure.last.sweeps >= rounds):
                break
        # the cache holds the prompt and every new token but the last, as plain decoding leaves it
        if new:
            held = settle(target, target_cache, held, past_length, after[:-1], start)
    except BaseException:
        # the draft's cache may be mid-run: it starts afresh next time; a chat trims the target's cache to
        # the tokens before the last one given out, which are known
        state.cache, state.tokens = draft.new_cache(), []
        if cache is not None:
            kept = (seq[:-1] if new else known) if known is not None else None
            note_held(cache, kept, len(kept or []))
            _STATES[cache] = state
        raise
    if cache is not None:
        note_held(cache, seq if known is not None else None, held)
        _STATES[cache] = state
    if streamer is not None:
        streamer.end()
    return np.concatenate([ids, np.array([new], dtype=np.int64).reshape(1, -1)], axis=1)


def verify(target, cache, held: int, pending: list, tree) -> np.ndarray:
    """One target sweep over the pending tokens and the tree: logits after the last pending token (row 0) and
    after every node (row 1 + node)."""
    tokens = pending + tree.tokens
    attend = positions = None
    if not tree.is_chain():
        before = held + len(pending) - 1  # tokens before the root, the last pending one
        slot = {n: before + 1 + n for n in range(len(tree))}
        width = before + 1 + len(tree)
        root_row = np.zeros((1, 1, width), dtype=bool)
        root_row[..., :before + 1] = True
        attend = np.concatenate([root_row, ancestor_mask(tree, list(range(len(tree))), slot, before + 1, width)], 1)
        positions = np.array([[before] + [before + d for d in tree.depths]])
    mask = np.ones((1, held + len(tokens)), dtype=np.int64)
    return target.step_logits(np.array([tokens]), mask, cache, len(tree) + 1, attend, positions)[0]


def keep_path(model, cache, held: int, pending: int, path: list) -> int:
    """Keep the cache's first held + pending positions and the accepted tree nodes after them; returns the
    tokens it then holds. A model whose convolution state is kept only where a step ended goes back to this
    sweep's start instead: the accepted tokens run again at the front of the next sweep."""
    start = held + pending
    try:
        if path == list(range(len(path))):
            model.trim_cache(cache, start + len(path))
        else:
            model.keep_cache_positions(cache, list(range(start)) + [start + i for i in path])
        return start + len(path)
    except CacheTrimError:
        model.trim_cache(cache, held)
        return held


def settle(model, cache, held: int, past: int, tokens: list, fallback: int) -> int:
    """Bring the cache to exactly the past and `tokens` after it. A stop inside an accepted run leaves it
    longer; where it cannot be trimmed exactly (a convolution state), it goes back to `fallback`, the last
    sweep's start, and the tokens after that run in one more sweep."""
    want = past + len(tokens)
    if held > want:
        try:
            model.trim_cache(cache, want)
            return want
        except CacheTrimError:
            model.trim_cache(cache, fallback)
            held = fallback
    if held < want:
        model.step(np.array([tokens[held - past:]]), np.ones((1, want), dtype=np.int64), cache)
    return want
