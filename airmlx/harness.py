"""lm-evaluation-harness adapter: `python -m airmlx.harness --model airmlx --model_args pretrained=...`.

lm-eval finds models in its registry only; importing this module registers "airmlx", and running it as
a module runs lm-eval's own command line with that registration in place (same arguments as `lm_eval`).
loglikelihood and loglikelihood_rolling go through the layer-major model.score(); generate_until through
batched model.generate(): requests with the same generation kwargs share batches, and a row stops at its
first `until` string (model.generate's stop_strings).
"""
import inspect
import json
import sys
import warnings
from dataclasses import dataclass

import numpy as np
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from .auto import AutoModel
from .cli import face
from .errors import OptionError
from .hub import DEMO_MODEL
from .scoring import encode_pair, prefix_token


def cuda_available():
    import torch
    return torch.cuda.is_available()


@register_model("airmlx")
class AirmlxLM(LM):
    def __init__(self, pretrained=None, backend="auto", device=None, dtype=None, memory_budget=None,
                 compression=None, batch_size=8, max_length=None, max_gen_toks=256, layer_shards_saving_path=None,
                 trust_remote_code=False, **unused):
        super().__init__()
        if str(device).startswith("cuda") and (backend == "mlx" or not cuda_available()):
            device = None  # lm-eval's command line sends device=cuda unless told otherwise, CUDA or not
        self.model = AutoModel.from_pretrained(pretrained or DEMO_MODEL, backend=backend, device=device,
                                               dtype=dtype, memory_budget=memory_budget, compression=compression,
                                               layer_shards_saving_path=layer_shards_saving_path,
                                               # model_args arrive as strings: "trust_remote_code=True"
                                               trust_remote_code=str(trust_remote_code).lower() in ("true", "1"))
        self.tokenizer = self.model.tokenizer
        # lm-eval's --batch_size auto (or auto:N) asks it to find the largest that fits: airmlx's default instead
        self.batch_size = 8 if str(batch_size).startswith("auto") else whole("batch_size", batch_size)
        if max_length is None:
            max_length = self.model.config.get("max_position_embeddings", 2048)
        self.max_length = whole("max_length", max_length)  # max_length=0 was the default, without a word
        self.max_gen_toks = whole("max_gen_toks", max_gen_toks)
        self.prefix_token = prefix_token(self.tokenizer)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> "AirmlxLM":
        """--model_args, then lm-eval's own options (--batch_size, --device, which its command line always
        sends) for what --model_args leaves out: batch_size=8 in --model_args collided with them."""
        options = {k: v for k, v in (additional_config or {}).items() if v is not None}
        known = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "unused")]
        unknown = sorted(set(arg_dict) - set(known))
        if unknown:  # a misspelt memory_budget ran under the default budget without a word (QA)
            raise OptionError(f"--model_args {', '.join(unknown)}: not an option of the airmlx model; it takes "
                              f"{', '.join(known)}.")
        return cls(**{**options, **arg_dict})

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "AirmlxLM":
        from lm_eval import utils
        return cls.create_from_arg_obj(utils.simple_parse_args_string(arg_string), additional_config)

    @property
    def tokenizer_name(self):
        """lm-eval asks for it only to apply a chat template, which this model does not do (it was lm-eval's
        NotImplementedError traceback)."""
        raise OptionError("--apply_chat_template: the airmlx model scores and generates the task's plain text; "
                          "leave it out.")

    def loglikelihood(self, requests, disable_tqdm=False):
        pairs = [self.fitted(i, *encode_pair(self.tokenizer, *r.args)) for i, r in enumerate(requests)]
        return [tuple(s) for s in self.model.score(pairs, batch_size=self.batch_size, progress=not disable_tqdm)]

    def fitted(self, index, context, continuation):
        """(context, continuation) with the context cut from the left to max_length + 1 tokens with its
        continuation, as lm-eval's own models cut it (the last token is only scored, never run); a continuation
        that leaves no room for one token of context is refused (its loglikelihood cannot be computed whole)."""
        room = self.max_length + 1 - len(continuation)
        if room < 1:
            raise OptionError(f"request {index}: its continuation has {len(continuation)} tokens, which leaves no room "
                              f"for its context under max_length={self.max_length}; raise max_length (--model_args "
                              "max_length=N, up to the model's context) or shorten the continuation.")
        return context[-room:], continuation

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        """Every text's windows in one model.score(), so the model is read once per pass, not once per text."""
        windows, owners = [], []
        for n, (text,) in enumerate(r.args for r in requests):
            ids = self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
            for window in get_rolling_token_windows(ids, self.prefix_token, self.max_length, context_len=1):
                windows.append(make_disjoint_window(window))
                owners.append(n)
        out = [0.0] * len(requests)
        for n, (loglikelihood, _) in zip(owners, self.model.score(windows, batch_size=self.batch_size,
                                                                   progress=not disable_tqdm)):
            out[n] += loglikelihood
        return out

    def generate_until(self, requests, disable_tqdm=False):
        """Requests with the same generation kwargs run together, batch_size prompts per model.generate(); a row
        leaves its batch at EOS, at max_gen_toks or as soon as its text contains one of its `until` strings, and
        its text is cut before the first of them. Sampling takes its seed from numpy's global RNG (which
        lm-eval's --seed sets) unless the kwargs carry a `seed`."""
        out = [None] * len(requests)
        for gen_kwargs, indices in group_by_kwargs([r.args[1] for r in requests]):
            settings = GenerationSettings.from_kwargs(gen_kwargs, self.max_gen_toks)
            prompts = {i: self.context_ids(requests[i].args[0], settings.max_new_tokens) for i in indices}
            by_length = sorted(indices, key=lambda i: -len(prompts[i]))  # similar lengths together: less padding
            for start in range(0, len(by_length), self.batch_size):
                batch = by_length[start:start + self.batch_size]
                for i, text in zip(batch, self.generate_batch([prompts[i] for i in batch], settings)):
                    out[i] = text
        return out

    def context_ids(self, context, max_new_tokens):
        """The context's token ids, keeping the last ones when context plus generation would not fit."""
        return self.tokenizer(context, verbose=False)["input_ids"][-max(self.max_length - max_new_tokens, 1):]

    def generate_batch(self, prompts, settings):
        """One model.generate() over left-padded prompts -> each row's continuation text, cut at its stop strings."""
        seed = settings.seed
        if seed is None and settings.do_sample:
            seed = int(np.random.randint(2**31 - 1))  # numpy's global RNG: lm-eval's --seed makes runs repeat
        # the mask says what padding there is: a prompt that starts with the pad id (a pad id that is the BOS) keeps it
        seqs = self.model.generate(prompts, attention_mask=[[1] * len(p) for p in prompts],
                                   max_new_tokens=settings.max_new_tokens, do_sample=settings.do_sample,
                                   temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k,
                                   stop_strings=settings.until or None, tokenizer=self.tokenizer, seed=seed)
        width = max(len(p) for p in prompts)
        return [self.continuation_text(seq[width:], settings.until) for seq in seqs]

    def continuation_text(self, tokens, until):
        """New tokens -> text up to the first EOS token and before the first stop string (lm-eval's cut)."""
        eos = self.model.eos_token_id
        stops = {int(t) for t in np.atleast_1d(eos)} if eos is not None else set()
        end = next((j for j, t in enumerate(tokens) if t in stops), len(tokens))
        text = self.tokenizer.decode(tokens[:end], skip_special_tokens=True)
        for stop in until:
            text = text.split(stop)[0]
        return text


