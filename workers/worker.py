"""One worker process: its slice of every layer, its own KV cache, and a loop that answers the coordinator.

A local worker (started by the coordinator) maps its shard from shared memory; a remote worker
(``--connect tcp://... --model-path ...``) cuts its own shard from its own copy of the checkpoint, with the
rank, N and dtype that the coordinator's handshake gives it (:class:`~shardllama.protocol.WorkerConfig`).
Either way the math is ``model.py``'s, applied to the slices that ``sharding.shard`` cut.

Its end of the wire is a :class:`~shardllama.transport.Dealer`: it never outlives its coordinator, and over
tcp it speaks CurveZMQ.  Frames are bounded (ZMQ_MAXMSGSIZE) and checked like the coordinator's
(``protocol``, ``tensor_frames``).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import traceback
from pathlib import Path

import torch

from shardllama import allreduce, cli_common, curve, dist_reduce
from shardllama import protocol as P
from shardllama.config import ModelArgs
from shardllama.errors import KeyFileError
from shardllama.kernels import gemm
from shardllama.model import DTYPES, Step
from shardllama.phases import Phases
from shardllama import qblocks
from shardllama.quant import activation_dtype, source_dtype
from shardllama.sharding import ShardSpec, plan
from shardllama.shm import Segment
from shardllama.tensor_frames import BlockChunk, TensorFrame
from shardllama.transport import Dealer, Hangup

from . import device as dev
from .shard import ShardModel, cut_weights

log = logging.getLogger("shardllama.worker")


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
        self.wire = Dealer(endpoint, keys=keys, server_key=server_key, parent_pid=parent_pid)
        self.model: ShardModel | None = None
        self.segment: Segment | None = None
        self.reduce_segment: Segment | None = None
        self.reduce: allreduce.AllReduce | dist_reduce.DistReduce | None = None

    def close(self) -> None:
        if isinstance(self.reduce, dist_reduce.DistReduce):
            self.reduce.close()
        self.model = self.reduce = None  # drop the views before unmapping
        for seg in (self.segment, self.reduce_segment):
            if seg is not None:
                seg.close()
        self.wire.close()

    # ---- handshake -------------------------------------------------------------------------------

    def handshake(self) -> None:
        self.wire.connect()
        self.wire.send(P.Hello(os.getpid(), self.rank, socket.gethostname()).pack())
        # A local worker may be started long before its coordinator has written the shards (``launch``): it
        # waits as long as its parent lives.
        buf = self.wire.recv(None if self.parent_pid is not None else self.connect_timeout)
        try:
            header = P.parse(buf, P.TO_WORKER)
            if header.kind == P.Kind.STOP:
                raise Hangup("the coordinator needs no more workers")
            config = P.WorkerConfig.unpack(buf, header)
        except P.BadFrame as e:
            raise Hangup(f"the coordinator at {self.endpoint} sent a malformed message: {e}", code=1) from None
        try:
            nbytes = self._build(config)
        except Exception as e:
            self.wire.send(P.Error(f"{type(e).__name__}: {e}").pack())
            raise
        self.wire.send(P.Ready(nbytes, self.phases.seconds).pack())

    def _build(self, config: P.WorkerConfig) -> int:
        args = config.args
        dtype = DTYPES[config.dtype]
        # As the coordinator resolved it on its CPU; a remote worker's own CPU may still lack bf16 (then: f32).
        prefill = gemm.check(config.prefill_precision, "the coordinator's prefill_precision")
        self.rank = config.rank
        with self.phases("select device"):
            device = dev.select(config.device)  # before anything else touches CUDA
        torch.set_num_threads(self.threads or config.threads)
        if dtype in (torch.float16, torch.bfloat16, torch.int8, *qblocks.DTYPES) and device.type == "cpu":
            from shardllama import kernels  # (CPU kernels only)
            from shardllama.kernels import blocks

            with self.phases("kernel library"):  # built (or loaded) now, under the connect timeout, not mid-step
                blocks.library() if dtype in qblocks.DTYPES else kernels.library()
        self.wire.spin_s = config.spin_us * 1e-6
        spec = plan(args, config.n_workers, dtype)[self.rank]
        if config.segment:
            with self.phases("map shard"):
                self.segment = Segment.attach(config.segment)
                weights = self.segment.tensors()
        else:
            with self.phases("read its shard"):
                weights = self._load_own(args, spec, dtype)
        with self.phases("KV cache and rope tables"):
            self.model = ShardModel(args, spec, weights, activation_dtype(dtype), config.max_seq_len,
                                    config.n_blocks, config.block_size, prefill, device)
        if config.dist:
            with self.phases("join the reduction group"):
                self.reduce = dist_reduce.DistReduce(config.dist, self.rank, config.n_workers, device,
                                                     2 * config.timeout + 5)
        elif config.reduce:
            self.reduce_segment = Segment.attach(config.reduce, writable=True)
            # Later than the coordinator's deadline: it names the worker that fell behind and aborts the pass.
            self.reduce = allreduce.AllReduce(self.reduce_segment, self.rank, 2 * config.timeout + 5,
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
        if dtype == qblocks.GGUF and not ckpt.block_types():
            raise ValueError(f"{self.model_path} holds no quantized blocks; the coordinator computes a quantized "
                             "GGUF's own blocks: give this worker the same file")
        return cut_weights(args, spec, lambda name: ckpt.load(name, source_dtype(dtype)), dtype)

    # ---- serving ---------------------------------------------------------------------------------

    def serve(self) -> None:
        assert self.model is not None
        step, step_id = None, None  # the model.Step of the pass under way, and its id
        while True:
            buf = self.wire.recv()
            try:
                h = P.parse(buf, P.TO_WORKER)
            except P.BadFrame as e:
                log.warning("worker %s: ignoring %s", self.rank, e)
                continue
            if h.kind == P.Kind.COMPUTE:
                step, step_id = self.compute(h, buf, step, step_id)
            elif h.kind == P.Kind.COPY_BLOCK:
                self.wire.send(self.copy_block(h, buf))
            elif h.kind in (P.Kind.READ_BLOCKS, P.Kind.WRITE_BLOCKS):
                self.wire.send(self.block_io(h, buf), copy=False)
            elif h.kind == P.Kind.STOP:
                raise Hangup("stopped by the coordinator")
            elif h.kind != P.Kind.PING:
                log.warning("worker %s: unexpected message kind %s", self.rank, h.kind.name)

    def compute(self, h: P.Header, buf, step: Step | None, step_id: int | None) -> tuple[Step | None, int | None]:
        """Answer one COMPUTE (RESULT, or ERROR if it fails); the step for the pass's next COMPUTE."""
        model = self.model
        msg = None
        try:
            msg, x = TensorFrame.unpack(buf, h, model.args.dim)
            if msg.block is not None:
                step = model.step(msg.block, msg.T)
                step_id = msg.step
            elif msg.step != step_id:
                raise RuntimeError(f"step {msg.step} continues a pass this worker never began")
            if msg.phase == P.Phase.WHOLE:
                out = model.whole_pass(x, step, msg.block.lengths, msg.all_logits, msg.block.pass_no, self.reduce)
            else:
                out = model.compute(msg.phase, msg.layer, x, step)
            reply, payload = TensorFrame(P.Kind.RESULT, msg.phase, msg.step, msg.layer, msg.B, out.shape[1],
                                         out.dtype).pack(out.shape[2])
            payload.copy_(out)
            self.wire.send(reply.numpy(), copy=False)
            return step, step_id
        except Exception as e:
            if msg is not None and msg.phase == P.Phase.WHOLE and msg.block is not None and self.reduce is not None:
                self.reduce.give_up(msg.block.pass_no)  # the peers must not wait for this worker's partials
            log.debug("%s", traceback.format_exc())
            layer = msg.layer if msg is not None else 0
            self.wire.send(P.Error(f"{type(e).__name__}: {e}", h.step, h.phase, layer).pack())
            return None, None

    def copy_block(self, h: P.Header, buf) -> bytes:
        cache = self.model.cache
        try:
            c = P.CopyBlock.unpack(buf, h)
            if not (0 <= c.src < cache.n_blocks and 0 <= c.dst < cache.n_blocks and 0 <= c.length <= cache.block_size):
                raise P.BadFrame(f"COPY_BLOCK {c.src} -> {c.dst} of {c.length} positions outside a cache of "
                                 f"{cache.n_blocks} blocks of {cache.block_size}")
            cache.copy_block(c.src, c.dst, c.length)
            return P.Signal(P.Kind.ACK, h.step).pack()
        except Exception as e:
            return P.Error(f"{type(e).__name__}: {e}", h.step, P.Phase.KV_IO).pack()

    def block_io(self, h: P.Header, buf) -> object:
        """The answer to READ_BLOCKS (BLOCK_DATA: the chunk's positions, this worker's KV heads) or to
        WRITE_BLOCKS (ACK once the chunk is in the cache); ERROR if the request does not fit."""
        chunk = None
        try:
            chunk = BlockChunk.unpack(buf, h)
            if chunk.kind == P.Kind.READ_BLOCKS:
                k, v = self.model.chunk_kv(chunk)  # (layers, T, heads, hd)
                answer = BlockChunk(P.Kind.BLOCK_DATA, h.step, chunk.blocks, chunk.offset, chunk.positions,
                                    chunk.layers, k.shape[2], k.dtype)
                return answer.pack(k, v).numpy()
            k, v = chunk.kv(buf, self.model.args.head_dim)
            self.model.write_chunk(chunk, k, v)
            return P.Signal(P.Kind.ACK, h.step).pack()
        except Exception as e:
            log.debug("%s", traceback.format_exc())
            where = f"blocks {list(chunk.blocks)[:8]}: " if chunk is not None else ""
            return P.Error(f"{where}{type(e).__name__}: {e}", h.step, P.Phase.KV_IO).pack()


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
    except Hangup as e:
        (log.error if e.code else log.info)("worker %s (pid %d) exits: %s", _rank(worker.rank), os.getpid(), e)
        return e.code
    except Exception as e:
        log.error("worker %s (pid %d) failed: %s: %s", _rank(worker.rank), os.getpid(), type(e).__name__, e)
        return 1
    finally:
        worker.close()
    return 0


def main(argv: list[str] | None = None, prog: str = "python -m workers") -> int:
    """The worker's command line (``prog``: how the user started it, for its usage line)."""
    phases = Phases.from_process_start()
    phases.add("python and imports", phases.elapsed())
    parser = argparse.ArgumentParser(prog=prog, description="a shardllama worker process")
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
    cli_common.add_common(parser)  # --version, -v/-vv, --log-level (a local coordinator passes its own level)
    a = parser.parse_args(argv)
    if a.model_path is not None and not Path(a.model_path).exists():
        parser.error(f"--model-path {a.model_path}: no such file or directory")
    cli_common.setup_logging(cli_common.log_level(a), "%(name)s: %(message)s")
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
