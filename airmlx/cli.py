"""What every command-line face shares: one parser class, the model options (choices read from the
registries), one error wrapper (an AirmlxError is one line on stderr and exit status 2; Ctrl-C is 130),
loading the model, and printing tokens as they arrive."""
import argparse
import errno
import functools
import math
import os
import re
import sys
import time
from typing import Callable

from .auto import BACKENDS, AutoModel
from .errors import AirmlxError
from .hub import DEMO_MODEL
from .pipeline_link import DEFAULT_TIMEOUT
from .plan import DEFAULT_PREFILL_STEP
from .preflight import load as load_preflight
from .preflight import quick as quick_preflight
from .spec_measure import check_num_draft_tokens
from .textstream import TextStream
from .units import parse_bytes


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad option in one line (exit status 2), like airmlx's other errors."""

    def error(self, message):
        self.exit(2, f"airmlx: {message}; see {self.prog} --help\n")

    def parse_known_args(self, args=None, namespace=None):
        # "--memory-budget -1GB": argparse takes "-1GB" for an option and says the value is missing; joined as
        # "--memory-budget=-1GB", the option's own check says what is wrong with it
        args = list(sys.argv[1:] if args is None else args)
        for i in range(len(args) - 1, 0, -1):
            action = self._option_string_actions.get(args[i - 1])
            if action is not None and action.nargs != 0 and re.match(r"-[0-9.]", args[i]) \
                    and args[i] not in self._option_string_actions:
                args[i - 1:i + 1] = [f"{args[i - 1]}={args[i]}"]
        return super().parse_known_args(args, namespace)


# the Python arguments errors name that the faces take as options; a one-word name only as `name=value`
AS_OPTIONS = ("memory_budget", "draft_model", "num_draft_tokens", "prefill_step_size", "gguf_file",
              "layer_shards_saving_path", "trust_remote_code", "pipeline_split", "pipeline_timeout", "dtype",
              "compression", "backend", "device")
# a name on its own: not inside a path, a file name or a possessive
_NAMED = re.compile(r"(?<![\w/.-])(" + "|".join(AS_OPTIONS) + r")(?:=(['\"]?)([\w-]+(?:\.[\w-]+)*)\2|(?![\w/.'-]))")


def as_options(message: str) -> str:
    """An error's Python spelling of arguments (memory_budget, dtype='float32') as the faces spell them
    (--memory-budget, --dtype float32): the advice comes from the library, the user typed options."""
    def option(m):
        name, value = m.group(1), m.group(3)
        if value is None and "_" not in name or value in ("False", "None"):
            return m.group(0)  # a plain word (the dtype of a tensor), or a value no option takes
        flag = "--" + name.replace("_", "-")
        return flag if value in (None, "", "True") else f"{flag} {value}"
    out = _NAMED.sub(option, message)
    # "trust_remote_code=True (--trust-remote-code)": the option once
    return re.sub(r" \((--[\w-]+)\)", lambda m: "" if out.find(m.group(1)) < m.start() else m.group(0), out)


def face(body: Callable[..., int] | None = None, *, options: bool = True) -> Callable[..., int]:
    """Wrap a face's main(): an AirmlxError prints `airmlx: <message>` and returns 2, Ctrl-C returns 130,
    output cut off by its reader (`| head`) ends quietly with 141, as a command killed by SIGPIPE does, and
    output that cannot be written (a full disk, a closed stdout) is said in one line. options=False (as
    @face(options=False)) keeps the message's Python names: a face that takes them so (--model_args)."""
    if body is None:
        return functools.partial(face, options=options)

    @functools.wraps(body)
    def main(argv=None, **kwargs):
        err = kwargs.get("stderr") or sys.stderr
        if sys.stdout is None:  # started with stdout closed (`>&-`): every result would be dropped without a word
            print("airmlx: standard output is closed; give it a file or a pipe to write to.", file=err)
            return 2
        try:
            return body(argv, **kwargs) or 0
        except AirmlxError as e:
            print(f"airmlx: {as_options(str(e)) if options else e}", file=err)
            return 2
        except KeyboardInterrupt:
            print(file=err)
            return 130
        except BrokenPipeError:
            # nothing more can be written, not even at exit's flush: stdout goes nowhere from here
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 141
        except OSError as e:
            if e.errno not in UNWRITABLE:
                raise
            print(f"airmlx: cannot write the output: {e.strerror}.", file=err)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 1
    return main


# errors of a write that fails whoever writes (the shard writer turns its own into InsufficientDiskSpaceError)
UNWRITABLE = {errno.ENOSPC, errno.EFBIG, errno.EIO, getattr(errno, "EDQUOT", errno.ENOSPC)}


def text_input(stream):
    """`stream`, reading bytes that are not UTF-8 as lone surrogates, as Python does only under the C locale: the
    face's check_text then refuses them in one line, where a UTF-8 locale's strict reading raised a traceback."""
    if hasattr(stream, "reconfigure"):
        stream.reconfigure(errors="surrogateescape")
    return stream


