"""Messages between the coordinator and its workers (ZeroMQ, ROUTER at the coordinator, DEALER at each worker).

Every message is one frame (the ROUTER adds the worker's routing id in front), no pickle:

    offset 0    prelude  <BBBBI: kind, phase, flags, dtype code, step id                  (:class:`Header`)
    offset 8    fields   the kind's own fixed fields (at most 24 bytes, zeros after them):
                         COMPUTE / RESULT <IIII layer, B, T, W (block-table width: 0 without a step block);
                         block chunks <IIIIII first layer, layers, offset, positions, KV heads, blocks;
                         COPY_BLOCK <qqq src, dst, length; ERROR <I layer
    offset 32   step     only COMPUTE with flag NEW_STEP (:class:`StepBlock`): start[B], tables[B, W] as int64,
                         in a WHOLE pass also lengths[B] and the pass number; padded to 32 bytes (at most
                         MAX_STEP_BYTES)
                or ids   only block chunks (:class:`BlockChunk`): the chunk's block ids as int64, padded to 32
    then        payload  the raw bytes of one C-contiguous tensor: (B, T, dim) activations or partial sums,
                         (B, T, vocab slice) logits, a block chunk's keys and values; or, for the start-up
                         messages (HELLO, CONFIG, READY, ERROR), a UTF-8 JSON object

One frame instead of header + payload frames: each extra frame costs a send call (~10 us), more than
copying a decode step's few kilobytes into place.  The payload starts on a 32-byte boundary, so the
receiver computes on a ``torch.frombuffer`` view of the frame without copying; JSON is never on the hot
path.  Each message kind is a frozen dataclass here with ``pack`` and a classmethod ``unpack`` (the tensor
frames, whose payload is written and read in place, return a payload view beside the message).

One forward pass is, per layer, ``COMPUTE(ATTN, h)`` -> ``RESULT(partial)`` from every worker, the
coordinator sums, ``COMPUTE(FFN, h)`` -> ``RESULT``, sums; then ``COMPUTE(HEAD, h)`` -> logits slices.
Step ids let the coordinator drop late answers to a pass it has given up on.  A *whole pass* (phase WHOLE,
local workers summing through shared memory: ``allreduce``) is one ``COMPUTE(WHOLE, embedded tokens)`` ->
``RESULT(logits slice)`` per worker: the workers run every layer and reduce among themselves.

Each worker's KV cache is a pool of ``n_blocks`` blocks of ``block_size`` positions (its own KV heads only;
both numbers come with CONFIG), and a COMPUTE that begins a pass names each row's blocks (its block table).
Reading and writing a sequence's cached positions (the server's prompt cache) goes in
:class:`BlockChunk` s that fit a frame (:func:`kv_chunks`), one request and one answer per worker per chunk;
a chunk names the blocks that hold its positions (position ``p`` of the chunk lives in block
``blocks[(offset + p) // block_size]`` at ``(offset + p) % block_size``):

    READ_BLOCKS   coordinator -> worker, the chunk's fields and block ids, no payload (KV heads 0)
    BLOCK_DATA    worker -> coordinator, the answer: the same fields and ids, payload (2, layers, T, heads,
                  head_dim) -- keys then values of the worker's own KV heads (its ``kv_heads``), cache dtype
    WRITE_BLOCKS  coordinator -> worker, the same payload for the worker's KV heads; answered by ACK

The coordinator assembles the full heads from the workers' ranges and cuts them again to write, so a state
read with N workers can be written with any other N (``block_transfer``).

Every frame is bounded (``MAX_FRAME``, ZMQ_MAXMSGSIZE on both ends: ZeroMQ drops a peer that announces a
bigger one before reading it) and checked before use: :func:`parse` (length, kind, phase, flags), then the
kind's ``unpack`` (fields of the right types and ranges, sizes consistent with the frame's length).  What
does not fit raises :class:`BadFrame`, never another exception.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import re
import struct
from typing import Any, ClassVar, NamedTuple

import torch

from .config import ModelArgs
from .errors import ModelFileError
from .phases import Phases

PRELUDE = struct.Struct("<BBBBI")
ALIGN = 32
HEAD_BYTES = ALIGN  # prelude and fields; a step block, payload or JSON body starts here

# Frame bounds.  A tensor payload is at most MAX_PAYLOAD: bigger passes are cut into pieces (``chunked``)
# and cached positions moved in chunks.  4 MiB is 256 positions of a 4096-wide model in f32 -- a piece
# costs one extra round of messages, noise next to computing 256 rows -- and keeps what an unauthenticated
# peer can make the coordinator hold small.  A step block (start, block tables, lengths) is at most
# MAX_STEP_BYTES: 1 MiB holds the tables of 256 rows of 8192 positions in blocks of 16; a batch with bigger
# tables goes in pieces of fewer rows.  Only the logits of a batch (rows x a vocabulary slice) may be
# bigger than a frame: the coordinator raises its own bound to fit its largest batch.
MAX_PAYLOAD = 4 << 20
MAX_ROWS = 2048  # rows (B) of one pass piece
MAX_STEP_BYTES = 1 << 20
MAX_CHUNK_BLOCKS = 1024  # block ids one block chunk names
MAX_FRAME = MAX_PAYLOAD + MAX_STEP_BYTES
MAX_BODY = 64 << 10  # a start-up message's JSON


class Kind(enum.IntEnum):
    HELLO = 1  # worker -> coordinator: who it is (:class:`Hello`)
    CONFIG = 2  # coordinator -> worker: everything it needs to build its shard (:class:`WorkerConfig`)
    READY = 3  # worker -> coordinator: shard built, cache allocated (:class:`Ready`)
    COMPUTE = 4  # coordinator -> worker: one phase of one layer (:class:`TensorFrame`)
    RESULT = 5  # worker -> coordinator: the partial sum (or logits slice)
    ERROR = 6  # worker -> coordinator: a request failed, the worker carries on (:class:`Error`)
    COPY_BLOCK = 7  # coordinator -> worker: copy a cache block's first positions (:class:`CopyBlock`)
    ACK = 8  # worker -> coordinator: a request without an answer of its own is done (:class:`Ack`)
    STOP = 9  # coordinator -> worker: exit now
    PING = 10  # coordinator -> remote worker, before a request and while waiting: refused at once if it is gone
    READ_BLOCKS = 11  # coordinator -> worker: send a chunk of cached positions (:class:`BlockChunk`)
    BLOCK_DATA = 12  # worker -> coordinator: that chunk, keys and values of its KV heads
    WRITE_BLOCKS = 13  # coordinator -> worker: fill a chunk of cached positions; answered by ACK


class Phase(enum.IntEnum):
    """Of COMPUTE / RESULT (and of an ERROR answering them); KV_IO of block chunks."""

    ATTN = 0
    FFN = 1
    HEAD = 2
    WHOLE = 3
    KV_IO = 4

    @property
    def label(self) -> str:
        return _PHASE_LABELS[self]


_PHASE_LABELS = {Phase.ATTN: "attention", Phase.FFN: "feed-forward", Phase.HEAD: "output head",
                 Phase.WHOLE: "whole pass", Phase.KV_IO: "KV-cache transfer"}
# workers/shard.py compares a COMPUTE's phase with these names.
ATTN, FFN, HEAD, WHOLE = Phase.ATTN, Phase.FFN, Phase.HEAD, Phase.WHOLE


class Flag(enum.IntFlag):
    NEW_STEP = 1  # a step block follows the fields; the worker builds a new model.Step
    ALL_LOGITS = 2  # a whole pass returns the logits of every position, not only each row's last real one


# Value -> member, looked up on every frame (calling an enum class costs microseconds).
_KINDS, _PHASES = dict(Kind._value2member_map_), dict(Phase._value2member_map_)
_FLAGS = {f: Flag(f) for f in range((Flag.NEW_STEP | Flag.ALL_LOGITS) + 1)}
FROM_WORKER = frozenset({Kind.HELLO, Kind.READY, Kind.RESULT, Kind.ERROR, Kind.ACK, Kind.BLOCK_DATA})
TO_WORKER = frozenset({Kind.CONFIG, Kind.COMPUTE, Kind.COPY_BLOCK, Kind.STOP, Kind.PING, Kind.READ_BLOCKS,
                       Kind.WRITE_BLOCKS})

DTYPE_CODES = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


class BadFrame(Exception):
    """A frame that does not follow this protocol; the message says how, in one line."""


class Header(NamedTuple):
    """The prelude every frame starts with: enough to route it to its kind's ``unpack``.  (A NamedTuple, not
    a dataclass: every frame makes one, and a tuple is made in a fifth of the time.)"""

    kind: Kind
    phase: Phase = Phase.ATTN
    flags: Flag = Flag(0)
    dtype: int = 0  # a DTYPE_CODES code, 0 where no tensor follows
    step: int = 0

    def pack(self, fields: bytes = b"") -> bytearray:
        """The 32 bytes of a frame's head: this prelude and the kind's ``fields``."""
        head = bytearray(HEAD_BYTES)
        PRELUDE.pack_into(head, 0, self.kind, self.phase, self.flags, self.dtype, self.step)
        head[PRELUDE.size : PRELUDE.size + len(fields)] = fields
        return head


def parse(buf: Any, kinds: frozenset[Kind]) -> Header:
    """The prelude of a received frame, which must be long enough, of one of ``kinds`` and of a known phase
    and flags."""
    n = memoryview(buf).nbytes
    if n < HEAD_BYTES:
        raise BadFrame(f"a frame of {n} bytes, shorter than a header")
    kind, phase, flags, dtype, step = PRELUDE.unpack_from(buf, 0)
    if kind not in kinds:
        raise BadFrame(f"a message of unexpected kind {kind}")
    if phase not in _PHASES or flags not in _FLAGS:
        raise BadFrame(f"a {Kind(kind).name} of unknown phase {phase} or flags {flags}")
    return Header(_KINDS[kind], _PHASES[phase], _FLAGS[flags], dtype, step)


def check_kind(buf: Any, header: Header | None, kind: Kind | frozenset[Kind]) -> Header:
    """``header`` (parsed here when None), which must be of ``kind``."""
    kinds = kind if isinstance(kind, frozenset) else frozenset({kind})
    if header is None:
        return parse(buf, kinds)
    if header.kind not in kinds:
        raise BadFrame(f"{header.kind.name} where {' or '.join(k.name for k in kinds)} was expected")
    return header


def check_length(buf: Any, header: Header, want: int) -> None:
    if memoryview(buf).nbytes != want:
        raise BadFrame(f"{header.kind.name} of {memoryview(buf).nbytes} bytes, not {want}")


def frame_dtype(header: Header) -> torch.dtype:
    if header.dtype not in CODE_DTYPES:
        raise BadFrame(f"{header.kind.name} of unknown dtype code {header.dtype}")
    return CODE_DTYPES[header.dtype]


# ---- the start-up and control messages --------------------------------------------------------------

_INT, _NUM, _STR, _NONE = (int,), (int, float), (str,), (type(None),)


def _json_frame(header: Header, body: dict, fields: bytes = b"") -> bytes:
    return bytes(header.pack(fields)) + json.dumps(body).encode()


def _read_json(buf: Any, header: Header, fields: dict[str, tuple[type, ...]]) -> dict:
    """The JSON object after the head, with ``fields`` of their types (more are allowed)."""
    raw = bytes(memoryview(buf)[HEAD_BYTES:])
    name = header.kind.name
    if len(raw) > MAX_BODY:
        raise BadFrame(f"{name} with a body of {len(raw)} bytes (at most {MAX_BODY})")
    try:
        body = json.loads(raw or b"{}")
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise BadFrame(f"{name} whose body is not JSON") from None
    if not isinstance(body, dict):
        raise BadFrame(f"{name} whose body is a JSON {type(body).__name__}, not an object")
    for key, types in fields.items():
        value = body.get(key, ...)
        if type(value) not in types:  # (bool is an int to Python, not to us)
            raise BadFrame(f"{name} whose {key!r} is {_describe(value)}, not "
                           f"{' or '.join('null' if t is type(None) else t.__name__ for t in types)}")
        if type(value) is int and not -(1 << 63) <= value < 1 << 63:  # ints end up in tensors and logs
            raise BadFrame(f"{name} whose {key!r} is out of range")
    return body


def _describe(value: Any) -> str:
    return "missing" if value is ... else f"of type {type(value).__name__}"


@dataclasses.dataclass(frozen=True)
class Hello:
    """A worker's first word: its pid, its rank (None for a remote worker: the coordinator picks) and host."""

    pid: int
    rank: int | None
    host: str
    FIELDS: ClassVar = {"pid": _INT, "rank": _INT + _NONE, "host": _STR}

    def pack(self) -> bytes:
        return _json_frame(Header(Kind.HELLO), dataclasses.asdict(self))

    @classmethod
    def unpack(cls, buf: Any, header: Header | None = None) -> "Hello":
        body = _read_json(buf, check_kind(buf, header, Kind.HELLO), cls.FIELDS)
        return cls(body["pid"], body["rank"], body["host"])


