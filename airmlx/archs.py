"""Registry: model_type -> how its checkpoint splits into stages, and the math switches both backends share.

One entry per architecture. The model math lives in mlx-lm and transformers; each backend keeps its own
table of the framework modules that run an architecture and the workarounds they need.
"""
import re
from dataclasses import dataclass
from typing import NamedTuple

from .errors import CheckpointError, UnsupportedArchitectureError


class Fused(NamedTuple):
    """A MoE checkpoint's tensor that holds all of a layer's experts, (experts, rows, columns) for weights,
    (experts, outputs) for biases: the sharder splits it (airmlx/relayout.py) into each expert's own tensors."""
    tensor: str  # its path in the layer
    hidden_in: bool  # whether the hidden size is the weight's input (else its output); None for a bias
    parts: tuple  # the per-expert tensors its outputs split into, in order
    interleaved: bool = False  # the parts' outputs alternate (gpt-oss: gate, up, gate, up, ...), else one after another
    in_out: bool = False  # stored (in, out) whatever the shape says (gpt-oss's square down_proj cannot tell)


@dataclass(frozen=True)
class Arch:
    """What both backends and the sharder need of an architecture: where its stages sit in the checkpoint
    and the math switches the stage wiring applies. Framework modules and workarounds live in each
    backend's own table (backends/mlx_archs.py MLX_ARCHS, backends/torch_backend.py TORCH_ARCHS)."""
    model_type: str
    # module paths in the checkpoint (remote-code families differ from transformers' own names)
    embed: str = "model.embed_tokens"
    positions: str = None  # learned position embeddings (GPT-2, StarCoder), added to the tokens' in the embed stage
    bounded_positions: bool = False  # rotary positions from a table of max_position_embeddings (transformers' GPT-J)
    layers: str = "model.layers"
    norm: str = "model.norm"
    head: str = "lm_head"
    remote_code: bool = False  # ships its own modelling code: torch runs it only with trust_remote_code=True
    embed_scale: bool = False  # hidden states leave the embedding times sqrt(hidden_size), in the model's dtype
    final_softcap: bool = False  # logits = cap * tanh(logits / cap), cap = config final_logit_softcapping
    # config keys of constants outside the decoder layers: the embedding's output times config[embed_multiplier]
    # (Granite), the logits times config[logit_multiplier] (Cohere) or over config[logit_divisor] (Granite)
    embed_multiplier: str = None
    logit_multiplier: str = None
    logit_divisor: str = None
    unquantized: tuple = ()  # modules the sharder's compression leaves alone
    unquantized_in_layers: tuple = ()  # likewise, in every decoder layer (a router mlx-lm keeps as a plain array)
    # MoE: where a layer's per-expert modules sit in the checkpoint ("<experts>.<e>.<proj>.weight"); the
    # sharder stores them apart from the layer so each expert is read on its own, after routing
    experts: str = None
    # MoE: the SwitchGLU mlx-lm stacks a layer's routed experts into, (experts, ...) per projection, as
    # mlx-community checkpoints store them (the sharder splits those): by default beside `experts`, "switch_mlp"
    switch: str = None
    expert_names: tuple = ()  # (checkpoint projection, SwitchGLU projection) where they differ (Mixtral's w1, w2, w3)
    # MoE checkpoints that fuse a layer's experts into one (experts, ...) tensor: (Fused, ...); the sharder splits
    # each (airmlx/relayout.py) into what a per-expert checkpoint holds
    fused_experts: tuple = ()
    # config.sliding_window applies to every layer when the config lists no layer_types (transformers'
    # Mistral, Phi-3, Mixtral, Phi-3.5-MoE, StarCoder2 and Qwen3-MoE pick their mask by `sliding_window is None`)
    window_everywhere: bool = False
    ignored: str = None  # a regex of buffers its checkpoints carry that no framework loads (beyond IGNORED's)
    # (transformers' prefix, mlx-lm's) where mlx-lm names the parameters otherwise (GPT-NeoX): the MLX backend
    # renames as it loads, and the sharder takes a checkpoint mlx-lm wrote (mlx-community's) back to transformers'
    mlx_names: tuple = ()
    # linears of a decoder layer that transformers keeps as Conv1D, their weights stored (in, out) (GPT-2): the
    # sharder writes them (out, in), as every other linear, and the torch backend runs them as nn.Linear
    conv1d: tuple = ()

    @property
    def embed_prefix(self):
        return self.embed + "."

    @property
    def layer_prefix(self):
        return self.layers + "."

    @property
    def stacked_experts(self):
        """Where mlx-lm's SwitchGLU sits in a layer (None for a dense architecture)."""
        return self.switch or (self.experts and self.experts.rpartition(".")[0] + ".switch_mlp")

    @property
    def embed_stage_prefixes(self):
        return (self.embed_prefix, self.positions + ".") if self.positions else (self.embed_prefix,)

    @property
    def head_prefixes(self):
        return (self.norm + ".", self.head + ".")


