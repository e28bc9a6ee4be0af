"""Tool calls for the server: the request's `tools` checked, and the calls read back out of the model's output.

transformers owns both ends. The chat template shows the tools to the model (`apply_chat_template(tools=)`), and
the tokenizer's `response_template` says how the model writes a call, which transformers' `ResponseParser`
reads, also as the text streams in. A tokenizer without one gets the template transformers' own server keeps for
its model_type (Qwen 2 / 2.5 / 3, Qwen 3.5, Gemma 4), where that table exists; otherwise `tools` is refused.
"""
import contextlib
import json
import logging
import uuid

from .requests import RequestError

log = logging.getLogger("airmlx.server")

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


def usable_template(tokenizer, model_type) -> dict | None:
    """The model's response template where transformers can read it (else tools are refused, with a warning)."""
    template = response_template(tokenizer, model_type)
    if template is None:
        return None
    try:
        from transformers.utils.chat_parsing.response_templates import load_response_template
        load_response_template(template)
    except Exception as e:  # noqa: BLE001 - whatever the tokenizer's file holds
        log.warning("tools are refused: the tokenizer's response_template cannot be read (%s)", e)
        return None
    return template


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
    arguments a JSON string as OpenAI's API has them. `finish()` gives the last items once the answer has ended;
    `result()` then gives the whole message as transformers' parser reads it. The parser reads the text with its
    special tokens (a call's markers are often special tokens); the stop tokens that end an answer are left out,
    as are a stop string and what follows it. A call the parser cannot read (broken JSON, no function name)
    comes out as content, from its opening marker on, and so does the rest of the answer.
    """

    def __init__(self, tokenizer, template: dict, prompt: list, tools: list, stop_tokens=(), stops=(), lock=None):
        from transformers.utils.chat_parsing import ResponseParser

        self.tokenizer, self.stop_tokens, self.stops = tokenizer, set(stop_tokens), list(stops)
        self.lock = lock or contextlib.nullcontext()
        with self.lock:
            prefix = tokenizer.decode(prompt, skip_special_tokens=False)
        self.parser = ResponseParser(template, prefix=prefix, tools=tools)
        self.tokens, self.fed = [], 0  # the answer's tokens; how much of its text the parser has been given
        self.call_start = None  # where the text of the call being read began
        self.broken = None  # where the text the parser could not read began: all from there on is content
        self.calls, self.given, self.started = [], {"content": [], "reasoning": []}, set()  # what was given
        self.message = None  # transformers' parse of the whole answer (where it could read it)

    def add(self, tokens) -> list:
        self.tokens += [int(t) for t in tokens if int(t) not in self.stop_tokens]
        text = self._text()
        stem = text.rstrip("\ufffd")  # a character whose bytes are still coming: held back, and it could be any
        end = len(stem) - max((n for s in self.stops for n in range(1, len(s)) if stem.endswith(s[:n])), default=0)
        return self._feed(text[:end])  # held back: what may be the start of a stop string

    def finish(self) -> list:
        """The items not given yet, once the answer has ended."""
        text = self._text()
        items = self._feed(text)
        if self.broken is None:
            try:
                message, events = self.parser.finalize()
                items += self._items(events, self.fed, text)
                self.message = message if self.broken is None else None
            except Exception:  # noqa: BLE001 - see _feed
                items += self._broke(text, self.fed)
        return items

    def result(self) -> tuple:
        """(content, reasoning or None, tool calls or None) of the finished answer: transformers' parse of it,
        where it could read it (leading and trailing space trimmed, as it trims them), else what was given."""
        if self.message is None:
            return "".join(self.given["content"]), "".join(self.given["reasoning"]).strip() or None, self.calls or None
        content = self.message.get("content") or ""
        reasoning = next((self.message[k] for k in REASONING_FIELDS if self.message.get(k)), None)
        as_text = [v if isinstance(v, str) else json.dumps(v) for v in (content, reasoning)]
        return as_text[0], as_text[1] if reasoning is not None else None, self.calls or None

    def _text(self) -> str:
        with self.lock:
            text = self.tokenizer.decode(self.tokens, skip_special_tokens=False)
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        return text[:min(found)] if found else text

    def _position(self) -> int:
        """Where the parser stands in the answer's text (what it holds back, a marker it may be reading, comes
        after): transformers' parser keeps no public count, so its buffer is read, and, failing that, all fed."""
        buffer, pos = getattr(self.parser, "_buffer", None), getattr(self.parser, "_pos", None)
        if not isinstance(buffer, str) or not isinstance(pos, int):
            return self.fed
        return max(0, self.fed - (len(buffer) - pos))

    def _feed(self, text: str) -> list:
        if len(text) <= self.fed:
            return []
        start = self._position()
        piece, self.fed = text[self.fed:], len(text)
        if self.broken is not None:
            return self._give([("content", piece)])
        try:
            return self._items(self.parser.feed(piece), start, text)
        except Exception:  # noqa: BLE001 - a model's text can break the parser any way (ValueError, RecursionError)
            return self._broke(text, start)

    def _broke(self, text: str, start: int) -> list:
        self.broken = self.call_start if self.call_start is not None else start
        return self._give([("content", text[self.broken:])])

    def _items(self, events: list, at: int, text: str) -> list:
        """Items for the parser's events; `at`: where in the text the first of them begins."""
        out = []
        for event in events:
            name = event.get("field")
            if event["type"] == "region_chunk":
                kind = "content" if name == "content" else "reasoning" if name in REASONING_FIELDS else None
                if kind and not event.get("dirty") and event.get("text"):
                    out.append((kind, event["text"]))
                at += len(event.get("text") or "")
            elif event["type"] == "region_open" and name == "tool_calls":
                self.call_start = at
            elif event["type"] == "region_close" and name == "tool_calls":
                call = self._call(event.get("value"))
                if call is None:  # not a call to a named function: the text it came from is content
                    return self._give(out) + self._broke(text, at)
                out.append(("tool_call", call))
                self.calls.append(call)
                self.call_start = None
        return self._give(out)

    def _give(self, items: list) -> list:
        """items, an answer's first content and first reasoning without their leading space (as transformers'
        parse has them)."""
        out = []
        for kind, value in items:
            if kind != "tool_call" and kind not in self.started:
                value = value.lstrip()
                if not value:
                    continue
                self.started.add(kind)
            if kind != "tool_call":
                self.given[kind].append(value)
            out.append((kind, value))
        return out

    @staticmethod
    def _call(value) -> dict | None:
        function = value.get("function", value) if isinstance(value, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not name.strip():
            return None
        arguments = function.get("arguments", {})
        return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": name.strip(),
                             "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments)}}
