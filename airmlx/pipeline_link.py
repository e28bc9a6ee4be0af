"""Messages between pipeline ranks, over a framework transport (backends/mlx_transport.py,
backends/torch_transport.py), with timeouts on every receive.

Every message goes forward around the ring, rank r to rank r + 1 (the last rank to rank 0): a fixed header
(int64: magic, kind, payload bytes, arrays, hops, origin), a payload (a dict of plain values and numpy arrays,
packed as JSON plus raw bytes, never pickle) and arrays (hidden states in the framework's own type, or numpy).

Nothing may wait forever:
- a rank that dies closes its sockets, so its neighbours' receives fail at once;
- every receive also has a deadline. Ranks that wait are kept informed: a rank that works pings the next rank
  between stages, a rank that waits passes the pings on (so every rank downstream hears them), and rank 0 pings
  while it is idle (a chat waiting for its user). A receive that hears nothing for `timeout` seconds fails.
  torch's receives time out themselves; MLX's recv cannot, so a watchdog thread ends the process (after
  printing the error and telling the next rank) when a receive passes its deadline by WATCHDOG_GRACE.
- a rank that fails tells the next rank (ABORT, naming the rank at fault); the ABORT travels around the ring
  and every rank ends with the same error.
"""
import contextlib
import json
import numbers
import os
import signal
import struct
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from .pipeline import PipelineError

MAGIC = 0x41494D4C58  # "AIMLX"
STEP, RESULT, PING, STOP, ABORT, STATS = 1, 2, 3, 4, 5, 6
KINDS = {STEP: "step", RESULT: "result", PING: "ping", STOP: "stop", ABORT: "abort", STATS: "stats"}
HEADER = 6
DEFAULT_TIMEOUT = 120.0  # seconds a receive waits for any sign of life from the rank before it
STARTUP_TIMEOUT = 600.0  # seconds ranks wait for each other at startup (a rank may be sharding the model)
ABORT_FLUSH = 2.0  # seconds an abort may wait to be taken before the process goes on to exit
WATCHDOG_GRACE = 5.0  # past a receive's deadline: the process ends when the transport could not raise


