"""OpenAI's HTTP API without the HTTP: request bodies checked and turned into prompt ids and options (a Job),
and the engine's events turned into OpenAI's response, chunk and error objects. Used by airmlx/server.py.

Fields outside the API that the server takes: `top_k` (sample among the k most likely tokens). Fields the
server ignores: those in IGNORED (`user`, `metadata`, ...). Fields it refuses unless left at their defaults:
`n`, `best_of`, `echo`, `suffix`, penalties, `logit_bias`, `response_format`, and what is not text
(`modalities`, `audio`, ...). A chat request's `tools` are taken where the model's tokenizer says how it writes
a call (airmlx/tool_calls.py), with `tool_choice` "auto" or "none". Any other field is refused, as OpenAI
refuses one it does not know (a 400 that names the field).
"""
import codecs
import functools
import json
import math
import re
from dataclasses import dataclass, field

from .generation import is_int, is_number
from .requests import RequestError, Sampling
from .session import render_chat
from .tool_calls import checked_tools

MAX_STOPS = 16  # OpenAI's API takes 4; lm-eval's completions send a task's stop strings and EOS, uncut
MAX_TOP_LOGPROBS = 20
# OpenAI's roles, as the chat template gets them: "developer" is OpenAI's newer name for "system".
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
UNSUPPORTED = {"n": 1, "best_of": 1, "echo": False, "suffix": None, "presence_penalty": 0, "frequency_penalty": 0,
               "logit_bias": None, "tools": None, "tool_choice": None, "functions": None, "function_call": None,
               "response_format": None, "ignore_eos": False,
               # what is not text
               "modalities": None, "audio": None, "prediction": None, "reasoning_effort": None,
               "web_search_options": None, "verbosity": None, "moderation": None}
# (ignore_eos is vLLM's and SGLang's, which their serving benchmarks send as false in every request)
# what clients send for "none of that" besides leaving a field out (LangChain sends logit_bias {})
ALSO_DEFAULT = {"tools": ([],), "functions": ([],), "logit_bias": ({},), "tool_choice": ("none",),
                "response_format": ({"type": "text"},), "modalities": (["text"],)}
# OpenAI's fields that change nothing here; any other field is refused, as OpenAI refuses one it does not know
# (a sampler's extra such as repetition_penalty or min_p would otherwise be ignored without a word)
IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "prompt_cache_key",
           "prompt_cache_retention", "prompt_cache_options", "safety_identifier"}
TAKEN = {"model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream",
         "stream_options", "logprobs"}
CHAT_ONLY = {"messages", "top_logprobs"}
CHAT_TOOLS = {"tools", "tool_choice"}  # taken by chat requests (checked in chat_job), refused by completions


@dataclass
class Job:
    chat: bool
    prompt: list  # token ids
    max_tokens: int
    sampling: Sampling
    stop: list = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None  # None: none; k: the chosen token's logprob and the k most likely
    max_tokens_given: bool = True  # False: the server's default, which shrinks to what the KV allowance holds
    tools: list | None = None  # the tools offered (chat): the answer is read for calls to them


def error_body(message: str, status: int, param: str | None = None) -> dict:
    kind = "invalid_request_error" if status < 500 else "server_error"
    code = "model_not_found" if status == 404 and param == "model" else \
        {401: "invalid_api_key", 404: "not_found", 503: "overloaded"}.get(status)
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
        # JSON's escapes can spell a lone surrogate ("\\ud800"): no text, the tokenizer's TypeError (a 500)
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError("the request body holds a lone surrogate escape (\\ud800 to \\udfff), which is no text; "
                           "send text as UTF-8.") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(f"the request body is not valid JSON ({e}); send a JSON object.") from None
    except RecursionError:  # json's decoder recurses once per level of nesting
        raise RequestError("the request body is nested too deeply to read; send a flatter JSON object.") from None
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object.")
    return body


