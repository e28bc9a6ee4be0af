"""Tool calls for the server: the request's `tools` checked, and the calls read back out of the model's output.

transformers owns both ends. The chat template shows the tools to the model (`apply_chat_template(tools=)`), and
the tokenizer's `response_template` says how the model writes a call, which transformers' `ResponseParser`
reads, also as the text streams in. A tokenizer without one gets the template transformers' own server keeps for
its model_type (Qwen 2 / 2.5 / 3, Qwen 3.5, Gemma 4), where that table exists; otherwise `tools` is refused.
"""
import contextlib
import json
import uuid

from .requests import RequestError

REASONING_FIELDS = ("reasoning_content", "thinking")  # what response templates name a model's thinking


def response_template(tokenizer, model_type: str | None) -> dict | None:
    """How this model writes its answer (content, reasoning, tool calls), or None where nobody says."""
    template = getattr(tokenizer, "response_template", None)
    if template is not None:
        return template
    try:  # transformers' own server keeps these for tokenizers that ship none (a private table: may move)
        from transformers.cli.serving.utils import _RESPONSE_TEMPLATE_FALLBACKS as fallbacks
    except Exception:  # noqa: BLE001 - an import of another package's internals: any failure means no table
        return None
    return next((t for types, t in fallbacks.items() if model_type in types), None)


def checked_tools(tools, tool_choice) -> list | None:
    """The request's tools in OpenAI's form, or None where none are offered or tool_choice is "none"."""
    if tool_choice not in (None, "auto", "none"):
        raise RequestError(f"tool_choice={json.dumps(tool_choice)[:80]} is not supported: this server cannot make "
                           "the model call a tool; use \"auto\" (or leave it out).", param="tool_choice")
    if tools is None or tools == [] or tool_choice == "none":
        return None
    if not isinstance(tools, list) or not all(
            isinstance(t, dict) and t.get("type", "function") == "function" and isinstance(t.get("function"), dict)
            and isinstance(t["function"].get("name"), str) and t["function"]["name"]
            and isinstance(t["function"].get("parameters", {}), dict) for t in tools):
        raise RequestError("tools must be a list of {\"type\": \"function\", \"function\": {\"name\": ..., "
                           "\"parameters\": {...}}} objects.", param="tools")
    return [{**t, "type": "function"} for t in tools]


class ToolCallReader:
    """Reads a chat answer as it is generated into content, reasoning and tool calls.

    `add(tokens)` takes the answer's new token ids and gives what they complete: ("content", text),
    ("reasoning", text) and ("tool_call", {"id", "type", "function": {"name", "arguments"}}) items, the
    arguments a JSON string as OpenAI's API has them. `finish()` gives the last items once the answer has ended.
    The parser reads the text with its special tokens (a call's markers are often special tokens); the
    stop tokens that end an answer are left out, as are a stop string and what follows it. A call the parser
    cannot read (the model wrote broken JSON, say) comes out as content, from its opening marker on, and so does
    the rest of the answer.
    """

    def __init__(self, tokenizer, template: dict, prompt: list, tools: list, stop_tokens=(), stops=(), lock=None):
        from transformers.utils.chat_parsing import ResponseParser

        self.tokenizer, self.stop_tokens, self.stops = tokenizer, set(stop_tokens), list(stops)
        self.lock = lock or contextlib.nullcontext()
        with self.lock:
            prefix = tokenizer.decode(prompt, skip_special_tokens=False)
        self.parser = ResponseParser(template, prefix=prefix, tools=tools)
        self.tokens, self.fed = [], 0
        self.seen = 0  # the text up to here was given as content or reasoning, or read as a call
        self.broken = None  # where the text the parser could not read began: all from there on is content
        self._items(self.parser.initial_events, "")  # the prompt's part of the answer (an opened <think>, say)

    def add(self, tokens) -> list:
        self.tokens += [int(t) for t in tokens if int(t) not in self.stop_tokens]
        text = self._text()
        end = len(text) - max((n for s in self.stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        while end > self.fed and text[end - 1] == "\ufffd":  # a character whose bytes are still coming
            end -= 1
        return self._feed(text[:end])  # held back: what may be the start of a stop string

    def finish(self) -> list:
        """The items not given yet, once the answer has ended."""
        text = self._text()
        items = self._feed(text)
        if self.broken is None:
            try:
                return items + self._items(self.parser.finalize()[1], text)
            except ValueError:
                self.broken = self.seen
                items.append(("content", text[self.broken:]))
        return items

    def _text(self) -> str:
        with self.lock:
            text = self.tokenizer.decode(self.tokens, skip_special_tokens=False)
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        return text[:min(found)] if found else text

    def _feed(self, text: str) -> list:
        if len(text) <= self.fed:
            return []
        piece, self.fed = text[self.fed:], len(text)
        if self.broken is not None:
            return [("content", piece)]
        try:
            return self._items(self.parser.feed(piece), text)
        except ValueError:  # a call's text the parser cannot read: from where the last thing shown ended
            self.broken = self.seen
            return [("content", text[self.broken:])]

    def _items(self, events: list, text: str) -> list:
        out = []
        for event in events:
            name = event.get("field")
            if event["type"] == "region_chunk" and not event.get("dirty") and event.get("text"):
                kind = "content" if name == "content" else "reasoning" if name in REASONING_FIELDS else None
                if kind:
                    out.append((kind, event["text"]))
                    at = text.find(event["text"], self.seen)
                    self.seen = at + len(event["text"]) if at >= 0 else self.seen
            elif event["type"] == "region_close" and name == "tool_calls" and event.get("value") is not None:
                out.append(("tool_call", self._call(event["value"])))
                self.seen = len(text)
        return out

    def _call(self, value) -> dict:
        function = value.get("function", value) if isinstance(value, dict) else {}
        arguments = function.get("arguments", {}) if isinstance(function, dict) else {}
        name = function.get("name") if isinstance(function, dict) else None
        return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": str(name if name is not None else "").strip(),
                             "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments)}}
