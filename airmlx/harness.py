"""lm-evaluation-harness adapter: `python -m airmlx.harness --model airmlx --model_args pretrained=...`.

lm-eval finds models in its registry only; importing this module registers "airmlx", and running it as
a module runs lm-eval's own command line with that registration in place (same arguments as `lm_eval`).
loglikelihood and loglikelihood_rolling go through the layer-major model.score(); generate_until through
batched model.generate().
"""
import sys
import warnings

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from .auto import AutoModel
from .cli import face
from .hub import DEMO_MODEL


def cuda_available():
    import torch
    return torch.cuda.is_available()


@register_model("airmlx")
class AirmlxLM(LM):
    def __init__(self, pretrained=None, backend="auto", device=None, dtype=None, memory_budget=None,
                 compression=None, batch_size=8, max_length=None, max_gen_toks=256, layer_shards_saving_path=None,
                 trust_remote_code=False, **unused):
        super().__init__()
        if str(device).startswith("cuda") and not cuda_available():
            # lm-eval's command line sends device=cuda:0 unless told otherwise, CUDA or not
            warnings.warn(f"device {device!r} has no CUDA here; airmlx picks the device itself.")
            device = None
        self.model = AutoModel.from_pretrained(pretrained or DEMO_MODEL, backend=backend, device=device,
                                               dtype=dtype, memory_budget=memory_budget, compression=compression,
                                               layer_shards_saving_path=layer_shards_saving_path,
                                               # model_args arrive as strings: "trust_remote_code=True"
                                               trust_remote_code=str(trust_remote_code).lower() in ("true", "1"))
        self.tokenizer = self.model.tokenizer
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self.max_length = int(max_length or self.model.config.get("max_position_embeddings", 2048))
        self.max_gen_toks = int(max_gen_toks)
        self.prefix_token = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None \
            else self.tokenizer.eos_token_id

    def encode_pair(self, context, continuation):
        """Token ids of context and continuation, split where the joint encoding splits (trailing spaces of
        the context belong to the continuation, as lm-eval's own models do it)."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.tokenizer(context + continuation)["input_ids"]
        context_ids = self.tokenizer(context)["input_ids"] if context else [self.prefix_token]
        if not context:
            whole = context_ids + self.tokenizer(continuation, add_special_tokens=False)["input_ids"]
        return whole[:len(context_ids)], whole[len(context_ids):]

    def loglikelihood(self, requests, disable_tqdm=False):
        pairs = [self.encode_pair(*r.args) for r in requests]
        pairs = [(c[-(self.max_length - len(k)):], k) for c, k in pairs]
        return [tuple(s) for s in self.model.score(pairs, batch_size=self.batch_size, progress=not disable_tqdm)]

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        out = []
        for (text,) in (r.args for r in requests):
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            windows = [make_disjoint_window(w) for w in
                       get_rolling_token_windows(ids, self.prefix_token, self.max_length, context_len=1)]
            scores = self.model.score(windows, batch_size=self.batch_size, progress=False)
            out.append(sum(s for s, _ in scores))
        return out

    def generate_until(self, requests, disable_tqdm=False):
        out = []
        for context, gen_kwargs in (r.args for r in requests):
            kwargs = dict(gen_kwargs)
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(kwargs.pop("temperature", 0.0))
            do_sample = bool(kwargs.pop("do_sample", temperature > 0))
            ids = self.tokenizer(context)["input_ids"][-(self.max_length - max_new):]
            seq = self.model.generate([ids], max_new_tokens=max_new, do_sample=do_sample,
                                      temperature=temperature or 1.0, top_p=float(kwargs.pop("top_p", 1.0)))[0]
            text = self.tokenizer.decode(seq[len(ids):], skip_special_tokens=True)
            for stop in until:
                text = text.split(stop)[0]
            out.append(text)
        return out


@face
def main(argv=None) -> int:
    """lm-eval's own command line (the same arguments as `lm_eval`), with "airmlx" registered."""
    from lm_eval.__main__ import cli_evaluate
    sys.argv[0] = "python -m airmlx.harness"
    if argv is not None:
        sys.argv[1:] = list(argv)
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
