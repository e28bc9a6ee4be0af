"""The token loop: input types, stopping, padding, streaming, sampling, and its errors."""
import inspect
import io
import os

import mlx.core as mx
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

import airmlx
from airmlx.errors import GenerationError
from airmlx.generation import sample, to_batch
from airmlx.units import format_bytes

from tiny import interrupt_at, make_chat_checkpoint, sentencepiece_tokenizer

PROMPT = [5, 17, 33, 2, 9, 60, 7]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from tiny import make_checkpoint
    folder = tmp_path_factory.mktemp("gen")
    ref = make_checkpoint(folder / "src", "llama")
    m = airmlx.AutoModel.from_pretrained(folder / "src", backend="torch",
                                         layer_shards_saving_path=folder / "shards", memory_budget="300KB")
    yield m, ref
    m.close()


def test_input_types_round_trip(model):
    m, _ = model
    want = m.generate(np.array([PROMPT]), max_new_tokens=5)
    assert isinstance(want, np.ndarray) and want.shape == (1, len(PROMPT) + 5)
    got_torch = m.generate(torch.tensor([PROMPT]), max_new_tokens=5)
    assert isinstance(got_torch, torch.Tensor) and got_torch.tolist() == want.tolist()
    got_mx = m.generate(mx.array([PROMPT]), max_new_tokens=5)
    assert isinstance(got_mx, mx.array) and got_mx.tolist() == want.tolist()
    assert m.generate(PROMPT, max_new_tokens=5) == want[0].tolist()
    out = m.generate(PROMPT, max_new_tokens=5, return_dict_in_generate=True)
    assert out.sequences == want[0].tolist() and out.num_new_tokens == 5


def test_eos_stops_and_pads_like_transformers(model):
    m, ref = model
    free = m.generate([PROMPT, PROMPT[:3]], max_new_tokens=12)
    eos = free[0][len(PROMPT) + 3]  # a token the first row produces mid-way
    ids = torch.tensor([PROMPT, [0] * 4 + PROMPT[:3]])
    mask = (torch.arange(len(PROMPT)) >= torch.tensor([[0], [4]])).long()
    want = ref.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=eos,
                        pad_token_id=0)
    got = m.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    assert got.tolist() == want.tolist()
    row = got[0].tolist()
    stop = row.index(eos, len(PROMPT))
    assert stop < len(row) - 1 and set(row[stop + 1:]) == {0}  # finished row: padded while the other runs on


def test_a_padded_tensor_without_attention_mask_is_masked_like_transformers_does(model):
    """Regression (a QA pass, AirLLM's README passes return_attention_mask=False): a left-padded batch without
    a mask ran its pad tokens as prompt tokens. transformers masks the pad id when no eos id shares it."""
    m, ref = model
    ids = torch.tensor([PROMPT, [90] * 4 + PROMPT[:3]])
    mask = (torch.arange(len(PROMPT)) >= torch.tensor([[0], [4]])).long()
    want = ref.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=90)
    assert ref.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=90).tolist() == want.tolist()
    assert m.generate(ids, max_new_tokens=5, pad_token_id=90).tolist() == want.tolist()
    assert m.generate(ids, max_new_tokens=5, pad_token_id=90, eos_token_id=90).tolist() != want.tolist()  # pad = eos
    as_list = m.generate(ids.tolist(), max_new_tokens=5, pad_token_id=90)  # a list padded by the caller, too
    assert as_list == want.tolist()
    # a pad id inside a prompt, or a prompt of nothing else, is a token (only left padding runs here)
    inside = [5, 90, 17, 90]
    assert m.generate([inside], max_new_tokens=3, pad_token_id=90) == m.generate(
        [inside], attention_mask=[[1] * 4], max_new_tokens=3, pad_token_id=90)
    assert len(m.generate([90, 90], max_new_tokens=2, pad_token_id=90)) == 4


def test_transformers_defaults_of_unsupported_arguments_are_taken(model):
    """generate(num_beams=1) is transformers' default, and what airmlx does: it was refused by name."""
    m, _ = model
    assert m.generate(PROMPT, max_new_tokens=2, num_beams=1, num_return_sequences=1) == m.generate(PROMPT, max_new_tokens=2)


def test_streamer_gets_prompt_then_each_token(model):
    m, _ = model
    seen = []

    class Recorder:
        def put(self, value):
            seen.append(np.asarray(value).tolist())

        def end(self):
            seen.append("end")

    out = m.generate([PROMPT], max_new_tokens=4, streamer=Recorder())
    assert seen[0] == [PROMPT] and seen[-1] == "end"
    assert [t[0] for t in seen[1:-1]] == out[0][len(PROMPT):]


def test_transformers_text_streamer_works(model, capsys):
    from transformers import TextStreamer

    class Tok:  # TextStreamer only needs decode()
        def decode(self, ids, **kw):
            return "".join(f"<{i}>" for i in ids)

    m, _ = model
    out = m.generate([PROMPT], max_new_tokens=3, streamer=TextStreamer(Tok(), skip_prompt=True))
    assert capsys.readouterr().out.strip() == "".join(f"<{i}>" for i in out[0][len(PROMPT):])


def test_use_cache_false_gives_the_same_tokens(model):
    m, _ = model
    assert m.generate(PROMPT, max_new_tokens=6, use_cache=False) == m.generate(PROMPT, max_new_tokens=6)


