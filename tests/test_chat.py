"""python -m airmlx.chat: one KV cache across turns, /reset, Ctrl-C mid-answer, piped stdin, one-line errors."""
import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import airmlx
from airmlx.chat import ChatUI, main
from airmlx.demo import DEMO_MODEL
from airmlx.errors import GenerationError
from airmlx.session import ChatSession, common_prefix, render_chat

from tiny import make_chat_checkpoint

MAX_TOKENS = 6


@pytest.fixture(scope="module")
def chat_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    src = make_chat_checkpoint(root / "src")
    return airmlx.shard_checkpoint(src, root / "shards", progress=False)


@pytest.fixture(scope="module")
def model(chat_shards):
    # a budget below the model: layers stream through the prefetcher, as they would for a big model
    with airmlx.AutoModel.from_pretrained(chat_shards, backend="torch", memory_budget="400KB") as m:
        assert m.plan.streamed
        yield m


@pytest.fixture(scope="module")
def mlx_model(chat_shards):
    with airmlx.AutoModel.from_pretrained(chat_shards, backend="mlx", memory_budget="400KB") as m:
        yield m


def layer_lengths(session):
    """Tokens each layer's cache holds (torch DynamicCache or mlx-lm KVCaches)."""
    cache = session.cache
    if hasattr(cache, "layers"):
        return [layer.get_seq_length() for layer in cache.layers]
    return [int(c.offset) for c in cache]


class StepSpy:
    """Wraps model.step to record how many tokens each step feeds."""

    def __init__(self, model, monkeypatch):
        self.fed = []
        inner = model.step

        def step(tokens, mask, cache):
            self.fed.append(np.asarray(tokens).shape[1])
            return inner(tokens, mask, cache)

        monkeypatch.setattr(model, "step", step)


def from_scratch(model, ids, max_new):
    """The greedy answer a fresh generate gives for the whole rendered conversation."""
    out = model.generate([ids], max_new_tokens=max_new, eos_token_id=model.tokenizer.eos_token_id)
    return out[0][len(ids):]


def test_second_turn_feeds_only_its_new_tokens_and_matches_a_fresh_generate(model, monkeypatch):
    session = ChatSession(model, max_tokens=MAX_TOKENS)
    spy = StepSpy(model, monkeypatch)
    first_prompt = session.render([{"role": "user", "content": "What is a list?"}])
    t1 = session.send("What is a list?")
    assert spy.fed[0] == len(first_prompt) and t1.reused_tokens == 0
    assert t1.tokens == from_scratch(model, first_prompt, MAX_TOKENS)
    assert session.cache_length() == len(session.cached) == len(first_prompt) + len(t1.tokens) - 1
    assert session.messages[-1] == {"role": "assistant", "content": t1.text}

    spy.fed.clear()
    before = session.cache_length()
    ids = session.render(session.messages + [{"role": "user", "content": "And a dict?"}])
    t2 = session.send("And a dict?")
    reused = common_prefix(ids, session.cached)
    assert t2.reused_tokens >= len(first_prompt)  # at least the whole first prompt came from the cache
    assert spy.fed[0] == len(ids) - t2.reused_tokens == t2.prompt_tokens < len(ids) - len(first_prompt) + 1
    assert all(n == 1 for n in spy.fed[1:])  # then one token per step
    assert reused >= t2.reused_tokens and t2.reused_tokens <= before
    assert t2.tokens == from_scratch(model, ids, MAX_TOKENS)
    assert session.cache_length() == len(ids) + len(t2.tokens) - 1


def test_a_rewritten_answer_trims_the_cache_to_the_common_prefix(model, monkeypatch):
    session = ChatSession(model, max_tokens=MAX_TOKENS)
    session.send("What is a list?")
    # the template renders the stored answer; pretend it tokenises differently from what was generated
    session.messages[-1]["content"] = "Something else entirely."
    spy = StepSpy(model, monkeypatch)
    ids = session.render(session.messages + [{"role": "user", "content": "Why?"}])
    keep = common_prefix(session.cached, ids)
    assert keep < session.cache_length()
    turn = session.send("Why?")
    assert turn.reused_tokens == keep and spy.fed[0] == len(ids) - keep
    assert turn.tokens == from_scratch(model, ids, MAX_TOKENS)


def test_reset_empties_the_cache_and_the_conversation(model):
    session = ChatSession(model, max_tokens=3, system_prompt="Be brief.")
    session.send("hi")
    assert session.cache_length() > 0 and len(session.messages) == 3
    session.reset()
    assert session.cache_length() == 0 and session.cached == []
    assert session.messages == [{"role": "system", "content": "Be brief."}]
    turn = session.send("hi")
    assert turn.reused_tokens == 0  # nothing was kept from before


