"""`python -m airmlx.server`: an OpenAI-compatible HTTP server in which every waiting request shares each
read of the weights.

    python -m airmlx.server [--model PATH_OR_HUB_ID] [--host 127.0.0.1] [--port 8080] [--memory-budget 4GB]
        [--max-batch 32] [--max-queue 64] [--max-kv-bytes 2GB] [--api-key KEY] [--draft-model D] [...model options]

Endpoints: GET /v1/models, POST /v1/chat/completions, POST /v1/completions, GET /health. The engine behind
them is airmlx/engine.py (with --draft-model, a request alone in it decodes speculatively; requests
together share sweeps); request bodies and response objects are airmlx/openai_api.py. Needs the server
extra: pip install 'airmlx[server]'.
"""
import asyncio
import hmac
import json
import logging
import signal
import socket
import sys
import threading
import time
import uuid

from . import openai_api as api
from . import tool_calls
from .cli import ArgumentParser, add_model_options, face, load_model, whole_number
from .engine import Delta, Engine, Failed, Finished, Request, RequestError
from .errors import AirmlxError
from .pipeline_model import PipelineModel
from .units import format_bytes, parse_bytes

log = logging.getLogger("airmlx.server")
DISCONNECT_POLL_S = 1.0  # how often a non-streaming request checks that its client is still there