def test_sampling_is_seeded_and_respects_top_k(model):
    m, _ = model
    a = m.generate(PROMPT, max_new_tokens=8, do_sample=True, temperature=1.5, seed=3)
    b = m.generate(PROMPT, max_new_tokens=8, do_sample=True, temperature=1.5, seed=3)
    greedy = m.generate(PROMPT, max_new_tokens=8)
    assert a == b
    assert m.generate(PROMPT, max_new_tokens=8, do_sample=True, top_k=1, seed=5) == greedy


def test_sample_filters_match_transformers_warpers():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 50)).astype(np.float32) * 3
    t = torch.from_numpy(logits)
    for temperature, top_k, top_p in [(0.7, 0, 1.0), (1.0, 5, 1.0), (1.0, 0, 0.8), (1.3, 10, 0.5)]:
        warped = TemperatureLogitsWarper(temperature)(None, t.clone())
        if top_k:
            warped = TopKLogitsWarper(top_k)(None, warped)
        if top_p < 1:
            warped = TopPLogitsWarper(top_p)(None, warped)
        allowed = torch.isfinite(warped).numpy()
        draws = np.stack([sample(logits, True, temperature, top_k, top_p, np.random.default_rng(s)) for s in range(300)])
        assert all(allowed[row, draws[:, row]].all() for row in range(3))
        probs = torch.softmax(warped, -1).numpy()
        top = probs.argmax(-1)
        assert all((draws[:, row] == top[row]).mean() > probs[row, top[row]] - 0.15 for row in range(3))
    assert (sample(logits) == logits.argmax(-1)).all()


@pytest.mark.parametrize("kwargs, match", [
    (dict(input_ids=[]), "empty"),
    (dict(input_ids=[[1, 2]], attention_mask=[[0, 0]]), "empty"),
    (dict(input_ids=[1, 2], max_new_tokens=-1), "max_new_tokens"),
    (dict(input_ids=[1, 2], do_sample=True, temperature=0), "temperature"),
    (dict(input_ids=[1, 2], top_p=0), "top_p"),
    (dict(input_ids=[1, 2], top_k=-3), "top_k"),
    (dict(input_ids=[[1, 2, 3]], attention_mask=[[1, 0, 1]]), "left padding"),
    (dict(input_ids=[5] * 300), "context of 256"),
    (dict(input_ids="hello"), "not supported"),
])
def test_bad_generate_inputs_raise_clear_errors(model, kwargs, match):
    m, _ = model
    with pytest.raises(GenerationError, match=match):
        m.generate(**kwargs)


def test_transformers_inputs_name_and_a_ragged_mask_padded_as_its_rows(model):
    """QA: generate(inputs=...) (transformers' name) was a TypeError, and a ragged attention_mask given with ragged
    rows a numpy ValueError; the mask is now left-padded as the rows are."""
    m, _ = model
    want = m.generate([PROMPT, PROMPT[:3]], max_new_tokens=4)
    assert m.generate(inputs=[PROMPT, PROMPT[:3]], max_new_tokens=4) == want
    ragged = [[1] * len(PROMPT), [1] * 3]
    assert m.generate([PROMPT, PROMPT[:3]], attention_mask=ragged, max_new_tokens=4) == want
    with pytest.raises(GenerationError, match="got input_ids and inputs"):
        m.generate(PROMPT, inputs=PROMPT)


