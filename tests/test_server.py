"""python -m airmlx.server against the official openai client: a live server on a free local port, tiny
models, greedy output equal to model.generate, many clients sharing each sweep, bad inputs, a flood, a
client that goes away, and SIGINT / SIGTERM."""
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
from transformers import AutoTokenizer

import airmlx
from airmlx.engine import Engine, Finished, Request, RequestError, Sampling
from airmlx.openai_api import chat_job
from airmlx.server import build_app, make_server

from tiny import make_chat_checkpoint, make_checkpoint, sentencepiece_tokenizer, word_tokenizer_with_special

# the word-level test tokenizer ("w5 w17 ..."), with a chat template of its own words
WORD_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}w3 {{ m['content'] }} w4 "
                 "{% else %}{{ m['content'] }} w6 {% endif %}{% endfor %}")
MESSAGES = [{"role": "user", "content": "w5 w17 w33 w2 w9"}]
PROMPT = "w8 w90 w10 w4 w61"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    make_checkpoint(root / "src", "llama")
    tok = AutoTokenizer.from_pretrained(root / "src")
    tok.chat_template = WORD_TEMPLATE
    tok.save_pretrained(root / "src")
    return airmlx.shard_checkpoint(root / "src", root / "shards", progress=False)


@pytest.fixture(scope="module")
def model(shards):
    # no prefetch thread: every streamed byte is read inside the sweep that uses it, so counts are exact
    with airmlx.AutoModel.from_pretrained(shards, backend="torch", memory_budget="420KB", prefetching=False) as m:
        yield m


class Live:
    """A server in a thread on a free 127.0.0.1 port, stopped on exit."""

    def __init__(self, model, api_key=None, **engine_options):
        self.engine = Engine(model, **{"kv_allowance": 10**8, **engine_options})
        self.server = make_server(build_app(self.engine, ["tiny"], api_key=api_key), self.engine, "127.0.0.1", 0,
                                  "warning")
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=60)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)
        self.engine.stop()
        self.engine.join(30)
        assert not self.thread.is_alive() and not self.engine.thread.is_alive()

    def settle(self):
        """Wait until every finished request has left the engine."""
        deadline = time.monotonic() + 10
        while self.engine.stats()["active"] and time.monotonic() < deadline:
            time.sleep(0.01)


@pytest.fixture(scope="module")
def live(model):
    with Live(model) as server:
        yield server


def expected(model, ids, n, chat=False):
    """(the model's greedy text, its tokens): a chat's reply stands alone, a completion's text goes on from its
    prompt (decoded after it: with the word-level tokenizer, a space first)."""
    new = model.generate(ids, max_new_tokens=n)[len(ids):]
    if chat:
        return model.tokenizer.decode(new, skip_special_tokens=True), new
    lead = model.tokenizer.decode(ids, skip_special_tokens=True)
    return model.tokenizer.decode([*ids, *new], skip_special_tokens=True)[len(lead):], new


def token_texts(tokenizer, new, before=None):
    """Each token's text as the answer's text has it: decoded after the token before it (the first one after
    `before`, a completion's prompt's last, or alone, as a chat's reply starts)."""
    out = []
    for t in new:
        out.append(tokenizer.decode([t]) if before is None else
                   tokenizer.decode([before, t])[len(tokenizer.decode([before])):])
        before = t
    return out


