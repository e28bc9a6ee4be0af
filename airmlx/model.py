"""The model object users hold: a shard store, a backend and the scheduler between them.

One call runs at a time: generate, score, logits and step take the model's lock, so two threads sharing a
model take turns; close() cancels a running call at its next step and waits for it to end.
"""
import functools
import json
import threading
import warnings
import weakref
from pathlib import Path

import numpy as np

from .archs import arch_for, experts_per_token
from .backends.base import available_ram, position_table
from .draft import check_same_vocabulary, draft_share
from .errors import GenerationError, ModelClosedError, ModelNotFoundError
from .experts import expert_demand
from .generation import (
    GenerateOutput,
    Given,
    WholePrompt,
    check_flags,
    check_seed,
    check_streamer,
    check_token_ids,
    forget_held,
    generate_tokens,
    held_tokens,
    is_int,
    left_padding,
    mask_pad,
    note_held,
    resolve_sampling,
    to_batch,
    trim_held,
    whole_conversation,
)
from .plan import (
    DEFAULT_PREFILL_STEP,
    SCORE_LOGITS,
    ExpertDemand,
    StageCost,
    activation_bytes,
    check_prefill_step,
    kv_bytes_per_token,
    make_plan,
    minimum_budget,
    resolve_budget,
)
from .preflight import load as load_preflight
from .schedule import Scheduler
from .spec_measure import Measurements, Totals, check_num_draft_tokens, check_speculation
from .stage_copies import use_copies
from .store import ShardStore
from .sweeps import prompt_contexts, sweep_batches
from .units import format_bytes, per_token

# what to use instead of the transformers / AirLLM generate() arguments people try
GENERATE_HINTS = {"max_length": "it counts the prompt too: use max_new_tokens",
                  "num_beams": "airmlx decodes greedily or samples, without beams",
                  "generation_config": "pass its settings (do_sample, temperature, top_p, ...) as arguments"}
PROGRESS_TOKENS = 512  # sweeps over at least this many new tokens show a progress bar


def exclusive(method):
    """Run `method` holding the model's lock, and refuse it once the model is closed (or closing)."""
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._lock:
            self._check_open()
            return method(self, *args, **kwargs)
    return locked