W123 = (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj"))  # Mixtral's names for its experts' projections

ARCHS = {a.model_type: a for a in [
    Arch("llama"),
    Arch("mistral", window_everywhere=True),  # Mistral-7B-v0.1: sliding_window 4096
    Arch("qwen2"),
    Arch("qwen3"),
    Arch("phi3", window_everywhere=True),  # Phi-3-*-4k: sliding_window 2047
    Arch("glm4"),
    Arch("smollm3"),  # no rotary positions in every fourth layer (config.no_rope_layers)
    Arch("olmo2"),
    Arch("olmo3"),  # sliding-window layers from config.layer_types
    Arch("phi", norm="model.final_layernorm"),  # Phi-1 / 2: a biased head
    Arch("ernie4_5"),
    Arch("helium"),
    Arch("hunyuan_v1_dense"),
    Arch("stablelm"),
    Arch("nemotron"),
    Arch("seed_oss"),
    Arch("starcoder2", window_everywhere=True),  # LayerNorm, biases, an ungated GELU MLP; sliding_window 4096
    Arch("gemma", embed_scale=True),  # Gemma 1: RMSNorm with weight + 1, a GELU-gated MLP, tied head
    Arch("granite", embed_multiplier="embedding_multiplier", logit_divisor="logits_scaling"),
    Arch("cohere", logit_multiplier="logit_scale"),  # Command-R: LayerNorm, attention and MLP in parallel
    Arch("cohere2", logit_multiplier="logit_scale"),  # Command R7B: sliding-window layers from config.layer_types
    Arch("apertus"),  # Apertus 8B / 70B: xIELU activation, q / k norms, an ungated MLP
    Arch("exaone4"),  # EXAONE 4.0: norms after attention and MLP, sliding-window layers from config.layer_types
    Arch("glm"),  # GLM-4 (glm-4-9b-chat-hf): partial interleaved rotary, fused gate_up_proj
    # Pythia, GPT-NeoX-20B: LayerNorm, partial rotary, attention and MLP in parallel; older checkpoints carry the
    # attention's causal mask as a buffer
    Arch("gpt_neox", embed="gpt_neox.embed_in", layers="gpt_neox.layers", norm="gpt_neox.final_layer_norm",
         head="embed_out", ignored=r"\.attention\.(bias|masked_bias)$", mlx_names=(
             ("gpt_neox.layers.", "model.h."), ("gpt_neox.", "model."), ("embed_out.", "model.embed_out."))),
    # GPT-2, DistilGPT2, DialoGPT: StarCoder's layout with Conv1D linears; the original checkpoints name the tensors
    # without the "transformer." prefix (wte.weight, h.0.*), which the sharder adds
    Arch("gpt2", embed="transformer.wte", positions="transformer.wpe", layers="transformer.h", norm="transformer.ln_f",
         ignored=r"\.attn\.(bias|masked_bias)$", mlx_names=(("transformer.", "model."),),
         conv1d=("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")),
    # GPT-J 6B: rotary over the first rotary_dim of each head (interleaved), attention and MLP in parallel, a biased head
    Arch("gptj", embed="transformer.wte", layers="transformer.h", norm="transformer.ln_f",
         ignored=r"\.attn\.(bias|masked_bias)$", mlx_names=(("transformer.", "model."),), bounded_positions=True),
    # StarCoder, SantaCoder, WizardCoder: learned positions, multi-query attention, LayerNorm, a GELU MLP, biases
    Arch("gpt_bigcode", embed="transformer.wte", positions="transformer.wpe", layers="transformer.h",
         norm="transformer.ln_f", ignored=r"\.attn\.(bias|masked_bias)$"),
    Arch("ministral3", window_everywhere=True),  # Ministral 3: Llama 4's attention temperature scaling
    # MoE: the layer stage holds attention, norms, router (and a shared expert); the routed experts stream
    # one by one (airmlx/experts.py), stacked for the framework's own MoE module
    Arch("mixtral", experts="block_sparse_moe.experts", expert_names=W123, window_everywhere=True),
    Arch("qwen2_moe", experts="mlp.experts"),
    # Qwen3-VL-MoE's language model is Qwen3-MoE with its experts fused (released (in, out), as transformers
    # 5 saves them (out, in))
    Arch("qwen3_moe", experts="mlp.experts", window_everywhere=True, fused_experts=(
        Fused("mlp.experts.gate_up_proj", True, ("gate_proj.weight", "up_proj.weight")),
        Fused("mlp.experts.down_proj", False, ("down_proj.weight",)))),
    Arch("olmoe", experts="mlp.experts"),
    # Phi-3.5-MoE: sparsemixer routing
    Arch("phimoe", experts="block_sparse_moe.experts", expert_names=W123, window_everywhere=True),
    Arch("ernie4_5_moe", experts="mlp.experts"),  # ERNIE 4.5 MoE: shared experts, a routing bias
    # routers that are plain arrays in mlx-lm stay unquantised (as DeepSeek's below)
    Arch("exaone_moe", experts="mlp.experts", unquantized_in_layers=("mlp.gate",)),  # K-EXAONE: DeepSeek-V3's routing
    Arch("laguna", experts="mlp.experts", unquantized_in_layers=("mlp.gate",)),
    # dots.llm1: DeepSeek-V3's routing
    Arch("dots1", experts="mlp.experts", switch="mlp.experts", unquantized_in_layers=("mlp.gate",)),
    Arch("mellum", experts="mlp.experts"),  # sliding-window layers with rotary settings of their own
    # MiniMax-M2, M2.1, M2.5: Mixtral's layout, sigmoid routing with a correction bias, q / k norms over all heads
    Arch("minimax_m2", experts="block_sparse_moe.experts", expert_names=W123),
    # Granite 3 MoE: Granite's multipliers; its experts fused, gate and up in one
    Arch("granitemoe", experts="block_sparse_moe.experts", embed_multiplier="embedding_multiplier",
         logit_divisor="logits_scaling", fused_experts=(
             Fused("block_sparse_moe.input_linear.weight", True, ("gate_proj.weight", "up_proj.weight")),
             Fused("block_sparse_moe.output_linear.weight", False, ("down_proj.weight",)))),
    # gpt-oss 20B / 120B: attention sinks, sliding-window layers from config.layer_types, biased experts whose gate
    # and up outputs alternate, stored (in, out) in bf16 checkpoints; the released ones are mxfp4 (relayout.py)
    Arch("gpt_oss", experts="mlp.experts", switch="mlp.experts", unquantized_in_layers=("mlp.router",), fused_experts=(
        Fused("mlp.experts.gate_up_proj", True, ("gate_proj.weight", "up_proj.weight"), interleaved=True, in_out=True),
        Fused("mlp.experts.gate_up_proj_bias", None, ("gate_proj.bias", "up_proj.bias"), interleaved=True),
        Fused("mlp.experts.down_proj", False, ("down_proj.weight",), in_out=True),
        Fused("mlp.experts.down_proj_bias", None, ("down_proj.bias",)))),
    # DeepSeek-V2 / V3 / R1: latent attention, a shared expert, (grouped) routing; the first layers are dense.
    # Their router is a plain array in mlx-lm, so compression leaves it alone
    Arch("deepseek_v2", experts="mlp.experts", unquantized_in_layers=("mlp.gate",)),
    Arch("deepseek_v3", experts="mlp.experts", unquantized_in_layers=("mlp.gate",)),
    Arch("glm4_moe", experts="mlp.experts", unquantized_in_layers=("mlp.gate",)),  # GLM-4.5, 4.6: DeepSeek-V3's routing
    Arch("glm4_moe_lite", experts="mlp.experts", unquantized_in_layers=("mlp.gate",)),  # GLM-4.7-Flash: DeepSeek-V3's
    # sliding-window layers come from config.layer_types (layer_types() below)
    Arch("gemma2", embed_scale=True, final_softcap=True),
    Arch("gemma3_text", embed_scale=True, final_softcap=True),
    # remote-code families: on torch, transformers' module where it has one (internlm3), else the
    # checkpoint's own code with trust_remote_code=True
    Arch("internlm2", embed="model.tok_embeddings", head="output", remote_code=True),
    Arch("internlm3", remote_code=True),
    Arch("qwen", embed="transformer.wte", layers="transformer.h", norm="transformer.ln_f", remote_code=True),
    # mlx-lm's sanitize normalises lm_head (a NormHead) only when it is not quantised: compression keeps it
    Arch("baichuan_m1", remote_code=True, unquantized=("lm_head",)),
]}

# Buffers some checkpoints carry that no framework loads.
IGNORED = re.compile(r"rotary_emb\.inv_freq$")


def renamed(name: str, renames) -> str:
    """name with the first of its (prefix, replacement) renames that applies; for the way back, pass them
    reversed (Arch.mlx_names: mlx-lm's names are the longer ones first)."""
    for old, new in renames:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def with_base_prefix(arch, names) -> dict:
    """{name: the name under the model's prefix} for a checkpoint saved from the base model, without it (GPT-2's
    wte.weight, h.0.*, ln_f.*: transformers adds "transformer." as it loads); other names are kept."""
    prefix = arch.embed.partition(".")[0] + "."
    bare = tuple(path.removeprefix(prefix) + "." for path in (arch.embed, arch.positions, arch.layers, arch.norm)
                 if path and path.startswith(prefix))
    return {n: prefix + n if n.startswith(bare) else n for n in names}


def from_mlx_names(arch, names) -> dict:
    """{name: transformers' name} for a checkpoint mlx-lm wrote (its names where Arch.mlx_names says so)."""
    back = sorted(((new, old) for old, new in arch.mlx_names), key=lambda pair: -len(pair[0]))
    return {n: renamed(n, back) for n in names}


# image-text model_types whose language model airmlx runs -> the model_type it runs as (None: text_config's own);
# airmlx/multimodal.py reads their checkpoints
LANGUAGE_MODELS = {"gemma3": None, "mistral3": None, "qwen2_vl": "qwen2", "qwen2_5_vl": "qwen2", "qwen3_vl": "qwen3",
                   "qwen3_vl_moe": "qwen3_moe"}


def arch_for(config: dict) -> Arch:
    model_type = config.get("model_type")
    if model_type not in ARCHS:
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} is not supported by airmlx; supported: {', '.join(sorted(ARCHS))}; "
            f"image-text, their language model: {', '.join(sorted(LANGUAGE_MODELS))}.")
    return ARCHS[model_type]