def chat_ids(tokenizer, messages):
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_chat_and_completions_streamed_or_not_equal_generate(live, model):
    tok = model.tokenizer
    c = live.client
    ids = chat_ids(tok, MESSAGES)
    text, _ = expected(model, ids, 10, chat=True)
    r = c.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10, temperature=0)
    assert r.choices[0].message.content == text and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 10)
    chunks = list(c.chat.completions.create(model="tiny", messages=MESSAGES, max_completion_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10

    ids = tok(PROMPT)["input_ids"]
    text, _ = expected(model, ids, 12)
    r = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0)
    assert r.choices[0].text == text and r.usage.prompt_tokens == len(ids)
    chunks = list(c.completions.create(model="tiny", prompt=ids, max_tokens=12, temperature=0, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == text and chunks[-1].choices[0].finish_reason == "length"
    assert all(ch.usage is None for ch in chunks)  # no include_usage: no usage chunk
    assert c.models.list().data[0].id == "tiny"
    assert httpx.get(live.url + "/health").json()["status"] == "ok"


def test_stop_strings_are_found_across_token_boundaries_and_left_out(live, model):
    ids = model.tokenizer(PROMPT)["input_ids"]
    text, _ = expected(model, ids, 12)
    words = text.split(" ")
    stop = words[4][-1] + " " + words[5][:2]  # the end of one token, a space and the start of the next
    cut = text.index(stop)
    for stream in (False, True):
        r = live.client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0,
                                           stop=["never said", stop], stream=stream)
        chunks = list(r) if stream else [r]
        assert "".join(ch.choices[0].text for ch in chunks) == text[:cut]
        assert chunks[-1].choices[0].finish_reason == "stop"


def test_completion_logprobs_are_the_models(live, model):
    ids = model.tokenizer(PROMPT)["input_ids"]
    _, new = expected(model, ids, 3)
    r = live.client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    logits = model.logits([ids])[0, -1].astype(np.float64)
    want = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
    assert lp.tokens == token_texts(model.tokenizer, new, ids[-1]) and "".join(lp.tokens) == r.choices[0].text
    assert lp.token_logprobs[0] == pytest.approx(want[new[0]], abs=1e-4)
    assert len(lp.top_logprobs[0]) == 2 and max(lp.top_logprobs[0].values()) == pytest.approx(lp.token_logprobs[0])
    assert lp.text_offset[:2] == [0, len(lp.tokens[0])]
    r = live.client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2, temperature=0,
                                            logprobs=True, top_logprobs=3)
    assert len(r.choices[0].logprobs.content) == 2 and len(r.choices[0].logprobs.content[0].top_logprobs) == 3


def test_a_completions_top_logprobs_hold_the_chosen_token_as_openais_do(live):
    """Regression (QA): a completion's top_logprobs held only the k most likely tokens, so logprobs=0 gave empty
    dicts and a sampled token outside the k was missing; OpenAI's legacy API adds the chosen one (k + 1 at most)."""
    ask = dict(model="tiny", prompt=PROMPT, max_tokens=8)
    lp = live.client.completions.create(**ask, temperature=0, logprobs=0).choices[0].logprobs
    assert lp.top_logprobs == [{t: p} for t, p in zip(lp.tokens, lp.token_logprobs)]
    lp = live.client.completions.create(**ask, temperature=2, seed=1, logprobs=1).choices[0].logprobs
    tops = [(top, t, p) for top, t, p in zip(lp.top_logprobs, lp.tokens, lp.token_logprobs)]
    assert all(top[t] == p and len(top) <= 2 for top, t, p in tops)
    assert any(len(top) == 2 for top, _, _ in tops)  # a token sampled outside the most likely one


def test_a_chat_messages_logprobs_leave_out_the_stop_token_as_its_content_does(model):
    """Regression (QA): chat logprobs listed the end-of-turn token that stopped the answer, which its content
    leaves out. A completion's logprobs keep it (they run along the text's offsets, as legacy completions' do)."""
    ids = chat_ids(model.tokenizer, MESSAGES)
    _, new = expected(model, ids, 3)
    with Live(model) as server:
        server.engine.stop_tokens = [new[2]]  # the third greedy token ends the turn
        ask = dict(model="tiny", messages=MESSAGES, max_tokens=8, temperature=0, logprobs=True)
        whole = server.client.chat.completions.create(**ask).choices[0]
        chunks = list(server.client.chat.completions.create(**ask, stream=True))
    assert whole.finish_reason == "stop"
    assert [t.token for t in whole.logprobs.content] == token_texts(model.tokenizer, new[:2])
    streamed = [t for ch in chunks if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in whole.logprobs.content]


def test_streamed_text_offsets_count_the_text_held_back_for_a_stop_string(live, model):
    """Regression (QA): a stream's text_offset counted only the text already sent, so tokens whose text was
    held back (it could begin a stop string) all got the same, wrong offset."""
    text, new = expected(model, model.tokenizer(PROMPT)["input_ids"], 10)
    ask = dict(model="tiny", prompt=PROMPT, max_tokens=10, temperature=0, logprobs=1, stop=[text + "Q"])
    whole = live.client.completions.create(**ask).choices[0].logprobs
    chunks = live.client.completions.create(**ask, stream=True)
    streamed = [o for ch in chunks if ch.choices[0].logprobs for o in ch.choices[0].logprobs.text_offset]
    pieces = token_texts(model.tokenizer, new, model.tokenizer(PROMPT)["input_ids"][-1])
    assert whole.text_offset == streamed == [sum(map(len, pieces[:i])) for i in range(10)]


def test_logprobs_name_a_token_that_holds_part_of_a_character_by_its_own_bytes():
    """Regression (QA): such a token was shown as U+FFFD with U+FFFD's bytes, so the bytes of several tokens
    could not be joined back into the character, and a completion's top_logprobs kept one of several such
    tokens (they shared the key)."""
    from transformers import AutoTokenizer

    from airmlx import openai_api as api
    tok = AutoTokenizer.from_pretrained(airmlx.DEMO_MODEL)  # byte-level BPE
    text = "“quoted” ü 😊"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    entries = [(t, -1.0, [(t, -1.0), (u, -2.0)]) for t, u in zip(ids, ids[1:] + ids[:1])]
    content = api.chat_logprobs(tok, entries)["content"]
    assert bytes(b for c in content for b in c["bytes"]).decode() == text
    assert any(c["token"].startswith("bytes:\\x") for c in content)
    legacy = api.completion_logprobs(tok, entries, api.TokenPieces())
    assert all(len(top) == 2 for top in legacy["top_logprobs"])  # different parts keep different names
    assert legacy["text_offset"][-1] == len(text) - 1  # the emoji's four tokens start where it does
    assert legacy["text_offset"][-4] == legacy["text_offset"][-1]

    class ByteFallback:  # a sentencepiece tokenizer's pieces for "é": two bytes, no character alone
        def decode(self, ids):
            return {0: "\ufffd", 1: "\ufffd", 2: " x"}[ids[0]]

        def convert_ids_to_tokens(self, token):
            return ["<0xC3>", "<0xA9>", "▁x"][token]
    assert [api.token_bytes(ByteFallback(), t) for t in range(3)] == [b"\xc3", b"\xa9", b" x"]
    from transformers.convert_slow_tokenizer import bytes_to_unicode  # the table byte-level tokenizers use
    assert api.byte_level_alphabet() == {char: byte for byte, char in bytes_to_unicode().items()}


class Retokenized:
    """The model with another tokenizer over the same ids."""

    def __init__(self, model, tokenizer):
        self._model, self.tokenizer = model, tokenizer

    def __getattr__(self, name):
        return getattr(self._model, name)


def test_a_completion_goes_on_from_its_prompt_with_a_sentencepiece_tokenizer(model):
    """Regression (review): a completion's text and its logprobs' tokens were decoded alone, and sentencepiece
    tokenizers (Llama 2, Mistral) drop the space that starts a text: the text went on "w7 w9" where the prompt's
    words and the model's go "... w6 w7 w9", each listed token lost its space, and text_offset drifted by one a
    word. A chat's reply stands alone: its first word starts it."""
    tok = sentencepiece_tokenizer()
    ids = [1, 12, 13]
    new = list(model.generate(ids, max_new_tokens=8)[len(ids):])
    assert len(new) == 8 and min(new) >= 5  # all words (not a special token nor a byte)
    text = tok.decode(ids + new, skip_special_tokens=True)[len(tok.decode(ids, skip_special_tokens=True)):]
    assert text.startswith(" w") and text.count(" ") == 8
    with Live(Retokenized(model, tok)) as live:
        for stream in (False, True):
            r = live.client.completions.create(model="tiny", prompt=ids, max_tokens=8, temperature=0, logprobs=2,
                                               stream=stream)
            chunks = list(r) if stream else [r]
            listed = [ch.choices[0].logprobs for ch in chunks if ch.choices[0].logprobs]
            tokens = [t for lp in listed for t in lp.tokens]
            assert "".join(ch.choices[0].text for ch in chunks) == "".join(tokens) == text
            assert [o for lp in listed for o in lp.text_offset] == [len("".join(tokens[:i])) for i in range(8)]
            assert all(t in top for lp in listed for t, top in zip(lp.tokens, lp.top_logprobs))
    from airmlx import openai_api as api
    content = api.chat_logprobs(tok, [(t, -1.0, [(t, -1.0)]) for t in new])["content"]
    assert "".join(c["token"] for c in content) == tok.decode(new) == text[1:]
    assert [c["top_logprobs"][0]["token"] for c in content] == [c["token"] for c in content]


def test_a_stop_string_that_is_a_special_token_stops_the_answer(model):
    """Regression (review): stop=["<|im_end|>"] (a chat model's end of turn, where its config's EOS is another
    token) was never found in the text, which leaves special tokens out: the answer ran on to max_tokens."""
    ids = [1, 12, 13]
    new = list(model.generate(ids, max_new_tokens=8)[len(ids):])
    assert new[3] > 2 and new[3] not in new[:3]  # not one of the tokenizer's own specials, and first there
    tok = word_tokenizer_with_special(new[3])
    lead = tok.decode(ids, skip_special_tokens=True)
    text = tok.decode(ids + new[:3], skip_special_tokens=True)[len(lead):]
    with Live(Retokenized(model, tok)) as live:
        for stream in (False, True):
            r = live.client.completions.create(model="tiny", prompt=ids, max_tokens=8, temperature=0,
                                               stop=["<|end|>"], stream=stream)
            chunks = list(r) if stream else [r]
            assert "".join(ch.choices[0].text for ch in chunks) == text
            assert chunks[-1].choices[0].finish_reason == "stop"
            if not stream:
                assert r.usage.completion_tokens == 4


class RecordingLock:
    """A lock that notes every thread that took it."""

    def __init__(self):
        self.lock, self.threads = threading.Lock(), set()

    def __enter__(self):
        self.threads.add(threading.current_thread())
        self.lock.acquire()
        return self

    def __exit__(self, *exc):
        self.lock.release()


def test_the_event_loop_never_takes_the_tokenizers_lock(model):
    """Regression (review): logprobs were decoded, and requests submitted (a completion's text decoded after its
    prompt, a logged prompt), on the event loop under the tokenizer's lock, which a worker thread holds while it
    renders a long prompt's chat template: every stream and /health waited meanwhile."""
    with Live(model, log_prompts=True) as live:
        lock = live.engine.tokenizer_lock = RecordingLock()
        for stream in (False, True):
            answers = [live.client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3, temperature=0,
                                                      logprobs=1, stream=stream),
                       live.client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=3,
                                                           temperature=0, logprobs=True, stream=stream)]
            for r in answers:
                assert (list(r) if stream else r.choices)  # a whole answer came
        assert live.engine.thread in lock.threads and live.thread not in lock.threads


