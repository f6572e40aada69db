"""Both ends of the wire: the coordinator's ROUTER socket that every worker connects to (:class:`Router`),
and each worker's DEALER socket (:class:`Dealer`).  Both bound every frame, busy-wait the same way
(:func:`spin`) and hand over frames with their prelude parsed (``protocol.parse``).

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

A worker's :class:`Dealer` never outlives its coordinator: waiting, it raises :class:`Hangup` when a local
worker's parent pid changes (and removes the private ipc directory that a killed coordinator leaves behind)
or a remote worker's connection drops (ZeroMQ socket monitor, with heartbeats on tcp).  Over tcp it speaks
CurveZMQ (``curve``): a refused key or a coordinator with another key is a Hangup with one line saying which.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import weakref
from pathlib import Path
from typing import NamedTuple

import zmq
from zmq.utils.monitor import recv_monitor_message

from . import curve
from . import protocol as P
from .curve import CurveServer
from .errors import UsageError

log = logging.getLogger(__name__)

RCVHWM = 8  # frames a connection may have waiting: a worker has at most one answer in flight
HEARTBEAT_IVL_MS = 2000  # tcp: drop the connection of a host that vanished without closing it
HEARTBEAT_TIMEOUT_MS = 10000
REMEMBERED_STRANGERS = 1024  # peers whose dropped frames were logged (then forgotten, so memory stays flat)
POLL_MS = 250  # how often an idle worker checks that its coordinator is still there
HANDSHAKE_FAILED = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "the coordinator at {endpoint} refused this worker's CurveZMQ key {key} (copy "
                                     "this host's shardllama.key into the coordinator's authorized_workers)",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "the CurveZMQ handshake with {endpoint} failed: is the coordinator's "
                                          "public key the one this worker pins (--server-key)?",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "{endpoint} and this worker disagree on security: one end uses CurveZMQ, "
                                         "the other --insecure",
}


def spin(sock: zmq.Socket, seconds: float) -> bool:
    """Busy-wait up to ``seconds`` for a frame on ``sock``; True when one is there.  Waking a sleeping process
    costs ~50-100 us on a VM, per message; spinning pays where every process has a core of its own."""
    end = time.perf_counter() + seconds
    while not sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
        if time.perf_counter() > end:
            return False
    return True


def _bound(sock: zmq.Socket, endpoint: str, max_frame: int) -> None:
    """The options both ends set: frames of at most ``max_frame`` bytes; over tcp, heartbeats that drop the
    connection of a host that vanished without closing it."""
    sock.setsockopt(zmq.MAXMSGSIZE, max_frame)
    if endpoint.startswith("tcp://"):
        sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)


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
        _bound(s, endpoint, max_frame)
        s.setsockopt(zmq.RCVHWM, RCVHWM)
        if endpoint == "ipc":
            self._held["ipc_dir"] = ipc_dir or tempfile.mkdtemp(prefix="shardllama-")  # 0700: only this user gets in
            endpoint = f"ipc://{self._held['ipc_dir']}/workers"
        elif endpoint.startswith("tcp://"):
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
        return spin(self.sock, seconds)

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


class Hangup(Exception):
    """The coordinator is gone or refused this worker (exit code 0), or never answered (1)."""

    def __init__(self, why: str, code: int = 0):
        super().__init__(why)
        self.code = code


class Dealer:
    """A worker's end: one DEALER socket to the coordinator at ``endpoint`` (ipc:// or tcp://, CurveZMQ with
    ``keys`` and the pinned ``server_key`` unless both are None); ``parent_pid`` for a local worker, which
    watches its parent instead of its connection.  Paired with :meth:`close`."""

    def __init__(self, endpoint: str, *, keys: curve.Keypair | None = None, server_key: bytes | None = None,
                 parent_pid: int | None = None):
        self.endpoint = endpoint
        self.parent_pid = parent_pid
        self.spin_s = 0.0  # busy-wait this long before sleeping on a receive (the coordinator's CONFIG says)
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 1000)
        _bound(self.sock, endpoint, P.MAX_FRAME)
        if endpoint.startswith("ipc://"):  # started before its coordinator listens (``launch``): retry soon
            self.sock.setsockopt(zmq.RECONNECT_IVL, 10)
        self.public_key = keys[0].decode() if keys is not None else None
        if keys is not None:
            curve.client(self.sock, keys, server_key)
        events = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
        for event in HANDSHAKE_FAILED:
            events |= event
        self.monitor = self.sock.get_monitor_socket(events)
        self.poller = zmq.Poller()
        self.poller.register(self.sock, zmq.POLLIN)
        self.poller.register(self.monitor, zmq.POLLIN)
        self.connected = False

    def connect(self) -> None:
        self.sock.connect(self.endpoint)

    def send(self, buf, copy: bool = True) -> None:
        self.sock.send(buf, copy=copy)

    def recv(self, timeout: float | None = None) -> memoryview:
        """The next frame (a view of it), after spinning ``spin_s`` and then sleeping up to ``timeout`` seconds
        (None: for ever); Hangup if the coordinator is gone or nothing came."""
        if not (self.spin_s and spin(self.sock, self.spin_s)) and not self._wait(timeout):
            raise Hangup(f"no answer from the coordinator at {self.endpoint} within {timeout:.0f} s", code=1)
        return self.sock.recv(copy=False).buffer

    def _wait(self, timeout: float | None) -> bool:
        """Block until a frame arrives (True) or ``timeout`` seconds pass (False); Hangup when the coordinator
        is gone."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            events = dict(self.poller.poll(POLL_MS))
            if self.monitor in events:
                event = recv_monitor_message(self.monitor)["event"]
                if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    self.connected = True
                elif event in HANDSHAKE_FAILED:
                    raise Hangup(HANDSHAKE_FAILED[event].format(endpoint=self.endpoint, key=self.public_key), code=1)
                elif event == zmq.EVENT_DISCONNECTED and self.connected and self.parent_pid is None:
                    # (a local worker watches its parent instead: that also tells it to clean up)
                    raise Hangup("lost the connection to the coordinator")
            if self.sock in events:
                return True
            if self.parent_pid is not None and os.getppid() != self.parent_pid:
                self._remove_socket_file()
                raise Hangup("the coordinator process is gone")
            if deadline is not None and time.monotonic() > deadline:
                return False

    def _remove_socket_file(self) -> None:
        """A coordinator that was killed could not remove its private ipc directory; its workers do."""
        if not self.endpoint.startswith("ipc://"):
            return
        path = Path(self.endpoint.removeprefix("ipc://"))
        if path.parent.name.startswith("shardllama-"):
            for p, remove in ((path, os.unlink), (path.parent, os.rmdir)):
                try:
                    remove(p)
                except OSError:
                    pass  # another worker got there first

    def close(self) -> None:
        self.sock.disable_monitor()
        self.monitor.close(linger=0)
        self.sock.close()
        self.ctx.term()
