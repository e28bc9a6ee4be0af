"""The token loop: input types, stopping, padding, streaming, sampling, and its errors."""
import mlx.core as mx
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

import airmlx
from airmlx.errors import GenerationError
from airmlx.generation import sample, to_batch

from tiny import interrupt_at

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