def test_a_seed_samples_as_generate_does(live, model):
    ids = model.tokenizer(PROMPT)["input_ids"]
    want = model.generate(ids, max_new_tokens=8, do_sample=True, temperature=0.9, top_k=0, top_p=0.95, seed=5)
    texts = [live.client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0.9, top_p=0.95,
                                            seed=5).choices[0].text for _ in range(2)]
    assert texts == [model.tokenizer.decode(want)[len(model.tokenizer.decode(ids)):]] * 2


def test_a_tiny_temperature_samples_the_most_likely_token(live, model):
    """Regression (QA): a temperature the API takes but so small that logits / temperature overflowed (1e-320)
    made every probability NaN, and token 0 was drawn each time."""
    text, _ = expected(model, model.tokenizer(PROMPT)["input_ids"], 6)
    r = live.client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=1e-320, seed=1)
    assert r.choices[0].text == text


class Slow:
    """The model with sweeps of at least 50 ms, as a streamed model's are: clients that a loaded machine
    starts a little apart still meet in the batch."""

    def __init__(self, model):
        self._model = model

    def step_many(self, items):
        time.sleep(0.05)
        return self._model.step_many(items)

    def __getattr__(self, name):
        return getattr(self._model, name)


def test_eight_clients_get_their_solo_tokens_from_shared_sweeps(model):
    prompts = [" ".join(f"w{5 + (i * 7 + j * 3) % 80}" for j in range(3 + i)) for i in range(8)]
    solo = [expected(model, model.tokenizer(p)["input_ids"], 16)[0] for p in prompts]
    with Live(Slow(model)) as live:
        before = model.memory_stats()

        def stream(p):
            chunks = live.client.completions.create(model="tiny", prompt=p, max_tokens=16, temperature=0, stream=True)
            return "".join(ch.choices[0].text for ch in chunks)

        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(stream, prompts))
        live.settle()
        after = model.memory_stats()
        assert got == solo
        ran = after["steps"] - before["steps"]
        assert ran == live.engine.sweeps
        assert after["bytes_read"] - before["bytes_read"] == ran * model.plan.streamed_bytes_per_step  # one read each
        assert ran < 2 * 16 < 8 * 16 and live.engine.rows_peak >= 4  # 128 tokens in about 16 sweeps, not 128