def _get(body, name, check, what, default=None):
    value = body.get(name)
    if value is None:
        return default
    if not check(value):
        raise RequestError(f"{name}={json.dumps(value)[:80]}: use {what}.", param=name)
    return value


def _common(body: dict, served: list, generation_config: dict, default_max_tokens: int, chat: bool) -> dict:
    model = body.get("model")
    if model is None:
        raise RequestError(f"model is missing; use one of {served} (GET /v1/models).", param="model")
    if model not in served:  # OpenAI's answer: 404, model_not_found
        raise RequestError(f"model {json.dumps(model)[:80]} is not served here; use one of {served} "
                           "(GET /v1/models).", param="model", status=404)
    known = TAKEN | IGNORED | UNSUPPORTED.keys() | (CHAT_ONLY if chat else {"prompt"})
    unknown = sorted(k for k, v in body.items() if k not in known and v is not None)  # null: left out
    if unknown:
        raise RequestError(f"{unknown[0]} is not a field this server takes (see the README, \"Server\"); leave it "
                           "out.", param=unknown[0])
    if body.get("echo") not in (False, None):  # what lm-eval's API models send for loglikelihood tasks
        raise RequestError("echo is not supported by this server; to score prompts (lm-eval's loglikelihood tasks) "
                           "run python -m airmlx.harness, which reads the model once per batch of requests.",
                           param="echo")
    for name, default in UNSUPPORTED.items():
        if chat and name in CHAT_TOOLS:
            continue
        if body.get(name) not in (default, None, *ALSO_DEFAULT.get(name, ())):
            raise RequestError(f"{name}={json.dumps(body[name])[:80]} is not supported by this server; leave it out.",
                               param=name)
    max_tokens = _get(body, "max_tokens", lambda v: is_int(v) and v >= 1, "a whole number >= 1", default_max_tokens)
    completion = _get(body, "max_completion_tokens", lambda v: is_int(v) and v >= 1, "a whole number >= 1")
    max_tokens = max_tokens if completion is None else completion  # the newer name wins; both are checked
    temperature = _get(body, "temperature", lambda v: is_number(v) and 0 <= v <= 2, "a number from 0 to 2")
    top_p = _get(body, "top_p", lambda v: is_number(v) and 0 <= v <= 1, "a number from 0 to 1")
    top_k = _get(body, "top_k", lambda v: is_int(v) and v >= 0, "a whole number >= 0 (0: off)")
    seed = _get(body, "seed", lambda v: is_int(v) and v >= 0, "a whole number >= 0")
    stop = _get(body, "stop", lambda v: isinstance(v, str) or isinstance(v, list) and len(v) <= MAX_STOPS and all(
        isinstance(s, str) for s in v), f"a string or a list of at most {MAX_STOPS} strings", [])
    stop = [stop] if isinstance(stop, str) else stop
    if "" in stop:
        raise RequestError("stop strings must not be empty; leave stop out to stop only at EOS.", param="stop")
    stream = _get(body, "stream", lambda v: isinstance(v, bool), "true or false", False)
    options = _get(body, "stream_options", lambda v: isinstance(v, dict), 'an object like {"include_usage": true}', {})
    include_usage = _get(options, "include_usage", lambda v: isinstance(v, bool), "true or false", False)
    if body.get("stream_options") is not None and not stream:  # as OpenAI's API answers it
        raise RequestError("stream_options is only allowed when stream is true.", param="stream_options")
    if chat:
        wanted = _get(body, "logprobs", lambda v: isinstance(v, bool), "true or false", False)
        top = _get(body, "top_logprobs", lambda v: is_int(v) and 0 <= v <= MAX_TOP_LOGPROBS,
                   f"a whole number from 0 to {MAX_TOP_LOGPROBS}")
        if top is not None and not wanted:
            raise RequestError("top_logprobs needs logprobs=true.", param="top_logprobs")
        logprobs = (top or 0) if wanted else None
    else:
        logprobs = _get(body, "logprobs", lambda v: is_int(v) and 0 <= v <= MAX_TOP_LOGPROBS,
                        f"a whole number from 0 to {MAX_TOP_LOGPROBS}")
    given = body.get("max_completion_tokens") is not None or body.get("max_tokens") is not None
    return dict(max_tokens=max_tokens, max_tokens_given=given,
                sampling=sampling(generation_config, temperature, top_p, top_k, seed),
                stop=stop, stream=stream, include_usage=include_usage, logprobs=logprobs)


