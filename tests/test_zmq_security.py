"""A --listen coordinator facing the network: CurveZMQ keys, rogue peers, workers on another network.

A real HTTP server (``shardllama serve --listen``) with real remote workers (``shardllama worker``) on a tiny
GGUF, and a rogue ZeroMQ peer written here.  Over Curve (the default) a peer without an authorized key gets
nothing through; with --insecure anyone can connect, so every frame is checked: garbage, malformed
HELLO / READY / answers and oversized frames are dropped with their peer -- the server stays up, serves the
next request, and its memory stays flat.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import requests
import zmq

from shardllama import protocol as P
from shardllama.curve import load_keypair
from shardllama.model import random_weights
from tests.test_cli import run_cli
from tests.test_loading import ARGS, write_gguf

PROMPT = "tok1 tok2 tok3"
HELLO = {"pid": 4242, "rank": None, "host": "rogue"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def frame(kind: int, body: bytes = b"", fields: bytes = b"", **prelude) -> bytes:
    """A head (``prelude``: phase, dtype, step; the kind's raw ``fields``) and whatever ``body`` follows."""
    return bytes(P.Header(kind, **prelude).pack(fields)) + body


class Proc:
    """A subprocess whose stderr a thread collects (so the pipe never fills)."""

    def __init__(self, argv: list[str], env: dict):
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, env=env)
        self.lines: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while not (m := re.search(pattern, self.log)):
            assert self.proc.poll() is None and time.monotonic() < deadline, f"no {pattern!r} in:\n{self.log}"
            time.sleep(0.05)
        return m

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return write_gguf(tmp_path_factory.mktemp("model") / "tiny.gguf", random_weights(ARGS, seed=5))


@pytest.fixture
def env(tmp_path) -> dict:
    """A config directory of our own, with this 'user's' keypair in it."""
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config")}
    assert run_cli("keys", env=env, timeout=60).returncode == 0
    return env


def start_server(model: Path, endpoint: str, env: dict, *extra: str) -> Proc:
    return Proc([sys.executable, "-m", "shardllama", "serve", "--model-path", str(model), "--workers", "2",
                 "--listen", endpoint, "--max-seq-len", "32", "--inference-server-port", "0", "--worker-timeout", "20",
                 *extra], env)


def start_worker(model: Path, endpoint: str, env: dict, *extra: str) -> Proc:
    return Proc([sys.executable, "-m", "shardllama", "worker", "--connect", endpoint, "--model-path", str(model),
                 "--connect-timeout", "120", *extra], env)


def url(server: Proc) -> str:
    port = server.wait_for(r"serving POST http://127\.0\.0\.1:(\d+)/", 180).group(1)
    return f"http://127.0.0.1:{port}/rllama/v1/inference"


def generate(address: str) -> requests.Response:
    return requests.post(address, json={"prompt": PROMPT, "temperature": 0, "max_new_tokens": 6}, timeout=180)


def text(r: requests.Response) -> list[tuple[str, int]]:
    """The generated pieces and their ids (not the statistics: a cache hit changes those)."""
    assert r.status_code == 200, r.text
    lines = [json.loads(line) for line in r.text.splitlines()]
    assert all(len(line) == 1 for line in lines), lines
    return [(piece, fields["id"]) for line in lines for piece, fields in line.items()]


def rss(server: Proc) -> int:
    return psutil.Process(server.proc.pid).memory_info().rss


def dealer(ctx: zmq.Context, endpoint: str, **options) -> zmq.Socket:
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    for name, value in options.items():
        setattr(s, name, value)
    s.connect(endpoint)
    return s


def recv(sock: zmq.Socket, timeout: float) -> bytes | None:
    return sock.recv() if sock.poll(int(timeout * 1000)) else None


def rogue_worker(ctx: zmq.Context, endpoint: str, reply: bytes, answer: bytes | None, seen: list) -> None:
    """Connect, say HELLO, answer CONFIG with the frame ``reply`` and COMPUTE with a RESULT of ``answer``;
    record the kinds received until STOP."""
    s = dealer(ctx, endpoint)
    try:
        s.send(frame(P.Kind.HELLO, json.dumps(HELLO).encode()))
        while (msg := recv(s, 150)) is not None:
            kind = P.parse(msg, P.TO_WORKER).kind
            seen.append(kind)
            if kind == P.Kind.CONFIG:
                s.send(reply)
            elif kind == P.Kind.COMPUTE and answer is not None:
                h = P.parse(msg, P.TO_WORKER)  # answered with the COMPUTE's own layer, B and T (no block tables)
                s.send(frame(P.Kind.RESULT, answer, msg[P.PRELUDE.size : P.PRELUDE.size + 12], phase=h.phase,
                             dtype=h.dtype, step=h.step))
            elif kind == P.Kind.STOP:
                return
    finally:
        s.close()