def test_a_request_whose_client_went_away_while_waiting_gives_up_its_place_in_the_queue(model):
    """Regression (QA): it kept its place until a batch row freed, so newcomers got 503 meanwhile (and /health
    did not count it as disconnected)."""
    ids = model.tokenizer(PROMPT)["input_ids"]
    engine = Engine(Slow(model), max_batch=1, max_queue=1, kv_allowance=10**8)
    try:
        engine.submit(Request(ids, 200, Sampling(), lambda e: None))
        deadline = time.monotonic() + 30
        while not engine.stats()["active"]:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        gone = Request(ids, 5, Sampling(), lambda e: None)
        engine.submit(gone)
        gone.cancel()
        assert engine.stats()["waiting"] == 0 and engine.stats()["disconnected"] == 1
        engine.submit(Request(ids, 5, Sampling(), lambda e: None))  # was QueueFullError
        assert engine.stats()["waiting"] == 1 and engine.stats()["disconnected"] == 1
    finally:
        engine.stop()
        engine.join(30)


def test_a_lone_request_speculates_and_requests_together_share_sweeps(shards, model, monkeypatch):
    from airmlx.spec_measure import Measurements
    monkeypatch.setattr(Measurements, "worth_a_round", lambda self: True)  # drafting on a tiny model in memory
    prompts = [PROMPT, "w9 w31 w4", "w70 w2 w11 w5"]
    solo = [expected(model, model.tokenizer(p)["input_ids"], 16)[0] for p in prompts]
    stopped = expected(model, model.tokenizer(PROMPT)["input_ids"], 16)[0].split(" ")[3]
    with airmlx.AutoModel.from_pretrained(shards, backend="torch") as draft, \
            airmlx.AutoModel.from_pretrained(shards, backend="torch", draft_model=draft, num_draft_tokens=5) as m:
        with Live(m) as live:
            engine = live.engine
            assert engine.per_token == model.kv_bytes_per_token + draft.kv_bytes_per_token and engine.headroom == 5
            sweeps = engine.sweeps
            r = live.client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=0)
            assert r.choices[0].text == solo[0] and r.usage.completion_tokens == 16
            live.settle()
            # the prefill's sweep gives the first token, speculative sweeps the other 15, several at a time
            assert engine.speculative_tokens == 15 and engine.speculative_sweeps < 15
            assert engine.sweeps - sweeps == 1 + engine.speculative_sweeps
            # a stop string inside an accepted run: the text ends before it, and the cache kept holds only that
            r = live.client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=0, stop=[stopped])
            assert r.choices[0].text == solo[0][:solo[0].index(stopped)] and r.choices[0].finish_reason == "stop"
            live.settle()
            assert all(m.cache_length(c) == len(ids) for ids, c in engine.kept.values())
            r = live.client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=0.9, seed=3)
            assert r.usage.completion_tokens == 16 or r.choices[0].finish_reason == "stop"

            def stream(p):
                chunks = live.client.completions.create(model="tiny", prompt=p, max_tokens=16, temperature=0,
                                                        stream=True)
                return "".join(ch.choices[0].text for ch in chunks)

            with ThreadPoolExecutor(3) as pool:
                assert list(pool.map(stream, prompts)) == solo


def test_a_client_that_goes_away_leaves_the_batch(live, model):
    ids = model.tokenizer(PROMPT)["input_ids"]
    text, _ = expected(model, ids, 40)
    gone_before = live.engine.stats()["disconnected"]
    other = {}

    def finish():
        other["text"] = live.client.completions.create(model="tiny", prompt=PROMPT, max_tokens=40,
                                                       temperature=0).choices[0].text
    leaver = live.client.completions.create(model="tiny", prompt=PROMPT, max_tokens=200, temperature=0, stream=True)
    next(iter(leaver))
    worker = threading.Thread(target=finish)
    worker.start()
    leaver.close()  # the client hangs up mid-stream
    worker.join(60)
    assert other["text"] == text
    live.settle()
    assert live.engine.stats()["disconnected"] == gone_before + 1
    assert live.client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3, temperature=0).choices[0].text


def test_a_resent_conversation_computes_only_what_is_new(live, model):
    first = live.client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6, temperature=0)
    turn = MESSAGES + [{"role": "assistant", "content": first.choices[0].message.content},
                       {"role": "user", "content": "w40 w41"}]
    ids = chat_ids(model.tokenizer, turn)
    text, _ = expected(model, ids, 6, chat=True)
    live.settle()
    r = live.client.chat.completions.create(model="tiny", messages=turn, max_tokens=6, temperature=0)
    assert r.choices[0].message.content == text
    assert r.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens


