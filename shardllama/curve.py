"""CurveZMQ keys: which workers a ``--listen`` coordinator accepts, and which coordinator a worker trusts.

Every tcp connection between a coordinator and its workers is authenticated and encrypted with CurveZMQ
(libzmq's elliptic-curve handshake; pyzmq's ``zmq.auth`` does the key checks), unless both ends are given
``--insecure``.  The files live in the user's config directory (``$XDG_CONFIG_HOME/shardllama``, by default
``~/.config/shardllama``, mode 0700), in zmq.auth's certificate format:

    shardllama.key              this user's public key
    shardllama.key_secret       its secret key (0600)
    authorized_workers/*.key    the public keys of the workers a coordinator accepts

``shardllama keys`` makes the keypair and authorizes it as a worker, so one user whose hosts share the
directory (or a copy of it) needs nothing more: both ends use the same keypair.  A worker elsewhere with
its own keypair is authorized by copying its ``shardllama.key`` into the coordinator's
``authorized_workers/`` (``shardllama keys --authorize FILE``); it pins the coordinator's public key with
``--server-key KEY|FILE`` (default: its own public key, i.e. the shared-keypair case).  The coordinator
reads ``authorized_workers`` when it starts.

Key files owned by another user, a secret readable by others, or public keys and directories others could
change are refused: whoever can write them chooses who may see the activations.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import stat
from pathlib import Path
from typing import Mapping

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from .errors import KeyFileError

log = logging.getLogger(__name__)

NAME = "shardllama"
AUTHORIZED = "authorized_workers"
Keypair = tuple[bytes, bytes]  # (public, secret), Z85 as zmq.auth reads them


def default_dir(environ: Mapping[str, str]) -> Path:
    """``$XDG_CONFIG_HOME/shardllama``, or ``~/.config/shardllama`` (read at the command's entry)."""
    base = environ.get("XDG_CONFIG_HOME") or os.path.join(environ.get("HOME") or os.path.expanduser("~"), ".config")
    return Path(base) / NAME


def make_keys(keys_dir: Path) -> tuple[bytes, bool]:
    """This user's keypair in ``keys_dir``, made (and authorized as a worker) if missing: (public key, made)."""
    keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    _check(keys_dir, others_may_read=False)
    secret_file = keys_dir / f"{NAME}.key_secret"
    made = not secret_file.exists()
    if made:
        # The directory is 0700 (checked above), so nobody sees the secret before it is 0600.
        public_file, secret_name = zmq.auth.create_certificates(keys_dir, NAME)
        os.chmod(secret_name, 0o600)
        os.chmod(public_file, 0o644)
        authorized = keys_dir / AUTHORIZED
        authorized.mkdir(mode=0o700, exist_ok=True)
        shutil.copyfile(public_file, authorized / f"{NAME}-{socket.gethostname()}.key")
    return load_keypair(keys_dir)[0], made


def authorize(keys_dir: Path, public_file: Path) -> Path:
    """Copy a worker's public key file into ``authorized_workers``; the copy's path."""
    key = _read(public_file, secret=False)[0]
    authorized = keys_dir / AUTHORIZED
    authorized.mkdir(mode=0o700, parents=True, exist_ok=True)
    _check(authorized, others_may_read=True)
    dest = authorized / f"{key.decode()[:8].replace('/', '_')}-{public_file.name}"
    if not dest.name.endswith(".key"):
        dest = dest.with_name(dest.name + ".key")
    shutil.copyfile(public_file, dest)
    os.chmod(dest, 0o644)
    return dest


def load_keypair(keys_dir: Path) -> Keypair:
    secret_file = keys_dir / f"{NAME}.key_secret"
    if not secret_file.exists():
        raise KeyFileError(f"no CurveZMQ keys in {keys_dir}: run `shardllama keys` (or give both ends --insecure "
                           "on a network you trust)")
    _check(keys_dir, others_may_read=False)
    public, secret = _read(secret_file, secret=True)
    if secret is None:
        raise KeyFileError(f"{secret_file}: holds no secret key")
    return public, secret


def server_key(spec: str | None, own: Keypair) -> bytes:
    """The coordinator's public key a worker pins: ``spec`` is a key file or a 40-character Z85 key; None:
    this user's own public key (coordinator and worker share the keypair)."""
    if spec is None:
        return own[0]
    if os.path.isfile(spec):
        return _read(Path(spec), secret=False)[0]
    if len(spec) == 40:
        try:
            if len(z85.decode(spec)) == 32:
                return spec.encode()
        except (ValueError, KeyError, IndexError):
            pass
    raise KeyFileError(f"--server-key {spec!r}: neither a key file nor a 40-character Z85 public key")


def client(sock: zmq.Socket, keys: Keypair, server_public: bytes) -> None:
    """Make ``sock`` (a worker's) connect only to the coordinator holding ``server_public``'s secret."""
    sock.curve_publickey, sock.curve_secretkey = keys
    sock.curve_serverkey = server_public


class CurveServer:
    """The coordinator's end: its keypair on the socket, and a ZAP thread (pyzmq's ThreadAuthenticator) that
    lets in only keys listed in ``authorized_workers``.  :meth:`close` stops the thread; it must run before
    the context is terminated."""

    def __init__(self, ctx: zmq.Context, keys_dir: Path):
        self.keys = load_keypair(keys_dir)
        authorized = keys_dir / AUTHORIZED
        if not authorized.is_dir():
            raise KeyFileError(f"{authorized}: no such directory; `shardllama keys` makes it")
        _check(authorized, others_may_read=True)
        files = sorted(authorized.glob("*.key"))
        for f in files:
            _read(f, secret=False)  # owner and permissions, and that it is a key at all
        if not files:
            raise KeyFileError(f"{authorized}: no worker keys (*.key); `shardllama keys --authorize FILE` adds one")
        self.n_authorized = len(files)
        self.auth: ThreadAuthenticator | None = ThreadAuthenticator(ctx, log=_Denials(log, {}))
        self.auth.start()
        self.auth.configure_curve(domain="*", location=str(authorized))

    def apply(self, sock: zmq.Socket) -> None:
        sock.curve_publickey, sock.curve_secretkey = self.keys
        sock.curve_server = True

    def close(self) -> None:
        if self.auth is not None:
            self.auth.stop()
            self.auth = None


class _Denials(logging.LoggerAdapter):
    """zmq.auth reports a refused key at debug level; a worker turned away deserves a warning."""

    def debug(self, msg, *args, **kwargs):
        try:
            text = msg % args if args else str(msg)
        except (TypeError, ValueError):
            text = str(msg)
        if text.startswith("DENIED (CURVE)"):  # "DENIED (CURVE) domain=* client_key=b'...'"
            key = args[-1].decode(errors="replace") if args and isinstance(args[-1], bytes) else text
            self.logger.warning("refused a connection: its CurveZMQ key %s is not in %s", key, AUTHORIZED)
        else:
            self.logger.debug(msg, *args, **kwargs)


def _read(path: Path, *, secret: bool) -> tuple[bytes, bytes | None]:
    _check(path, others_may_read=not secret)
    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise KeyFileError(f"{path}: not a CurveZMQ key file ({e})") from None
    if not public:
        raise KeyFileError(f"{path}: holds no public key")
    return public, secret_key


def _check(path: Path, *, others_may_read: bool) -> None:
    """``path`` must be this user's and unchangeable by others (and unreadable by them, for secrets)."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise KeyFileError(f"{path}: {e.strerror}") from None
    me = os.geteuid()
    if st.st_uid != me:
        raise KeyFileError(f"{path}: owned by uid {st.st_uid}, not by this user (uid {me}); refusing it")
    mode = stat.S_IMODE(st.st_mode)
    if mode & (0o022 if others_may_read else 0o077):
        what = "change" if mode & 0o022 else "read"
        fix = "go-w" if others_may_read else "go-rwx"
        raise KeyFileError(f"{path}: others can {what} it (mode {mode:o}); refusing it (chmod {fix} {path})")