def test_to_batch_left_pads_ragged_lists():
    ids, mask, restore = to_batch([[1, 2, 3], [4]], pad_token_id=9)
    assert ids.tolist() == [[1, 2, 3], [9, 9, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert restore(ids) == [[1, 2, 3], [9, 9, 4]]


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_continuing_a_cache_prefills_only_new_tokens(model, tmp_path, backend):
    _, ref = model
    m = airmlx.AutoModel.from_pretrained(model[0].shard_dir, backend=backend)
    full = m.generate(PROMPT, max_new_tokens=6)
    cache = m.new_cache()
    first = m.generate(PROMPT[:4], max_new_tokens=1, past_key_values=cache)
    assert m.cache_length(cache) == 4
    fed, real = [], m.step
    m.step = lambda tokens, mask, cache: fed.append((tokens.shape[1], mask.shape[1])) or real(tokens, mask, cache)
    rest = m.generate(PROMPT[4:], max_new_tokens=6, past_key_values=cache)
    assert first[:4] == PROMPT[:4] and rest == PROMPT[4:] + full[len(PROMPT):]
    # one sweep over the tokens after the cached ones (the mask covers all), then one token per sweep
    n = len(PROMPT)
    assert fed == [(n - 4, n)] + [(1, n + i) for i in range(1, 6)]
    assert m.cache_length(cache) == len(PROMPT) + 5
    m.trim_cache(cache, 4)
    assert m.cache_length(cache) == 4
    assert m.generate(PROMPT[4:], max_new_tokens=6, past_key_values=cache) == rest
    m.close()


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_a_cache_continues_from_the_whole_conversation_as_in_transformers(model, backend):
    """transformers' generate takes the whole conversation with a cache holding its start, and runs only the
    rest; airmlx ran all of it again after the cached tokens (left alone at the thirteenth stop)."""
    from transformers import DynamicCache
    _, ref = model
    m = airmlx.AutoModel.from_pretrained(model[0].shard_dir, backend=backend)
    cache, ref_cache = m.new_cache(), DynamicCache(config=ref.config)
    first = m.generate(torch.tensor([PROMPT[:4]]), max_new_tokens=3, past_key_values=cache)
    # transformers >= 5.2x names the cache `cache=`, before it `past_key_values=`; airmlx takes both
    name = "cache" if "cache" in inspect.signature(ref.forward).parameters else "past_key_values"
    want_first = ref.generate(torch.tensor([PROMPT[:4]]), max_new_tokens=3, do_sample=False, **{name: ref_cache})
    assert first.tolist() == want_first.tolist() and m.cache_length(cache) == 6
    conversation = torch.cat([first, torch.tensor([[60, 7]])], 1)
    fed, real = [], m.step
    m.step = lambda tokens, mask, cache: fed.append(tokens.shape[1]) or real(tokens, mask, cache)
    puts = []  # a streamer is shown the whole conversation as its prompt, as transformers shows it
    streamer = type("Streamer", (), {"put": lambda self, ids: puts.append(np.asarray(ids).reshape(-1).tolist()),
                                     "end": lambda self: None})()
    out = m.generate(conversation, max_new_tokens=4, cache=cache, return_dict_in_generate=True, streamer=streamer)
    want = ref.generate(conversation, max_new_tokens=4, do_sample=False, **{name: ref_cache})
    assert out.sequences.tolist() == want.tolist() and out.num_prompt_tokens == 9 and out.past_key_values is cache
    assert puts[0] == conversation[0].tolist() and sum(puts[1:], []) == want[0, 9:].tolist()
    assert fed == [3, 1, 1, 1]  # the token after the cached six, then the two new ones; then one a step
    assert m.cache_length(cache) == 12
    # only new tokens, as before; a call other than generate() makes the cache's tokens unknown
    assert m.generate([9], max_new_tokens=1, past_key_values=cache)[0] == 9
    m.step(np.array([[5]]), np.ones((1, m.cache_length(cache) + 1)), cache)
    assert len(m.generate(want[0].tolist(), max_new_tokens=1, past_key_values=cache)) == want.shape[1] + 1
    m.close()


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_a_cut_short_generate_leaves_a_cache_that_continues_in_transformers_way(model, backend, monkeypatch):
    """Ctrl-C in a sweep: the cache certainly holds the prompt and every new token but the last one given out,
    and trimmed to that it continues from the whole conversation. Its record of its tokens was left stale, so
    the whole conversation ran again after the cached tokens, silently."""
    m = airmlx.AutoModel.from_pretrained(model[0].shard_dir, backend=backend)
    cache = m.new_cache()
    first = m.generate(PROMPT[:4], max_new_tokens=3, past_key_values=cache)
    stages, calls, inner = len(m.plan.stage_bytes), {"n": 0}, m.backend.run_stage

    def run_stage(stage, x, ctx):  # the fourth sweep of the call, half-way through its layers
        calls["n"] += 1
        if calls["n"] == 3 * stages + stages // 2:
            raise KeyboardInterrupt
        return inner(stage, x, ctx)

    given = []
    streamer = type("Streamer", (), {"put": lambda self, ids: given.extend(np.asarray(ids).reshape(-1).tolist()),
                                     "end": lambda self: None})()
    monkeypatch.setattr(m.backend, "run_stage", run_stage)
    with pytest.raises(KeyboardInterrupt):
        m.generate(first + [60, 7], max_new_tokens=8, past_key_values=cache, streamer=streamer)
    monkeypatch.undo()
    new = given[len(first) + 2:]
    assert len(new) == 3
    m.trim_cache(cache, len(first) + 2 + len(new) - 1)
    conversation = first + [60, 7] + new[:-1] + [41]
    assert m.generate(conversation, max_new_tokens=6, past_key_values=cache) == \
        m.generate(conversation, max_new_tokens=6)
    m.close()


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_a_left_padded_row_continues_a_cache_as_in_transformers(model, backend):
    """One left-padded row with its mask and a cache: on MLX the padding took positions in a fresh cache (other
    tokens than without one), and a second turn's mask over the whole conversation was cut at the cached part."""
    import copy

    from transformers import DynamicCache
    _, ref = model
    name = "cache" if "cache" in inspect.signature(ref.forward).parameters else "past_key_values"
    m = airmlx.AutoModel.from_pretrained(model[0].shard_dir, backend=backend)
    ids, mask = torch.tensor([[0, 0] + PROMPT[:4]]), torch.tensor([[0, 0, 1, 1, 1, 1]])
    cache, ref_cache = m.new_cache(), DynamicCache(config=ref.config)
    first = m.generate(ids, attention_mask=mask, max_new_tokens=3, past_key_values=cache)
    want = ref.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, **{name: ref_cache})
    assert first.tolist() == want.tolist() == m.generate(ids, attention_mask=mask, max_new_tokens=3).tolist()
    conversation = torch.cat([first, torch.tensor([[60, 7]])], 1)
    whole = torch.cat([mask, torch.ones(1, 5, dtype=torch.long)], 1)
    copied = copy.deepcopy(cache)  # transformers' way of reusing a prompt's cache: a copy knows its tokens too
    out = m.generate(conversation, attention_mask=whole, max_new_tokens=3, past_key_values=copied)
    want = ref.generate(conversation, attention_mask=whole, max_new_tokens=3, do_sample=False, **{name: ref_cache})
    assert out.tolist() == want.tolist() and m.cache_length(copied) == m.cache_length(cache) + 5
    m.close()


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_trim_repairs_a_cache_cut_mid_sweep(model, backend):
    m = airmlx.AutoModel.from_pretrained(model[0].shard_dir, backend=backend)
    want = m.generate(PROMPT, max_new_tokens=4)
    cache = m.new_cache()
    m.generate(PROMPT[:4], max_new_tokens=1, past_key_values=cache)
    restore = interrupt_at(m.backend, 4)  # embed + two layers run, then Ctrl-C
    with pytest.raises(KeyboardInterrupt):
        m.generate(PROMPT[4:], max_new_tokens=4, past_key_values=cache)
    restore()
    m.trim_cache(cache, 4)
    assert m.generate(PROMPT[4:], max_new_tokens=4, past_key_values=cache) == PROMPT[4:] + want[len(PROMPT):]
    m.close()


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_finished_rows_leave_the_batch(model, backend):
    m = airmlx.AutoModel.from_pretrained(model[0].shard_dir, backend=backend)
    rows = [PROMPT, PROMPT[:3], PROMPT[2:]]
    free = [m.generate(r, max_new_tokens=10) for r in rows]
    eos = free[1][3 + 2]  # row 1's third new token: it stops early, the others (probably) later
    alone = [m.generate(r, max_new_tokens=10, eos_token_id=eos, pad_token_id=0) for r in rows]
    widths = []
    real = m.step
    m.step = lambda tokens, mask, cache: widths.append(tokens.shape[0]) or real(tokens, mask, cache)
    batched = m.generate(rows, max_new_tokens=10, eos_token_id=eos, pad_token_id=0)
    m.close()
    width = max(len(r) for r in rows)
    for row, got, want in zip(rows, batched, alone):  # each row's tokens as alone, then padding after EOS
        new, want_new = got[width:], want[len(row):]
        assert new == (want_new + [0] * len(new))[:len(new)]
    assert eos in batched[1][width:]
    assert widths[0] == 3 and min(widths) < 3  # the batch shrank once a row was done


class AngleTok:
    """A stand-in tokenizer: token i decodes to "<i>", so "3><4" is split over two tokens."""

    def decode(self, ids, **kw):
        return "".join(f"<{int(i)}>" for i in ids)


def tokens_to_reach(new_tokens, stop, decode):
    """How many new tokens a row needs before its decoded text contains `stop` (None: never)."""
    return next((n for n in range(1, len(new_tokens) + 1) if stop in decode(new_tokens[:n])), None)


def test_stop_string_split_over_two_tokens_stops_the_row(model):
    m, _ = model
    free = m.generate(PROMPT, max_new_tokens=10)[len(PROMPT):]
    stop = f"{free[2]}><{free[3]}"  # the end of the third new token and the start of the fourth
    n = tokens_to_reach(free, stop, AngleTok().decode)
    assert n is not None and n < 10
    steps = m.memory_stats()["steps"]
    got = m.generate(PROMPT, max_new_tokens=10, stop_strings=[stop], tokenizer=AngleTok())
    assert got == PROMPT + free[:n]  # the stop string stays in, as in transformers; nothing after it
    assert m.memory_stats()["steps"] - steps == n  # one sweep per token, none after the stop
    assert m.generate(PROMPT, max_new_tokens=10, stop_strings=stop, tokenizer=AngleTok()) == got  # a lone string


def test_a_stop_strings_tokenizer_needs_only_decode_of_ids(model):
    """Regression (QA): the error said a tokenizer is "anything with decode(ids)", and a decode taking no keyword
    got decode(ids, skip_special_tokens=False): a TypeError."""
    class Plain:
        def decode(self, ids):
            return AngleTok().decode(ids)

    m, _ = model
    free = m.generate(PROMPT, max_new_tokens=10)[len(PROMPT):]
    stop = f"{free[2]}><{free[3]}"
    n = tokens_to_reach(free, stop, AngleTok().decode)
    assert m.generate(PROMPT, max_new_tokens=10, stop_strings=stop, tokenizer=Plain()) == PROMPT + free[:n]


def test_stop_strings_default_to_the_models_tokenizer(model):
    m, _ = model
    free = m.generate(PROMPT, max_new_tokens=10)[len(PROMPT):]
    words = m.tokenizer.decode(free).split()
    stop = f"{words[1][-1]} {words[2][:2]}"  # "w50 w76 w28": "0 w7", over the second and third token
    n = tokens_to_reach(free, stop, m.tokenizer.decode)
    assert n is not None and n < 10
    assert m.generate(PROMPT, max_new_tokens=10, stop_strings=[stop]) == PROMPT + free[:n]


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_a_row_at_its_stop_string_leaves_the_batch(model, backend):
    m = airmlx.AutoModel.from_pretrained(model[0].shard_dir, backend=backend)
    rows = [PROMPT, PROMPT[:3], PROMPT[2:]]
    free = [m.generate(r, max_new_tokens=10)[len(r):] for r in rows]
    stop = f"<{free[1][2]}>"  # row 1's third new token; the other rows stop there too if they make it
    alone = [m.generate(r, max_new_tokens=10, stop_strings=[stop], tokenizer=AngleTok(), pad_token_id=0)
             for r in rows]
    widths = []
    real = m.step
    m.step = lambda tokens, mask, cache: widths.append(tokens.shape[0]) or real(tokens, mask, cache)
    batched = m.generate(rows, max_new_tokens=10, stop_strings=[stop], tokenizer=AngleTok(), pad_token_id=0)
    m.close()
    width = max(len(r) for r in rows)
    for row, got, want in zip(rows, batched, alone):  # each row's tokens as alone, then padding after its stop
        new, want_new = got[width:], want[len(row):]
        assert new == (want_new + [0] * len(new))[:len(new)]
    assert len(alone[1]) == 3 + 3 and widths[0] == 3 and min(widths) < 3


@pytest.mark.parametrize("stop_strings, tokenizer, match", [
    ([""], AngleTok(), "non-empty strings"),
    ([3], AngleTok(), "non-empty strings"),
    ([], AngleTok(), "non-empty strings"),
])
def test_bad_stop_strings(model, stop_strings, tokenizer, match):
    m, _ = model
    with pytest.raises(GenerationError, match=match):
        m.generate(PROMPT, max_new_tokens=2, stop_strings=stop_strings, tokenizer=tokenizer)


def test_the_token_loop_needs_a_tokenizer_for_stop_strings():
    from airmlx.generation import generate_tokens
    ids = np.array([PROMPT])
    with pytest.raises(GenerationError, match="needs a tokenizer"):
        generate_tokens(None, None, ids, np.ones_like(ids), stop_strings=["x"])


# ---- sampling defaults: the call, then the checkpoint's generation_config.json, then transformers' defaults

QWEN_STYLE = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "bos_token_id": 1,
              "pad_token_id": 0}  # Qwen2.5-Instruct's generation_config.json, less repetition_penalty