@dataclasses.dataclass(frozen=True)
class Ready:
    """Shard built and cache allocated: the bytes it holds and its own start-up figures (phase -> seconds)."""

    nbytes: int
    phases: dict[str, float] = dataclasses.field(default_factory=dict)
    FIELDS: ClassVar = {"nbytes": _INT}

    def pack(self) -> bytes:
        return _json_frame(Header(Kind.READY), {"nbytes": self.nbytes, "phases": self.phases})

    @classmethod
    def unpack(cls, buf: Any, header: Header | None = None) -> "Ready":
        body = _read_json(buf, check_kind(buf, header, Kind.READY), cls.FIELDS)
        return cls(body["nbytes"], Phases.worker_figures(body.get("phases")))


@dataclasses.dataclass(frozen=True)
class Error:
    """A request failed in the worker, which carries on: what, and where (step, phase, layer)."""

    message: str
    step: int = 0
    phase: Phase = Phase.ATTN
    layer: int = 0
    FIELDS: ClassVar = {"message": _STR}
    LAYER: ClassVar = struct.Struct("<I")

    def pack(self) -> bytes:
        return _json_frame(Header(Kind.ERROR, self.phase, step=self.step), {"message": self.message},
                           self.LAYER.pack(self.layer))

    @classmethod
    def unpack(cls, buf: Any, header: Header | None = None) -> "Error":
        header = check_kind(buf, header, Kind.ERROR)
        body = _read_json(buf, header, cls.FIELDS)
        return cls(body["message"], header.step, header.phase, cls.LAYER.unpack_from(buf, PRELUDE.size)[0])

    def where(self) -> str:
        if self.phase == Phase.KV_IO:
            return f"in a {self.phase.label}"
        return f"in layer {self.layer} ({self.phase.label})"