def whole(name, value) -> int:
    """A --model_args number (a string from lm-eval's command line): a whole number >= 1, or a one-line error."""
    try:
        number = int(str(value))
    except ValueError:
        number = 0
    if number < 1:
        raise OptionError(f"{name}={value!r}: use a whole number >= 1 (--model_args {name}=N).")
    return number


LIMIT_NAMES = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")


@dataclass(frozen=True)
class GenerationSettings:
    """An lm-eval request's generation kwargs as model.generate() takes them. Greedy unless the task asks for
    sampling (a temperature > 0 or do_sample), as lm-eval's own models do."""
    until: tuple
    max_new_tokens: int
    do_sample: bool
    temperature: float | None
    top_p: float | None
    top_k: int | None
    seed: int | None

    @classmethod
    def from_kwargs(cls, gen_kwargs: dict, max_gen_toks: int) -> "GenerationSettings":
        kwargs = dict(gen_kwargs)
        until = kwargs.pop("until", None) or []
        until = (until,) if isinstance(until, str) else tuple(u for u in until if u)
        # the names lm-eval takes for the limit, the first given winning, as its normalize_gen_kwargs orders them
        limits = [kwargs.pop(name, None) for name in LIMIT_NAMES]
        max_new = int(next((v for v in limits if v is not None), max_gen_toks))
        temperature = kwargs.pop("temperature", None)
        temperature = 0.0 if temperature is None else float(temperature)
        do_sample = kwargs.pop("do_sample", None)
        do_sample = temperature > 0 if do_sample is None else bool(do_sample)
        top_p, top_k, seed = kwargs.pop("top_p", None), kwargs.pop("top_k", None), kwargs.pop("seed", None)
        if kwargs:
            warnings.warn(f"airmlx ignores these generation arguments: {sorted(kwargs)}.")
        return cls(until, max_new, do_sample, temperature or None, None if top_p is None else float(top_p),
                   None if top_k is None else int(top_k), None if seed is None else int(seed))


def group_by_kwargs(all_kwargs: list) -> list:
    """[(gen_kwargs, indices of the requests that have them)], in order of first appearance."""
    groups = {}
    for i, kwargs in enumerate(all_kwargs):
        key = json.dumps(kwargs, sort_keys=True, default=repr)
        groups.setdefault(key, (kwargs, []))[1].append(i)
    return list(groups.values())


@face(options=False)  # --model_args memory_budget=...: the Python names the errors use
def main(argv=None) -> int:
    """lm-eval's own command line (the same arguments as `lm_eval`), with "airmlx" registered."""
    from lm_eval.__main__ import cli_evaluate
    sys.argv[0] = "python -m airmlx.harness"
    if argv is not None:
        sys.argv[1:] = list(argv)
    try:
        cli_evaluate()
    except (ValueError, KeyError, FileNotFoundError) as e:
        if not raised_by_lm_eval(e):
            raise
        raise OptionError(f"lm-eval: {e}") from None  # an unknown task was lm-eval's traceback (QA)
    return 0


def raised_by_lm_eval(error: BaseException) -> bool:
    """Whether lm-eval's own code raised `error` (its answer to the command line), not airmlx or a library."""
    trace = error.__traceback__
    if trace is None:
        return False
    while trace.tb_next is not None:
        trace = trace.tb_next
    return "/lm_eval/" in trace.tb_frame.f_code.co_filename.replace("\\", "/")


if __name__ == "__main__":
    sys.exit(main())