DRAWS = 300


@pytest.fixture(scope="module")
def vocab400(tmp_path_factory):
    """A 400-token model (so top_k 50 and 20 cut something), sharded twice: as saved, and with a
    Qwen2.5-style generation_config.json."""
    import json
    import shutil

    from tiny import make_checkpoint
    root = tmp_path_factory.mktemp("vocab400")
    make_checkpoint(root / "src", "llama", vocab_size=400)
    plain = airmlx.shard_checkpoint(root / "src", root / "plain", progress=False)
    qwen = shutil.copytree(plain, root / "qwen-style")
    (qwen / "generation_config.json").write_text(json.dumps(QWEN_STYLE))
    return plain, qwen


def draws_and_logits(folder, **kwargs):
    """DRAWS first tokens sampled for PROMPT in one batch (each row samples on its own), and the logits."""
    with airmlx.AutoModel.from_pretrained(folder, backend="torch") as m:
        out = m.generate([PROMPT] * DRAWS, max_new_tokens=1, seed=0, **kwargs)
        return np.array([row[-1] for row in out]), m.logits([PROMPT])[0, -1]


def allowed(logits, temperature=1.0, top_k=0, top_p=1.0):
    """The tokens transformers' warpers leave for sampling."""
    t = TemperatureLogitsWarper(temperature)(None, torch.from_numpy(logits)[None])
    if top_k:
        t = TopKLogitsWarper(top_k)(None, t)
    if top_p < 1:
        t = TopPLogitsWarper(top_p)(None, t)
    return set(np.flatnonzero(torch.isfinite(t[0]).numpy()).tolist())