@dataclasses.dataclass(frozen=True)
class WorkerConfig:
    """CONFIG: everything a worker needs to build its shard, from the coordinator that admits it."""

    rank: int
    n_workers: int
    args: ModelArgs
    dtype: str  # a model.DTYPES name: of the weights
    max_seq_len: int
    n_blocks: int  # KV-cache blocks (of this worker's KV heads)
    block_size: int  # positions per block
    threads: int
    spin_us: float  # busy-wait this long for a message before sleeping
    segment: str | None  # its shard in shared memory; None: the worker reads its own checkpoint
    reduce: str | None  # the whole pass's reduction segment; None: no whole passes
    timeout: float  # the coordinator's per-layer timeout
    prefill_precision: str  # as the coordinator resolved it (``kernels.gemm``)
    device: str = "cpu"  # cpu or cuda:K: where it keeps its weights and KV cache and computes (``devices``)
    dist: str | None = None  # torch.distributed init_method of the workers' group (``dist_reduce``); None: none
    FIELDS: ClassVar = {"rank": _INT, "n_workers": _INT, "args": (dict,), "dtype": _STR, "max_seq_len": _INT,
                        "n_blocks": _INT, "block_size": _INT, "threads": _INT, "spin_us": _NUM, "segment": _STR + _NONE,
                        "reduce": _STR + _NONE, "timeout": _NUM, "prefill_precision": _STR, "device": _STR,
                        "dist": _STR + _NONE}

    def pack(self) -> bytes:
        body = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return _json_frame(Header(Kind.CONFIG), {**body, "args": self.args.to_dict()})

    @classmethod
    def unpack(cls, buf: Any, header: Header | None = None) -> "WorkerConfig":
        body = _read_json(buf, check_kind(buf, header, Kind.CONFIG), cls.FIELDS)
        if not 0 <= body["rank"] < body["n_workers"]:
            raise BadFrame(f"CONFIG of rank {body['rank']} among {body['n_workers']} workers")
        for key in ("max_seq_len", "n_blocks", "block_size"):
            if not 1 <= body[key] < 1 << 31:
                raise BadFrame(f"CONFIG whose {key!r} is {body[key]}, not between 1 and 2**31")
        if not re.fullmatch(r"cpu|cuda:\d{1,3}", body["device"]):
            raise BadFrame(f"CONFIG whose 'device' is not cpu or cuda:N")
        if body["dist"] is not None and not body["dist"].startswith("file:///"):
            raise BadFrame("CONFIG whose 'dist' is not a file:/// rendezvous")
        try:
            args = ModelArgs(**body["args"])
        except (TypeError, ValueError, ModelFileError) as e:
            raise BadFrame(f"CONFIG whose 'args' are not a model's: {e}") from None
        return cls(**{**{k: body[k] for k in cls.FIELDS}, "args": args})