def unquantized_modules(config: dict) -> list:
    """The module paths the sharder's compression leaves alone (Arch.unquantized, and
    Arch.unquantized_in_layers in every decoder layer): mlx-lm's per-module False entries."""
    arch = arch_for(config)
    return [*arch.unquantized, *(f"{arch.layer_prefix}{i}.{m}" for i in range(config["num_hidden_layers"])
                                 for m in arch.unquantized_in_layers)]


def stage_name(kind, index=None, num_layers=0):
    if kind in ("layer", "experts"):
        name = f"layer.{index:0{max(3, len(str(num_layers - 1)))}d}"
        return name + ".experts" if kind == "experts" else name
    return kind


def experts_per_token(config: dict) -> int:
    """The experts a token routes to: num_experts_per_tok, which ERNIE 4.5's config.json calls moe_k."""
    return config.get("num_experts_per_tok") or config.get("moe_k") or 1


def routed_experts(config: dict) -> int:
    """The routed experts of a layer, under the names configs give them (1 for a dense model)."""
    names = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
    return next((config[n] for n in names if isinstance(config.get(n), int) and config[n] > 0), 1)


def expert_pattern(arch):
    """Matches a routed expert's checkpoint tensor: groups (layer, expert)."""
    return re.compile(re.escape(arch.layer_prefix) + r"(\d+)\." + re.escape(arch.experts) + r"\.(\d+)\.")