def test_an_empty_system_prompt_is_rendered_as_generate_renders_it(model):
    """Regression (QA): `chat --system-prompt ""` dropped the system message (a template then put in its default
    one) while `generate --chat-template --system-prompt ""` rendered an empty one: two first answers."""
    session = ChatSession(model, max_tokens=3, system_prompt="")
    system = [{"role": "system", "content": ""}]
    assert session.messages == system
    assert session.render(session.messages + [{"role": "user", "content": "hi"}]) == \
        render_chat(model.tokenizer, system + [{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("backend, when", [("torch", "prefill"), ("torch", "decode"), ("mlx", "decode")])
def test_ctrl_c_mid_sweep_keeps_the_partial_answer_and_the_next_turn_is_right(request, monkeypatch, backend, when):
    model = request.getfixturevalue("model" if backend == "torch" else "mlx_model")
    session = ChatSession(model, max_tokens=MAX_TOKENS)
    session.send("What is a list?")
    n_stages = len(model.plan.stage_bytes)
    # the stage call at which Ctrl-C lands: half-way through the prefill sweep of turn 2, or through its
    # third decode sweep; either way some layers have written this step's keys and values, others not
    target = n_stages // 2 + (0 if when == "prefill" else 3 * n_stages)
    calls = {"n": 0}
    inner = model.backend.run_stage

    def run_stage(stage, x, ctx):
        calls["n"] += 1
        if calls["n"] == target + 1:
            raise KeyboardInterrupt
        return inner(stage, x, ctx)

    monkeypatch.setattr(model.backend, "run_stage", run_stage)
    ids = session.render(session.messages + [{"role": "user", "content": "And a dict?"}])
    turn = session.send("And a dict?")
    monkeypatch.undo()
    assert turn.interrupted
    assert len(turn.tokens) == (0 if when == "prefill" else 3)
    assert session.messages[-1] == {"role": "assistant", "content": turn.text}  # the partial answer is kept
    lengths = set(layer_lengths(session))
    assert lengths == {session.cache_length()} == {len(session.cached)}  # every layer trimmed alike
    assert session.cached == (ids + turn.tokens)[:len(session.cached)]

    want_ids = session.render(session.messages + [{"role": "user", "content": "Go on."}])
    after = session.send("Go on.")
    assert not after.interrupted and after.reused_tokens > 0
    assert after.tokens == from_scratch(model, want_ids, MAX_TOKENS)


def test_same_seed_same_sampled_answer_and_too_long_is_refused(model):
    a = ChatSession(model, max_tokens=MAX_TOKENS, temp=1.5, top_p=0.95, seed=7)
    b = ChatSession(model, max_tokens=MAX_TOKENS, temp=1.5, top_p=0.95, seed=7)
    first = a.send("hi").tokens
    assert [first, a.send("more").tokens] == [b.send("hi").tokens, b.send("more").tokens]
    a.reset()  # a new conversation samples from the seed's start again (it went on from where it was)
    assert a.send("hi").tokens == first
    before = list(a.messages)
    with pytest.raises(airmlx.AirmlxError, match="/reset"):
        a.send("list " * model.config["max_position_embeddings"])
    assert a.messages == before and a.cache_length() == len(a.cached)


def test_a_message_past_the_context_gets_our_refusal_not_the_tokenizers_warning():
    import logging

    from transformers import AutoTokenizer

    from airmlx.openai_api import RequestError, completion_job
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("transformers").addHandler(handler)
    try:
        tok = AutoTokenizer.from_pretrained(DEMO_MODEL)  # a fresh one: it warns once per instance
        long = "list " * tok.model_max_length
        assert len(render_chat(tok, [{"role": "user", "content": long}])) > tok.model_max_length
        with contextlib.suppress(RequestError):
            completion_job({"model": "m", "prompt": long}, tok, ["m"], {}, 8)
        ours = list(records)
        tok(long)  # the warning, as a tokenizer asked plainly gives it: so this hook would have seen ours
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert ours == [] and ["sequence length is longer" in r.getMessage() for r in records] == [True]


@pytest.mark.parametrize("text", [None, 5, ["hi"]])
def test_a_message_that_is_not_text_is_refused(model, text):
    """Regression (QA): the template rendered None, 5 and a list as their Python text ("None", "5", "['hi']")."""
    session = ChatSession(model, max_tokens=3)
    with pytest.raises(GenerationError, match="send\\(\\) takes the user's message as a string"):
        session.send(text)
    assert session.messages == []


def test_a_line_of_bytes_that_are_not_utf8_is_refused_and_the_chat_goes_on(model):
    """Regression (QA): `printf 'hi \\xff\\n' | python -m airmlx.chat` ended the chat in the tokenizer's TypeError
    (Python keeps such bytes as lone surrogates)."""
    # a UTF-8 locale reads a pipe strictly: a UnicodeDecodeError traceback ended the chat (review)
    for stdin in (io.StringIO("hi \udcff\nhello\n"), io.TextIOWrapper(io.BytesIO(b"hi \xff\nhello\n"), encoding="utf-8")):
        session = ChatSession(model, max_tokens=3)
        err = io.StringIO()
        ChatUI(session, stdin=stdin, stdout=io.StringIO(), stderr=err, interactive=False).run()
        assert "airmlx: the message is not UTF-8 text (byte 0xff at character 3)" in err.getvalue()
        assert [m["content"] for m in session.messages if m["role"] == "user"] == ["hello"]
    with pytest.raises(GenerationError, match="the system prompt is not UTF-8 text"):
        ChatSession(model, system_prompt="\udcfe")


def test_ui_commands_on_a_stream(model):
    session = ChatSession(model, max_tokens=3)
    out, err = io.StringIO(), io.StringIO()
    lines = "hello\n\n/stats\n/help\n/nope\n/stats please\n/reset\n/stats\nq and a, please\nq\nnever read\n"
    ChatUI(session, stdin=io.StringIO(lines), stdout=out, stderr=err, interactive=False).run()
    text = out.getvalue()
    assert ">>" not in text  # no prompt when piped
    assert "tokens/s" in text and "per step" in text and "peak memory" in text and str(model.plan) in text
    assert "/reset" in text and "/quit" in text  # the help
    assert "no answer yet" not in text.split("/reset")[0]
    assert "unknown command /nope" in err.getvalue() and "new conversation" in err.getvalue()
    assert "/stats takes nothing after it" in err.getvalue()  # it was sent to the model as a message
    # a message whose first word is "q" is a message (it was refused as "q takes nothing after it")
    assert "q takes nothing" not in err.getvalue()
    # reset ("hello" is gone), and "never read" was not sent
    assert [m["content"] for m in session.messages if m["role"] == "user"] == ["q and a, please"]


def test_chat_from_a_pipe_end_to_end(chat_shards, tmp_path):
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run([sys.executable, "-m", "airmlx.chat", "--model", str(chat_shards), "--backend", "torch",
                           "--max-tokens", "4", "--profile"],
                          input="hi\nwhat is a list?\n/stats\n", capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    answers, _, after = proc.stdout.partition("prompt: ")  # two answers, then the /stats line
    assert answers.count("\n") >= 2 and "tokens/s" in after and "per step" in after and "cache:" in after
    assert ">>" not in proc.stdout and "Traceback" not in proc.stderr
    assert "profile:" in proc.stdout and "profile:" in proc.stderr  # on /stats and at the end


@pytest.mark.parametrize("argv, says", [
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--max-tokens", "lots"], "not a whole number"),
    (["--temp", "-1"], "--temp: -1: use a finite number >= 0 (0: greedy)"),  # was "temperature=", a Python name
    (["--top-p", "2"], "--top-p: 2: use a finite number in (0, 1]"),
    (["--top-k", "-1"], "--top-k: -1 is less than 0"),
    (["--compression", "3bit"], "--compression: '3bit' is unknown; use one of ['4bit', '8bit']"),  # was "a dict like"
    (["--max-tokens", "0"], "--max-tokens/-m: 0 is less than 1"),
    (["--seed", "3", "--top-p", "0.9", "--top-k", "4"], "--top-p and --top-k only change sampling"),  # were ignored
])
def test_bad_option_is_one_line_and_status_2(argv, says, capsys):
    try:
        code = main(argv, stdin=io.StringIO(""))
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("airmlx: ") and says in err


def test_missing_model_is_one_line_and_status_2(tmp_path, capsys):
    code = main(["--model", str(tmp_path / "nowhere"), "--backend", "torch"], stdin=io.StringIO("hi\n"))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("airmlx: ") and "nowhere" in err


def test_session_follows_generation_config_and_the_chat_cli_stays_greedy(chat_shards, tmp_path):
    import json
    import shutil
    folder = shutil.copytree(chat_shards, tmp_path / "sampling")
    config = json.loads((folder / "generation_config.json").read_text())
    config.update(do_sample=True, temperature=1.5, top_k=0)  # a checkpoint that asks for sampling
    (folder / "generation_config.json").write_text(json.dumps(config))
    with airmlx.AutoModel.from_pretrained(folder, backend="torch") as m:
        greedy = ChatSession(m, max_tokens=MAX_TOKENS, temp=0).send("hi")
        sampled = {tuple(ChatSession(m, max_tokens=MAX_TOKENS, seed=s).send("hi").tokens) for s in range(4)}
    assert len(sampled) > 1  # temp left unset: the session samples, as the checkpoint asks

    def cli(*flags):
        out = io.StringIO()
        assert main(["--model", str(folder), "--backend", "torch", "--max-tokens", str(MAX_TOKENS), *flags],
                    stdin=io.StringIO("hi\n"), stdout=out) == 0
        return out.getvalue()

    assert cli("--seed", "1") == cli("--seed", "2") == greedy.text + "\n"  # no --temp: greedy