def build_app(engine: Engine, served: list, api_key: str | None = None, default_max_tokens: int = 512):
    """The Starlette app serving `engine` under the model names `served` (the first is the one listed)."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    model = engine.model
    gen_config = model.generation_config
    started = int(time.time())
    calls_template = tool_calls.usable_template(engine.tokenizer, model.config.get("model_type"))

    def error(message, status, param=None, headers=None):
        return JSONResponse(api.error_body(message, status, param), status_code=status, headers=headers)

    def authorised(request) -> bool:
        if api_key is None:
            return True
        scheme, _, given = request.headers.get("authorization", "").strip().partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), api_key.encode())

    async def health(request):
        stats = engine.stats()
        return JSONResponse({"status": "stopping" if engine.stopping else "ok", **stats},
                            status_code=503 if engine.stopping else 200)

    async def models(request):
        if not authorised(request):
            return error("a valid API key is needed: send the header 'Authorization: Bearer <key>'.", 401)
        return JSONResponse({"object": "list", "data": [model_object(name) for name in served[:1]]})

    async def one_model(request):  # the client's models.retrieve(name)
        if not authorised(request):
            return error("a valid API key is needed: send the header 'Authorization: Bearer <key>'.", 401)
        name = request.path_params["name"]
        if name not in served:
            return error(f"model {json.dumps(name)[:80]} is not served here; use one of {served[:1]} (GET /v1/models).",
                         404, "model")
        return JSONResponse(model_object(name))

    def model_object(name):
        return {"id": name, "object": "model", "created": started, "owned_by": "airmlx"}

    def make_job(chat, body):
        with engine.tokenizer_lock:
            if chat:
                job = api.chat_job(body, engine.tokenizer, served, gen_config, default_max_tokens, calls_template)
            else:
                job = api.completion_job(body, engine.tokenizer, served, gen_config, default_max_tokens)
        try:
            job.max_tokens = engine.check(len(job.prompt), job.max_tokens, "messages" if chat else "prompt",
                                          fit=not job.max_tokens_given)
        except RequestError as e:
            if e.param == "max_tokens" and body.get("max_completion_tokens") is not None:
                e.param = "max_completion_tokens"  # the name the client sent
            raise
        reader = None
        if job.tools:
            reader = tool_calls.ToolCallReader(engine.tokenizer, calls_template, job.prompt, job.tools,
                                               engine.stop_tokens, job.stop, engine.tokenizer_lock)
        return job, reader

    async def complete(request, chat):
        if not authorised(request):
            return error("a valid API key is needed: send the header 'Authorization: Bearer <key>'.", 401)
        try:
            body = api.parse_json(await request.body())
            job, reader = await run_in_threadpool(make_job, chat, body)
            events = asyncio.Queue()
            req = Request(job.prompt, job.max_tokens, job.sampling, deliver(asyncio.get_running_loop(), events),
                          stop=job.stop, logprobs=job.logprobs, continues=not job.chat)
            await run_in_threadpool(engine.submit, req)  # off the loop: it takes the tokenizer's lock
        except RequestError as e:
            headers = {"Retry-After": str(e.retry_after)} if e.retry_after else None
            return error(str(e), e.status, e.param, headers)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        meta = (job, rid, served[0], int(time.time()))
        if job.stream:
            return StreamingResponse(stream(req, events, meta, reader), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            return await collect(request, req, events, meta, reader)
        except BaseException:  # whatever stops the answer being collected: the request leaves the batch
            req.cancel()
            raise

    def listed(job, entries):
        """The (token, logprob, top) entries a response lists: a chat message's content tokens leave out the stop
        token that ended it, as its content does (a completion's text_offset-aligned list keeps it)."""
        return [e for e in entries if e[0] not in engine.stop_tokens] if job.chat else entries

    def pieces(job):
        """Where the listed tokens stand: a completion's text goes on from its prompt, a chat's reply stands alone."""
        return api.TokenPieces(None if job.chat else job.prompt[-1])

    def decoded_logprobs(job, entries, at):
        with engine.tokenizer_lock:
            return api.chat_logprobs(engine.tokenizer, entries, at) if job.chat else \
                api.completion_logprobs(engine.tokenizer, entries, at)

    async def logprobs_of(job, entries, at):
        """Off the loop: the tokenizer's lock may be held a while (a long prompt's chat template), and every
        stream and /health would wait meanwhile."""
        return None if job.logprobs is None else await run_in_threadpool(decoded_logprobs, job, entries, at)

    async def collect(request, req, events, meta, reader):
        job = meta[0]
        text, entries = [], []
        checked = time.monotonic()
        while True:
            try:
                event = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                event = None
            if time.monotonic() - checked >= DISCONNECT_POLL_S:  # also while tokens keep coming
                checked = time.monotonic()
                if await request.is_disconnected():
                    req.cancel()
                    return error("the client went away.", 499)
            if isinstance(event, Delta):
                text.append(event.text)
                entries += listed(job, event.logprobs)
                if reader:  # off the loop: it decodes the answer so far
                    await run_in_threadpool(reader.add, event.tokens)
            elif isinstance(event, Failed):
                return error(event.message, event.status)
            elif isinstance(event, Finished):
                used = api.usage(event.prompt_tokens, event.completion_tokens, event.reused_tokens)
                parts = {}
                if reader:
                    await run_in_threadpool(reader.finish)
                    content, reasoning, calls = reader.result()
                    text, parts = [content], dict(tool_calls=calls, reasoning=reasoning)
                return JSONResponse(api.response(*meta, "".join(text), event.reason, used,
                                                 await logprobs_of(job, entries, pieces(job)), **parts))

    async def stream(req, events, meta, reader):
        job = meta[0]
        at = pieces(job)  # where each token starts, text held back for a stop string included
        calls = []  # the tool calls sent so far

        def read_calls(items, logprobs):
            """Chunks for what the reader gave; the delta's logprobs go with the first (or an empty one)."""
            if not items and logprobs is not None:
                items = [("content", "")]
            for kind, value in items:
                if kind == "tool_call":
                    delta = api.tool_call_delta(value, len(calls))
                    calls.append(value)
                else:
                    delta = {"content" if kind == "content" else "reasoning_content": value}
                yield sse(api.chunk(*meta, None, logprobs=logprobs, delta=delta))
                logprobs = None
        try:
            if job.chat:
                yield sse(api.chunk(*meta, None, role=True))
            while True:
                event = await events.get()
                if isinstance(event, Delta):
                    entries = listed(job, event.logprobs)
                    if reader:  # off the loop: it decodes the answer so far
                        items = await run_in_threadpool(reader.add, event.tokens)
                        for piece in read_calls(items, await logprobs_of(job, entries, at)):
                            yield piece
                        continue
                    if not event.text and not entries:
                        continue
                    yield sse(api.chunk(*meta, event.text, logprobs=await logprobs_of(job, entries, at)))
                elif isinstance(event, Failed):
                    yield sse(api.error_body(event.message, event.status))
                    break
                elif isinstance(event, Finished):
                    if reader:
                        for piece in read_calls(await run_in_threadpool(reader.finish), None):
                            yield piece
                    yield sse(api.chunk(*meta, None if job.chat else "", finish=api.finished(event.reason, calls)))
                    if job.include_usage:
                        used = api.usage(event.prompt_tokens, event.completion_tokens, event.reused_tokens)
                        yield sse(api.usage_chunk(*meta, used))
                    break
            yield "data: [DONE]\n\n"
        finally:  # also when the client goes away mid-stream: the request leaves the batch
            req.cancel()

    async def chat_completions(request):
        return await complete(request, chat=True)

    async def completions(request):
        return await complete(request, chat=False)

    async def http_error(request, exc):
        return error(f"{request.method} {request.url.path}: {exc.detail}", exc.status_code)

    routes = [Route("/health", health), Route("/v1/models", models), Route("/v1/models/{name:path}", one_model),
              Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/completions", completions, methods=["POST"])]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error})


def deliver(loop, events):
    """An emit callback for the engine's thread: the event goes to this request's queue on the server's loop
    (dropped once that loop is closed: the server has gone)."""
    def emit(event):
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:
            pass
    return emit


def sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def make_server(app, engine: Engine, host: str, port: int, log_level: str = "info"):
    """A uvicorn server whose SIGINT / SIGTERM first fail every open request (each stream ends with an error
    chunk), so the graceful shutdown that follows has nothing to wait for."""
    import uvicorn

    class Server(uvicorn.Server):
        exit_signal = None  # the first signal that stopped it

        def handle_exit(self, sig, frame):
            self.exit_signal = self.exit_signal or sig
            # not here: engine.stop() takes the engine's lock, which this (signal-handling) thread may hold
            threading.Thread(target=engine.stop, name="airmlx-stop", daemon=True).start()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=10,
                            access_log=log_level == "debug")
    return Server(config)


def _terminated(sig, frame):
    raise SystemExit(128 + sig)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m airmlx.server",
                            description="An OpenAI-compatible server: every waiting request shares each read "
                                        "of the streamed weights.")
    add_model_options(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=whole_number(0), default=8080)
    parser.add_argument("--served-model-name", default=None,
                        help="the model name clients send and /v1/models lists (default: --model, or 'airmlx-demo')")
    parser.add_argument("--max-batch", type=int, default=32, help="most requests decoding at once (default 32)")
    parser.add_argument("--max-queue", type=int, default=64,
                        help="most requests waiting for a place; beyond it: 503 with Retry-After (default 64)")
    parser.add_argument("--max-kv-bytes", default=None,
                        help="KV-cache memory every request and kept cache together may reach, e.g. 2GB (default: "
                             "half the memory free once the model is loaded); each request counts as "
                             "(prompt + max_tokens) tokens of keys and values")
    parser.add_argument("--max-tokens", type=int, default=512,
                        help="new tokens for a request that does not say (default 512; capped by the context)")
    parser.add_argument("--keep-caches", type=int, default=4,
                        help="finished conversations whose KV caches are kept, so a request that starts with one "
                             "computes only what is new (default 4; they count against --max-kv-bytes)")
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on /v1/ requests (401 otherwise)")
    parser.add_argument("--micro-batches", type=int, default=None,
                        help="launched on several ranks: split the active requests into this many micro-batches "
                             "whose sweeps overlap across the ranks (default: one per rank when every rank holds "
                             "its range resident, else 1)")
    parser.add_argument("--log-prompts", action="store_true",
                        help="log each request's prompt (never logged otherwise)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


def check_server_args(args) -> None:
    if args.port > 65535:
        raise AirmlxError(f"--port {args.port}: use a port from 0 to 65535 (0: any free one).")
    for name in ("max_batch", "max_queue", "max_tokens"):
        if getattr(args, name) < 1:
            raise AirmlxError(f"--{name.replace('_', '-')} {getattr(args, name)}: use a whole number >= 1.")
    if args.micro_batches is not None and args.micro_batches < 1:
        raise AirmlxError(f"--micro-batches {args.micro_batches}: use a whole number >= 1.")
    if args.keep_caches < 0:
        raise AirmlxError(f"--keep-caches {args.keep_caches}: use a whole number >= 0.")
    if args.max_kv_bytes is not None:
        parse_bytes(args.max_kv_bytes, "--max-kv-bytes")


def listen_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound before the model loads: an address in use or unknown is a one-line error at
    once, not uvicorn's log after minutes of loading."""
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
    except (OSError, OverflowError) as e:
        raise AirmlxError(f"cannot listen on {host}:{port} ({getattr(e, 'strerror', None) or e}); choose another "
                          "--host or --port.") from None
    sock.set_inheritable(True)
    return sock


@face
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    check_server_args(args)
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise AirmlxError("the server needs starlette and uvicorn: pip install 'airmlx[server]'.") from None
    sock = listen_socket(args.host, args.port)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s: %(message)s")
    # uvicorn shuts down on SIGTERM, then raises it again: end with exit status 143 after cleaning up, as
    # Ctrl-C ends with 130, rather than being killed on the spot
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminated)
    with sock, load_model(args) as model:
        kv = parse_bytes(args.max_kv_bytes) if args.max_kv_bytes is not None else None
        if args.micro_batches not in (None, 1) and not isinstance(model, PipelineModel):
            raise AirmlxError(f"--micro-batches {args.micro_batches}: requests split into micro-batches only on a "
                              "pipeline over several hosts (mlx.launch, torchrun); leave it out here.")
        engine = Engine(model, max_batch=args.max_batch, max_queue=args.max_queue, kv_allowance=kv,
                        keep_caches=args.keep_caches, log_prompts=args.log_prompts,
                        micro_batches=args.micro_batches)
        name = args.served_model_name or args.model or "airmlx-demo"
        app = build_app(engine, [name], api_key=args.api_key, default_max_tokens=args.max_tokens)
        log.info("serving %s on http://%s:%d/v1 | KV allowance %s | %s", name, args.host, args.port,
                 format_bytes(engine.kv_allowance), model.plan)
        server = make_server(app, engine, args.host, args.port, args.log_level)
        try:
            server.run(sockets=[sock])
        finally:
            engine.stop()
            engine.join(60)
    # uvicorn raises the signal again once shut down, which ends here as 130 or 143; but a server started with
    # SIGINT ignored (a shell's background job) gets it back ignored, and would end with 0
    return 128 + server.exit_signal if server.exit_signal else 0


if __name__ == "__main__":
    sys.exit(main())
