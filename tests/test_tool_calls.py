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


def read(tokenizer, answer: str, stops=(), template=None):
    """The reader's items, fed one token at a time, and transformers' parse of the whole answer."""
    template = template or response_template(tokenizer, "qwen2")
    prompt = tokenizer.encode(QWEN_PROMPT, add_special_tokens=False)
    reader = ToolCallReader(tokenizer, template, prompt, TOOLS, stops=stops)
    items = []
    for token in tokenizer.encode(answer, add_special_tokens=False):
        items += reader.add([token])
    return items + reader.finish()


def test_calls_streamed_token_by_token_are_what_transformers_parses_from_the_whole_answer(tokenizer):
    answer = "Let me look that up." + CALL + "\n" + CALL.replace("Paris", "Oslo")
    items = read(tokenizer, answer)
    expected = tokenizer.parse_response(answer, response_template(tokenizer, "qwen2"), prefix=QWEN_PROMPT, tools=TOOLS)
    calls = [value for kind, value in items if kind == "tool_call"]
    assert [c["function"]["name"] for c in calls] == [c["function"]["name"] for c in expected["tool_calls"]]
    # arguments as OpenAI has them: a JSON string, cast by the tool's schema ("3" for an integer is 3)
    assert [json.loads(c["function"]["arguments"]) for c in calls] == \
        [c["function"]["arguments"] for c in expected["tool_calls"]]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris", "days": 3}
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert len({c["id"] for c in calls}) == 2
    assert "".join(v for kind, v in items if kind == "content") == expected["content"] == "Let me look that up."


def test_an_answer_without_a_call_is_all_content(tokenizer):
    items = read(tokenizer, "No tools needed: it is sunny.")
    assert items and all(kind == "content" for kind, _ in items)
    assert "".join(v for _, v in items) == "No tools needed: it is sunny."


def test_a_call_the_parser_cannot_read_comes_out_as_content(tokenizer):
    broken = '<tool_call>\n{"name": "get_weather", "arguments": {"city": Paris}\n</tool_call> then more'
    items = read(tokenizer, "Sure." + broken)
    assert all(kind == "content" for kind, _ in items)
    assert "".join(v for _, v in items) == "Sure." + broken


def test_a_stop_string_ends_the_answer_before_it_is_parsed(tokenizer):
    items = read(tokenizer, "Checking." + CALL + " STOP and more " + CALL, stops=["STOP"])
    assert [kind for kind, _ in items].count("tool_call") == 1
    assert "STOP" not in "".join(v for kind, v in items if kind == "content")


def test_a_stop_string_held_back_until_it_cannot_be_one(tokenizer):
    items = read(tokenizer, "It is ST and then STOP", stops=["STOP"])
    assert "".join(v for kind, v in items if kind == "content") == "It is ST and then "


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