def whole_number(least: int) -> Callable[[str], int]:
    """An argparse type: a whole number >= least."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"{value} is less than {least}")
        return value
    return parse


def whole_numbers(least: int) -> Callable[[str], list]:
    """An argparse type: a comma-separated list of whole numbers >= least, e.g. 1,8,32."""
    one = whole_number(least)

    def parse(text: str) -> list:
        try:
            return [one(part) for part in text.split(",")]
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentTypeError(f"{text!r}: give whole numbers >= {least} separated by commas ({e})") \
                from None
    return parse


def number_in(low: float, high: float, low_open: bool = False, what: str = "") -> Callable[[str], float]:
    """An argparse type: a finite number in [low, high] ((low, high] when low_open)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value) or not (low < value if low_open else low <= value) or not value <= high:
            span = f">= {low:g}" if high == math.inf else f"in {'(' if low_open else '['}{low:g}, {high:g}]"
            raise argparse.ArgumentTypeError(f"{text}: use a finite number {span}{what}")
        return value
    return parse


def compression_option(text: str) -> str:
    """An argparse type: a compression name (quant.compression_config's)."""
    from .quant import COMPRESSIONS, compression_config
    try:
        compression_config(text)
    except AirmlxError:
        raise argparse.ArgumentTypeError(f"{text!r} is unknown; use one of {sorted(COMPRESSIONS)}, optionally with "
                                         "-g32 or -g128 (group size) and -gptq (calibrated), e.g. 4bit-g32-gptq") from None
    return text


def add_model_options(parser: argparse.ArgumentParser, speculation: bool = True) -> None:
    """The options that open a model, shared by every face; speculation: --draft-model and
    --num-draft-tokens too (faces that generate)."""
    parser.add_argument("--model", default=None,
                        help="model folder, hub id or shard folder (default: the bundled demo model)")
    parser.add_argument("--backend", default="auto", choices=BACKENDS)
    parser.add_argument("--device", default=None, help="torch: cuda/cpu; mlx: gpu/cpu")
    parser.add_argument("--dtype", default=None, help="compute dtype: float32, float16 or bfloat16")
    parser.add_argument("--compression", default=None, type=compression_option,
                        help="4bit or 8bit (group size 64), optionally -g32/-g128 and -gptq, e.g. 4bit-g32-gptq")
    parser.add_argument("--gguf-file", default=None, help="the .gguf file to use from a hub repo or folder")
    parser.add_argument("--memory-budget", default=None,
                        help="memory for the weights: resident stages, stages in flight, the expert cache (e.g. "
                             "4GB); the KV cache and activations come on top")
    parser.add_argument("--prefill-step-size", type=int, default=DEFAULT_PREFILL_STEP,
                        help=f"tokens a stage runs at once; longer prompts run in chunks (default {DEFAULT_PREFILL_STEP})")
    parser.add_argument("--layer-shards-saving-path", default=None, help="where the shard folder goes")
    parser.add_argument("--hf-token", default=None)
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run the checkpoint's own modelling/tokenizer code (torch backend, families "
                             "transformers lacks); read that code first")
    parser.add_argument("--profile", action="store_true",
                        help="record read / wait / load / compute time per stage and print the table")
    if not speculation:
        parser.set_defaults(draft_model=None, num_draft_tokens=None)
    else:
        parser.add_argument("--draft-model", default=None,
                            help="speculative decoding: a smaller model of the same tokenizer (path or hub id), or "
                                 "4bit / 8bit (or 4bit-g32, ...) for a quantised copy of the model; kept resident, inside "
                                 "--memory-budget; on torch's CPU it computes in bfloat16 unless --dtype says; "
                                 "where a round costs more than it gives, plain steps are taken; the server "
                                 "speculates for a request while it is alone")
        parser.add_argument("--num-draft-tokens", type=int, default=None,
                            help="with --draft-model: the most draft tokens one sweep verifies (default: 64 in a "
                                 "tree, 16 in a chain; fewer when that is faster)")
    # launched by mlx.launch or torchrun on several ranks: a pipeline (airmlx/pipeline.py)
    parser.add_argument("--pipeline-split", default=None,
                        help="launched on several ranks: stages per rank, e.g. 9,9 (default: balanced by each "
                             "rank's budget; --memory-budget may list one budget per rank, e.g. 4GB,8GB)")
    parser.add_argument("--pipeline-timeout", type=float, default=None,
                        help=f"launched on several ranks: seconds a rank waits for a sign of life from the rank "
                             f"before it, then ends every rank with an error (default {DEFAULT_TIMEOUT:.0f})")


