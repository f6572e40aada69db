"""One worker process: its slice of every layer, its own KV cache, and a loop that answers the coordinator.

A local worker (started by the coordinator) maps its shard from shared memory; a remote worker
(``--connect tcp://... --model-path ...``) cuts its own shard from its own copy of the checkpoint, with the
rank, N and dtype that the coordinator's handshake gives it.  Either way the math is ``model.py``'s,
applied to the slices that ``sharding.shard`` cut.

A worker never outlives its coordinator: a local one exits when its parent pid changes (and removes the
private ipc directory that a killed coordinator leaves behind); a remote one exits when its connection to
the coordinator drops (ZeroMQ socket monitor, with heartbeats on tcp).

Over tcp a worker speaks CurveZMQ (``shardllama.curve``): it holds a keypair the coordinator must have
authorized, and pins the coordinator's public key, so it talks to that coordinator only and nobody reads
the activations on the way.  A refused key or a coordinator with another key ends the worker with one line
saying which.  Frames are bounded (ZMQ_MAXMSGSIZE) and checked like the coordinator's (``protocol``).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import time
import traceback
from pathlib import Path

import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from shardllama import allreduce, curve
from shardllama import protocol as P
from shardllama.config import ModelArgs
from shardllama.errors import KeyFileError
from shardllama.kernels import gemm
from shardllama.model import DTYPES, Step
from shardllama.phases import Phases
from shardllama.quant import activation_dtype, source_dtype
from shardllama.sharding import ShardSpec, plan
from shardllama.shm import Segment

from .shard import ShardModel, cut_weights

log = logging.getLogger("shardllama.worker")

POLL_MS = 250  # how often an idle worker checks that its coordinator is still there
HANDSHAKE_FAILED = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "the coordinator at {endpoint} refused this worker's CurveZMQ key {key} (copy "
                                     "this host's shardllama.key into the coordinator's authorized_workers)",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "the CurveZMQ handshake with {endpoint} failed: is the coordinator's "
                                          "public key the one this worker pins (--server-key)?",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "{endpoint} and this worker disagree on security: one end uses CurveZMQ, "
                                         "the other --insecure",
}


class _Exit(Exception):
    """The coordinator is gone or said stop (exit code 0), or never answered (1)."""

    def __init__(self, why: str, code: int = 0):
        super().__init__(why)
        self.code = code


class Worker:
    def __init__(self, endpoint: str, rank: int | None, model_path: str | None, threads: int | None,
                 parent_pid: int | None, connect_timeout: float, keys: curve.Keypair | None = None,
                 server_key: bytes | None = None, phases: Phases | None = None):
        self.endpoint = endpoint
        self.rank = rank
        self.model_path = model_path
        self.threads = threads
        self.parent_pid = parent_pid
        self.connect_timeout = connect_timeout
        self.phases = phases if phases is not None else Phases()  # its own start, sent with READY
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 1000)
        self.sock.setsockopt(zmq.MAXMSGSIZE, P.MAX_FRAME)
        if endpoint.startswith("ipc://"):  # started before its coordinator listens (``launch``): retry soon
            self.sock.setsockopt(zmq.RECONNECT_IVL, 10)
        if endpoint.startswith("tcp://"):  # notice a coordinator host that vanished without closing
            self.sock.setsockopt(zmq.HEARTBEAT_IVL, 2000)
            self.sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 10000)
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
        self.spin_s = 0.0
        self.model: ShardModel | None = None
        self.segment: Segment | None = None
        self.reduce_segment: Segment | None = None
        self.reduce: allreduce.AllReduce | None = None

    def close(self) -> None:
        self.model = self.reduce = None  # drop the views before unmapping
        for seg in (self.segment, self.reduce_segment):
            if seg is not None:
                seg.close()
        self.sock.disable_monitor()
        self.monitor.close(linger=0)
        self.sock.close()
        self.ctx.term()

    # ---- waiting ---------------------------------------------------------------------------------

    def _wait(self, timeout: float | None) -> bool:
        """Block until a message arrives (True) or ``timeout`` seconds pass (False); raise _Exit when the
        coordinator is gone."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            events = dict(self.poller.poll(POLL_MS))
            if self.monitor in events:
                event = recv_monitor_message(self.monitor)["event"]
                if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    self.connected = True
                elif event in HANDSHAKE_FAILED:
                    raise _Exit(HANDSHAKE_FAILED[event].format(endpoint=self.endpoint, key=self.public_key), code=1)
                elif event == zmq.EVENT_DISCONNECTED and self.connected and self.parent_pid is None:
                    # (a local worker watches its parent instead: that also tells it to clean up)
                    raise _Exit("lost the connection to the coordinator")
            if self.sock in events:
                return True
            if self.parent_pid is not None and os.getppid() != self.parent_pid:
                self._remove_socket_file()
                raise _Exit("the coordinator process is gone")
            if deadline is not None and time.monotonic() > deadline:
                return False

    def _recv(self, timeout: float | None = None) -> zmq.Frame:
        if self.spin_s:  # the coordinator found a core for every process: busy-wait a little before sleeping
            end = time.perf_counter() + self.spin_s
            while time.perf_counter() < end:
                if self.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    return self.sock.recv(copy=False)
        if not self._wait(timeout):
            raise _Exit(f"no answer from the coordinator at {self.endpoint} within {timeout:.0f} s", code=1)
        return self.sock.recv(copy=False)

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

    # ---- handshake -------------------------------------------------------------------------------

    def handshake(self) -> None:
        self.sock.connect(self.endpoint)
        self.sock.send(P.control(P.HELLO, {"pid": os.getpid(), "rank": self.rank, "host": socket.gethostname()}))
        # A local worker may be started long before its coordinator has written the shards (``launch``): it
        # waits as long as its parent lives.
        buf = self._recv(None if self.parent_pid is not None else self.connect_timeout).buffer
        try:
            header = P.parse(buf, P.TO_WORKER)
            if header.kind == P.STOP:
                raise _Exit("the coordinator needs no more workers")
            if header.kind != P.CONFIG:
                raise P.BadFrame(f"{header.name()} instead of CONFIG")
            config = P.read_body(buf, header)
        except P.BadFrame as e:
            raise _Exit(f"the coordinator at {self.endpoint} sent a malformed message: {e}", code=1) from None
        try:
            nbytes = self._build(config)
        except Exception as e:
            self.sock.send(P.control(P.ERROR, {"message": f"{type(e).__name__}: {e}"}))
            raise
        self.sock.send(P.control(P.READY, {"nbytes": nbytes, "phases": self.phases.seconds}))

    def _build(self, config: dict) -> int:
        args = ModelArgs(**config["args"])
        dtype = DTYPES[config["dtype"]]
        # As the coordinator resolved it on its CPU; a remote worker's own CPU may still lack bf16 (then: f32).
        prefill = gemm.check(config["prefill_precision"], "the coordinator's prefill_precision")
        self.rank = config["rank"]
        torch.set_num_threads(self.threads or config["threads"])
        if dtype in (torch.float16, torch.bfloat16, torch.int8):
            from shardllama import kernels

            with self.phases("kernel library"):
                kernels.library()  # build (or load) the matvec kernel now, under the connect timeout, not mid-step
        self.spin_s = config.get("spin_us", 0.0) * 1e-6
        spec = plan(args, config["n_workers"])[self.rank]
        if config.get("segment"):
            with self.phases("map shard"):
                self.segment = Segment.attach(config["segment"])
                weights = self.segment.tensors()
        else:
            with self.phases("read its shard"):
                weights = self._load_own(args, spec, dtype)
        with self.phases("KV cache and rope tables"):
            self.model = ShardModel(args, spec, weights, activation_dtype(dtype), config["max_seq_len"],
                                    config["n_slots"], prefill)
        if config.get("reduce"):
            self.reduce_segment = Segment.attach(config["reduce"], writable=True)
            # Later than the coordinator's deadline: it names the worker that fell behind and aborts the pass.
            self.reduce = allreduce.AllReduce(self.reduce_segment, self.rank, 2 * config["timeout"] + 5,
                                              self.parent_pid)
        log.info("worker %d (pid %d): heads %s, kv heads %s, ffn %s, vocab %s, %s prefill", self.rank, os.getpid(),
                 spec.q_heads, spec.kv_heads, spec.ffn, spec.vocab, self.model.prefill_precision)
        return sum(t.numel() * t.element_size() for t in weights.values()) + self.model.cache.nbytes()

    def _load_own(self, args: ModelArgs, spec: ShardSpec, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        if not self.model_path:
            raise ValueError("the coordinator sent no shared-memory shard; start the worker with --model-path")
        from shardllama.loading import open_checkpoint  # only remote workers read checkpoints

        ckpt = open_checkpoint(self.model_path)
        mine = {k: v for k, v in vars(ckpt.args).items() if k != "max_seq_len"}
        theirs = {k: v for k, v in vars(args).items() if k != "max_seq_len"}
        if mine != theirs:
            raise ValueError(f"{self.model_path} is not the coordinator's model: {mine} != {theirs}")
        return cut_weights(args, spec, lambda name: ckpt.load(name, source_dtype(dtype)), dtype)

    # ---- serving ---------------------------------------------------------------------------------

    def serve(self) -> None:
        model = self.model
        assert model is not None
        step, step_id = None, None
        send = self.sock.send
        while True:
            buf = self._recv().buffer
            try:
                h = P.parse(buf, P.TO_WORKER)
            except P.BadFrame as e:
                log.warning("worker %s: ignoring %s", self.rank, e)
                continue
            if h.kind == P.COMPUTE:
                pass_no = None
                try:
                    if h.dtype not in P.CODE_DTYPES:
                        raise P.BadFrame(f"COMPUTE of dtype code {h.dtype}")
                    P.check_tensor(buf, h, h.B, h.T, model.args.dim, P.CODE_DTYPES[h.dtype])
                    if h.flags & P.NEW_STEP:
                        start, slots = P.read_step(buf, h)
                        step = Step.make(start, h.T, model.slot_tables(slots), model.rope,  # phase 2: tables on the wire
                                         model.cache.block_size)
                        step_id = h.step
                    elif h.step != step_id:
                        raise RuntimeError(f"step {h.step} continues a pass this worker never began")
                    x = P.read_tensor(buf, h, model.args.dim)
                    if h.phase == P.WHOLE:
                        lengths, pass_no = P.read_whole(buf, h)
                        out = model.whole_pass(x, step, lengths, bool(h.flags & P.ALL_LOGITS), pass_no, self.reduce)
                    else:
                        out = model.compute(h.phase, h.layer, x, step)
                    reply, payload = P.tensor_message(P.Header(P.RESULT, h.phase, 0, P.DTYPE_CODES[out.dtype], h.step,
                                                               h.layer, h.B, out.shape[1]), tuple(out.shape), out.dtype)
                    payload.copy_(out)
                    send(reply.numpy(), copy=False)
                except Exception as e:
                    step_id = None
                    if pass_no is not None and self.reduce is not None:
                        self.reduce.give_up(pass_no)  # the peers must not wait for this worker's partials
                    log.debug("%s", traceback.format_exc())
                    send(P.control(P.ERROR, {"message": f"{type(e).__name__}: {e}"}, phase=h.phase, step=h.step,
                                   layer=h.layer))
            elif h.kind == P.COPY_SLOT:
                send(self.copy_slot(h, buf))
            elif h.kind in (P.READ_SLOT, P.WRITE_SLOT):
                send(self.slot_io(h, buf), copy=False)
            elif h.kind == P.STOP:
                raise _Exit("stopped by the coordinator")
            elif h.kind != P.PING:
                log.warning("worker %s: unexpected message kind %d", self.rank, h.kind)


    def copy_slot(self, h: P.Header, buf) -> bytes:
        model = self.model  # phase 2: tables on the wire
        try:
            body = P.read_body(buf, h)
            src, dst, length = body["src"], body["dst"], body["length"]
            if not (0 <= src < model.n_slots and 0 <= dst < model.n_slots and 0 <= length <= model.max_seq_len):
                raise P.BadFrame(f"COPY_SLOT {src} -> {dst} of {length} positions outside the cache")
            model.copy_slot(src, dst, length)
            return P.control(P.ACK, step=h.step)
        except Exception as e:
            return P.control(P.ERROR, {"message": f"{type(e).__name__}: {e}"}, step=h.step)

    def slot_io(self, h: P.Header, buf) -> object:
        """The answer to READ_SLOT (SLOT_DATA: a chunk of the slot, this worker's KV heads) or to WRITE_SLOT
        (ACK once the chunk is in the cache); ERROR if the request does not fit."""
        model, cache, args = self.model, self.model.cache, self.model.args  # phase 2: tables on the wire
        try:
            if not 0 <= h.layer < model.n_slots:
                raise P.BadFrame(f"slot {h.layer} outside the cache's {model.n_slots}")
            layers, positions = P.read_slot_range(buf, h, args.n_layers, model.max_seq_len)
            cache_k, cache_v = model.slot_kv(h.layer, layers, positions)  # (layers, T, heads, hd) views
            if h.kind == P.READ_SLOT:
                return P.slot_message(P.SLOT_DATA, h.step, h.layer, layers, positions, cache_k, cache_v).numpy()
            if h.B != cache.k.shape[3]:
                raise P.BadFrame(f"WRITE_SLOT of {h.B} KV heads to a worker holding {cache.k.shape[3]}")
            k, v = P.read_slot_payload(buf, h, layers, args.head_dim, cache.k.dtype)
            cache_k[:] = k
            cache_v[:] = v
            return P.control(P.ACK, step=h.step)
        except Exception as e:
            log.debug("%s", traceback.format_exc())
            return P.control(P.ERROR, {"message": f"slot {h.layer}: {type(e).__name__}: {e}"}, phase=P.SLOT_IO,
                             step=h.step, layer=h.layer)


def _rank(rank: int | None) -> str:
    return "?" if rank is None else str(rank)


def run_worker(endpoint: str, *, rank: int | None = None, model_path: str | None = None, threads: int | None = None,
               parent_pid: int | None = None, connect_timeout: float = 60.0, keys: curve.Keypair | None = None,
               server_key: bytes | None = None, phases: Phases | None = None) -> int:
    """Connect to a coordinator, build this worker's shard, answer until told to stop.  Returns an exit code.

    Local workers get ``rank`` and ``parent_pid`` from the coordinator that starts them; a remote worker
    passes only ``endpoint`` and ``model_path`` (``shardllama worker --connect tcp://HOST:PORT``), and over tcp
    its CurveZMQ ``keys`` and the coordinator's public ``server_key`` (None for both: --insecure).  ``phases``:
    the worker's start-up so far (told to the coordinator with READY).
    """
    worker = Worker(endpoint, rank, model_path, threads, parent_pid, connect_timeout, keys, server_key, phases)
    try:
        with torch.inference_mode():
            worker.handshake()
            worker.serve()
    except _Exit as e:
        (log.error if e.code else log.info)("worker %s (pid %d) exits: %s", _rank(worker.rank), os.getpid(), e)
        return e.code
    except Exception as e:
        log.error("worker %s (pid %d) failed: %s: %s", _rank(worker.rank), os.getpid(), type(e).__name__, e)
        return 1
    finally:
        worker.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    phases = Phases.from_process_start()
    phases.add("python and imports", phases.elapsed())
    parser = argparse.ArgumentParser(prog="python -m workers", description="a shardllama worker process")
    parser.add_argument("--connect", required=True, metavar="ENDPOINT",
                        help="the coordinator's endpoint, e.g. tcp://HOST:PORT")
    parser.add_argument("--model-path", help="this machine's copy of the model (remote workers)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: what the coordinator says)")
    parser.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)  # set by a local coordinator
    parser.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--connect-timeout", type=float, default=60.0, help="seconds to wait for the coordinator")
    parser.add_argument("--keys-dir", type=Path, default=curve.default_dir(os.environ),
                        help="this worker's CurveZMQ keypair (`shardllama keys`; default %(default)s)")
    parser.add_argument("--server-key", metavar="KEY|FILE",
                        help="the coordinator's public key (--server-key=KEY: a key may start with '-'), or its "
                             "shardllama.key file (default: this worker's own public key, for a coordinator sharing "
                             "the keypair)")
    parser.add_argument("--insecure", action="store_true",
                        help="tcp without CurveZMQ, for a coordinator started with --insecure on a trusted network")
    parser.add_argument("--log-level", default="WARNING")
    a = parser.parse_args(argv)
    if a.model_path is not None and not Path(a.model_path).exists():
        parser.error(f"--model-path {a.model_path}: no such file or directory")
    logging.basicConfig(level=a.log_level.upper(), format="%(name)s: %(message)s", stream=sys.stderr)
    if a.parent_pid is not None:
        # Local worker: Ctrl-C in the terminal reaches the whole process group; the coordinator stops us.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    keys = server_key = None
    if a.connect.startswith("tcp://") and a.insecure:
        log.warning("--insecure: this worker accepts whichever coordinator answers at %s, and its activations "
                    "travel unencrypted; use it only on a network you trust", a.connect)
    elif a.connect.startswith("tcp://"):
        try:
            keys = curve.load_keypair(a.keys_dir)
            server_key = curve.server_key(a.server_key, keys)
        except KeyFileError as e:
            print(f"shardllama: error: {e}", file=sys.stderr)
            return 1
    return run_worker(a.connect, rank=a.rank, model_path=a.model_path, threads=a.threads, parent_pid=a.parent_pid,
                      connect_timeout=a.connect_timeout, keys=keys, server_key=server_key, phases=phases)