def sampling(generation_config: dict, temperature, top_p, top_k, seed) -> Sampling:
    """temperature 0: greedy; > 0: sample at it; left out: the model's generation_config.json decides (greedy
    when it says nothing), as model.generate does. top_p and top_k left out come from generation_config.json,
    else no cut (OpenAI's API has no top_k). top_p 0 (OpenAI's range starts there) leaves only the most likely
    token: greedy."""
    do_sample = temperature > 0 if temperature is not None else bool(generation_config.get("do_sample", False))
    if top_p == 0:
        do_sample, top_p = False, 1.0
    if temperature is None:
        temperature = generation_config.get("temperature", 1.0) or 1.0
    return Sampling(do_sample=do_sample and temperature > 0, temperature=float(temperature),
                    top_p=float(top_p if top_p is not None else generation_config.get("top_p", 1.0) or 1.0),
                    top_k=int(top_k if top_k is not None else generation_config.get("top_k", 0) or 0), seed=seed)


def chat_job(body: dict, tokenizer, served: list, generation_config: dict, default_max_tokens: int,
             response_template: dict | None = None) -> Job:
    """response_template: how the model writes a tool call (tool_calls.response_template); None: tools refused."""
    options = _common(body, served, generation_config, default_max_tokens, chat=True)
    tools = checked_tools(body.get("tools"), body.get("tool_choice"))
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list of {\"role\": ..., \"content\": ...} objects.",
                           param="messages")
    plain = [_message(m) for m in messages]
    if not getattr(tokenizer, "chat_template", None):
        raise RequestError("this model's tokenizer has no chat template; use /v1/completions with a plain prompt.")
    if tools and response_template is None:
        raise RequestError("tools are not supported for this model: its tokenizer has no response_template saying "
                           "how it writes a tool call; leave tools out.", param="tools")
    try:
        ids = render_chat(tokenizer, plain, tools)
        if tools and ids == render_chat(tokenizer, plain):
            raise RequestError("tools are not supported for this model: its chat template does not show them to "
                               "the model; leave tools out.", param="tools")
    except RequestError:
        raise
    except Exception as e:  # the template's own checks (roles in order, ...) raise what they like
        raise RequestError(f"the chat template refused these messages: {' '.join(str(e).split())}",
                           param="messages") from None
    return Job(True, ids, **options, tools=tools)


def _message(m) -> dict:
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise RequestError("each message must be an object with a string role and a content.", param="messages")
    if m["role"] not in ROLES:
        raise RequestError(f"unknown role {json.dumps(m['role'])[:40]}; use one of {', '.join(ROLES)}.",
                           param="messages")
    content = m.get("content")
    if "content" not in m and not (m["role"] == "assistant" and m.get("tool_calls")):
        raise RequestError(f"each {m['role']} message needs a content.", param="messages")
    if isinstance(content, list):  # content parts: only text ones
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise RequestError("only text content parts ({\"type\": \"text\", \"text\": ...}) are supported.",
                               param="messages")
        content = "".join(p["text"] for p in content)
    elif content is None:
        content = ""
    elif not isinstance(content, str):
        raise RequestError("a message's content must be a string or a list of text parts.", param="messages")
    plain = {"role": ROLES[m["role"]], "content": content}
    if m.get("tool_calls") is not None:
        plain["tool_calls"] = _tool_calls(m["tool_calls"])
    for key in ("tool_call_id", "name"):  # a tool's answer names the call it answers (and the tool)
        if isinstance(m.get(key), str):
            plain[key] = m[key]
    return plain