def add_sampling_options(parser: argparse.ArgumentParser) -> None:
    """Greedy unless --temp > 0 (like mlx-lm's CLI); then top-p / top-k not given follow the model's
    generation_config.json, then transformers' defaults (model.generate's rule)."""
    parser.add_argument("--temp", type=number_in(0, math.inf, what=" (0: greedy)"), default=None,
                        help="sample at this temperature; without it (or 0) decoding is greedy, whatever the "
                             "model's generation_config.json says")
    parser.add_argument("--top-p", type=number_in(0, 1, low_open=True), default=None,
                        help="with --temp: nucleus sampling, keep this much probability (default: the model's "
                             "generation_config.json, else 1.0)")
    parser.add_argument("--top-k", type=whole_number(0), default=None,
                        help="with --temp: sample among the k most likely tokens, 0 for all (default: the model's "
                             "generation_config.json, else 50)")


def check_sampling_options(parser: argparse.ArgumentParser, args) -> None:
    """--top-p and --top-k cut what is sampled, and only --temp > 0 samples: alone they would change nothing.
    (--seed alone is taken: greedy output is the same under every seed.)"""
    given = [f"--{name.replace('_', '-')}" for name in ("top_p", "top_k") if getattr(args, name) is not None]
    if given and not args.temp:
        parser.error(f"{' and '.join(given)} only change{'s' if len(given) == 1 else ''} sampling, and decoding is "
                     "greedy without --temp: add --temp T (T > 0), or leave them out")


def add_budget_options(parser: argparse.ArgumentParser, fraction: float) -> None:
    """The benches' budget: a fraction of the model, or a size."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--budget-fraction", type=float, default=None,
                       help=f"memory budget as a fraction of the model's bytes (default {fraction})")
    group.add_argument("--memory-budget", default=None, help="memory budget as a size, e.g. 200MB")
    parser.set_defaults(default_fraction=fraction)


def parse_bench_args(parser: ArgumentParser, argv=None) -> argparse.Namespace:
    """A bench's options; its cold regime (stage files evicted with posix_fadvise) needs a platform that has it,
    unless the bench takes --warm and was given it."""
    args = parser.parse_args(argv)
    if not getattr(args, "warm", False) and not hasattr(os, "posix_fadvise"):
        hint = "; use --warm" if hasattr(args, "warm") else ""
        parser.error(f"this platform has no posix_fadvise, so the cold regime cannot be measured{hint}")
    return args


def bench_budget(args: argparse.Namespace, model_bytes: int) -> int:
    if args.memory_budget is not None:
        return parse_bytes(args.memory_budget)
    fraction = args.default_fraction if args.budget_fraction is None else args.budget_fraction
    if not fraction > 0:
        raise AirmlxError(f"--budget-fraction {fraction}: use a fraction > 0 of the model, e.g. 0.25.")
    return int(fraction * model_bytes)


def load_model(args: argparse.Namespace, preflight: bool = True):
    """The model the options name; the first time a streamed model is opened, a one-line preflight on stderr
    (its disk's measured bandwidth and the fastest a token can be read)."""
    model = open_model(args)
    if preflight and model.plan.streamed and load_preflight(model.shard_dir) is None:
        print(quick_preflight(model), file=sys.stderr)
    return model


def open_model(args: argparse.Namespace):
    check_num_draft_tokens(args.num_draft_tokens)  # before a long load
    if args.num_draft_tokens is not None and not args.draft_model:
        raise AirmlxError(f"--num-draft-tokens {args.num_draft_tokens} sizes the rounds of a draft model; give "
                          "--draft-model too (e.g. --draft-model 4bit), or leave it out.")
    return AutoModel.from_pretrained(args.model or DEMO_MODEL, backend=args.backend, device=args.device,
                                     dtype=args.dtype, compression=args.compression,
                                     memory_budget=args.memory_budget,
                                     layer_shards_saving_path=args.layer_shards_saving_path, hf_token=args.hf_token,
                                     profiling_mode=args.profile, trust_remote_code=args.trust_remote_code,
                                     prefill_step_size=args.prefill_step_size,
                                     gguf_file=getattr(args, "gguf_file", None), draft_model=args.draft_model,
                                     num_draft_tokens=args.num_draft_tokens,
                                     pipeline_split=args.pipeline_split, pipeline_timeout=args.pipeline_timeout)


class PrintStreamer:
    """Prints text as tokens arrive (decoding the whole answer so far, so multi-token characters come out
    whole) and times the prompt and each new token. prefix: the prompt's text, printed once generation starts,
    which the answer's text then goes on from (decoded after the prompt's last tokens)."""

    def __init__(self, tokenizer, out=None, prefix: str = ""):
        self.tokenizer, self.out, self.prefix = tokenizer, out or sys.stdout, prefix
        self.text, self.times = None, []

    def put(self, value):
        self.times.append(time.perf_counter())
        if len(self.times) == 1:  # the prompt
            self.text = TextStream(self.tokenizer, context=value.reshape(-1).tolist() if self.prefix else None)
            self._write(self.prefix)
            return
        self._write(self.text.add(value.reshape(-1).tolist())[0])

    def end(self):
        self._write((self.text.flush() if self.text else "") + "\n")

    def _write(self, piece: str) -> None:
        if piece:
            self.out.write(piece)
            self.out.flush()
