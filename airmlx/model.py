"""The model object users hold: a shard store, a backend and the scheduler between them."""
import json
from pathlib import Path

import numpy as np

from .errors import GenerationError, ModelNotFoundError
from .experts import expert_demand
from .generation import GenerateOutput, generate_tokens, left_padding, resolve_sampling, to_batch
from .schedule import Scheduler, default_budget, make_plan
from .store import ShardStore
from .units import format_bytes, parse_bytes

PROGRESS_TOKENS = 512  # sweeps over at least this many new tokens show a progress bar


class AirModel:
    """A sharded model streamed through a backend. Build it with airmlx.AutoModel.from_pretrained.

    trust_remote_code: the tokenizer may run the checkpoint's own tokenizer code."""

    def __init__(self, shard_dir, backend, memory_budget=None, prefetching: bool = True,
                 profiling_mode: bool = False, trust_remote_code: bool = False):
        self.shard_dir = Path(shard_dir)
        self.trust_remote_code = trust_remote_code
        self.store = ShardStore(shard_dir)
        self.config = self.store.manifest.config
        self.backend = backend
        budget = (parse_bytes(memory_budget) if memory_budget is not None
                  else default_budget(backend.available_memory(), self.config))
        stages = self.store.manifest.stages
        routed = [s for s in stages if s.kind == "experts"]
        self.plan = make_plan({s.name: s.nbytes for s in stages if s.kind != "experts"}, budget, prefetching,
                              expert_demand(routed, self.config.get("num_experts_per_tok", 1)))
        self.scheduler = Scheduler(self.store, backend, self.plan, profiling=profiling_mode)
        gen_path = self.shard_dir / "generation_config.json"
        self.generation_config = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
        self._tokenizer = None

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

    def step(self, tokens, attention_mask, cache):
        """Run new tokens (B, T) through every stage; return last-position logits (B, vocab) as float32 numpy."""
        ctx = self.backend.begin_step(tokens, attention_mask, cache)
        return self.backend.logits(self.scheduler.forward(ctx, self._progress(tokens)))[:, -1]

    def _progress(self, tokens):
        return f"prefill {tokens.size} tokens" if tokens.size >= PROGRESS_TOKENS else None

    def logits(self, input_ids, attention_mask=None) -> np.ndarray:
        """Logits for every position of left-padded prompts (B, T, vocab), float32 numpy: one sweep, no cache kept."""
        ids, mask, _ = to_batch(input_ids, attention_mask, self.pad_token_id or 0)
        cache = self.new_cache(ids.shape[0], left_padding(mask))
        ctx = self.backend.begin_step(ids, mask, cache, all_positions=True)
        return self.backend.logits(self.scheduler.forward(ctx, self._progress(ids)))

    def score(self, requests: list, batch_size: int = 8, max_tokens: int | None = None, progress: bool = True):
        """Log-likelihood and is-greedy of each request (a text, or a (context, continuation) pair, of text or
        token ids), layer-major: the model is read about once per pass, not once per request. The result
        also carries .bytes_read and .passes. See airmlx.score."""
        from .score import score
        return score(self, requests, batch_size=batch_size, max_tokens=max_tokens, progress=progress)

    def sweep(self, batches: list, on_output, progress: str | None = None) -> None:
        """One read of the model for several left-padded batches [(ids (B, T), mask (B, T))] that keep no cache:
        each stage runs every batch before the next stage is read. on_output(i, logits) gets batch i's logits
        for every position as float32 numpy (B, T, vocab), one batch at a time."""
        ctxs = [self.backend.begin_step(ids, mask, None, all_positions=True) for ids, mask in batches]
        self.scheduler.forward_many(ctxs, lambda i, x: on_output(i, self.backend.logits(x)), progress)

    @property
    def bytes_read(self) -> int:
        """Bytes of stage files read so far (streamed stages count once per step)."""
        return self.store.bytes_read

    @property
    def backend_name(self) -> str:
        return self.backend.name

    @property
    def shard_bytes(self) -> int:
        """Bytes of all stage files: the model as stored."""
        return self.store.manifest.total_bytes

    def stage_files(self, streamed_only: bool = False) -> list:
        """The shard folder's stage files (only those streamed every step, with streamed_only=True)."""
        return [self.shard_dir / e.file for e in self.store.manifest.stages
                if not streamed_only or e.name in self.plan.streamed or e.kind == "experts"]

    def read_bandwidth(self, cold: bool = True) -> float:
        """Bytes per second the store reads this model's streamed stages (every stage when none streams);
        cold: from the disk, warm: from the page cache."""
        return self.store.read_bandwidth(self.plan.streamed or list(self.plan.stage_bytes), cold)

    def reset_peak(self) -> None:
        """Start the backend's peak-memory count afresh."""
        self.backend.reset_peak()

    def new_cache(self, batch_size: int = 1, left_padding: list | None = None):
        """Empty KV caches for every layer (resident for the model's life; pass to generate to continue)."""
        return self.backend.new_cache(batch_size, left_padding or [0] * batch_size)

    def cache_length(self, cache) -> int:
        """Tokens a cache from new_cache() holds."""
        return self.backend.cache_length(cache)

    def trim_cache(self, cache, keep: int) -> None:
        """Roll a cache back to its first `keep` tokens (every layer, also after a sweep cut short)."""
        self.backend.trim_cache(cache, keep)

    def cache_bytes(self, cache) -> int:
        return self.backend.cache_bytes(cache)

    def generate(self, input_ids, attention_mask=None, max_new_tokens: int = 20, do_sample: bool | None = None,
                 temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                 eos_token_id=None, pad_token_id=None, use_cache: bool = True, return_dict_in_generate: bool = False,
                 streamer=None, seed: int | None = None, past_key_values=None,
                 stop_strings: "str | list[str] | None" = None, tokenizer=None, **unused):
        """Prompt + new tokens, like transformers' generate; an object with .sequences when
        return_dict_in_generate=True. input_ids: torch tensor, numpy array, mx.array or (nested) list.

        do_sample, temperature, top_p, top_k: None takes the checkpoint's generation_config.json, then
        transformers' defaults (greedy; when sampling, temperature 1.0, top_k 50, top_p 1.0).
        stop_strings: a row stops once its new tokens, decoded with `tokenizer` (default: the model's own),
        contain one of them; the stop string stays in the output, as in transformers.
        past_key_values: a cache from model.new_cache(1, [0]) to continue (one prompt only): input_ids are
        then just the tokens after those already in it, and the cache grows by the prompt and all new
        tokens but the last. Multi-turn chat keeps one cache this way."""
        if unused:
            raise GenerationError(f"generate() got unsupported arguments {sorted(unused)}.")
        pad = pad_token_id if pad_token_id is not None else self.pad_token_id
        eos = eos_token_id if eos_token_id is not None else self.eos_token_id
        if pad is None:
            pad = int(np.atleast_1d(eos)[0]) if eos is not None else 0
        ids, mask, restore = to_batch(input_ids, attention_mask, pad)
        vocab = self.config.get("vocab_size")
        if vocab and (ids.min() < 0 or ids.max() >= vocab):
            bad = int(ids.max() if ids.max() >= vocab else ids.min())
            raise GenerationError(f"token id {bad} is outside the model's vocabulary (0..{vocab - 1}); "
                                  "use this model's tokenizer (model.tokenizer).")
        past = 0
        if past_key_values is not None:
            if ids.shape[0] != 1 or not use_cache:
                raise GenerationError("past_key_values continues a single prompt with use_cache=True; "
                                      "pass one prompt.")
            past = self.backend.cache_length(past_key_values)
        limit = self.config.get("max_position_embeddings")
        if limit and past + ids.shape[1] > limit:
            raise GenerationError(f"the prompt has {past + ids.shape[1]} tokens, more than the model's context of "
                                  f"{limit}; shorten it.")
        sampling = resolve_sampling(self.generation_config, do_sample=do_sample, temperature=temperature,
                                    top_k=top_k, top_p=top_p)
        if stop_strings is not None and tokenizer is None:
            tokenizer = self.tokenizer
        seqs = generate_tokens(self.step, self.new_cache, ids, mask, max_new_tokens=max_new_tokens, **sampling,
                               eos_token_id=eos, pad_token_id=pad, use_cache=use_cache, streamer=streamer,
                               rng=np.random.default_rng(seed), cache=past_key_values, past_length=past,
                               select_rows=self.backend.select_rows, stop_strings=stop_strings, tokenizer=tokenizer)
        out = restore(seqs)
        if return_dict_in_generate:
            return GenerateOutput(out, ids.shape[1], seqs.shape[1] - ids.shape[1])
        return out

    def memory_stats(self) -> dict:
        """Budget, plan and the backend's memory counters, in bytes; steps run so far."""
        experts = self.scheduler.experts.stats() if self.scheduler.experts else {}
        return {"budget": self.plan.budget, "resident": self.plan.resident_bytes,
                "streamed_per_step": self.plan.streamed_bytes_per_step, "bytes_read": self.store.bytes_read,
                "steps": self.scheduler.steps, **experts, **self.backend.memory()}

    def stats_line(self, prompt_tokens: int, times: list, start: float) -> str:
        """Prompt tokens/s, generation tokens/s, bytes read per step, peak memory, the plan. `times`: when the
        prompt and each new token arrived (a streamer's .times); start: when the call began."""
        times = [start] + list(times[1:])
        prefill = times[1] - times[0] if len(times) > 1 else 0.0
        gen = len(times) - 2
        gen_tps = gen / (times[-1] - times[1]) if gen > 0 else 0.0
        mem = self.memory_stats()
        return (f"prompt: {prompt_tokens} tokens, {prompt_tokens / prefill if prefill else 0:.1f} tokens/s | "
                f"generation: {gen + 1} tokens, {gen_tps:.1f} tokens/s | "
                f"read {format_bytes(mem['bytes_read'] / max(mem['steps'], 1))} per step | "
                f"peak memory {format_bytes(mem['peak'])} | {self.plan}")

    def close(self):
        self.scheduler.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"AirModel({self.config.get('model_type')}, {self.shard_dir}, backend={self.backend.name}, {self.plan})"

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
