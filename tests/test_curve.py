"""CurveZMQ key files: made safely, refused when they are not safely this user's."""

from __future__ import annotations

import os
import stat

import pytest
import zmq

from shardllama import curve
from shardllama.errors import KeyFileError
from tests.test_cli import run_cli


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_keys_command_makes_a_private_keypair_once_and_authorizes_it(tmp_path):
    env = {"XDG_CONFIG_HOME": str(tmp_path / "config")}
    first = run_cli("keys", env=env, timeout=60)
    assert first.returncode == 0 and "made the CurveZMQ keypair" in first.stderr, first.stderr
    d = tmp_path / "config" / "shardllama"
    public = first.stdout.strip()
    assert len(public) == 40 and curve.load_keypair(d)[0].decode() == public
    assert mode(d) == 0o700 and mode(d / "shardllama.key_secret") == 0o600 and mode(d / curve.AUTHORIZED) == 0o700
    assert [zmq.auth.load_certificate(f)[0].decode() for f in (d / curve.AUTHORIZED).glob("*.key")] == [public]
    again = run_cli("keys", env=env, timeout=60)
    assert again.returncode == 0 and again.stdout.strip() == public and "found" in again.stderr

    other = tmp_path / "other"
    other_public, made = curve.make_keys(other)
    assert made and other_public.decode() != public
    added = run_cli("keys", "--authorize", other / "shardllama.key", env=env, timeout=60)
    assert added.returncode == 0, added.stderr
    keys = {zmq.auth.load_certificate(f)[0] for f in (d / curve.AUTHORIZED).glob("*.key")}
    assert keys == {public.encode(), other_public}
    ctx = zmq.Context()
    try:
        server = curve.CurveServer(ctx, d)
        assert server.n_authorized == 2
        server.close()
    finally:
        ctx.term()


def test_key_files_others_could_read_or_change_are_refused(tmp_path):
    d = tmp_path / "keys"
    curve.make_keys(d)
    secret = d / "shardllama.key_secret"
    secret.chmod(0o640)
    with pytest.raises(KeyFileError, match=r"shardllama.key_secret: others can read it \(mode 640\); refusing it"):
        curve.load_keypair(d)
    secret.chmod(0o600)
    d.chmod(0o755)
    with pytest.raises(KeyFileError, match="others can read it"):
        curve.load_keypair(d)
    d.chmod(0o700)
    authorized = next((d / curve.AUTHORIZED).glob("*.key"))
    authorized.chmod(0o666)
    ctx = zmq.Context()
    try:
        with pytest.raises(KeyFileError, match=r"others can change it \(mode 666\)"):
            curve.CurveServer(ctx, d)
    finally:
        ctx.term()


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_key_files_of_another_user_are_refused(tmp_path):
    d = tmp_path / "keys"
    curve.make_keys(d)
    os.chown(d / "shardllama.key_secret", 65534, 65534)
    with pytest.raises(KeyFileError, match="owned by uid 65534, not by this user"):
        curve.load_keypair(d)


def test_server_key_is_a_file_or_a_z85_key(tmp_path):
    d = tmp_path / "keys"
    own_public, _ = curve.make_keys(d)
    own = curve.load_keypair(d)
    assert curve.server_key(None, own) == own_public
    assert curve.server_key(str(d / "shardllama.key"), own) == own_public
    other = zmq.curve_keypair()[0]
    assert curve.server_key(other.decode(), own) == other
    for junk in ("short", "~" * 40, str(tmp_path / "missing.key")):
        with pytest.raises(KeyFileError, match="--server-key"):
            curve.server_key(junk, own)