LONG = " ".join(["w7"] * 300)  # longer than the tiny model's 256-token context
BAD = [  # (path, body or raw bytes, status, param)
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", {"model": "gpt-9", "prompt": PROMPT}, 404, "model"),  # was a 400; OpenAI's is a 404
    ("/v1/completions", {"prompt": PROMPT}, 400, "model"),
    ("/v1/completions", {"model": "tiny", "prompt": PROMPT, "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"model": "tiny", "prompt": PROMPT, "temperature": 3}, 400, "temperature"),
    ("/v1/completions", {"model": "tiny", "prompt": PROMPT, "top_p": -0.5}, 400, "top_p"),
    ("/v1/chat/completions", {"model": "tiny", "messages": MESSAGES, "moderation": {"model": "m"}}, 400, "moderation"),
    ("/v1/completions", {"model": "tiny", "prompt": PROMPT, "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": PROMPT, "max_tokens": 1.5}, 400, "max_tokens"),
    # with max_completion_tokens given, a bad max_tokens was ignored without a word (QA)
    ("/v1/completions", {"model": "tiny", "prompt": PROMPT, "max_completion_tokens": 4, "max_tokens": 0}, 400,
     "max_tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": PROMPT, "stop": ["a", 3]}, 400, "stop"),
    ("/v1/completions", {"model": "tiny", "prompt": PROMPT, "stop": ""}, 400, "stop"),
    ("/v1/completions", {"model": "tiny", "prompt": PROMPT, "stop": ["a", ""]}, 400, "stop"),
    ("/v1/completions", {"model": "tiny", "prompt": PROMPT, "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"model": "tiny", "prompt": PROMPT, "logprobs": 99}, 400, "logprobs"),
    # accepted silently (QA); OpenAI's API refuses it
    ("/v1/completions", {"model": "tiny", "prompt": PROMPT, "stream_options": {"include_usage": True}}, 400,
     "stream_options"),
    ("/v1/completions", {"model": "tiny", "prompt": PROMPT, "n": 2}, 400, "n"),
    ("/v1/completions", {"model": "tiny", "prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": [5, 9999]}, 400, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": [5, 2**63]}, 400, "prompt"),  # past int64: was a 500 (QA)
    ("/v1/completions", {"model": "tiny", "prompt": LONG}, 400, "prompt"),
    ("/v1/chat/completions", {"model": "tiny", "messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"content": "w5"}]}, 400, "messages"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "wizard", "content": "w5"}]}, 400, "messages"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": LONG}]}, 400, "messages"),
    ("/v1/chat/completions", {"model": "tiny", "messages": MESSAGES, "top_logprobs": 2}, 400, "top_logprobs"),
    # fields OpenAI's API does not have were ignored without a word (QA): a sampler's extras change the output
    ("/v1/completions", {"model": "tiny", "prompt": PROMPT, "repetition_penalty": 1.5}, 400, "repetition_penalty"),
    ("/v1/chat/completions", {"model": "tiny", "messages": MESSAGES, "min_p": 0.1}, 400, "min_p"),
    ("/v1/completions", {"model": "tiny", "prompt": PROMPT, "top_logprobs": 2}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"model": "tiny", "messages": MESSAGES, "modalities": ["text", "audio"]}, 400,
     "modalities"),
    # lm-eval's loglikelihood requests: refused with a pointer to airmlx.harness (QA)
    ("/v1/completions", {"model": "tiny", "prompt": [5, 9], "echo": True, "logprobs": 1, "max_tokens": 1}, 400,
     "echo"),
    ("/v1/completions", {"model": "tiny", "prompt": PROMPT, "stop": ["w"] * 17}, 400, "stop"),
    # a user message without content was taken as empty (QA)
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user"}]}, 400, "messages"),
    ("/v1/chat/completions", {"model": "tiny", "messages": MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "function": "f"}]}]}, 400, "messages"),
    ("/v1/nowhere", {}, 404, None),
    # JSON nested deeper than Python's recursion limit was a 500 with a traceback in the log (QA)
    ("/v1/completions", b"[" * 100_000 + b"]" * 100_000, 400, None),
    # a lone surrogate escape, valid JSON but no text, reached the tokenizer: a 500 with a traceback (QA)
    ("/v1/completions", b'{"model": "tiny", "prompt": "w5 \\ud800"}', 400, None),
    ("/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "user", "content": "\\udfff"}]}', 400, None),
]


@pytest.mark.parametrize("path, body, status, param", BAD)
def test_every_bad_input_gets_its_status_and_an_openai_error_body(live, path, body, status, param):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(live.url + path, timeout=30, **kw)
    assert r.status_code == status
    error = r.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error" and error["param"] == param


def test_tool_calls_in_a_conversation_reach_the_chat_template(model, monkeypatch):
    """Regression (QA): an assistant's tool_calls and a tool message's tool_call_id were dropped, so the model
    never saw the call it had made. They go to the template as transformers' templates take them."""
    import copy

    from airmlx import openai_api
    tokenizer = copy.deepcopy(model.tokenizer)
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m.role }}: {{ m.content }}{% for c in m.tool_calls or [] %} call {{ c.id }} "
        "{{ c.function.name }}({{ c.function.arguments.city }}){% endfor %}{% if m.tool_call_id %} answers "
        "{{ m.tool_call_id }}{% endif %} | {% endfor %}")
    messages = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "w7"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "w9"}]
    rendered = []
    monkeypatch.setattr(openai_api, "render_chat", lambda tok, plain, tools=None: rendered.append(
        tok.apply_chat_template(plain, tokenize=False)) or [5])
    chat_job({"model": "tiny", "messages": messages}, tokenizer, ["tiny"], {}, 8)
    assert rendered == ["user: w5 w17 w33 w2 w9 | assistant:  call c1 weather(w7) | tool: w9 answers c1 | "]