@dataclasses.dataclass(frozen=True)
class CopyBlock:
    """Copy the first ``length`` positions of cache block ``src`` to ``dst``; answered by ACK."""

    step: int
    src: int
    dst: int
    length: int
    FIELDS: ClassVar = struct.Struct("<qqq")

    def pack(self) -> bytes:
        return bytes(Header(Kind.COPY_BLOCK, step=self.step).pack(self.FIELDS.pack(self.src, self.dst, self.length)))

    @classmethod
    def unpack(cls, buf: Any, header: Header | None = None) -> "CopyBlock":
        header = check_kind(buf, header, Kind.COPY_BLOCK)
        check_length(buf, header, HEAD_BYTES)
        return cls(header.step, *cls.FIELDS.unpack_from(buf, PRELUDE.size))


@dataclasses.dataclass(frozen=True)
class Signal:
    """A message that is only its kind and step: ACK (to ``step``), STOP, PING."""

    kind: Kind
    step: int = 0
    KINDS: ClassVar = frozenset({Kind.ACK, Kind.STOP, Kind.PING})

    def pack(self) -> bytes:
        assert self.kind in self.KINDS, self.kind
        return bytes(Header(self.kind, step=self.step).pack())

    @classmethod
    def unpack(cls, buf: Any, header: Header | None = None) -> "Signal":
        header = check_kind(buf, header, cls.KINDS)
        check_length(buf, header, HEAD_BYTES)
        return cls(header.kind, header.step)