def test_the_sampling_defaults_are_transformers_own():
    from transformers import GenerationConfig

    from airmlx.generation import SAMPLING_DEFAULTS
    theirs = GenerationConfig._get_default_generation_params()
    assert SAMPLING_DEFAULTS == {k: theirs[k] for k in SAMPLING_DEFAULTS}


def test_sampling_keeps_transformers_default_top_k_50(vocab400):
    plain, _ = vocab400
    draws, logits = draws_and_logits(plain, do_sample=True)
    top50 = allowed(logits, top_k=50)
    assert len(top50) == 50 and set(draws.tolist()) <= top50
    assert len(set(draws.tolist())) > 10  # it did sample
    draws, _ = draws_and_logits(plain, do_sample=True, top_k=0)  # top_k=0 turns the cut off, as in transformers
    assert not set(draws.tolist()) <= top50


def test_generation_config_json_makes_generate_sample_within_its_settings(vocab400):
    plain, qwen = vocab400
    draws, logits = draws_and_logits(qwen)  # no sampling arguments at all
    assert len(set(draws.tolist())) > 1  # it samples, as the checkpoint asks
    assert set(draws.tolist()) <= allowed(logits, temperature=0.7, top_k=20, top_p=0.8) <= allowed(logits, top_k=20)
    greedy, _ = draws_and_logits(plain)
    assert set(greedy.tolist()) == {int(logits.argmax())}  # without the config: greedy
    # explicit arguments override the config
    assert set(draws_and_logits(qwen, do_sample=False)[0].tolist()) == {int(logits.argmax())}
    assert set(draws_and_logits(qwen, top_k=1)[0].tolist()) == {int(logits.argmax())}
    wide, _ = draws_and_logits(qwen, top_k=0, top_p=1.0, temperature=1.0)
    assert not set(wide.tolist()) <= allowed(logits, top_k=20)