def _tool_calls(calls) -> list:
    """An assistant message's tool_calls as transformers' chat templates take them: each function's arguments as
    a dict where OpenAI's JSON string decodes to one (else the string)."""
    if not isinstance(calls, list) or not all(
            isinstance(c, dict) and isinstance(c.get("function"), dict) and isinstance(c["function"].get("name"), str)
            for c in calls):
        raise RequestError("tool_calls must be a list of {\"type\": \"function\", \"function\": {\"name\": ..., "
                           "\"arguments\": ...}} objects.", param="messages")
    out = []
    for call in calls:
        arguments = call["function"].get("arguments")
        if isinstance(arguments, str):
            try:
                decoded = json.loads(arguments)
            except (ValueError, RecursionError):  # not JSON, or nested too deeply to decode: kept as the string
                decoded = None
            arguments = decoded if isinstance(decoded, dict) else arguments
        out.append({**call, "type": call.get("type", "function"), "function": {**call["function"], "arguments": arguments}})
    return out


def completion_job(body: dict, tokenizer, served: list, generation_config: dict, default_max_tokens: int) -> Job:
    options = _common(body, served, generation_config, default_max_tokens, chat=False)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str) and prompt:
        ids = tokenizer(prompt, verbose=False)["input_ids"]  # past the context: a 400 says so, not its warning
    elif isinstance(prompt, list) and prompt and all(is_int(t) for t in prompt):
        ids = prompt  # ids outside the vocabulary: Request and Engine.submit refuse them
    else:
        raise RequestError("prompt must be a non-empty string or a list of token ids (one prompt per request).",
                           param="prompt")
    return Job(False, [int(t) for t in ids], **options)


# -- responses ------------------------------------------------------------------------------------------
BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # sentencepiece's piece for one byte


def token_bytes(tokenizer, token: int, before: "tuple | None" = None) -> bytes:
    """The token's own bytes: its text (after `before`, (the token before it, that token's text), as the answer's
    text has it: a sentencepiece word decoded alone loses the space it starts with), or, where that is part of a
    character (it decodes to U+FFFD), the bytes its vocabulary piece stands for (sentencepiece's <0xNN> byte
    fallback, or byte-level BPE's alphabet)."""
    if before is not None:
        both = tokenizer.decode([before[0], token])
        if both.startswith(before[1]) and "\ufffd" not in both:  # else it or the one before is part of a character
            return both[len(before[1]):].encode()
    text = tokenizer.decode([token])
    if "\ufffd" not in text:
        return text.encode()
    piece = tokenizer.convert_ids_to_tokens(token)
    if isinstance(piece, str) and (byte := BYTE_FALLBACK.fullmatch(piece)):
        return bytes([int(byte[1], 16)])
    alphabet = byte_level_alphabet()
    if isinstance(piece, str) and piece and all(c in alphabet for c in piece):
        return bytes(alphabet[c] for c in piece)
    return text.encode()