def pack(obj) -> bytes:
    """A dict of JSON values and numpy arrays -> bytes (JSON head, then the arrays' raw bytes)."""
    arrays = []

    def encode(v):
        if isinstance(v, np.ndarray):
            arrays.append(np.ascontiguousarray(v))
            return {"@": len(arrays) - 1, "dtype": v.dtype.str, "shape": list(v.shape)}
        if isinstance(v, np.generic):
            return v.item()
        if isinstance(v, dict):
            return {str(k): encode(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [encode(x) for x in v]
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        raise TypeError(f"cannot send a {type(v).__name__} between pipeline ranks")

    head = json.dumps(encode(obj)).encode()
    return struct.pack("<Q", len(head)) + head + b"".join(a.tobytes() for a in arrays)


def unpack(blob: bytes):
    (n,) = struct.unpack_from("<Q", blob)
    head = json.loads(blob[8:8 + n])
    offsets, pos = {}, 8 + n

    def decode(v):
        nonlocal pos
        if isinstance(v, dict) and "@" in v:
            dtype = np.dtype(v["dtype"])
            count = int(np.prod(v["shape"], dtype=np.int64))
            if v["@"] not in offsets:
                offsets[v["@"]] = pos
                pos += count * dtype.itemsize
            start = offsets[v["@"]]
            return np.frombuffer(blob, dtype, count, start).reshape(v["shape"]).copy()
        if isinstance(v, dict):
            return {k: decode(x) for k, x in v.items()}
        if isinstance(v, list):
            return [decode(x) for x in v]
        return v

    return decode(head)


@dataclass
class Message:
    kind: int
    payload: dict = field(default_factory=dict)
    arrays: list = field(default_factory=list)
    hops: int = 0
    origin: int = 0


class Watchdog:
    """Ends the process when a receive passes its deadline (MLX's recv has no timeout of its own)."""

    def __init__(self, expire):
        self.expire = expire  # expire(message) prints, tells the next rank and ends the process
        self.deadline, self.message = None, ""
        self.cond = threading.Condition()
        threading.Thread(target=self._run, name="airmlx-watchdog", daemon=True).start()

    def arm(self, seconds, message):
        with self.cond:
            self.deadline, self.message = time.monotonic() + seconds, message
            self.cond.notify()

    def disarm(self):
        with self.cond:
            self.deadline = None

    def _run(self):
        with self.cond:
            while True:
                if self.deadline is None:
                    self.cond.wait()
                elif time.monotonic() >= self.deadline:
                    self.expire(self.message)
                    return
                else:
                    self.cond.wait(self.deadline - time.monotonic())


@contextlib.contextmanager
def deferred_interrupt():
    """Ctrl-C while a message is half sent or half received would leave the ranks out of step: hold it until
    the exchange is over (main thread only; elsewhere nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda *_: caught.append(1))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            raise KeyboardInterrupt


class Link:
    """This rank's messages: sent to the next rank, received from the previous one."""

    def __init__(self, transport, timeout: float = DEFAULT_TIMEOUT):
        # finite: the watchdog's wait and gloo's timedelta overflow on inf, and a pipeline must not hang
        if not isinstance(timeout, numbers.Real) or isinstance(timeout, bool) or \
                not 0 < timeout < threading.TIMEOUT_MAX / 2:
            raise PipelineError(f"pipeline timeout {timeout!r}: use a finite number of seconds > 0.")
        self.transport, self.timeout = transport, float(timeout)
        self.rank, self.size = transport.rank, transport.size
        self.next, self.prev = (self.rank + 1) % self.size, (self.rank - 1) % self.size
        self.ping_every = max(self.timeout / 4, 0.2)
        self.lock = threading.RLock()  # one message at a time on the way out
        self.last_sent = time.monotonic()
        self.watchdog = Watchdog(self._expire)

    # -- sending -----------------------------------------------------------------------------------
    def send(self, kind: int, payload: "dict | None" = None, arrays=(), hops: int = 0, origin: "int | None" = None,
             wait: bool = True) -> None:
        """One message to the next rank. wait=False: small messages that must never block (pings, aborts)."""
        described = [([*a.shape], a.dtype.str, True) if isinstance(a, np.ndarray) else self.transport.describe(a)
                     for a in arrays]
        blob = pack({**(payload or {}), "_arrays": described}) if (payload or described) else b""
        header = np.array([MAGIC, kind, len(blob), len(arrays), hops, self.rank if origin is None else origin],
                          dtype=np.int64)
        with self.lock:
            try:
                self.transport.send(header, self.next, wait)
                if blob:
                    self.transport.send(np.frombuffer(blob, dtype=np.uint8), self.next, wait)
                for a in arrays:
                    self.transport.send(a, self.next, wait)
            except Exception as e:  # the transport's own errors: a closed connection, a timeout
                raise PipelineError(f"rank {self.rank}: sending a {KINDS[kind]} message to rank {self.next} failed "
                                    f"({one_line(e)}); rank {self.next} ended or the network dropped: see its "
                                    "output, then launch again.") from None
            self.last_sent = time.monotonic()

    def keepalive(self) -> None:
        """Between stages (and while rank 0 is idle): ping the next rank if it has heard nothing for a while."""
        if time.monotonic() - self.last_sent >= self.ping_every:
            with contextlib.suppress(PipelineError):
                self.send(PING, hops=1, wait=False)

    def abort(self, error: str, culprit: int) -> None:
        """Tell the ranks downstream that the pipeline is over, best effort."""
        if self.next != culprit:
            with contextlib.suppress(Exception):
                self.send(ABORT, {"error": error, "culprit": culprit}, wait=False)
                self.transport.flush(ABORT_FLUSH)  # this process may be about to exit

    # -- receiving ---------------------------------------------------------------------------------
    def recv(self, what: str, timeout: "float | None" = None) -> Message:
        """The next message that is not a ping. An ABORT, a timeout or a lost link raises PipelineError (and
        tells the next rank)."""
        while True:
            header = self._recv((HEADER,), "<i8", True, what, timeout)
            if int(header[0]) != MAGIC:
                self._fail(f"rank {self.rank}: a garbled message came from rank {self.prev} while waiting for {what}; "
                           "the ranks are out of step: launch them again.", self.prev)
            kind, nbytes, narrays, hops, origin = (int(v) for v in header[1:])
            payload = unpack(self._recv((nbytes,), "|u1", True, what, timeout).tobytes()) if nbytes else {}
            arrays = [self._recv(tuple(shape), dtype, is_numpy, what, timeout)
                      for shape, dtype, is_numpy in payload.pop("_arrays", [])]
            if len(arrays) != narrays:
                self._fail(f"rank {self.rank}: a garbled message came from rank {self.prev} while waiting for {what}; "
                           "the ranks are out of step: launch them again.", self.prev)
            if kind == PING:
                if hops < self.size - 1:
                    with contextlib.suppress(PipelineError):
                        self.send(PING, hops=hops + 1, origin=origin, wait=False)
                continue
            if kind == ABORT:
                if self.next != origin:
                    self.abort(payload["error"], payload.get("culprit", origin))
                raise PipelineError(payload["error"])
            return Message(kind, payload, arrays, hops, origin)

    def _recv(self, shape, dtype, is_numpy, what, timeout):
        seconds = self.timeout if timeout is None else timeout
        silent = (f"rank {self.rank}: no message from rank {self.prev} for {seconds:g} s while waiting for {what}; "
                  f"rank {self.prev} hung or the network dropped: see its output, then launch again "
                  "(--pipeline-timeout sets the wait).")
        self.watchdog.arm(seconds + (WATCHDOG_GRACE if self.transport.times_out else 0), silent)
        try:
            return self.transport.recv(shape, dtype, self.prev, seconds, is_numpy)
        except Exception as e:  # the transport's own errors: a closed connection, a timeout
            why = one_line(e)
            if "time" in why.lower() and "out" in why.lower():
                error = silent
            else:
                error = (f"rank {self.rank}: lost the link to rank {self.prev} while waiting for {what} ({why}); "
                         f"rank {self.prev} ended or the network dropped: see its output, then launch again.")
            self._fail(error, self.prev)
        finally:
            self.watchdog.disarm()

    def _fail(self, error, culprit):
        self.abort(error, culprit)
        raise PipelineError(error) from None

    def _expire(self, message):
        """The watchdog's end: say what happened, tell the next rank (a stuck receive does not stop a send),
        leave."""
        print(f"airmlx: {message}", file=sys.stderr, flush=True)
        teller = threading.Thread(target=self.abort, args=(message, self.prev), daemon=True)
        teller.start()
        teller.join(2.0)
        os._exit(2)

    def gather(self, row: np.ndarray, what: str) -> np.ndarray:
        """Every rank's row (rank order); at startup, so the deadline is STARTUP_TIMEOUT."""
        self.watchdog.arm(max(self.timeout, STARTUP_TIMEOUT),
                          f"rank {self.rank}: the other ranks did not all arrive within "
                          f"{max(self.timeout, STARTUP_TIMEOUT):.0f} s to agree on {what}; see their output, then "
                          "launch again.")
        try:
            return self.transport.all_gather(np.ascontiguousarray(row, dtype=np.int64))
        except Exception as e:
            raise PipelineError(f"rank {self.rank}: the ranks could not agree on {what} ({one_line(e)}); see every "
                                "rank's output, then launch again.") from None
        finally:
            self.watchdog.disarm()

    def close(self) -> None:
        self.watchdog.disarm()
        with contextlib.suppress(Exception):
            self.transport.close()


def one_line(error: BaseException) -> str:
    return " ".join(f"{type(error).__name__}: {error}".split())[:300]