def test_resolve_sampling_order():
    from airmlx.generation import resolve_sampling
    config = {"do_sample": True, "temperature": 0.7, "top_k": None}
    assert resolve_sampling(config) == {"do_sample": True, "temperature": 0.7, "top_k": 50, "top_p": 1.0}
    assert resolve_sampling(config, temperature=1.3, top_k=0, do_sample=False) == \
        {"do_sample": False, "temperature": 1.3, "top_k": 0, "top_p": 1.0}
    assert resolve_sampling({}) == {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0}


def test_generate_cli_is_greedy_unless_temp_is_given(vocab400, capsys):
    from airmlx.generate import main
    _, qwen = vocab400

    def run(*flags):
        assert main(["--model", str(qwen), "--backend", "torch", "--prompt", "w5 w17 w33", "--max-tokens", "8",
                     *flags]) == 0
        return capsys.readouterr().out

    with airmlx.AutoModel.from_pretrained(qwen, backend="torch") as m:
        ids = m.tokenizer("w5 w17 w33")["input_ids"]
        greedy = m.tokenizer.decode(m.generate(ids, max_new_tokens=8, do_sample=False)[len(ids):])
    # the new words go on after a space (they were glued to the prompt: "w5 w17 w33w20")
    assert run("--seed", "1") == run("--seed", "2") == run("--temp", "0") == f"w5 w17 w33 {greedy}\n"
    # a prompt of no tokens was told in the Python API's terms ("input_ids has shape (1, 0)")
    assert main(["--model", str(qwen), "--backend", "torch", "--prompt", ""]) == 2
    assert "is no tokens at all for this tokenizer" in capsys.readouterr().err
    for flags in (["--top-k", "5"], ["--top-p", "0.5", "--temp", "0"]):  # alone they changed nothing, silently
        with pytest.raises(SystemExit) as e:
            main(["--model", str(qwen), "--prompt", "w5", *flags])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and "decoding is greedy without --temp" in err
    assert len({run("--temp", "1.0", "--seed", str(s)) for s in range(3)}) > 1
    assert run("--temp", "1.0", "--top-k", "1", "--seed", "3") == f"w5 w17 w33 {greedy}\n"


def test_printed_text_goes_on_from_the_prompt_and_all_of_it_comes_out():
    """Regressions (review): generate printed the prompt, then the new tokens decoded alone, and sentencepiece
    tokenizers (Llama 2, Mistral) drop the space that starts a text ("The capital of France isParis"); and text
    held back while a character was incomplete never came out (the tokens of a speculative round, put at once,
    ending inside a character: all their text was lost)."""
    from airmlx.cli import PrintStreamer
    tok = sentencepiece_tokenizer()
    for prefix, want in (("w5 w6", "w5 w6 w7 w8 w9\ufffd\n"), ("", "w7 w8 w9\ufffd\n")):  # a chat reply stands alone
        out = io.StringIO()
        streamer = PrintStreamer(tok, out, prefix=prefix)
        streamer.put(np.array([[1, 5, 6]]))
        streamer.put(np.array([7]))
        streamer.put(np.array([8, 9, 3]))  # "<0xC3>": the first byte of "é"
        streamer.end()
        assert out.getvalue() == want


def test_a_chat_reply_from_generate_ends_at_the_tokenizers_eos_as_chats_does(tmp_path, capsys):
    """Regression (review): generate --chat-template stopped only at the generation config's EOS ids, where
    airmlx.chat and the server also stop at the tokenizer's: a checkpoint whose config leaves out the end-of-turn
    token its tokenizer names ran on past the reply."""
    from transformers import AutoTokenizer

    from airmlx.generate import main
    from airmlx.session import render_chat
    src = make_chat_checkpoint(tmp_path / "src")
    with airmlx.AutoModel.from_pretrained(src, backend="torch", layer_shards_saving_path=tmp_path / "plain") as m:
        ids = render_chat(m.tokenizer, [{"role": "user", "content": "What is a list?"}])
        reply = [int(t) for t in m.generate([ids], max_new_tokens=8)[0][len(ids):]]
        config_eos = m.eos_token_id
    assert reply[3] not in reply[:3] and reply[3] != config_eos
    tok = AutoTokenizer.from_pretrained(src)
    tok.chat_template = tok.chat_template.replace("eos_token", "'<|eos|>'")  # the prompt as it was
    tok.eos_token = tok.convert_ids_to_tokens(reply[3])  # the tokenizer's end of turn; the config keeps its own
    tok.save_pretrained(src)
    argv = ["--model", str(src), "--backend", "torch", "--prompt", "What is a list?", "--chat-template",
            "--max-tokens", "8"]
    assert main([*argv, "--layer-shards-saving-path", str(tmp_path / "shards")]) == 0
    assert capsys.readouterr().out == tok.decode(reply[:3], skip_special_tokens=True) + "\n"


def test_generate_cli_prints_a_chat_reply_without_the_prompt(capsys):
    """Regression: with --chat-template the CLI echoed the user's message glued to the reply
    ("What is the capital of France?The capital of France is Paris."). A reply stands alone."""
    from airmlx.generate import main
    from airmlx.hub import DEMO_MODEL
    from airmlx.session import render_chat
    assert main(["--backend", "torch", "--prompt", "The list", "--chat-template", "--max-tokens", "6"]) == 0
    with airmlx.AutoModel.from_pretrained(DEMO_MODEL, backend="torch") as m:
        ids = render_chat(m.tokenizer, [{"role": "user", "content": "The list"}])
        reply = m.tokenizer.decode(m.generate([ids], max_new_tokens=6)[0][len(ids):])
    assert capsys.readouterr().out == reply + "\n"