def expert_index(arch, tensor_name):
    m = expert_pattern(arch).match(tensor_name) if arch.experts else None
    return int(m.group(2)) if m else None


def stage_layout(config: dict, tensor_names: list) -> list:
    """Split a checkpoint's tensor names into stages, in sweep order: [(stage name, kind, [tensor names])].

    Tied embeddings: the head stage carries the embedding matrix too (under its own name), because the
    head reads all of it every step while the embedding stage only needs a few rows. MoE layers: the
    routed experts' tensors form an "experts" stage after their layer (read expert by expert, not swept).
    """
    arch = arch_for(config)
    n = config["num_hidden_layers"]
    names = [t for t in tensor_names if not IGNORED.search(t) and not (arch.ignored and re.search(arch.ignored, t))]
    embed = [t for t in names if t.startswith(arch.embed_stage_prefixes)]
    layers = [[] for _ in range(n)]
    head, stray = [], []
    layer_re = re.compile(re.escape(arch.layer_prefix) + r"(\d+)\.")
    # DeepSeek-V3's and GLM-4.5's multi-token prediction layers come after the decoder's: no step runs them
    predictors = config.get("num_nextn_predict_layers") or 0
    for t in names:
        m = layer_re.match(t)
        if m and int(m.group(1)) < n:
            layers[int(m.group(1))].append(t)
        elif m and int(m.group(1)) < n + predictors:
            continue
        elif t.startswith(arch.head_prefixes):
            head.append(t)
        elif not t.startswith(arch.embed_stage_prefixes):
            stray.append(t)
    if stray:
        raise CheckpointError(f"{len(stray)} checkpoint tensors belong to no stage of a {arch.model_type} model "
                              f"(e.g. {stray[:3]}); is config.json's model_type right?")
    if not embed:
        raise CheckpointError(f"the checkpoint has no {arch.embed_prefix}* tensors; it is incomplete.")
    missing = [i for i, ts in enumerate(layers) if not ts]
    if missing:
        raise CheckpointError(f"the checkpoint has no tensors for decoder layers {missing[:5]} of {n}; "
                              "it is incomplete or config.json's num_hidden_layers is wrong.")
    has_head = any(t.startswith(arch.head + ".") for t in head)
    tied = config.get("tie_word_embeddings", not has_head)
    if not tied and not has_head:
        raise CheckpointError("config.json says tie_word_embeddings is false but the checkpoint has no "
                              f"{arch.head}.weight; the checkpoint is incomplete.")
    if tied:  # the embedding is the head's weight; a bias of its own (ERNIE 4.5 with use_bias) stays
        head = [t for t in head if t not in {f"{arch.head}.{k}" for k in ("weight", "scales", "biases")}] + \
            [t for t in embed if t.startswith(arch.embed_prefix)]
    stages = [("embed", "embed", embed)]
    for i, ts in enumerate(layers):
        routed = [t for t in ts if expert_index(arch, t) is not None]
        stages.append((stage_name("layer", i, n), "layer", [t for t in ts if expert_index(arch, t) is None]))
        if routed:
            stages.append((stage_name("experts", i, n), "experts", routed))
    stages.append(("head", "head", head))
    return stages