def test_rogue_peers_on_an_insecure_port_cost_nothing(model, env):
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    ctx = zmq.Context()
    server = start_server(model, endpoint, env, "--insecure")
    workers: list[Proc] = []
    try:
        # Before any worker: garbage, malformed HELLOs and READYs, answers nobody asked for, an oversized frame.
        rogue = dealer(ctx, endpoint)
        junk = [b"x", b"\x00" * 40, frame(99), frame(P.Kind.HELLO, b"not json"), frame(P.Kind.HELLO, b"{}"),
                frame(P.Kind.HELLO, b"[]"), frame(P.Kind.HELLO, b'{"pid": "1", "rank": null, "host": "h"}'),
                frame(P.Kind.HELLO, b"[" * 20000), frame(P.Kind.READY, b'{"nbytes": 1}'),
                frame(P.Kind.RESULT, b"\x01" * 100)]
        for j in junk:
            rogue.send(j)
        rogue.send_multipart([frame(P.Kind.HELLO, json.dumps(HELLO).encode()), b"second frame"])
        assert P.parse(recv(rogue, 60), P.TO_WORKER).kind == P.Kind.STOP  # a malformed HELLO is turned away
        rogue.send(b"\x00" * (100 << 20))  # 100 MB: ZeroMQ drops the connection before storing it
        seen: list = []  # a peer that says HELLO, then that it failed, gives its rank back: it cannot end the wait
        rogue_worker(ctx, endpoint, frame(P.Kind.ERROR, b'{"message": "boom"}'), None, seen)
        assert seen == [P.Kind.CONFIG, P.Kind.STOP]
        workers += [start_worker(model, endpoint, env, "--insecure") for _ in range(2)]
        address = url(server)
        assert "--insecure: " in server.log and "ignoring a peer at 127.0.0.1 that is not a worker" in server.log, server.log
        assert "dropping worker 0 (pid 4242 on rogue): could not build its shard: boom" in server.log, server.log
        want = text(generate(address))

        # Idle and serving alike, a flood of garbage costs at most RCVHWM frames of memory.
        before = rss(server)
        flood = dealer(ctx, endpoint, sndhwm=0)
        for round_ in range(2):
            for _ in range(30):
                flood.send(b"\x07" * (4 << 20))
            bigs = [dealer(ctx, endpoint) for _ in range(2)]
            for big in bigs:
                big.send(b"\x00" * (100 << 20))
            time.sleep(2)
            for big in bigs:
                big.close()
            assert text(generate(address)) == want
            grown = rss(server) - before
            assert grown < 100 << 20, f"the server grew by {grown >> 20} MiB in flood {round_ + 1}"

        # A worker dies while idle: the next request waits for a replacement.  A rogue that answers CONFIG with a
        # malformed READY is dropped before it becomes one; a rogue that becomes one and answers with a
        # malformed RESULT fails that request (503) and is dropped too; the next worker to connect replaces it.
        victim = workers[1].proc
        victim.kill()
        victim.wait()
        seen_ready: list = []
        lots = frame(P.Kind.READY, b'{"nbytes": "lots"}')
        r2 = threading.Thread(target=rogue_worker, args=(ctx, endpoint, lots, None, seen_ready))
        r2.start()
        time.sleep(1)
        answer: dict = {}
        request = threading.Thread(target=lambda: answer.update(r=generate(address)))
        request.start()
        r2.join(150)
        assert seen_ready == [P.Kind.CONFIG, P.Kind.STOP]
        seen_result: list = []
        rogue_worker(ctx, endpoint, frame(P.Kind.READY, b'{"nbytes": 1}'), b"\x00" * 3, seen_result)
        assert seen_result[0] == P.Kind.CONFIG and P.Kind.COMPUTE in seen_result and seen_result[-1] == P.Kind.STOP
        request.join(180)
        assert answer["r"].status_code == 503, answer["r"].text  # one line naming it; no 500, no traceback
        assert re.fullmatch(r"worker \d \(pid 4242 on rogue\) sent a malformed answer \(RESULT of 35 bytes, not \d+\)",
                            answer["r"].json()["error"]), answer["r"].text
        workers.append(start_worker(model, endpoint, env, "--insecure"))
        assert re.search(r"dropping worker \d \(pid 4242 on rogue\): sent a malformed message \(READY whose "
                         r"'nbytes' is of type str", server.log), server.log
        assert re.search(r"dropping worker \d \(pid 4242 on rogue\): sent a malformed answer \(RESULT of 3",
                         server.log), server.log
        assert text(generate(address)) == want
        assert server.proc.poll() is None
    finally:
        code = server.stop()
        for w in workers:
            w.proc.kill()
            w.proc.wait()
        ctx.destroy(linger=0)
    assert code == 0 and "Traceback" not in server.log, server.log