def test_generate_cli_refuses_what_it_cannot_do_in_one_line_before_printing(tmp_path, capsys):
    """Regressions: --chat-template on a model without one was transformers' traceback; a prompt and
    --max-tokens past the context went on into garbage; the prompt was printed before a bad option failed."""
    import json
    import shutil

    from airmlx.generate import main
    from airmlx.hub import DEMO_MODEL
    plain = tmp_path / "no-chat"
    shutil.copytree(DEMO_MODEL, plain)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    cases = [(["--model", str(plain), "--chat-template"], "has no chat template; leave out --chat-template"),
             (["--prompt", "a " * 505, "--max-tokens", "20"], "go past the model's context of 512 tokens"),
             (["--prompt", "The list", "--temp", "-1"], "--temp: -1: use a finite number >= 0"),
             (["--system-prompt", "Be brief."], "--system-prompt goes in the chat template: add --chat-template")]
    for argv, phrase in cases:
        try:
            code = main(["--backend", "torch", *argv])
        except SystemExit as e:  # argparse's own errors, in the same one-line form
            code = e.code
        assert code == 2
        out, err = capsys.readouterr()
        last = err.split("\r")[-1].split("\n", 1)[-1] if "\r" in err else err  # after a progress bar
        assert out == "" and last.startswith("airmlx: ") and last.count("\n") == 1 and phrase in last, (argv, err)