def test_tool_calls_are_read_out_of_the_answer_as_transformers_parses_it(model, monkeypatch):
    """A request's tools reach the chat template, and the calls the model writes come back as OpenAI's tool_calls
    (streamed or not), with finish_reason tool_calls: the calls transformers' parser reads in the same answer, on
    the tokenizer's response_template. Here the template names a call by words of the greedy answer, and its
    fifth token is made the stop token, so the answer ends by itself right after the call."""
    from airmlx import engine as engine_module
    from airmlx.session import render_chat, stop_token_ids

    tok = model.tokenizer
    tools = [{"type": "function", "function": {"name": "look", "parameters": {"type": "object", "properties": {}}}}]
    monkeypatch.setattr(tok, "chat_template", "{% if tools %}w7 {% for t in tools %}w8 {% endfor %}{% endif %}"
                        + WORD_TEMPLATE)
    prompt = render_chat(tok, MESSAGES, tools)
    assert prompt != render_chat(tok, MESSAGES)
    new = [t for t in model.generate(prompt, max_new_tokens=8)[len(prompt):] if t not in stop_token_ids(model)]
    words = tok.decode(new, skip_special_tokens=False).split()
    # the answer: words[0] (content), then the call from words[1] to words[3], then the (made) stop token
    assert len(words) == len(new) >= 5 and words[3] not in words[:3] and new[4] not in new[:4], words
    monkeypatch.setattr(engine_module, "stop_token_ids", lambda m: [new[4]])
    template = {"start_anchor_pattern": r"\bw4\b", "fields": {
        "tool_calls": {"open_pattern": rf"\s*\b{words[1]}\b", "close_pattern": rf"\b{words[3]}\b", "repeats": True,
                       "content": "text", "transform": {"type": "function", "function": {"name": "{content}",
                                                                                         "arguments": {}}}},
        "content": {"content": "text"}}}
    parsed = tok.parse_response(tok.decode(new[:4], skip_special_tokens=False), template,
                                prefix=tok.decode(prompt, skip_special_tokens=False))
    monkeypatch.setattr(tok, "response_template", template, raising=False)
    ask = dict(model="tiny", messages=MESSAGES, tools=tools, max_tokens=8, temperature=0)
    with Live(model) as server:
        r = server.client.chat.completions.create(**ask)
        chunks = list(server.client.chat.completions.create(**ask, stream=True))
        plain = server.client.chat.completions.create(**{**ask, "tool_choice": "none"})
    message = r.choices[0].message
    assert [c.function.name for c in message.tool_calls] == [c["function"]["name"].strip()
                                                             for c in parsed["tool_calls"]] == [words[2]]
    assert message.tool_calls[0].function.arguments == "{}" and message.tool_calls[0].type == "function"
    assert message.content == parsed["content"] == words[0]
    assert r.choices[0].finish_reason == "tool_calls" and r.usage.completion_tokens == 5
    streamed = [c.choices[0].delta for c in chunks if c.choices]
    assert streamed[0].role == "assistant"
    assert "".join(d.content or "" for d in streamed).strip() == message.content
    calls = [c for d in streamed for c in d.tool_calls or []]
    assert [(c.index, c.type, c.function.name, c.function.arguments) for c in calls] == [(0, "function", words[2], "{}")]
    assert calls[0].id.startswith("call_") and calls[0].id != message.tool_calls[0].id
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    # tool_choice "none": no tools shown, nothing read (the answer to the plain prompt, up to the stop token)
    assert plain.choices[0].message.tool_calls is None
    ids = render_chat(tok, MESSAGES)
    answer = model.generate(ids, max_new_tokens=8)[len(ids):]
    answer = answer[:answer.index(new[4])] if new[4] in answer else answer
    assert plain.choices[0].message.content == tok.decode(answer, skip_special_tokens=True)


def test_tools_are_refused_where_the_model_cannot_take_them(live, model, monkeypatch):
    tools = [{"type": "function", "function": {"name": "look"}}]
    body = {"model": "tiny", "messages": MESSAGES, "tools": tools}
    with pytest.raises(RequestError, match="no response_template"):
        chat_job(body, model.tokenizer, ["tiny"], {}, 8)
    with pytest.raises(RequestError, match="does not show them"):  # WORD_TEMPLATE has no tools
        chat_job(body, model.tokenizer, ["tiny"], {}, 8, response_template={"fields": {}})
    with pytest.raises(openai.BadRequestError, match="tools are not supported for this model"):
        live.client.chat.completions.create(model="tiny", messages=MESSAGES, tools=tools, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="tools=.* is not supported"):
        live.client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2, extra_body={"tools": tools})


def test_up_to_16_stop_strings_are_taken_as_lm_eval_sends_them(live):
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 4, "stop": [f"w{i}x" for i in range(16)]}
    assert httpx.post(live.url + "/v1/completions", json=body, timeout=30).status_code == 200