@functools.cache
def byte_level_alphabet() -> dict:
    """Byte-level BPE's stand-in character for each byte -> the byte. GPT-2's scheme: the printable Latin-1
    bytes stand for themselves, the others for the characters from U+0100 on, in byte order."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in kept]
    return {**{chr(b): b for b in kept}, **{chr(256 + i): b for i, b in enumerate(others)}}


def shown(raw: bytes) -> str:
    """A token as OpenAI's logprobs name it: its text, or `bytes:\\xNN...` where its bytes are not whole
    characters (so tokens holding different parts of a character keep different names)."""
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


class TokenPieces:
    """Where a response's listed tokens stand, carried across a stream's chunks: the token before the next one
    (each is decoded after it, as the text is) and each token's character offset in the text (a token that
    starts inside a character starts where that character does)."""

    def __init__(self, before: "int | None" = None):
        """before: the token the text is decoded after (a completion's prompt's last; a chat's reply stands
        alone)."""
        self.before = before
        self.decoder, self.offset = codecs.getincrementaldecoder("utf-8")("replace"), 0

    def listed(self, tokenizer, entries: list) -> list:
        """[(the token's bytes, [each alternative's bytes])] for (token, logprob, top) entries, in order."""
        out = []
        for t, _, top in entries:
            before = None if self.before is None else (self.before, tokenizer.decode([self.before]))  # once a place
            out.append((token_bytes(tokenizer, t, before), [token_bytes(tokenizer, u, before) for u, _ in top]))
            self.before = t
        return out

    def next(self, raw: bytes) -> int:
        start = self.offset
        self.offset += len(self.decoder.decode(raw))
        return start


def completion_logprobs(tokenizer, entries: list, pieces: TokenPieces) -> dict:
    """Legacy completions' logprobs for (token, logprob, top) entries; pieces: where the text stands. Each
    top_logprobs holds the chosen token too, as OpenAI's legacy API has it (up to logprobs + 1 of them)."""
    raw = pieces.listed(tokenizer, entries)
    return {"tokens": [shown(r) for r, _ in raw], "token_logprobs": [_finite(lp) for _, lp, _ in entries],
            "top_logprobs": [{shown(u): _finite(q) for u, q in zip([*alts, r], [*(q for _, q in top), lp])}
                             for (r, alts), (_, lp, top) in zip(raw, entries)],
            "text_offset": [pieces.next(r) for r, _ in raw]}


def chat_logprobs(tokenizer, entries: list, pieces: "TokenPieces | None" = None) -> dict:
    raw = (pieces or TokenPieces()).listed(tokenizer, entries)

    def one(r, lp):
        return {"token": shown(r), "logprob": _finite(lp), "bytes": list(r)}
    return {"content": [{**one(r, lp), "top_logprobs": [one(u, q) for u, (_, q) in zip(alts, top)]}
                        for (r, alts), (_, lp, top) in zip(raw, entries)]}


def _finite(x: float) -> float:
    return x if math.isfinite(x) else -9999.0  # JSON has no -inf; OpenAI's own floor


def usage(prompt_tokens: int, completion_tokens: int, reused: int = 0) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": reused}}


def response(job: Job, rid: str, model: str, created: int, text: str, finish: str, used: dict, logprobs,
             tool_calls: list | None = None, reasoning: str | None = None) -> dict:
    if job.chat:
        message = {"role": "assistant", "content": text if text or not tool_calls else None}
        if tool_calls:
            message["tool_calls"] = tool_calls
        if reasoning:
            message["reasoning_content"] = reasoning  # as vLLM and DeepSeek's API name it
        choice = {"index": 0, "message": message, "finish_reason": finished(finish, tool_calls),
                  "logprobs": logprobs}
        return {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": [choice],
                "usage": used}
    choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": logprobs}
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice],
            "usage": used}


def chunk(job: Job, rid: str, model: str, created: int, text: str | None, finish: str | None = None,
          logprobs=None, role: bool = False, delta: dict | None = None) -> dict:
    """delta: a chat chunk's delta other than text (a tool call, reasoning)."""
    if job.chat:
        if delta is None:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text is not None else {})
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": logprobs}
        kind = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": logprobs}
        kind = "text_completion"
    out = {"id": rid, "object": kind, "created": created, "model": model, "choices": [choice]}
    if job.include_usage:
        out["usage"] = None
    return out


def finished(reason: str, tool_calls) -> str:
    """OpenAI's finish_reason: "tool_calls" where an answer that ended by itself called a tool."""
    return "tool_calls" if tool_calls and reason == "stop" else reason


def tool_call_delta(call: dict, index: int) -> dict:
    return {"tool_calls": [{"index": index, **call}]}


def usage_chunk(job: Job, rid: str, model: str, created: int, used: dict) -> dict:
    return {"id": rid, "object": "chat.completion.chunk" if job.chat else "text_completion", "created": created,
            "model": model, "choices": [], "usage": used}