def test_generate_cli_reads_a_prompt_from_stdin_and_puts_a_system_prompt_in_the_template(monkeypatch, capsys):
    """As mlx_lm.generate: --prompt - reads stdin (it generated from the text "-"), and --system-prompt goes before
    the user's message in the chat template (there was none)."""
    import io

    import airmlx
    from airmlx.generate import main
    from airmlx.hub import DEMO_MODEL
    from airmlx.session import render_chat
    monkeypatch.setattr("sys.stdin", io.StringIO("The list"))
    assert main(["--backend", "torch", "--prompt", "-", "--max-tokens", "6"]) == 0
    with airmlx.AutoModel.from_pretrained(DEMO_MODEL, backend="torch") as model:
        tok = model.tokenizer
        plain = tok.decode(model.generate(tok("The list")["input_ids"], max_new_tokens=6), skip_special_tokens=True)
        ids = render_chat(tok, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
        reply = tok.decode(model.generate(ids, max_new_tokens=6)[len(ids):], skip_special_tokens=True)
    assert capsys.readouterr().out.strip() == plain.strip()
    assert main(["--backend", "torch", "--prompt", "Hi", "--chat-template", "--system-prompt", "Be brief.",
                 "--max-tokens", "6"]) == 0
    assert capsys.readouterr().out.strip() == reply.strip()


def test_generate_cli_cut_off_by_its_reader_ends_quietly():
    """Regression: `python -m airmlx.generate | head -c 5` ended in a BrokenPipeError traceback."""
    import subprocess
    import sys
    proc = subprocess.Popen([sys.executable, "-m", "airmlx.generate", "--backend", "torch", "--max-tokens", "24"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # the reader is gone before anything is written
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 141 and "Traceback" not in err, err


@pytest.mark.parametrize("redirect, code, said", [(">/dev/full", 1, "airmlx: cannot write the output: No space left on device."),
                                                   (">&-", 2, "airmlx: standard output is closed; give it a file or a pipe")],
                         ids=["disk full", "stdout closed"])
def test_output_that_cannot_be_written_is_said_in_one_line(redirect, code, said):
    """Regression (QA): `generate >/dev/full` ended in an OSError traceback, and with stdout closed every result was
    dropped while the command exited 0."""
    import shlex
    import subprocess
    import sys
    if redirect == ">/dev/full" and not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    command = f"{shlex.quote(sys.executable)} -m airmlx.generate --backend torch --max-tokens 4 {redirect}"
    proc = subprocess.run(["bash", "-c", command], stderr=subprocess.PIPE, text=True, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("airmlx:")]
    assert proc.returncode == code and "Traceback" not in proc.stderr and lines and lines[-1].startswith(said), \
        proc.stderr


def test_a_prompt_of_bytes_that_are_not_utf8_is_refused_in_one_line(monkeypatch, capsys):
    """Regressions: `printf 'hi \\xff' | python -m airmlx.generate --prompt -` ended in the tokenizer's TypeError
    (QA, under the C locale, where Python reads such bytes as lone surrogates), and under a UTF-8 locale, where
    Python reads stdin strictly, in a UnicodeDecodeError traceback (review)."""
    import sys

    from airmlx.generate import main
    for stdin in (io.StringIO("hi \udcff"), io.TextIOWrapper(io.BytesIO(b"hi \xff"), encoding="utf-8")):
        monkeypatch.setattr(sys, "stdin", stdin)
        assert main(["--backend", "torch", "--prompt", "-"]) == 2
        assert capsys.readouterr().err.strip() == "airmlx: the prompt is not UTF-8 text (byte 0xff at character 3); " \
                                                 "give it as UTF-8."


def test_the_stats_line_of_a_call_that_speculated_counts_its_whole_time():
    """Regression: a speculative call gives its tokens out a round at a time; timed from the first token, 8
    tokens of one round printed '12409.9 tokens/s' (and the prompt's speed took the whole round)."""
    from airmlx.hub import DEMO_MODEL
    from airmlx.spec_measure import Totals
    with airmlx.AutoModel.from_pretrained(DEMO_MODEL, backend="torch") as model:
        model.speculation.last = Totals(sweeps=2, tokens=8)
        line = model.stats_line(3, [10.0] + [14.0] * 8, start=10.0)  # 8 tokens at once, 4 s after the start
        assert "prompt: 3 tokens (in the first sweep)" in line and "generation: 8 tokens, 2.0 tokens/s" in line
        model.speculation.last = Totals()
        line = model.stats_line(3, [10.0, 11.0, 11.5], start=10.0)
        assert "prompt: 3 tokens, 3.0 tokens/s" in line and "generation: 2 tokens, 2.0 tokens/s" in line
        assert "generation: 1 token, one token" in model.stats_line(3, [10.0, 11.0], start=10.0)
        # a prefill slower than a token a second (a streamed sweep of a short prompt) printed "0.0 tokens/s"
        assert "prompt: 1 token, 40.00 s/token | generation: 2 tokens, 2.00 s/token" in \
            model.stats_line(1, [10.0, 50.0, 52.0], start=10.0)


def test_the_stats_line_reads_per_step_what_the_sweeps_read_not_the_resident_stages_first_loads():
    """Regression: an all-resident model showed its whole size (12.89 MB) read per step for its first token, and
    a first run counted the preflight's measurement reads as the steps'."""
    from airmlx.hub import DEMO_MODEL
    with airmlx.AutoModel.from_pretrained(DEMO_MODEL, backend="torch") as model:
        model.generate([[1, 2, 3]], max_new_tokens=1)
        stats = model.memory_stats()
        assert stats["resident_bytes_read"] == stats["bytes_read"] == model.plan.resident_bytes > 0
        assert "| read 0 B per step |" in model.stats_line(3, [10.0, 11.0], start=10.0)
        assert [r["swept_bytes_read"] for r in model.rank_stats()] == [0]  # one process: its own (was an error)
        model.read_bandwidth(cold=False)  # as the CLIs' first preflight does: not the sweeps' reads either
        assert model.memory_stats()["measured_bytes_read"] == model.plan.resident_bytes
        assert "| read 0 B per step |" in model.stats_line(3, [10.0, 11.0], start=10.0)
    with airmlx.AutoModel.from_pretrained(DEMO_MODEL, backend="torch", memory_budget="4MB") as model:
        model.generate([[1, 2, 3]], max_new_tokens=4)
        per_step = model.plan.streamed_bytes_per_step  # and what the prefetcher has read ahead for the next step
        ahead = (model.plan.prefetch_depth + 1) * max(model.plan.stage_bytes.values())
        read = (model.memory_stats()["bytes_read"] - model.plan.resident_bytes) / model.scheduler.steps
        assert per_step <= read <= per_step + ahead / model.scheduler.steps
        assert f"| read {format_bytes(read)} per step" in model.stats_line(3, [10.0, 11.0], start=10.0)


def test_generating_past_the_context_warns(model):
    """Left alone before: the Python generate ran past max_position_embeddings without a word (transformers'
    generate does too; the CLIs refuse it)."""
    import warnings
    model, _ = model
    limit = model.config["max_position_embeddings"]
    prompt = [5] * (limit - 4)
    with pytest.warns(UserWarning, match=f"runs past the model's context of {limit}"):
        model.generate([prompt], max_new_tokens=5, eos_token_id=-1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.generate([prompt], max_new_tokens=4, eos_token_id=-1)


def test_an_empty_eos_list_means_no_eos(model, monkeypatch):
    """Regression (QA): eos_token_id=[] raised IndexError while choosing the padding id of a model without one."""
    model, _ = model
    monkeypatch.setattr(type(model), "pad_token_id", None)
    assert model.generate([PROMPT], max_new_tokens=6, eos_token_id=[]) == \
        model.generate([PROMPT], max_new_tokens=6, eos_token_id=-1)


@pytest.mark.parametrize("written, want", [({}, 20), ({"max_new_tokens": 3}, 3), ({"max_length": 9}, 9 - len(PROMPT)),
                                           ({"max_length": 2}, "counts the prompt too")])
def test_max_new_tokens_left_out_or_none_follows_generation_config_as_transformers(vocab400, tmp_path, written, want):
    """Regression (QA): max_new_tokens=None was refused, where transformers takes generation_config.json's
    max_new_tokens, else its max_length less the prompt."""
    import json
    import shutil
    folder = shutil.copytree(vocab400[0], tmp_path / "shards")
    (folder / "generation_config.json").write_text(json.dumps(written))
    with airmlx.AutoModel.from_pretrained(folder, backend="torch") as m:
        for kwargs in ({}, {"max_new_tokens": None}):
            if isinstance(want, str):  # as transformers raises
                with pytest.raises(GenerationError, match=want):
                    m.generate([PROMPT], **kwargs)
            else:
                assert len(m.generate([PROMPT], eos_token_id=[], **kwargs)[0]) == len(PROMPT) + want
