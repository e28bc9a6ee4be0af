"""Tool calls read out of an answer as it streams in, held to transformers' own parser on the whole text."""
import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

import airmlx
from airmlx.requests import RequestError
from airmlx.tool_calls import ToolCallReader, checked_tools, response_template

DEMO = Path(airmlx.__file__).parent / "demo_model"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": "3"}}\n</tool_call>'
QWEN_PROMPT = "<|im_start|>user\nWeather?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(DEMO)


@pytest.fixture(scope="module")
def qwen_like(tmp_path_factory):
    """The demo tokenizer with Qwen's markers as tokens of their own: <|im_end|> special (a stop token),
    <tool_call> and <think> added but not special, as Qwen 2.5 / 3 have them."""
    from tokenizers import AddedToken
    tok = AutoTokenizer.from_pretrained(DEMO)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.add_tokens([AddedToken(t, special=False) for t in ["<tool_call>", "</tool_call>", "<think>", "</think>"]])
    return tok


def read(tokenizer, answer: str, stops=(), stop_tokens=()):
    """The reader's items, fed one token at a time, and the reader."""
    template = response_template(tokenizer, "qwen3")
    prompt = tokenizer.encode(QWEN_PROMPT, add_special_tokens=False)
    reader = ToolCallReader(tokenizer, template, prompt, TOOLS, stop_tokens=stop_tokens, stops=stops)
    items = []
    for token in tokenizer.encode(answer, add_special_tokens=False):
        items += reader.add([token])
    return items + reader.finish(), reader


def parsed(tokenizer, answer):
    return tokenizer.parse_response(answer, response_template(tokenizer, "qwen3"), prefix=QWEN_PROMPT, tools=TOOLS)


def joined(items, kind="content"):
    return "".join(v for k, v in items if k == kind)


@pytest.mark.parametrize("tok", ["tokenizer", "qwen_like"])  # the markers split in byte pieces, or tokens
def test_calls_streamed_token_by_token_are_what_transformers_parses_from_the_whole_answer(tok, request):
    tokenizer = request.getfixturevalue(tok)
    answer = "Let me look that up.\n\n" + CALL + "\n" + CALL.replace("Paris", "Oslo")
    items, reader = read(tokenizer, answer)
    expected = parsed(tokenizer, answer)
    calls = [value for kind, value in items if kind == "tool_call"]
    assert [c["function"]["name"] for c in calls] == [c["function"]["name"] for c in expected["tool_calls"]]
    # arguments as OpenAI has them: a JSON string, cast by the tool's schema ("3" for an integer is 3)
    assert [json.loads(c["function"]["arguments"]) for c in calls] == \
        [c["function"]["arguments"] for c in expected["tool_calls"]]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris", "days": 3}
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert len({c["id"] for c in calls}) == 2
    assert reader.result() == (expected["content"], None, calls) == ("Let me look that up.", None, calls)
    assert joined(items).strip() == expected["content"]


def test_thinking_and_content_come_back_as_transformers_parses_them(qwen_like):
    answer = "<think>\nhmm ok\n</think>\n\nHello there."
    items, reader = read(qwen_like, answer + "<|im_end|>", stop_tokens=[qwen_like.convert_tokens_to_ids("<|im_end|>")])
    expected = parsed(qwen_like, answer)
    assert reader.result() == (expected["content"], expected["reasoning_content"], None) == ("Hello there.", "hmm ok",
                                                                                            None)
    assert joined(items) == "Hello there." and joined(items, "reasoning").strip() == "hmm ok"


def test_an_answer_without_a_call_is_all_content(tokenizer):
    items, reader = read(tokenizer, "No tools needed: it is sunny.")
    assert items and all(kind == "content" for kind, _ in items)
    assert joined(items) == reader.result()[0] == "No tools needed: it is sunny."


@pytest.mark.parametrize("tok", ["tokenizer", "qwen_like"])
@pytest.mark.parametrize("before", ["Sure.", "<think>\nneed weather\n</think>\n\n"])
@pytest.mark.parametrize("call", [
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": Paris}\n</tool_call> then more',  # broken JSON
    '<tool_call>\n{"arguments": {"city": "Paris"}}\n</tool_call>',  # no function named
    "<tool_call>\n" + "[" * 3000,  # a repetition loop: the JSON parser's RecursionError, at the end
])
def test_a_call_the_parser_cannot_read_comes_out_as_content_from_its_marker(tok, before, call, request):
    tokenizer = request.getfixturevalue(tok)
    items, reader = read(tokenizer, before + call)
    thinking = "think" in before
    content = call if thinking else before + call
    assert not [v for k, v in items if k == "tool_call"]
    assert joined(items) == content and joined(items, "reasoning").strip() == ("need weather" if thinking else "")
    assert reader.result() == (content, "need weather" if thinking else None, None)


def test_a_stop_string_ends_the_answer_before_it_is_parsed(tokenizer):
    items, _ = read(tokenizer, "Checking." + CALL + " STOP and more " + CALL, stops=["STOP"])
    assert [kind for kind, _ in items].count("tool_call") == 1
    assert "STOP" not in "".join(v for kind, v in items if kind == "content")


def test_a_stop_string_held_back_until_it_cannot_be_one(tokenizer):
    items, _ = read(tokenizer, "It is ST and then STOP", stops=["STOP"])
    assert "".join(v for kind, v in items if kind == "content") == "It is ST and then "


@pytest.mark.parametrize("answer, stop", [("It is hot 😊 then", " 😊"), ("It is hot“quoted”", "t“")])
def test_a_stop_string_held_back_while_a_character_of_it_is_still_coming(tokenizer, answer, stop):
    """Regression (QA): the text before a character whose bytes were still coming was given to the parser even
    where, with that character, it began a stop string: the stop string's start was streamed, or kept."""
    items, reader = read(tokenizer, answer, stops=[stop])
    assert joined(items) == reader.result()[0] == answer[:answer.index(stop)]


def test_the_qwen_fallback_comes_from_transformers_and_an_unknown_model_has_none(tokenizer):
    assert response_template(tokenizer, "qwen3")["start_anchor"] == "<|im_start|>assistant\n"
    assert response_template(tokenizer, "llama") is None


@pytest.mark.parametrize("tools, choice, message", [
    ([{"type": "function"}], None, "tools must be a list"),
    ("get_weather", None, "tools must be a list"),
    ([{"type": "retrieval", "function": {"name": "x"}}], None, "tools must be a list"),
    (TOOLS, "required", "cannot make the model call a tool"),
    (TOOLS, {"type": "function", "function": {"name": "get_weather"}}, "cannot make the model call a tool"),
])
def test_bad_tools_are_refused_in_one_line(tools, choice, message):
    with pytest.raises(RequestError, match=message):
        checked_tools(tools, choice)


def test_tool_choice_none_and_no_tools_offer_none():
    assert checked_tools(TOOLS, "none") is None
    assert checked_tools([], "auto") is None
    assert checked_tools(None, None) is None
    assert checked_tools(TOOLS, "auto") == TOOLS