class AirModel:
    """A sharded model streamed through a backend. Build it with airmlx.AutoModel.from_pretrained.

    trust_remote_code: the tokenizer may run the checkpoint's own tokenizer code."""
    scheduler_type = Scheduler  # a pipeline rank sweeps with a subclass (airmlx/pipeline_model.py)

    def __init__(self, shard_dir, backend, memory_budget=None, prefetching: bool = True,
                 profiling_mode: bool = False, trust_remote_code: bool = False,
                 prefill_step_size: int = DEFAULT_PREFILL_STEP, draft: "AirModel | None" = None,
                 num_draft_tokens: int | None = None, stages: "list | None" = None, progress: bool = True):
        """progress: False shows no progress bars (one-time stage copies, long prefills, scoring passes).
        draft: a resident AirModel of the same tokenizer that generate() speculates with; its bytes come out of
        the budget. num_draft_tokens: the most draft tokens one sweep verifies (None: airmlx.speculative's
        default); speculation adapts below it. stages: the names of the stages this model streams (a pipeline
        rank's range, airmlx/pipeline.py); default: every stage."""
        self.shard_dir = Path(shard_dir)
        self.progress = progress
        self.trust_remote_code = trust_remote_code
        self.prefill_step_size = check_prefill_step(prefill_step_size)
        self.store = ShardStore(shard_dir, stages)
        self.config = self.store.manifest.config
        self.backend = backend
        budget = resolve_budget(memory_budget, backend, self.config, prefill_step_size)
        costs = {s.name: StageCost(s.nbytes, *backend.footprint(s, self.store.tensor_infos(s.name)))
                 for s in self.store.stages.values()}
        self._widening = max((backend.quantized_widening(self.store.tensor_infos(s.name), self._activation_itemsize)
                              for s in self.store.stages.values()), default=0)
        self.routed = routed = [s for s in self.store.stages.values() if s.kind == "experts"]
        # experts are held as the backend loads them: as many bytes as their files, or more if it dequantises
        scale = max((costs[s.name].held / s.nbytes for s in routed), default=1.0)
        stages = {n: c for n, c in costs.items() if n not in {s.name for s in routed}}
        total, largest, largest_read = expert_demand(routed, scale)
        top_k = experts_per_token(self.config) if routed else 0
        stacking = max((backend.expert_stacking(self.store.tensor_infos(s.name)) for s in routed), default=1.0)
        # the cache counts a read buffer while it fills; a load that converts holds it beside what it makes
        converts = any(costs[s.name].loading > costs[s.name].held for s in routed)
        experts = ExpertDemand(total, largest, top_k, largest_read, top_k * largest_read * len(routed), stacking,
                               # a converting load holds its read buffer and, on torch, the converted tensors
                               # beside their concatenation (transformers' mapping): about one more expert
                               load_excess=largest_read + largest if converts else 0,
                               per_layer=max((len(s.parts) for s in routed), default=0))
        self.minimum_budget = minimum_budget(stages, experts)  # the smallest memory_budget this model runs under
        draft_bytes = draft_share(draft, budget, self.minimum_budget) if draft is not None else 0
        self.plan = make_plan(stages, budget - draft_bytes, prefetching, experts)
        self.plan.budget, self.plan.draft_bytes = budget, draft_bytes
        # scratch the framework may keep between stages (MLX's buffer cache) is part of the activations
        backend.set_scratch(self._activation_bound(1, prefill_step_size, 0))
        layout = backend.copy_layout(self.store, self.plan.streamed)  # torch on a CPU: 4-bit codes as its kernel's
        if layout:
            backend.use_copies(use_copies(self.store, *layout, progress=progress))
        self.scheduler = self.scheduler_type(self.store, backend, self.plan, profiling=profiling_mode)
        gen_path = self.shard_dir / "generation_config.json"
        self.generation_config = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
        self._tokenizer = None
        self._lock = threading.RLock()
        self._closing = self._closed = False
        self._caches = weakref.WeakSet()  # caches made by new_cache(), counted while they live
        self._largest_step = (0, 0, 0, 0)  # rows, new tokens, tokens of context, logits of the largest step
        self._kv_peak = 0  # the largest KV cache a step has left
        # speculative decoding (airmlx/speculative.py): the draft, and what speculating has measured
        self.draft, self.num_draft_tokens, self.owns_draft = draft, check_num_draft_tokens(num_draft_tokens), False
        self.speculation = Measurements()
        if draft is not None:
            check_same_vocabulary(self, draft)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer
            try:
                self._tokenizer = AutoTokenizer.from_pretrained(self.shard_dir,
                                                                trust_remote_code=self.trust_remote_code)
            except Exception as e:  # a missing file surfaces as OSError, ValueError, TypeError, ... by tokenizer
                why = " ".join(f"{type(e).__name__}: {e}".split())  # one line
                raise ModelNotFoundError(f"{self.shard_dir}: no usable tokenizer files ({why}); copy the model's "
                                         "tokenizer files into this folder or shard from a folder that has them.") from e
        return self._tokenizer

    @property
    def eos_token_id(self):
        return self.generation_config.get("eos_token_id", self.config.get("eos_token_id"))

    @property
    def pad_token_id(self):
        return self.generation_config.get("pad_token_id", self.config.get("pad_token_id"))

    def _check_open(self):
        if self._closing or self._closed:
            raise ModelClosedError("this model is closed (close() was called); load it again with "
                                   "AutoModel.from_pretrained.")

    @exclusive
    def step(self, tokens, attention_mask, cache):
        """Run new tokens (B, T) through every stage; return last-position logits (B, vocab) as float32 numpy.
        attention_mask covers the cache's past tokens and the new ones (B, past + T). A prompt longer than
        prefill_step_size runs in chunks inside the one sweep."""
        out = []
        self.start_step(tokens, attention_mask, cache, out.append)
        return out[0]

    @exclusive
    def start_step(self, tokens, attention_mask, cache, on_logits) -> None:
        """step(), handing the logits to on_logits: on a pipeline's rank 0 inside overlapped(), once the last
        rank sends them back, which may be after this returns."""
        self.start_step_many([(tokens, attention_mask, cache)], lambda out: on_logits(out[0]), self._progress(tokens))

    def _count_kv(self, *caches) -> None:
        """kv_cache_peak: every cache alive after a step (new_cache()'s, merged and extracted ones, and the
        step's own), at its largest so far."""
        alive = {id(c): c for c in [*self._caches, *caches] if c is not None}
        self._kv_peak = max(self._kv_peak, sum(self.backend.cache_bytes(c) for c in alive.values()))

    def _progress(self, tokens):
        return f"prefill {np.size(tokens)} tokens" if self.progress and np.size(tokens) >= PROGRESS_TOKENS else None

    def _note_step(self, rows, tokens, context, logits=0):
        """Remember the largest step so far: rows, new tokens, context and positions of logits."""
        largest = self._largest_step
        self._largest_step = (max(largest[0], rows), max(largest[1], tokens), max(largest[2], context),
                              max(largest[3], logits))

    def check_vocabulary(self, ids) -> None:
        """A GenerationError naming a token id outside the model's vocabulary (0..vocab_size - 1); `ids`: an
        array, or a list of any Python ints (past int64 too)."""
        try:
            ids = np.asarray(ids, dtype=np.int64)
        except OverflowError:  # a Python int past int64: outside any vocabulary, and named as given
            ids = np.asarray(ids, dtype=object)
        vocab = self.config.get("vocab_size")
        if vocab and ids.size and (ids.min() < 0 or ids.max() >= vocab):
            bad = int(ids.max() if ids.max() >= vocab else ids.min())
            raise GenerationError(f"token id {bad} is outside the model's vocabulary (0..{vocab - 1}); "
                                  "use this model's tokenizer (model.tokenizer).")

    @property
    def _activation_itemsize(self) -> int:
        return max(self.backend.itemsize, 4)

    def _activation_bound(self, rows, tokens, context, logits=0):
        return activation_bytes(self.config, min(rows * tokens, self.prefill_step_size), rows, context,
                                self._activation_itemsize, tokens, logits) + self._widening

    @exclusive
    def logits(self, input_ids, attention_mask=None) -> np.ndarray:
        """Logits for every position of left-padded prompts (B, T, vocab), float32 numpy: one sweep, no cache
        kept. The result itself is B x T x vocab x 4 bytes; score() returns log-likelihoods without it."""
        ids, mask, _ = to_batch(input_ids, attention_mask, self.pad_token_id or 0,
                                mask_pad(self.pad_token_id, self.eos_token_id))
        left_padding(mask)  # a hole in a row runs differently per backend: refused, as generate() does
        self.check_vocabulary(ids)
        limit = self.config.get("max_position_embeddings")
        if limit and ids.shape[1] > limit:  # as generate() and score() refuse it
            raise GenerationError(f"input_ids has {ids.shape[1]} positions, more than the model's context of {limit}; "
                                  "shorten it.")
        out = []
        sweep_batches(self, [(ids, mask, None)], lambda b, x: out.append(x), self._progress(ids))
        self._note_step(*ids.shape, ids.shape[1], ids.size)  # every position's logits: what was asked for
        out[0][mask == 0] = 0.0  # padding's are whatever a backend left there: zeros on both
        return out[0]

    def score(self, requests: list, batch_size: int = 8, max_tokens: int | None = None,
              progress: bool | None = None):
        """Log-likelihood and is-greedy of each request (a text, or a (context, continuation) pair, of text or
        token ids), layer-major: the model is read about once per pass, not once per request. The result
        also carries .passes and .bytes_read (what the disk read meanwhile: the passes and the next sweep's
        first stages, read ahead as a pass ends; the resident stages' first loads left out).
        See airmlx.scoring. progress: a bar per pass (default: the model's own, from_pretrained(progress=))."""
        from .scoring import score
        return score(self, requests, batch_size=batch_size, max_tokens=max_tokens,
                     progress=self.progress if progress is None else progress)

    @exclusive
    def sweep(self, batches: list, on_output, progress: str | None = None) -> None:
        """One read of the model for several left-padded batches [(ids (B, T), mask (B, T), targets (B, T))]
        that keep no cache: each stage runs every batch before the next stage is read. on_output(i, scores)
        gets batch i's (B, T, 2) float32 numpy: log p(targets[b, t]) after position t, and 1.0 where that
        target was the most likely token. The (B, T, vocab) logits never exist whole: the head works through
        a few positions at a time, and batches longer than prefill_step_size run in chunks."""
        sweep_batches(self, batches, on_output, progress)
        rows, width = sum(ids.shape[0] for ids, _, _ in batches), max(ids.shape[1] for ids, _, _ in batches)
        vocab = self.config.get("vocab_size", 1)
        self._note_step(rows, width, width, min(rows * width, max(SCORE_LOGITS // vocab, rows)))

    @property
    def bytes_read(self) -> int:
        """Bytes of stage files read so far (streamed stages count once per step)."""
        return self.store.bytes_read

    @property
    def swept_bytes_read(self) -> int:
        """Of bytes_read, what the sweeps read: less the resident stages' first loads and the disk measurements."""
        return swept_bytes(self.memory_stats())

    @property
    def backend_name(self) -> str:
        return self.backend.name

    @property
    def shard_bytes(self) -> int:
        """Bytes of all stage files: the model as stored."""
        return self.store.manifest.total_bytes

    def stage_files(self, streamed_only: bool = False) -> list:
        """The shard folder's stage files (only those streamed every step, with streamed_only=True)."""
        return [self.store.path(e.name) for e in self.store.stages.values()
                if not streamed_only or e.name in self.plan.streamed or e.kind == "experts"]

    def read_ahead(self) -> int:
        """Ask the OS to start reading the next sweep's streamed stages into its page cache (at most half the
        RAM available now), so the disk works while something else runs first (a speculative round's draft).
        Returns the bytes asked for; holds no memory of the process (airmlx/readahead.py)."""
        if not self.scheduler.hinted:  # nothing streams, or nothing worth a hint: no need to look at the RAM
            return 0
        return self.scheduler.read_ahead(min(self.plan.streamed_bytes_per_step, available_ram() // 2))

    @exclusive
    def read_bandwidth(self, cold: bool = True, limit_bytes: int | None = None) -> float:
        """Bytes per second the store reads this model's streamed stages (every stage when none streams), the
        first of them up to limit_bytes; cold: from the disk, warm: from the page cache. A measurement: while
        it runs it holds one stage beyond the plan, which memory_stats()'s peaks then show."""
        names, total = [], 0
        for name in self.plan.streamed or list(self.plan.stage_bytes):
            if names and limit_bytes is not None and total + self.plan.stages[name].read > limit_bytes:
                break
            names.append(name)
            total += self.plan.stages[name].read
        return self.store.read_bandwidth(names, cold, mapped=self.backend.page_cache_views)

    @exclusive
    def expert_read_bandwidth(self, cold: bool = True, limit_bytes: int | None = None) -> float | None:
        """Bytes per second the store reads routed experts as decode steps do (top_k of a layer at once, the
        layers in turn, each layer's experts in a shuffled order), up to limit_bytes; None for a model without
        routed experts. They are byte ranges here and there within their layers' files, which a disk may read
        slower than whole stage files (read_bandwidth). The top_k buffers in flight take room the expert cache
        has not filled yet: measure before the first step, as the doctor does."""
        routed = self.routed
        if not routed:
            return None
        top_k = experts_per_token(self.config)
        rng = np.random.default_rng(0)
        keys = {s.name: list(rng.permutation(sorted(s.parts, key=int))) for s in routed}
        rounds = -(-max(map(len, keys.values())) // top_k)
        parts, total = [], 0
        for name, key in ((s.name, k) for r in range(rounds) for s in routed
                          for k in keys[s.name][r * top_k: (r + 1) * top_k]):
            start, end = self.store.stages[name].parts[key]
            if parts and limit_bytes is not None and total + end - start > limit_bytes:
                break
            parts.append((name, int(key)))
            total += end - start
        return self.store.part_read_bandwidth(parts, cold, top_k)

    def reset_peak(self) -> None:
        """Start the peak-memory counts afresh."""
        self.backend.reset_peak()
        self.store.reset_peak()
        self._kv_peak = 0
        self._largest_step = (0, 0, 0, 0)

    def new_cache(self, batch_size: int = 1, left_padding: list | None = None):
        """Empty KV caches for every layer (pass to generate to continue); memory_stats() counts them while
        they live."""
        cache = self.backend.new_cache(batch_size, left_padding or [0] * batch_size)
        self._caches.add(cache)
        return cache

    def cache_length(self, cache) -> int:
        """Tokens a cache from new_cache() holds."""
        try:
            return self.backend.cache_length(cache)
        except (AttributeError, TypeError, IndexError, KeyError):
            raise GenerationError(f"{type(cache).__name__} is not a cache of this model's backend "
                                  f"({self.backend.name}); make one with model.new_cache().") from None

    def trim_cache(self, cache, keep: int) -> None:
        """Roll a cache back to its first `keep` tokens (every layer, also after a sweep cut short). Exact, or
        a CacheTrimError when sliding-window layers no longer hold what the roll-back needs (start a new
        cache then)."""
        if not is_int(keep) or keep < 0:
            raise GenerationError(f"keep={keep!r}: use a whole number of tokens >= 0.")
        self.backend.trim_cache(cache, keep)
        trim_held(cache, keep)

    def cache_bytes(self, cache) -> int:
        return self.backend.cache_bytes(cache)

    def default_new_tokens(self, prompt_length: int) -> int:
        """generate()'s max_new_tokens when none is given: generation_config.json's max_new_tokens, else its
        max_length less the prompt (transformers' rule; a max_length the prompt fills is refused), else 20."""
        config = self.generation_config
        if is_int(config.get("max_new_tokens")):
            return config["max_new_tokens"]
        if is_int(config.get("max_length")):
            if config["max_length"] <= prompt_length:  # transformers raises too
                raise GenerationError(f"generation_config.json's max_length {config['max_length']} counts the prompt "
                                      f"too, and the prompt has {prompt_length} tokens; pass max_new_tokens.")
            return config["max_length"] - prompt_length
        return 20

    @exclusive
    def generate(self, input_ids=None, attention_mask=None, max_new_tokens: int | None = None, do_sample: bool | None = None,
                 temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                 eos_token_id=None, pad_token_id=None, use_cache: bool = True, return_dict_in_generate: bool = False,
                 streamer=None, seed: int | None = None, past_key_values=None, cache=None,
                 stop_strings: "str | list[str] | None" = None, tokenizer=None, draft_model=None,
                 num_draft_tokens: int | None = None, speculation: str | None = None,
                 micro_batches: int | None = None, **unused):
        """Prompt + new tokens, like transformers' generate; an object with .sequences when
        return_dict_in_generate=True. input_ids: torch tensor, numpy array, mx.array or (nested) list.

        max_new_tokens: None takes generation_config.json's max_new_tokens, else its max_length less the prompt's
        length, as transformers does, else 20.
        do_sample, temperature, top_p, top_k: None takes the checkpoint's generation_config.json, then
        transformers' defaults (greedy; when sampling, temperature 1.0, top_k 50, top_p 1.0).
        stop_strings: a row stops once its new tokens, decoded with `tokenizer` (default: the model's own),
        contain one of them; the stop string stays in the output, as in transformers.
        past_key_values: a cache from model.new_cache(1, [0]) to continue (one prompt only): input_ids are
        then just the tokens after those already in it, and the cache grows by the prompt and all new
        tokens but the last. Multi-turn chat keeps one cache this way. transformers' way works too on a cache
        generate() filled: input_ids the whole conversation, starting with the tokens the cache holds; only
        the rest runs, and the output is the whole conversation and the new tokens.
        draft_model: an AirModel of the same tokenizer to speculate with (default: the model's own draft, from
        from_pretrained(draft_model=...); False: none). One prompt at a time; a batch runs without the
        model's own draft. num_draft_tokens: the most draft tokens one sweep verifies (default: the model's).
        speculation: "chain" or "tree" (default: a tree where both models can verify one, else a chain).
        Output is what generating without a draft gives: token for token when greedy, the same distribution
        when sampling. See airmlx.speculative.
        cache: past_key_values under the name transformers >= 5.2x gives it.
        micro_batches: on a pipeline over several hosts, how many parts a batch's rows are split into so that
        the hosts work on different parts at once (default: as many as hosts when every host holds its range
        resident, else 1); one process runs a batch whole."""
        if "inputs" in unused:  # transformers' name for it
            if input_ids is not None:
                raise GenerationError("generate() got input_ids and inputs; pass the prompt once.")
            input_ids = unused.pop("inputs")
        if input_ids is None:
            raise GenerationError("generate() needs a prompt: input_ids (token ids, as the tokenizer gives them).")
        unused = {k: v for k, v in unused.items() if not (k in ("num_beams", "num_return_sequences") and v == 1)}
        if unused:  # (transformers' defaults above are what airmlx does)
            hints = "".join(f"; {k}: {GENERATE_HINTS[k]}" for k in sorted(unused) if k in GENERATE_HINTS)
            raise GenerationError(f"generate() got unsupported arguments {sorted(unused)}{hints}.")
        if micro_batches is not None and (not is_int(micro_batches) or micro_batches < 1):
            raise GenerationError(f"micro_batches={micro_batches!r}: use a whole number >= 1.")
        check_seed(seed)
        check_flags(do_sample=do_sample, use_cache=use_cache, return_dict_in_generate=return_dict_in_generate)
        check_token_ids("eos_token_id", eos_token_id)
        check_token_ids("pad_token_id", pad_token_id, many=False)
        check_streamer(streamer)
        check_speculation(speculation)
        if cache is not None:
            if past_key_values is not None and past_key_values is not cache:
                raise GenerationError("generate() got two caches, past_key_values= and cache=; pass one.")
            past_key_values = cache
        pad = pad_token_id if pad_token_id is not None else self.pad_token_id
        eos = eos_token_id if eos_token_id is not None else self.eos_token_id
        eos_ids = np.atleast_1d(eos) if eos is not None else ()
        fill = pad if pad is not None else (int(eos_ids[0]) if len(eos_ids) else 0)
        ids, mask, restore = to_batch(input_ids, attention_mask, fill, mask_pad(pad, eos))
        self.check_vocabulary(ids)
        past, held, before = 0, None, ids[:, :0]
        if past_key_values is not None:
            if ids.shape[0] != 1 or not use_cache:
                raise GenerationError("past_key_values continues a single prompt with use_cache=True; "
                                      "pass one prompt.")
            past = self.cache_length(past_key_values)
            held = held_tokens(past_key_values, past)
            ids, mask, before = whole_conversation(ids, mask, held)
            if streamer is not None and before.shape[1]:
                streamer = WholePrompt(streamer, before)
        if max_new_tokens is None:
            max_new_tokens = self.default_new_tokens(past + ids.shape[1])
        limit = self.config.get("max_position_embeddings")
        if limit and past + ids.shape[1] > limit:
            raise GenerationError(f"the prompt has {past + ids.shape[1]} tokens, more than the model's context of "
                                  f"{limit}; shorten it.")
        # the last new token is never run: the highest position a generation runs is prompt + max_new_tokens - 2
        table = limit and position_table(arch_for(self.config), self.config)
        if table and is_int(max_new_tokens) and past + ids.shape[1] + max_new_tokens - 1 > limit:
            # none past them: refused before any work
            raise GenerationError(f"generating up to {max_new_tokens} tokens after {past + ids.shape[1]} runs past the "
                                  f"{limit} positions this model has embeddings for; lower max_new_tokens "
                                  f"to {limit - past - ids.shape[1] + 1} or less.")
        if limit and not table and is_int(max_new_tokens) and past + ids.shape[1] + max_new_tokens > limit:
            warnings.warn(f"generating up to {max_new_tokens} tokens after {past + ids.shape[1]} runs past the model's "
                          f"context of {limit}: it generates on, as transformers does, but the model was not trained on "
                          "positions beyond it (lower max_new_tokens to stay within it).", stacklevel=2)
        sampling = resolve_sampling(self.generation_config, do_sample=do_sample, temperature=temperature,
                                    top_k=top_k, top_p=top_p)
        if stop_strings is not None and tokenizer is None:
            tokenizer = self.tokenizer
        num_draft_tokens = check_num_draft_tokens(num_draft_tokens)
        draft = self._draft_for(draft_model, ids.shape[0], use_cache)
        if draft is not None:  # speculative_generate counts its rounds in speculation.last
            from .speculative import speculative_generate
            self.micro_batch_count(ids.shape[0], micro_batches)  # refused in one process, as without a draft
            seqs = speculative_generate(self, draft, ids, mask, max_new_tokens=max_new_tokens, **sampling,
                                        eos_token_id=eos, pad_token_id=pad, streamer=streamer,
                                        rng=np.random.default_rng(seed), cache=past_key_values, past_length=past,
                                        stop_strings=stop_strings, tokenizer=tokenizer, speculation=speculation,
                                        num_draft_tokens=num_draft_tokens or self.num_draft_tokens,
                                        history=held, repeatable=seed is not None)
        else:
            self.speculation.last = Totals()  # no rounds: the stats line shows none from an earlier call
            given = Given(streamer) if held is not None else None
            try:
                seqs = self._token_loop(ids, mask, micro_batches, max_new_tokens=max_new_tokens, **sampling,
                                        eos_token_id=eos, pad_token_id=pad, use_cache=use_cache,
                                        streamer=given or streamer, rng=np.random.default_rng(seed),
                                        cache=past_key_values, past_length=past, select_rows=self.backend.select_rows,
                                        stop_strings=stop_strings, tokenizer=tokenizer)
            except BaseException:
                if given is not None:  # trim_cache to its length, and the record is right again
                    kept = held + given.certainly_held(ids.shape[1])
                    note_held(past_key_values, kept, len(kept))
                raise
            if past_key_values is not None:  # speculative_generate keeps this record itself (also on Ctrl-C)
                note_held(past_key_values, held + seqs[0].tolist() if held is not None else None,
                          self.cache_length(past_key_values))
        out = restore(np.concatenate([before, seqs], axis=1))
        if return_dict_in_generate:
            return GenerateOutput(out, before.shape[1] + ids.shape[1], seqs.shape[1] - ids.shape[1], past_key_values)
        return out

    def _token_loop(self, ids, mask, micro_batches, **options):
        self.micro_batch_count(ids.shape[0], micro_batches)
        return generate_tokens(self.step, self.new_cache, ids, mask, **options)

    def micro_batch_count(self, rows: int, asked: int | None = None) -> int:
        """How many micro-batches `rows` rows run in: 1 in one process (asked: None or 1); on a pipeline, see
        PipelineModel."""
        if asked not in (None, 1):
            raise GenerationError(f"micro_batches={asked}: a batch is split into micro-batches only on a "
                                  "pipeline over several hosts; this model runs in one process: leave it out.")
        return 1

    def memory_stats(self) -> dict:
        """What the model holds, in bytes, and what it has read:

        budget; plan (weights as planned: resident_weights, in_flight, expert_cache, expert_stack; plan_total
        never exceeds the budget); held now (stage buffers and mappings handed out, in_flight_now, and their
        peak, in_flight_peak: beyond the pool of read slots, mappings of streamed stages and resident stages
        the backend computes on in place);
        kv_cache (the caches of new_cache() still alive); activation_bound (the bound on a step's activations
        for the largest step so far, see airmlx.plan.activation_bytes); active and
        kv_cache_peak (the KV caches alive after a step, at their largest); peak (the backend's own count:
        everything MLX holds; on torch its own tensors and KV caches plus the stage buffers it computes from),
        never above budget + kv_cache_peak + activation_bound; bytes_read and steps, and the parts of bytes_read
        that loaded the resident stages, once (resident_bytes_read), and that measured the disk
        (measured_bytes_read: read_bandwidth, the doctor, the CLIs' first preflight); for MoE the expert cache's
        counters."""
        experts = self.scheduler.experts.stats() if self.scheduler.experts else {}
        backend = self.backend.memory()
        if not self.backend.counts_buffers:  # torch: the store's buffers and mappings are not its own
            backend = {"active": backend["active"] + self.store.buffer_bytes,
                       "peak": backend["peak"] + self.store.pool.pooled_bytes + self.store.peak_held_bytes}
        plan = self.plan
        return {"budget": plan.budget, "resident_weights": plan.resident_bytes, "in_flight": plan.in_flight_bytes,
                "expert_stack": plan.expert_stack, "plan_total": plan.total_bytes,
                "streamed_per_step": plan.streamed_bytes_per_step, "in_flight_now": self.store.held_bytes,
                "in_flight_peak": self.store.peak_held_bytes,
                "kv_cache": sum(self.backend.cache_bytes(c) for c in list(self._caches)),
                "kv_cache_peak": self._kv_peak,
                "activation_bound": self._activation_bound(*self._largest_step),
                "bytes_read": self.store.bytes_read, "resident_bytes_read": self.scheduler.resident_bytes_read,
                "measured_bytes_read": self.store.measured_bytes_read,
                "steps": self.scheduler.steps, **experts, **backend,
                **self._speculation_stats()}

    def rank_summary(self, rank: int) -> dict:
        stats = self.memory_stats()
        return {"rank": rank, "stages": list(self.store.stages), "bytes_read": stats["bytes_read"],
                "swept_bytes_read": swept_bytes(stats),
                "steps": stats["steps"], "streamed_per_step": stats["streamed_per_step"],
                "range_bytes": sum(s.nbytes for s in self.store.stages.values()),
                "expert_bytes": sum(s.nbytes for s in self.store.stages.values() if s.kind == "experts"),
                "budget": stats["budget"],
                "peak": stats["peak"], "plan": str(self.plan)}

    def rank_stats(self) -> list:
        """What a pipeline's model gives for every rank (airmlx/pipeline_model.py): here, one process, its own."""
        return [self.rank_summary(0)]

    def stats_line(self, prompt_tokens: int, times: list, start: float) -> str:
        """Prompt tokens/s, generation speed (tokens/s, or s/token below one), bytes read per step and the
        bandwidth that achieved beside the disk's measured one (python -m airmlx.doctor), peak memory, the
        plan. `times`: when the prompt and each new token arrived (a streamer's .times); start: when the
        call began."""
        times = [start] + list(times[1:])
        new = len(times) - 1
        sweeps = self.speculation.last.sweeps
        if sweeps:
            # the prompt ran in the first verifying sweep and tokens come out a round at a time: the speeds are
            # the whole call's
            step_s = (times[-1] - times[0]) / new if new else 0.0
            sweep_s = (times[-1] - times[0]) / sweeps
            prompt = f"prompt: {prompt_tokens} tokens (in the first sweep)"
        else:
            prefill = times[1] - times[0] if new else 0.0
            step_s = sweep_s = (times[-1] - times[1]) / (new - 1) if new > 1 else 0.0
            rate = per_token(prefill / prompt_tokens) if prefill and prompt_tokens else "0.0 tokens/s"
            prompt = f"prompt: {prompt_tokens} token{'s' if prompt_tokens != 1 else ''}, {rate}"
        mem = self.memory_stats()
        per_step_read = swept_bytes(mem) / max(mem["steps"], 1)
        per_step = self.plan.streamed_bytes_per_step
        speed = f"{per_token(step_s)}" if step_s else "one token"
        disk = ""
        if sweep_s and per_step:
            disk = f", {format_bytes(per_step / sweep_s)}/s achieved"
            measured = load_preflight(self.shard_dir)
            if measured:
                disk += f" (disk: {format_bytes(measured.cold_bps)}/s cold, {format_bytes(measured.warm_bps)}/s warm)"
        return (f"{prompt} | "
                f"generation: {new} token{'s' if new != 1 else ''}, {speed} | "
                f"read {format_bytes(per_step_read)} per step{disk} | "
                f"peak memory {format_bytes(mem['peak'])} | {self.plan}" + self.speculation.stats_line())

    def close(self) -> None:
        """Free everything the model holds. A call running in another thread is cancelled at its next step
        (ModelClosedError there) and waited for; any later call raises ModelClosedError."""
        self._closing = True
        with self._lock:
            if not self._closed:
                self._closed = True
                self.scheduler.close()
                if self.owns_draft:
                    self.draft.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        state = "closed" if self._closed else str(self.plan)
        return f"AirModel({self.config.get('model_type')}, {self.shard_dir}, backend={self.backend.name}, {state})"

    @property
    def profiling(self) -> bool:
        """Whether every stage's read, wait, load and compute time is being recorded (profiling_mode)."""
        return self.scheduler.profiling

    @profiling.setter
    def profiling(self, on: bool) -> None:
        self.scheduler.profiling = on

    @property
    def profile_records(self) -> list:
        """One StageRecord(step, stage, bytes_read, read_s, wait_s, load_s, compute_s) per stage and step, with
        profiling_mode=True (see airmlx.profile)."""
        return self.scheduler.records

    def profile_report(self, show: bool = True) -> str:
        """The per-stage profile table (needs profiling_mode=True), printed unless show=False; see airmlx.profile."""
        from .profile import model_report
        return model_report(self, show)

    def profile_plot(self, ax=None):
        """The profile as a matplotlib Figure of stacked bars per stage (needs profiling_mode=True and
        matplotlib: pip install 'airmlx[plot]'); see airmlx.profile."""
        from .profile import model_plot
        return model_plot(self, ax=ax)

    # -- speculative decoding (airmlx/speculative.py) ------------------------------------------------
    @exclusive
    def step_logits(self, tokens, attention_mask, cache, last: int, attend=None, positions=None) -> np.ndarray:
        """One sweep over new tokens (B, T) after the cache's past (attention_mask covers past + T): the logits
        of the last `last` positions, (B, last, vocab) float32. The tokens before them run as a prompt does
        (in chunks); the last ones run together, with a tree's attention when `attend` (B, last, past + T)
        bool and `positions` (B, last) are given (see Backend.begin_step)."""
        forget_held(cache)
        head = tokens.shape[1] - last
        past = attention_mask.shape[1] - tokens.shape[1]
        ctxs = prompt_contexts(self.backend, tokens[:, :head], attention_mask[:, :past + head], cache,
                               self.prefill_step_size) if head else []
        ctxs.append(self.backend.begin_step(tokens[:, head:], attention_mask, cache, True, None, attend, positions))
        out = []
        self.scheduler.forward_many(ctxs, lambda i, x: out.append(x) if i == len(ctxs) - 1 else None,
                                    self._progress(tokens))
        self._note_step(tokens.shape[0], tokens.shape[1], attention_mask.shape[1], tokens.shape[0] * last)
        self._count_kv(cache)
        return self.backend.logits(out[0])

    def keep_cache_positions(self, cache, positions) -> None:
        """Keep only these positions of a cache (ascending), in order: the accepted path of a token tree."""
        forget_held(cache)
        self.backend.keep_cache_positions(cache, positions)

    @property
    def tree_attention_problem(self) -> str | None:
        """Why this model cannot verify a tree of draft tokens in one sweep (None when it can)."""
        return self.backend.tree_attention_problem()

    def _draft_for(self, draft_model, batch: int, use_cache: bool):
        """The draft generate() speculates with, or None. The model's own draft sits out a batch (which already
        gets many tokens out of each sweep) and use_cache=False; a draft asked for explicitly cannot."""
        if draft_model is False or (draft_model is None and (self.draft is None or batch > 1 or not use_cache)):
            return None
        if draft_model is None:
            return self.draft
        if not isinstance(draft_model, AirModel):
            raise GenerationError(f"draft_model={draft_model!r}: generate() takes an AirModel (or False); load a "
                                  "draft by path or as '4bit' with AutoModel.from_pretrained(..., draft_model=...).")
        if batch > 1 or not use_cache:
            raise GenerationError(f"speculative decoding runs one prompt with use_cache=True, not {batch} prompts"
                                  f"{'' if use_cache else ' without a cache'}; generate them one at a time, or pass "
                                  "draft_model=False.")
        if draft_model is not self.draft:
            check_same_vocabulary(self, draft_model)
        return draft_model

    def _speculation_stats(self) -> dict:
        if self.draft is None and not self.speculation.total.sweeps:
            return {}
        draft_kv = sum(self.draft.cache_bytes(c) for c in list(self.draft._caches)) if self.draft else 0
        return {"draft_weights": self.plan.draft_bytes, "draft_kv_cache": draft_kv, **self.speculation.total.as_dict()}

    # -- the server's engine (airmlx/engine.py): requests with caches of their own share each sweep ---------
    @exclusive
    def step_many(self, items: list) -> list:
        """One sweep for several independent steps [(tokens (B, T), attention_mask (B, past + T), cache)]:
        each stage is read once and runs every item before the next stage is read, each item with its own
        cache, so requests at different points (a batch decoding, a prompt being prefilled) share one read
        of the model. Returns each item's last-position logits (B, vocab) as float32 numpy, as step() would
        for that item alone. A long prompt runs in chunks of prefill_step_size inside the sweep."""
        out = []
        self.start_step_many(items, out.append)
        return out[0]

    @exclusive
    def start_step_many(self, items: list, on_logits, progress: str | None = None) -> None:
        """step_many(), handing the list of logits to on_logits (on a pipeline's rank 0 inside overlapped(),
        once the last rank sends them back, which may be after this returns). progress: a progress bar's label."""
        items = [(np.asarray(t, dtype=np.int64), np.asarray(m, dtype=np.int64), c) for t, m, c in items]
        if not items:
            raise GenerationError("step_many takes a non-empty list of (tokens, attention_mask, cache) items.")
        for t, m, _ in items:
            if t.ndim != 2 or not t.size or m.ndim != 2 or m.shape[0] != t.shape[0] or m.shape[1] < t.shape[1]:
                raise GenerationError(f"tokens {t.shape} and attention_mask {m.shape}: pass tokens (B, T) and a "
                                      "mask (B, past + T) covering the cache's tokens and the new ones.")
            self.check_vocabulary(t)
        ctxs, owner = [], []
        for i, (tokens, mask, cache) in enumerate(items):
            forget_held(cache)
            made = prompt_contexts(self.backend, tokens, mask, cache, self.prefill_step_size)
            ctxs += made
            owner += [i] * len(made)
        out = [None] * len(items)

        def collect(j, x):
            if j + 1 == len(ctxs) or owner[j + 1] != owner[j]:  # an item's last chunk: its logits
                out[owner[j]] = self.backend.logits(x)[:, -1]
            if j + 1 == len(ctxs):
                on_logits(out)

        self.scheduler.forward_many(ctxs, collect, progress)
        # every item's hidden states are held between stages: note them as one step of all their rows
        self._note_step(sum(t.shape[0] for t, _, _ in items), max(t.shape[1] for t, _, _ in items),
                        max(m.shape[1] for _, m, _ in items))
        self._count_kv(*(c for _, _, c in items))

    def merge_caches(self, caches: list, lengths: list):
        """One batch cache holding every row of `caches` in order, each right-aligned (left-padded to the
        longest row); lengths[i]: a list, the tokens each row of caches[i] holds. None when these caches cannot be
        merged (sliding-window layers, convolution states): run them as items of their own then. The caches
        given are used up; memory_stats() counts the result while it lives."""
        if len(lengths) != len(caches) or not all(isinstance(n, (list, tuple)) and all(is_int(k) for k in n)
                                                  for n in lengths):
            raise GenerationError(f"merge_caches takes one list of row lengths per cache ({len(caches)} caches, "
                                  f"lengths {lengths!r:.80}), e.g. [[5], [3, 4]] for a cache of one row and one of two.")
        merged = self.backend.merge_caches(caches, lengths)
        if merged is not None:
            self._caches.add(merged)
        return merged

    def extract_cache(self, cache, row: int, length: int):
        """One row of a batch cache as a cache of its own holding that row's last `length` tokens (a copy),
        e.g. to keep a finished request's conversation for the next one that starts with it; None for caches
        that cannot be merged either."""
        if not is_int(row) or not is_int(length) or row < 0 or length < 0:
            raise GenerationError(f"extract_cache(row={row!r}, length={length!r}): use whole numbers >= 0.")
        single = self.backend.extract_cache(cache, row, length)
        if single is not None:
            self._caches.add(single)
        return single

    def select_cache_rows(self, cache, rows: list) -> None:
        """Keep only these rows of a batch cache (finished requests leave the batch)."""
        self.backend.select_rows(cache, rows)

    def available_memory(self) -> int:
        """Bytes the device could still give (free RAM, or free device memory on CUDA), now."""
        return self.backend.available_memory()

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of keys and values one token takes in every layer's cache, at the cache's dtype."""
        return kv_bytes_per_token(self.config, self.backend.itemsize)


def swept_bytes(stats: dict) -> int:
    """What the sweeps read, of memory_stats()'s bytes_read: less the resident stages' first loads and the disk
    measurements."""
    return stats["bytes_read"] - stats["resident_bytes_read"] - stats["measured_bytes_read"]
