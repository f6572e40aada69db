"""The coordinator's end of the wire: one ROUTER socket that every worker connects to.

Local workers reach it over ipc, in a fresh 0700 directory only this user can enter.  Remote workers reach
it over tcp, where CurveZMQ (``curve``) authenticates every peer against ``authorized_workers`` and
encrypts the activations -- unless ``insecure``, which a trusted network may choose and which says so
loudly.  Whatever a peer is, it cannot make the coordinator hold much for it: a frame is at most
``max_frame`` bytes (ZMQ_MAXMSGSIZE: a peer that announces a bigger one is disconnected before a byte of
it is stored) and at most ``RCVHWM`` frames per connection wait to be read (beyond that ZeroMQ stops
reading the connection), so a peer costs at most RCVHWM x max_frame, however long the coordinator idles.

:meth:`Router.recv` hands over every frame with its header parsed (``protocol.parse``: length and kind),
or the reason it is not one of ours; the coordinator checks the rest against what it waits for and drops
a peer whose frame does not fit.  :meth:`Router.ignore` logs a stranger's frames once per peer.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
import weakref
from pathlib import Path
from typing import NamedTuple

import zmq

from . import protocol as P
from .curve import CurveServer
from .errors import UsageError

log = logging.getLogger(__name__)

RCVHWM = 8  # frames a connection may have waiting: a worker has at most one answer in flight
HEARTBEAT_IVL_MS = 2000  # tcp: drop the connection of a host that vanished without closing it
HEARTBEAT_TIMEOUT_MS = 10000
REMEMBERED_STRANGERS = 1024  # peers whose dropped frames were logged (then forgotten, so memory stays flat)


class Incoming(NamedTuple):
    ident: bytes  # the peer's routing id
    header: P.Header | None  # None: not a frame of this protocol (``error`` says why)
    buf: memoryview | None
    error: str
    frame: zmq.Frame

    def peer(self) -> str:
        try:
            return self.frame.get("Peer-Address") or "?"
        except zmq.ZMQError:
            return "?"


class Router:
    """Binds ``endpoint`` ("ipc": a private directory, ``ipc_dir`` if given -- one made 0700 for it, which it
    then owns; or tcp://HOST:PORT); paired with :meth:`close`."""

    def __init__(self, endpoint: str, *, max_frame: int, keys_dir: Path | None = None, insecure: bool = False,
                 ipc_dir: str | None = None):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self._held: dict = {}  # what close() releases besides the socket: curve, ipc_dir
        self._finalizer = weakref.finalize(self, _close, self.ctx, self.sock, self._held)
        self._strangers: set[bytes] = set()
        self._poller = zmq.Poller()
        self._poller.register(self.sock, zmq.POLLIN)
        try:
            self._bind(endpoint, max_frame, keys_dir, insecure, ipc_dir)
        except BaseException:
            self.close()
            raise

    def _bind(self, endpoint: str, max_frame: int, keys_dir: Path | None, insecure: bool, ipc_dir: str | None) -> None:
        s = self.sock
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.ROUTER_MANDATORY, 1)  # sending to a vanished worker fails, not drops
        s.setsockopt(zmq.MAXMSGSIZE, max_frame)
        s.setsockopt(zmq.RCVHWM, RCVHWM)
        if endpoint == "ipc":
            self._held["ipc_dir"] = ipc_dir or tempfile.mkdtemp(prefix="shardllama-")  # 0700: only this user gets in
            endpoint = f"ipc://{self._held['ipc_dir']}/workers"
        elif endpoint.startswith("tcp://"):
            s.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
            s.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
            if insecure:
                log.warning("--insecure: %s takes any peer that connects and sends activations unencrypted; anyone "
                            "who reaches that port can read the prompts and choose the generated text. Use it only "
                            "on a network you trust.", endpoint)
            elif keys_dir is None:
                raise UsageError(f"{endpoint}: a tcp endpoint needs CurveZMQ keys (`shardllama keys`) or --insecure")
            else:
                curve = self._held["curve"] = CurveServer(self.ctx, keys_dir)
                curve.apply(s)
                log.info("CurveZMQ on %s: %d authorized worker key(s)", endpoint, curve.n_authorized)
        else:
            raise UsageError(f"endpoint must be 'ipc' or tcp://HOST:PORT, got {endpoint!r}")
        try:
            s.bind(endpoint)
        except zmq.ZMQError as e:
            raise UsageError(f"cannot listen on {endpoint}: {e}") from None

    @property
    def endpoint(self) -> str:
        """Where workers connect (with the port filled in when tcp was given port 0)."""
        return self.sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def send(self, ident: bytes, buf, block: bool = True) -> None:
        """One frame to a peer; zmq.ZMQError (EHOSTUNREACH) if its connection is gone."""
        self.sock.send_multipart([ident, buf], 0 if block else zmq.NOBLOCK, copy=False)

    def wait(self, timeout_ms: int) -> bool:
        """True when a frame is waiting, within ``timeout_ms``."""
        return bool(self._poller.poll(timeout_ms))

    def spin(self, seconds: float) -> bool:
        """Busy-wait up to ``seconds`` for a frame; True when one is there."""
        end = time.perf_counter() + seconds
        while not self.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            if time.perf_counter() > end:
                return False
        return True

    def recv(self) -> Incoming:
        frames = self.sock.recv_multipart(copy=False)
        ident, last = frames[0].bytes, frames[-1]
        if len(frames) != 2:
            return Incoming(ident, None, None, f"a message of {len(frames) - 1} frames", last)
        buf = last.buffer
        try:
            return Incoming(ident, P.parse(buf, P.FROM_WORKER), buf, "", last)
        except P.BadFrame as e:
            return Incoming(ident, None, None, str(e), last)

    def ignore(self, got: Incoming, what: str) -> None:
        """Drop a frame from a peer that is not a worker, logging the first one of each peer."""
        if self.first_from(got.ident):
            log.warning("ignoring a peer at %s that is not a worker: it sent %s", got.peer(), what)

    def first_from(self, ident: bytes) -> bool:
        """Whether this is the first time a stranger ``ident`` is dropped (so worth a log line)."""
        if ident in self._strangers:
            return False
        if len(self._strangers) >= REMEMBERED_STRANGERS:
            self._strangers.clear()
        self._strangers.add(ident)
        return True

    def close(self) -> None:
        self._finalizer()


def _close(ctx: zmq.Context, sock: zmq.Socket, held: dict) -> None:
    sock.close(linger=0)
    if held.get("curve") is not None:
        held.pop("curve").close()  # the ZAP thread's sockets, before the context ends
    ctx.term()
    if held.get("ipc_dir"):
        shutil.rmtree(held.pop("ipc_dir"), ignore_errors=True)
