"""The server's engine without HTTP: model.step_many (one sweep, several caches), merging and extracting
caches, and the engine's batches against model.generate, on both backends."""
import threading
import time

import numpy as np
import pytest

import airmlx
from airmlx.engine import Delta, Engine, Failed, Finished, Request, RequestError, Sampling
from airmlx.textstream import TextStream

from tiny import make_checkpoint, sentencepiece_tokenizer, word_tokenizer_with_special

PROMPTS = [[5, 17, 33, 2, 9, 60, 7], [8, 90, 10, 4], [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    make_checkpoint(root / "src", "llama")
    return airmlx.shard_checkpoint(root / "src", root / "shards", progress=False)


@pytest.fixture(scope="module")
def windowed(tmp_path_factory):
    """A Mistral with an 8-token sliding window: its caches cannot be merged into one batch."""
    root = tmp_path_factory.mktemp("engine-sliding")
    make_checkpoint(root / "src", "mistral", sliding_window=8)
    return airmlx.shard_checkpoint(root / "src", root / "shards", progress=False)


def load(shards, backend, **kw):
    # no prefetch thread: every streamed byte is read inside the sweep that uses it, so counts are exact
    return airmlx.AutoModel.from_pretrained(shards, backend=backend, memory_budget="420KB", prefetching=False, **kw)


def prefill(prompt):
    return np.array([prompt]), np.ones((1, len(prompt)), dtype=np.int64)


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_step_many_is_each_step_alone_for_one_sweep_of_reads(shards, backend):
    with load(shards, backend) as m:
        assert m.plan.streamed
        alone = [m.step(*prefill(p), m.new_cache()) for p in PROMPTS]
        before = m.memory_stats()
        together = m.step_many([(*prefill(p), m.new_cache()) for p in PROMPTS])
        after = m.memory_stats()
        for a, b in zip(alone, together):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
        assert after["steps"] - before["steps"] == 1
        assert after["bytes_read"] - before["bytes_read"] == m.plan.streamed_bytes_per_step


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_merged_caches_decode_as_each_prompt_alone(shards, backend):
    with load(shards, backend) as m:
        solo = [m.generate(p, max_new_tokens=6)[len(p):] for p in PROMPTS]
        caches = [m.new_cache() for _ in PROMPTS]
        tokens = [[int(x.argmax())] for x in m.step_many([(*prefill(p), c) for p, c in zip(PROMPTS, caches)])]
        lengths = [len(p) for p in PROMPTS]
        batch = m.merge_caches(caches, [[n] for n in lengths])
        assert m.memory_stats()["kv_cache"] >= m.cache_bytes(batch) > 0
        for _ in range(5):
            width = m.cache_length(batch)
            mask = np.array([[0] * (width - n) + [1] * (n + 1) for n in lengths])
            logits = m.step_many([(np.array([[t[-1]] for t in tokens]), mask, batch)])[0]
            for t, row in zip(tokens, logits):
                t.append(int(row.argmax()))
            lengths = [n + 1 for n in lengths]
        assert tokens == solo
        one = m.extract_cache(batch, 1, lengths[1])  # the short prompt's row, its padding dropped
        assert m.cache_length(one) == lengths[1]
        # the extracted conversation continues exactly as the uninterrupted one
        nxt = m.generate([tokens[1][-1]], past_key_values=one, max_new_tokens=3)
        assert nxt[1:] == m.generate(PROMPTS[1], max_new_tokens=9)[len(PROMPTS[1]) + 6:]


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_selecting_the_row_of_a_one_row_cache_keeps_it(shards, backend):
    """Regression (QA): on MLX, select_cache_rows on a cache of one unpadded prompt (mlx-lm's KVCache, which has
    no filter) raised AttributeError; torch kept the row."""
    with load(shards, backend) as m:
        empty = m.new_cache()
        m.select_cache_rows(empty, [0])
        assert m.cache_length(empty) == 0
        cache = m.new_cache()
        m.step(*prefill(PROMPTS[0]), cache)
        m.select_cache_rows(cache, [0])
        assert m.cache_length(cache) == len(PROMPTS[0])
        nxt = m.generate([7], past_key_values=cache, max_new_tokens=3)
        assert nxt == m.generate(PROMPTS[0] + [7], max_new_tokens=3)[len(PROMPTS[0]):]


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_extracting_more_tokens_than_a_row_holds_is_refused(shards, backend):
    """Regression (QA): after a trim to 1 token, extract_cache(cache, 0, 3) raised a bare ValueError on MLX and on
    torch returned a 1-token cache; a row the cache lacks gave torch an empty cache and MLX an IndexError."""
    from airmlx.errors import GenerationError
    with load(shards, backend) as m:
        cache = m.new_cache()
        m.step(*prefill(PROMPTS[0]), cache)
        m.trim_cache(cache, 1)
        with pytest.raises(GenerationError, match="row 0 holds .*1 tokens, not 3"):
            m.extract_cache(cache, 0, 3)
        with pytest.raises(GenerationError, match="row 1 is not a row of this cache"):
            m.extract_cache(cache, 1, 1)
        with pytest.raises(GenerationError, match="whole numbers"):
            m.extract_cache(cache, -1, 1)
        assert m.cache_length(m.extract_cache(cache, 0, 1)) == 1


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_extracting_a_padded_row_counts_its_own_tokens(shards, backend):
    """Regression (stop 44's note): on torch, extract_cache checked a length only against the batch's width, so a
    left-padded row asked for more tokens than it holds came back with padding positions as tokens."""
    from airmlx.errors import GenerationError
    with load(shards, backend) as m:
        caches = [m.new_cache() for _ in PROMPTS[:2]]
        m.step_many([(*prefill(p), c) for p, c in zip(PROMPTS[:2], caches)])
        batch = m.merge_caches(caches, [[len(p)] for p in PROMPTS[:2]])
        assert m.cache_length(batch) == len(PROMPTS[0])
        with pytest.raises(GenerationError, match=f"row 1 holds {len(PROMPTS[1])} tokens, not {len(PROMPTS[0])}"):
            m.extract_cache(batch, 1, len(PROMPTS[0]))
        m.select_cache_rows(batch, [1])  # the short row alone keeps its padding
        with pytest.raises(GenerationError, match=f"row 0 holds {len(PROMPTS[1])} tokens"):
            m.extract_cache(batch, 0, len(PROMPTS[1]) + 1)
        one = m.extract_cache(batch, 0, len(PROMPTS[1]))
        assert m.cache_length(one) == len(PROMPTS[1])
        assert m.generate([7], past_key_values=one, max_new_tokens=3) == \
            m.generate(PROMPTS[1] + [7], max_new_tokens=3)[len(PROMPTS[1]):]


class Collect:
    """An emit callback gathering one request's events."""

    def __init__(self):
        self.events, self.times, self.done = [], [], threading.Event()

    def __call__(self, event):
        self.events.append(event)
        self.times.append(time.monotonic())
        if isinstance(event, (Finished, Failed)):
            self.done.set()

    @property
    def tokens(self):
        return [t for e in self.events if isinstance(e, Delta) for t in e.tokens]


def run_engine(engine, prompts, max_tokens, stagger=False, **kw):
    """Run requests to their end; stagger: each is sent once the one before has its first token, so it
    joins a batch already decoding."""
    outs = [Collect() for _ in prompts]
    for p, out in zip(prompts, outs):
        engine.submit(Request(p, max_tokens, Sampling(**kw), out))
        while stagger and not out.events:
            time.sleep(0.001)
    assert all(out.done.wait(60) for out in outs), "a request never finished"
    deadline = time.monotonic() + 10
    while engine.stats()["active"] and time.monotonic() < deadline:  # finished rows leave after their sweep
        time.sleep(0.01)
    return outs


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_engine_batches_requests_and_each_gets_its_solo_tokens(shards, backend):
    with load(shards, backend) as m:
        solo = [m.generate(p, max_new_tokens=8)[len(p):] for p in PROMPTS]
        sampled = m.generate(PROMPTS[0], max_new_tokens=8, do_sample=True, temperature=0.9, top_k=0, seed=7)
        engine = Engine(m, kv_allowance=10**8)
        try:
            for stagger in (False, True):  # prefilled together, or each joining a batch already decoding
                engine.kept.clear()
                outs = run_engine(engine, PROMPTS, 8, stagger)
                assert [o.tokens for o in outs] == solo
                assert all(o.events[-1] == Finished("length", len(p), 8, 0) for o, p in zip(outs, PROMPTS))
                assert engine.merging and not engine.groups and engine.rows_peak == 3  # one batch, then none
            engine.kept.clear()
            outs = [Collect() for _ in PROMPTS]  # rows leaving one by one (the batch's padding shrinks)
            for p, n, out in zip(PROMPTS[::-1], (4, 6, 8), outs):
                engine.submit(Request(p, n, Sampling(), out))
            assert all(out.done.wait(60) for out in outs)
            assert [o.tokens for o in outs] == [s[:n] for s, n in zip(solo[::-1], (4, 6, 8))]
            # the first request's conversation was kept: sending it again with more computes only what is new
            again = PROMPTS[0] + solo[0] + [11, 12]
            out, = run_engine(engine, [again], 4)
            assert out.events[-1].reused_tokens == len(PROMPTS[0]) + 7  # all but the last answer token
            assert out.tokens == m.generate(again, max_new_tokens=4)[len(again):]
            out, = run_engine(engine, PROMPTS[:1], 8, do_sample=True, temperature=0.9, seed=7)
            assert out.tokens == sampled[len(PROMPTS[0]):]  # a seed samples as generate's does
        finally:
            engine.stop()
            engine.join(30)


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_caches_that_cannot_merge_decode_side_by_side(windowed, backend):
    prompts = [p * 2 for p in PROMPTS]  # longer than the window
    with load(windowed, backend) as m:
        solo = [m.generate(p, max_new_tokens=8)[len(p):] for p in prompts]
        engine = Engine(m, kv_allowance=10**8)
        try:
            outs = run_engine(engine, prompts, 8, stagger=True)
            assert [o.tokens for o in outs] == solo
            assert not engine.merging
            # sent together: one batch on its own cache, whose rows leave one by one
            engine.kept.clear()
            outs = [Collect() for _ in prompts]
            for p, n, out in zip(prompts, (4, 6, 8), outs):
                engine.submit(Request(p, n, Sampling(), out))
            assert all(out.done.wait(60) for out in outs)
            assert [o.tokens for o in outs] == [s[:n] for s, n in zip(solo, (4, 6, 8))]
            assert all(o.events[-1].reused_tokens == 0 for o in outs)
        finally:
            engine.stop()
            engine.join(30)


def test_a_default_max_tokens_shrinks_to_what_the_kv_allowance_holds(shards):
    """Regression (QA): a request that left max_tokens out was refused for the server's own default ("lower
    max_tokens") where the allowance held fewer tokens."""
    with load(shards, "torch") as m:
        engine = Engine(m, kv_allowance=20 * m.kv_bytes_per_token)
        try:
            assert engine.check(5, 512, fit=True) == 15
            with pytest.raises(RequestError, match="lower max_tokens"):
                engine.check(5, 512)
        finally:
            engine.stop()
            engine.join(30)


def test_requests_wait_for_kv_room_and_the_queue_is_bounded(shards):
    with load(shards, "torch") as m:
        per_request = (len(PROMPTS[0]) + 8) * m.kv_bytes_per_token
        engine = Engine(m, kv_allowance=per_request, max_queue=2, keep_caches=0)  # room for one at a time
        try:
            outs = run_engine(engine, [PROMPTS[0]] * 2, 8)
            assert outs[0].tokens == outs[1].tokens
            assert outs[1].times[0] > outs[0].times[-1]  # the second started once the first had finished
            with pytest.raises(RequestError, match="max-kv-bytes"):
                engine.check(len(PROMPTS[0]), 9)
            engine.stop()
            with pytest.raises(RequestError, match="shutting down") as refused:
                engine.submit(Request(PROMPTS[0], 8, Sampling(), Collect()))
            assert refused.value.status == 503
        finally:
            engine.stop()
            engine.join(30)


def test_a_resent_conversation_that_fits_the_allowance_starts_in_an_idle_engine(shards):
    """Regression (QA): a request continuing a kept conversation counted that cache twice (kept, and in its own
    reach), and the caches kept after it were not dropped for it, so a request whose reach fit the allowance
    waited forever in an idle engine (the server's client: a chat resent in a long conversation hung)."""
    with load(shards, "torch") as m:
        answer = m.generate(PROMPTS[0], max_new_tokens=8)[len(PROMPTS[0]):]
        again, allowance = PROMPTS[0] + answer + [11, 12], 40
        engine = Engine(m, kv_allowance=allowance * m.kv_bytes_per_token)
        try:
            run_engine(engine, PROMPTS[:1], 8)
            run_engine(engine, PROMPTS[1:2], 4)  # kept after the conversation
            assert len(engine.kept) == 2
            out = Collect()
            engine.submit(Request(again, allowance - len(again), Sampling(), out))  # its reach: the allowance
            assert out.done.wait(20), "the request never started"
            assert out.events[-1].reused_tokens == len(PROMPTS[0]) + 7
            assert out.tokens == m.generate(again, max_new_tokens=allowance - len(again))[len(again):]
        finally:
            engine.stop()
            engine.join(30)


def test_the_engine_refuses_from_python_what_the_server_refuses(shards):
    """Regression: Engine.submit took any Request: 1000 tokens ran past a 256-token context, an id outside the
    vocabulary failed with a traceback, max_tokens=0 gave a token, temperature 0 with sampling gave garbage."""
    bad = [(lambda e: Request([], 5, Sampling(), Collect()), "prompt"),
           (lambda e: Request([1, 2.5], 5, Sampling(), Collect()), "prompt"),
           (lambda e: Request([1, 2], 0, Sampling(), Collect()), "max_tokens"),
           (lambda e: Sampling(do_sample=True, temperature=0), "temperature"),
           (lambda e: Sampling(top_p=0), "top_p"),
           (lambda e: Sampling(top_k=-1), "top_k"),
           (lambda e: Sampling(seed=-1), "seed"),
           (lambda e: e.submit(Request([5, 99999], 5, Sampling(), Collect())), "prompt"),
           (lambda e: e.submit(Request([5] * e.context, 5, Sampling(), Collect())), "prompt")]
    with airmlx.AutoModel.from_pretrained(shards, backend="torch") as m:
        engine = Engine(m, kv_allowance=10**8)
        try:
            for make, param in bad:
                with pytest.raises(RequestError) as refused:
                    make(engine)
                assert refused.value.param == param and "\n" not in str(refused.value)
            with pytest.raises(RequestError, match="token id 96 is outside the model's vocabulary"):
                engine.submit(Request([5, 96], 5, Sampling(), Collect()))  # the model's own check, as generate's
            request = Request(PROMPTS[0], 10**4, Sampling(), Collect())
            engine.submit(request)
            assert request.max_tokens == engine.context - len(PROMPTS[0])  # capped by the context, as check() does
        finally:
            engine.stop()
            engine.join(30)


def test_a_draft_headroom_that_no_max_tokens_can_fit_says_what_does(shards):
    with airmlx.AutoModel.from_pretrained(shards, backend="torch", draft_model="4bit", num_draft_tokens=8) as m:
        engine = Engine(m, kv_allowance=10**8)
        try:
            assert engine.headroom == 8
            per = engine.per_token
            engine.kv_allowance = (5 + 1 + 8) * per - 1  # not even max_tokens 1 fits beside the headroom
            with pytest.raises(RequestError, match="the 8 draft tokens a sweep may verify.*; start the server with a "
                                                   "larger --max-kv-bytes or a smaller --num-draft-tokens"):
                engine.check(5, 2)
            engine.kv_allowance = (5 + 1 + 8) * per  # max_tokens 1 fits
            with pytest.raises(RequestError, match="; lower max_tokens or start the server"):
                engine.check(5, 2)
        finally:
            engine.stop()
            engine.join(30)


def test_the_engine_and_the_api_layer_import_no_framework():
    from test_layout import imports, modules
    mods = modules()
    for name in ("engine", "textstream", "openai_api", "server"):
        used = {i.split(".")[0] for i in imports(f"airmlx.{name}", mods[f"airmlx.{name}"])}
        assert not used & {"mlx", "mlx_lm", "torch", "transformers"}, (name, used)


class Chars:
    """A tokenizer whose tokens are characters."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def test_text_holds_back_only_what_could_start_a_stop_string():
    text = TextStream(Chars(), ["xyz", "ab"])
    pieces = [text.add(ord(c)) for c in "hi axbxyq x"]
    assert "".join(p for p, _ in pieces) + text.flush() == "hi axbxyq x"
    assert pieces[3] == ("", False) and pieces[4] == ("a", False)  # "a" waited for the "x" that ruled out "ab"
    assert not any(hit for _, hit in pieces)
    text = TextStream(Chars(), ["xyz"])
    assert [text.add(ord(c)) for c in "12xyz"] == [("1", False), ("2", False), ("", False), ("", False), ("", True)]
    assert text.flush() == ""  # the stop string is never sent


def test_text_that_continues_a_prompt_keeps_the_space_its_first_word_starts_with():
    """Regression (review): a completion's text was its new tokens decoded alone, and sentencepiece tokenizers
    (Llama 2, Mistral) drop the space that starts a text: after the prompt "w5 w6" it went on "w7", not " w7"."""
    tok = sentencepiece_tokenizer()
    prompt, new = [1, 5, 6], [7, 3, 4, 8]  # 3, 4: the two bytes of "é"
    for context, want in ((prompt, " w7é w8"), (None, "w7é w8")):  # a chat's reply stands alone
        text = TextStream(tok, context=context)
        assert "".join(text.add(t)[0] for t in new) + text.flush() == want
    assert tok.decode(prompt + new, skip_special_tokens=True) == "w5 w6" + " w7é w8"


def test_a_stop_string_that_is_a_special_token_ends_the_text_at_that_token():
    """Regression (review): the text is decoded without special tokens, so stop=["<|im_end|>"] was never found
    and the answer ran on past the model's end of turn to max_tokens."""
    tok = word_tokenizer_with_special(40)
    text = TextStream(tok, ["<|end|>"])
    assert [text.add(t) for t in (5, 6, 40)] == [("w5", False), (" w6", False), ("", True)]
    text = TextStream(tok, ["w6", "<|end|>"])  # a stop string before it in the same tokens still cuts first
    assert text.add([5, 6, 7, 40]) == ("w5 ", True)
    text = TextStream(tok, ["<|end|", "w7"])  # not the whole token: not found, and the token left out of the text
    assert "".join(text.add(t)[0] for t in (5, 40, 6)) + text.flush() == "w5 w6"


class Bytes:
    """A tokenizer whose tokens are UTF-8 bytes: a character of several bytes comes over several tokens."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", "replace")


@pytest.mark.parametrize("stop", [" ü", "i😊"])
def test_text_holds_back_what_could_start_a_stop_string_while_a_character_is_still_coming(stop):
    """Regression (QA): the text before a character still coming (U+FFFD at the end) was sent, though with that
    character it began a stop string: the answer ended after part of the stop string, which is never sent."""
    text = TextStream(Bytes(), [stop])
    pieces = [text.add(b) for b in ("hi" + stop + " there").encode()]
    sent = "".join(p for p, hit in pieces)
    assert sent == "hi" and any(hit for _, hit in pieces)


def test_a_stop_token_ends_a_request_as_eos_ends_generate(shards):
    with load(shards, "torch") as m:
        free = m.generate(PROMPTS[1], max_new_tokens=8)[len(PROMPTS[1]):]
        eos = free[3]
        want = m.generate(PROMPTS[1], max_new_tokens=8, eos_token_id=eos)[len(PROMPTS[1]):]
        engine = Engine(m, kv_allowance=10**8)
        try:
            engine.stop_tokens = [eos]
            out, = run_engine(engine, PROMPTS[1:2], 8)
            assert out.tokens == want == free[:free.index(eos) + 1]
            assert out.events[-1] == Finished("stop", len(PROMPTS[1]), len(want), 0)
            before = m.tokenizer.decode(want[:-1], skip_special_tokens=True)
            assert "".join(e.text for e in out.events if isinstance(e, Delta)) == before  # the stop token's text: no
            # regression: text held back because it could start a stop string was lost when the stop token came
            last = next(i for i in range(2, len(free)) if free[i] not in free[:i])
            engine.stop_tokens = [free[last]]
            before = m.tokenizer.decode(free[:last], skip_special_tokens=True)
            held = Collect()
            engine.submit(Request(PROMPTS[1], 8, Sampling(), held, stop=[before[-2:] + "\u2603"]))
            assert held.done.wait(60) and held.events[-1].reason == "stop" and len(before) >= 2
            assert "".join(e.text for e in held.events if isinstance(e, Delta)) == before
        finally:
            engine.stop()
            engine.join(30)


def test_a_models_own_draft_waits_while_requests_share_sweeps(shards):
    """Requests together share the engine's sweeps (model.step_many) and the draft waits: it speculates only
    for a request alone (tests/test_server.py). These three arrive together and finish together."""
    with airmlx.AutoModel.from_pretrained(shards, backend="torch", draft_model="4bit") as m:
        assert m.draft is not None
        solo = [m.generate(p, max_new_tokens=6, draft_model=False)[len(p):] for p in PROMPTS]
        engine = Engine(m, kv_allowance=10**8)
        try:
            outs = run_engine(engine, PROMPTS, 6)
            assert [o.tokens for o in outs] == solo
            assert not m.speculation.total.sweeps and not list(m.draft._caches)
        finally:
            engine.stop()
            engine.join(30)


def test_a_half_precision_batch_multiplies_in_float32_blocks(shards, monkeypatch):
    """torch on the CPU: a batch's bf16 Linears run as float32 products rounded once (torch's own bf16 kernel
    accumulates in float32 too, row by row at 2.4 x the cost), a block of weight rows at a time."""
    import torch

    from airmlx.backends import torch_batching
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 64, generator=gen).bfloat16()
    bias = torch.randn(96, generator=gen).bfloat16()
    x = torch.randn(2, 4, 64, generator=gen).bfloat16()
    monkeypatch.setattr(torch_batching, "WIDE_ELEMENTS", 40 * 64)  # three blocks of weight rows
    with torch_batching.WideLinears():
        y = torch.nn.functional.linear(x, weight, bias)
        plain32 = torch.nn.functional.linear(x.float(), weight.float())  # float32 passes through untouched
    want = (x.float().reshape(-1, 64) @ weight.float().t() + bias.float()).bfloat16().reshape(2, 4, 96)
    assert y.dtype == torch.bfloat16 and torch.equal(y, want)
    assert torch.equal(plain32, x.float() @ weight.float().t())
    ulp = torch.nn.functional.linear(x, weight, bias).float().abs() * 2 ** -7
    assert ((y.float() - torch.nn.functional.linear(x, weight, bias).float()).abs() <= ulp).all()
    with load(shards, "torch", dtype="bfloat16") as m:
        b = m.backend
        assert torch_batching.wide(b, torch.zeros(2, 4, 8, dtype=torch.bfloat16))
        assert not torch_batching.wide(b, torch.zeros(1, 16, 8, dtype=torch.bfloat16))  # one prompt: bf16 as is
        assert not torch_batching.wide(b, torch.zeros(4, 1, 8, dtype=torch.bfloat16))  # under 8 rows
        calls = []
        real = torch_batching.wide_linear
        monkeypatch.setattr(torch_batching, "wide_linear", lambda *a: calls.append(a[0].shape) or real(*a))
        m.step_many([(*prefill(p), m.new_cache()) for p in PROMPTS[:2]])
        assert not calls  # two caches: each its own batch of one
        ids = np.array([PROMPTS[0][:4], PROMPTS[1][:4]])
        m.step(ids, np.ones_like(ids), m.new_cache(2, [0, 0]))
        assert calls and all(s[0] == 2 for s in calls)


def test_speculative_tokens_count_only_the_tokens_given_out(shards, monkeypatch):
    """Regression: a stop string inside an accepted run left /health's speculative_tokens counting the tokens
    after it, which the request never gave out."""
    from airmlx.spec_measure import Measurements
    monkeypatch.setattr(Measurements, "worth_a_round", lambda self: True)  # drafting on a tiny model in memory
    prompt = PROMPTS[0]
    with airmlx.AutoModel.from_pretrained(shards, backend="torch") as draft, \
            airmlx.AutoModel.from_pretrained(shards, backend="torch", draft_model=draft) as m:
        solo = m.generate(prompt, max_new_tokens=12, draft_model=False)[len(prompt):]
        stop = m.tokenizer.decode(solo[5:6]).strip()
        assert stop not in m.tokenizer.decode(solo[:5])
        engine = Engine(m, kv_allowance=10**8)
        try:
            out = Collect()
            engine.submit(Request(prompt, 12, Sampling(), out, stop=[stop]))
            assert out.done.wait(60)
            assert out.tokens == solo[:6]  # the prefill's token, then speculative sweeps: every proposal accepted
            assert engine.stats()["speculative_tokens"] == 5 and engine.stats()["speculative_sweeps"] >= 1
        finally:
            engine.stop()
            engine.join(30)


def test_a_request_whose_cache_cannot_be_made_fails_and_the_engine_goes_on(shards, monkeypatch):
    """Regression (QA): an error while admitting requests (making their cache: out of memory) ended the engine's
    thread; the requests taken off the queue were never answered, and every later one waited forever."""
    with load(shards, "torch") as m:
        engine = Engine(m, keep_caches=0)
        try:
            want = run_engine(engine, [PROMPTS[0]], 4)[0].tokens
            made = m.new_cache
            monkeypatch.setattr(m, "new_cache", lambda *a: (_ for _ in ()).throw(MemoryError("no room")))
            failed = Collect()
            engine.submit(Request(PROMPTS[0], 4, Sampling(), failed))
            assert failed.done.wait(30), "the request was never answered"
            assert isinstance(failed.events[-1], Failed) and failed.events[-1].status == 500
            assert "MemoryError: no room" in failed.events[-1].message
            monkeypatch.setattr(m, "new_cache", made)
            assert engine.thread.is_alive() and run_engine(engine, [PROMPTS[0]], 4)[0].tokens == want
        finally:
            engine.stop()
            engine.join(30)