def test_tool_call_arguments_nested_too_deeply_to_decode_are_kept_as_their_string(model):
    """Regression (QA): such arguments raised RecursionError out of the request's thread, a 500."""
    deep = "[" * 100_000 + "]" * 100_000
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": deep}}
    body = {"model": "tiny", "messages": MESSAGES + [{"role": "assistant", "tool_calls": [call]}] + MESSAGES}
    assert chat_job(body, model.tokenizer, ["tiny"], {}, 8).prompt == chat_ids(model.tokenizer, body["messages"])


def test_a_developer_message_is_rendered_as_a_system_message(model):
    def prompt(role):
        body = {"model": "tiny", "messages": [{"role": role, "content": "w3 w4"}] + MESSAGES}
        return chat_job(body, model.tokenizer, ["tiny"], {}, 8).prompt

    assert prompt("developer") == prompt("system") == chat_ids(model.tokenizer, [
        {"role": "system", "content": "w3 w4"}] + MESSAGES)


def test_a_client_retrieves_the_served_model(live):
    """Regression (QA): GET /v1/models/{id} was a 404, so the client's models.retrieve failed."""
    assert live.client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError, match="not served here"):
        live.client.models.retrieve("other/model")


def test_unsupported_fields_at_their_defaults_are_accepted(live):
    """Regression: logit_bias {} (LangChain's default), tool_choice "none" and response_format text were 400s."""
    for field in ({"logit_bias": {}}, {"tool_choice": "none"}, {"response_format": {"type": "text"}}, {"tools": []},
                  {"modalities": ["text"]}, {"user": "u1", "metadata": {"k": "v"}, "store": False},
                  {"repetition_penalty": None},  # a field sent as null is left out
                  {"ignore_eos": False},  # vLLM's and SGLang's serving benchmarks send it in every request
                  {"prompt_cache_retention": "24h", "prompt_cache_options": {"ttl": "1h"}}):  # were 400s (review)
        r = httpx.post(live.url + "/v1/chat/completions", timeout=60,
                       json={"model": "tiny", "messages": MESSAGES, "max_tokens": 2, **field})
        assert r.status_code == 200, (field, r.text)
    r = httpx.post(live.url + "/v1/chat/completions", timeout=60,
                   json={"model": "tiny", "messages": MESSAGES, "response_format": {"type": "json_object"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"


def test_every_field_the_openai_client_sends_is_taken_ignored_or_refused_by_name():
    """Regression (review): prompt_cache_retention and prompt_cache_options, which the installed openai client
    sends when asked to, were refused as "not a field this server takes"; a client's newer field must be known."""
    from openai.types import completion_create_params as legacy
    from openai.types.chat import completion_create_params as chat

    from airmlx import openai_api as api
    known = api.TAKEN | api.IGNORED | api.UNSUPPORTED.keys()
    for params, only in ((chat, api.CHAT_ONLY), (legacy, {"prompt"})):
        fields = set(params.CompletionCreateParamsBase.__annotations__)
        assert "model" in fields and not fields - known - only, fields - known - only


def test_top_p_0_leaves_only_the_most_likely_token(live, model):
    """Regression (review): top_p 0, in OpenAI's range (0 to 1) and a common way to ask for greedy output, was a
    400."""
    text, _ = expected(model, model.tokenizer(PROMPT)["input_ids"], 6)
    for seed in (1, 2):
        r = live.client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=1.5, top_p=0,
                                           seed=seed)
        assert r.choices[0].text == text


def test_the_openai_client_sees_a_bad_request_as_one(live):
    with pytest.raises(openai.BadRequestError, match="top_p"):
        live.client.completions.create(model="tiny", prompt=PROMPT, top_p=2)
    with pytest.raises(openai.NotFoundError):
        live.client.get("/nowhere", cast_to=object)
    with pytest.raises(openai.NotFoundError, match="not served here") as e:  # was a BadRequestError
        live.client.completions.create(model="gpt-9", prompt=PROMPT)
    assert e.value.code == "model_not_found" and e.value.param == "model"


def test_an_api_key_is_asked_for_when_set(model):
    with Live(model, api_key="sesame") as server:
        for key in ("wrong", None):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            r = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": PROMPT}, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            server.client.models.list()
        good = openai.OpenAI(base_url=server.url + "/v1", api_key="sesame", max_retries=0)
        assert good.completions.create(model="tiny", prompt=PROMPT, max_tokens=2).usage.completion_tokens == 2
        r = httpx.post(server.url + "/v1/completions", headers={"Authorization": "bearer sesame"},  # RFC 7235: any case
                       json={"model": "tiny", "prompt": PROMPT, "max_tokens": 2})
        assert r.status_code == 200, r.text


def test_a_flood_beyond_the_queue_gets_503_with_retry_after(model):
    with Live(model, max_batch=1, max_queue=1) as server:
        def post(_):
            return httpx.post(server.url + "/v1/completions", timeout=60,
                              json={"model": "tiny", "prompt": PROMPT, "max_tokens": 100, "temperature": 0})
        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(post, range(8)))
        statuses = sorted(r.status_code for r in replies)
        assert statuses.count(200) >= 1 and statuses.count(503) >= 5 and set(statuses) == {200, 503}
        refused = next(r for r in replies if r.status_code == 503)
        assert int(refused.headers["retry-after"]) >= 1 and refused.json()["error"]["type"] == "server_error"
        assert post(0).status_code == 200  # still serving


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ignoring_sigint():
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize("sig, backend, started_ignoring", [(signal.SIGINT, "mlx", False), (signal.SIGTERM, "torch", False),
                                                            (signal.SIGINT, "torch", True)],
                         ids=["sigint-mlx", "sigterm-torch", "sigint-background-torch"])
def test_a_signal_ends_running_streams_with_an_error_and_the_server_exits(shards, sig, backend, started_ignoring):
    """started_ignoring: regression, a server started as a shell's background job (SIGINT ignored, inherited)
    stopped on SIGINT but exited with 0; uvicorn restored the ignored handler before raising the signal again."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "airmlx.server", "--model", str(shards), "--backend", backend,
                             "--memory-budget", "420KB", "--port", str(port), "--log-level", "info"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            preexec_fn=ignoring_sigint if started_ignoring else None)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
        secret = "w77 w78 w79 w80"
        stream = client.completions.create(model=str(shards), prompt=secret, max_tokens=250, temperature=0,
                                           stream=True)
        chunks = iter(stream)
        next(chunks)
        proc.send_signal(sig)
        with pytest.raises(openai.APIError, match="shutting down"):
            for _ in chunks:
                pass
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == (130 if sig == signal.SIGINT else 143), out[-2000:]
    assert "Traceback" not in out and secret not in out  # prompts are never logged unless asked


def test_bpe_chat_streams_whole_characters_as_generate_decodes_them(tmp_path):
    shards = airmlx.shard_checkpoint(make_chat_checkpoint(tmp_path / "src"), tmp_path / "shards", progress=False)
    with airmlx.AutoModel.from_pretrained(shards, backend="torch") as model, Live(model) as server:
        messages = [{"role": "user", "content": "What is a list?"}]
        text, _ = expected(model, chat_ids(model.tokenizer, messages), 24, chat=True)
        whole = server.client.chat.completions.create(model="tiny", messages=messages, max_tokens=24, temperature=0)
        chunks = server.client.chat.completions.create(model="tiny", messages=messages, max_tokens=24, temperature=0,
                                                       stream=True)
        assert whole.choices[0].message.content == text
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == text


def test_the_command_line_binds_locally_and_refuses_bad_options_in_one_line(capsys):
    from airmlx.server import build_parser, main
    assert build_parser().parse_args([]).host == "127.0.0.1"
    for bad in (["--max-batch", "0"], ["--max-queue", "0"], ["--max-kv-bytes", "lots"], ["--keep-caches", "-1"],
                ["--num-draft-tokens", "0"], ["--micro-batches", "0"]):
        assert main(bad) == 2
        err = capsys.readouterr().err
        assert err.startswith("airmlx: ") and err.count("\n") == 1, err
    assert "--max-kv-bytes 'lots' is not a size" in (main(["--max-kv-bytes", "lots"]), capsys.readouterr().err)[1]
    # an allowance too small for any request started a server that served nothing, without a word (QA)
    assert main(["--port", "0", "--backend", "torch", "--max-kv-bytes", "1"]) == 2
    err = capsys.readouterr().err
    err = err.split("\r")[-1].split("\n", 1)[-1] if "\r" in err else err  # after the demo's sharding bar, if any
    assert err.startswith("airmlx: a KV-cache allowance of 1 B holds no request") and err.count("\n") == 1, err
    # an address in use or unknown: one line before the model loads (it was uvicorn's log and exit status 3,
    # after "serving ... on" had been logged)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        for bad in (["--port", str(taken.getsockname()[1])], ["--host", "999.1.1.1"]):
            assert main(bad) == 2
            err = capsys.readouterr().err
            assert err.startswith("airmlx: cannot listen on ") and err.count("\n") == 1, err


def test_prompts_are_logged_only_when_asked(model, caplog):
    for asked in (False, True):
        engine = Engine(model, kv_allowance=10**8, log_prompts=asked)
        try:
            with caplog.at_level("INFO", logger="airmlx.server"):
                caplog.clear()
                done = threading.Event()
                engine.submit(Request([77, 78, 79], 2, Sampling(), lambda e: isinstance(e, Finished) and done.set()))
                assert done.wait(30)
            assert ("w77 w78 w79" in caplog.text) == asked and "prompt tokens" in caplog.text
        finally:
            engine.stop()
            engine.join(30)


def test_a_client_that_stops_waiting_for_a_whole_answer_leaves_the_batch(live, model, monkeypatch):
    """Regression (QA): a request answered whole checked its client only when no token had come for a second,
    so one whose client had gone ran on to its last token while tokens kept coming."""
    import httpx

    import airmlx.server
    ids = model.tokenizer(PROMPT)["input_ids"]
    _, new = expected(model, ids, 200)
    assert len(new) == 200  # no EOS: the request would run long after its client went
    monkeypatch.setattr(airmlx.server, "DISCONNECT_POLL_S", 0.02)
    gone_before = live.engine.stats()["disconnected"]
    with pytest.raises(httpx.TimeoutException):
        httpx.post(live.url + "/v1/completions", timeout=0.1,
                   json=dict(model="tiny", prompt=PROMPT, max_tokens=200, temperature=0))
    live.settle()
    assert live.engine.stats()["disconnected"] == gone_before + 1


def test_a_max_completion_tokens_past_the_kv_allowance_is_named_as_sent(model):
    """Regression (QA): the error named param max_tokens when the client had sent max_completion_tokens."""
    with Live(model, kv_allowance=40 * model.kv_bytes_per_token) as server:
        for name in ("max_tokens", "max_completion_tokens"):
            r = httpx.post(server.url + "/v1/completions", timeout=30,
                           json={"model": "tiny", "prompt": PROMPT, name: 60})
            assert r.status_code == 400 and r.json()["error"]["param"] == name, r.json()