def test_curve_lets_in_only_authorized_workers_that_pin_the_coordinator(model, env, tmp_path):
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    stranger = tmp_path / "stranger"  # another keypair, not authorized
    assert run_cli("keys", "--keys-dir", stranger, env=env, timeout=60).returncode == 0
    mine = load_keypair(Path(env["XDG_CONFIG_HOME"]) / "shardllama")
    theirs = load_keypair(stranger)
    ctx = zmq.Context()
    server = start_server(model, endpoint, env)
    workers: list[Proc] = []
    try:
        plain = dealer(ctx, endpoint)  # no Curve at all
        keyed = dealer(ctx, endpoint, curve_publickey=theirs[0], curve_secretkey=theirs[1], curve_serverkey=mine[0])
        for s in (plain, keyed):
            s.send(frame(P.Kind.HELLO, json.dumps(HELLO).encode()))
        refused = start_worker(model, endpoint, env, "--keys-dir", str(stranger), f"--server-key={mine[0].decode()}")
        wrong_server = start_worker(model, endpoint, env, f"--server-key={theirs[0].decode()}")  # (a key may start with '-')
        assert refused.proc.wait(120) == 1 and "refused this worker's CurveZMQ key" in refused.log, refused.log
        assert wrong_server.proc.wait(120) == 1 and "handshake" in wrong_server.log, wrong_server.log
        workers += [start_worker(model, endpoint, env) for _ in range(2)]
        address = url(server)
        first = text(generate(address))
        assert recv(plain, 1) is None and recv(keyed, 1) is None  # neither got a CONFIG, nor anything else
        assert "refused a connection: its CurveZMQ key " + theirs[0].decode() in server.log, server.log
        assert text(generate(address)) == first
    finally:
        code = server.stop()
        for w in workers:
            assert w.proc.wait(20) == 0, w.log  # told to stop
        ctx.destroy(linger=0)
    assert code == 0 and "Traceback" not in server.log, server.log


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")
    return r


def test_workers_in_another_network_namespace_give_the_local_text(model, env):
    """Two workers in a network namespace of their own, reaching the coordinator over a veth pair (a private
    /30 that exists only during the test), with CurveZMQ keys: the same greedy text as local workers."""
    if shutil.which("ip") is None:
        pytest.skip("iproute2 (`ip`) is not installed; .ci/run installs it")
    if os.geteuid() != 0:
        pytest.skip("making a network namespace needs root")
    tag = os.getpid() % 10000
    ns, host_if, ns_if = f"sltest{tag}", f"slh{tag}", f"sln{tag}"
    net = f"10.213.{tag % 250}"
    host, peer = f"{net}.1", f"{net}.2"
    made = _ip("netns", "add", ns, check=False)
    if made.returncode != 0:
        pytest.skip(f"the kernel refuses network namespaces here: {made.stderr.strip()}")
    procs: list[subprocess.Popen] = []
    try:
        _ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if, "netns", ns)
        _ip("addr", "add", f"{host}/30", "dev", host_if)
        _ip("link", "set", host_if, "up")
        for cmd in (("addr", "add", f"{peer}/30", "dev", ns_if), ("link", "set", ns_if, "up"), ("link", "set", "lo", "up")):
            _ip("netns", "exec", ns, "ip", *cmd)
        common = ["--model-path", model, "--prompt", PROMPT, "--temperature", "0", "--max-new-tokens", "8",
                  "--ignore-eos", "-q", "--workers", "2"]
        local = run_cli(*common, timeout=180, env=env)
        assert local.returncode == 0, local.stderr
        endpoint = f"tcp://{host}:{free_port()}"
        procs.append(subprocess.Popen([sys.executable, "-m", "shardllama", *map(str, common), "--listen", endpoint],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      stdin=subprocess.DEVNULL, env=env))
        for _ in range(2):
            procs.append(subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "shardllama", "worker",
                                           "--connect", endpoint, "--model-path", str(model)],
                                          stdin=subprocess.DEVNULL, env=env))
        for w in procs[1:]:  # really elsewhere: once `ip netns exec` has become python, its network is not ours
            deadline = time.monotonic() + 30
            while not Path(f"/proc/{w.pid}/cmdline").read_bytes().startswith(sys.executable.encode()):
                assert time.monotonic() < deadline
                time.sleep(0.01)
            assert os.readlink(f"/proc/{w.pid}/ns/net") != os.readlink("/proc/self/ns/net")
        out, err = procs[0].communicate(timeout=180)
        assert procs[0].returncode == 0, err
        assert out == local.stdout
        for w in procs[1:]:
            assert w.wait(30) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        _ip("netns", "del", ns, check=False)  # takes the veth pair with it
        _ip("link", "del", host_if, check=False)
    assert ns not in _ip("netns", "list").stdout and _ip("link", "show", host_if, check=False).returncode != 0