def rope_config(config):
    """rope_theta and rope_scaling, whether the config has them top-level (transformers 4) or in
    rope_parameters (transformers 5 writes only that)."""
    params = config.get("rope_parameters") or {}
    params = params.get("full_attention", params)  # per layer type (gemma3): the global layers' settings
    theta = config.get("rope_theta", params.get("rope_theta"))
    scaling = config.get("rope_scaling")
    if scaling is None and params.get("rope_type", "default") != "default":
        # mlx-lm's modules read "type" (transformers 4's key) or "rope_type", some only the first
        scaling = {"type": params["rope_type"], **{k: v for k, v in params.items() if k != "rope_theta"}}
    return theta, scaling


def layer_types(config):
    """Per layer: "full_attention" or "sliding_attention" (transformers' config.layer_types, or every layer
    sliding where the architecture applies config.sliding_window to all of them)."""
    n = config["num_hidden_layers"]
    # Qwen3-MoE's config keeps a sliding_window its use_sliding_window turns off
    everywhere = arch_for(config).window_everywhere and config.get("sliding_window") and \
        config.get("use_sliding_window", True)
    types = config.get("layer_types") or [("sliding_attention" if everywhere else "full_attention")] * n
    if "sliding_window_layers" in config:  # baichuan_m1 lists its sliding layers instead
        types = ["sliding_attention" if i in config["sliding_window_layers"] else "full_attention" for i in range(n)]
    return list(types)[:n]

