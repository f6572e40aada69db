"""Shared memory that someone else may have written: kept shards, a run's own segments, the reduction segment.

/dev/shm is writable by every local user.  Segments are planted as user ``nobody`` by a forked child that
setuid()s (the suite runs as root; those tests are skipped otherwise), and a run must map only its own
user's segments of mode 0600 whose recorded identity matches, saying so in one line when it ignores a set.
Other runs of the suite may share /dev/shm: these tests look only at names they made themselves.
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import subprocess
import sys
import traceback
import uuid
from typing import Callable

import pytest
import torch

from shardllama import allreduce
from shardllama.coordinator import Coordinator
from shardllama.fingerprint import fingerprint
from shardllama.model import random_weights
from shardllama.segment import SHM_DIR, ForeignSegmentError, Segment, run_tag, segment_name
from shardllama.sharding import plan
from shardllama.shm import ShardStore, clean_kept, list_kept, shard_key
from tests.test_cli import run_cli
from tests.test_tensor_parallel import MAX_SEQ, tiny_model

try:
    NOBODY = pwd.getpwnam("nobody")
except KeyError:
    NOBODY = None
as_root = pytest.mark.skipif(os.geteuid() != 0 or NOBODY is None,
                             reason="planting segments as user nobody needs root and a nobody user")


def as_nobody(fn: Callable[[], object]) -> object:
    """``fn()`` in a forked child running as nobody; its JSON result (an exception in it fails the test)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no return from here
        code = 1
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(NOBODY.pw_gid)
            os.setuid(NOBODY.pw_uid)
            os.write(w, json.dumps(fn()).encode())
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child running as nobody failed"
    return json.loads(out)


def plant(segments: dict[str, bytes], mode: int = 0o600) -> None:
    """Write ``segments`` (name -> bytes) into /dev/shm as nobody: what any local user can do."""

    def write() -> None:
        for name, data in segments.items():
            fd = os.open(SHM_DIR / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            with os.fdopen(fd, "wb") as f:
                f.write(data)

    as_nobody(write)
    for name in segments:
        assert (SHM_DIR / name).stat().st_uid == NOBODY.pw_uid


def unlink(names) -> None:
    for name in names:
        try:
            os.unlink(SHM_DIR / name)
        except FileNotFoundError:
            pass


def test_segments_are_made_0600_and_attach_refuses_what_others_control():
    key = f"trust{uuid.uuid4().hex[:8]}"
    seg = Segment.create(segment_name(key, "x", run_tag()), {"t": (torch.float32, (4,))}, {})
    reduce = allreduce.create(key, 2, 4, 8, torch.float32)
    link = segment_name(key, "link", run_tag())
    try:
        assert os.stat(SHM_DIR / seg.name).st_mode & 0o777 == 0o600
        assert os.stat(SHM_DIR / reduce.name).st_mode & 0o777 == 0o600
        assert f"-{os.getpid()}-" in reduce.name  # and a random part: no one can plant it beforehand
        Segment.attach(seg.name).close()
        os.chmod(SHM_DIR / seg.name, 0o644)
        with pytest.raises(ForeignSegmentError, match="mode 0644"):
            Segment.attach(seg.name)
        with pytest.raises(ForeignSegmentError):
            Segment.attach(seg.name, writable=True, trusted=False)  # never written, whatever the caller says
        listed = Segment.attach(seg.name, trusted=False)  # `shards list` may read it, marked
        assert listed.foreign
        listed.close()
        os.chmod(SHM_DIR / seg.name, 0o600)
        os.symlink(SHM_DIR / seg.name, SHM_DIR / link)
        with pytest.raises(ForeignSegmentError, match="symbolic link"):
            Segment.attach(link)
        if os.geteuid() == 0 and NOBODY is not None:
            os.chown(SHM_DIR / reduce.name, NOBODY.pw_uid, -1)  # a worker attaches it writable
            with pytest.raises(ForeignSegmentError, match=f"owned by uid {NOBODY.pw_uid}"):
                Segment.attach(reduce.name, writable=True)
    finally:
        unlink([link])
        for s in (seg, reduce):
            s.close()
            s.unlink()


def _store(model_file, load, keep=True, n=2, args=None) -> ShardStore:
    args = args or tiny_model()[0]
    return ShardStore.open(args, plan(args, n), torch.float32, load, shard_key(model_file, torch.float32, n),
                           keep=keep, info={"model": str(model_file)}, files=fingerprint(model_file))


def _must_not_load(name):
    raise AssertionError(f"kept shards were rebuilt (asked for {name})")


@as_root
def test_a_kept_set_planted_by_another_user_is_ignored(tmp_path, caplog):
    """nobody copies the victim's kept set, manifests and all, with other weights: a plain run never looks
    at it, a --keep-shards run says it ignores it; both compute with their own weights."""
    args, weights = tiny_model()
    evil = random_weights(args, seed=99)
    model_file = tmp_path / "model.bin"
    model_file.write_bytes(b"stands for the checkpoint")
    key = shard_key(model_file, torch.float32, 2)
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    planted: dict[str, bytes] = {}
    try:
        with Coordinator(args, weights, n_workers=2, max_seq_len=MAX_SEQ, keep_shards=True, model_path=model_file) as c:
            mine = c.forward(prompt, torch.tensor([0]), torch.tensor([[0]]))
            real = {s.name: bytes(s.buf) for s in c.store.segments.values()}
            starts = {s.name: s.manifest["data_start"] for s in c.store.segments.values()}
        assert sorted(clean_kept(key)) == sorted(real)
        fake = ShardStore.open(args, plan(args, 2), torch.float32, evil.__getitem__, key=f"fake{uuid.uuid4().hex}")
        try:  # the real headers and manifests (identity included), the other model's tensor bytes
            for part, seg in fake.segments.items():
                name = segment_name(key, part)
                data = bytes(seg.buf)[seg.manifest["data_start"]:]
                planted[name] = real[name][: starts[name]] + data
                assert len(planted[name]) == len(real[name]) and planted[name] != real[name]
        finally:
            fake.close()
        plant(planted)

        for keep in (False, True):
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="shardllama"):
                with Coordinator(args, weights, n_workers=2, max_seq_len=MAX_SEQ, keep_shards=keep,
                                 model_path=model_file) as c:
                    assert c.store.owned and not c.store.kept
                    assert torch.equal(c.forward(prompt, torch.tensor([0]), torch.tensor([[0]])), mine)
            lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
            if keep:
                [line] = lines
                assert f"ignoring kept shards {key}" in line and f"owned by uid {NOBODY.pw_uid}" in line
                assert "private shards" in line
            else:
                assert lines == []  # a plain run does not even look
        # Never removed for nobody, and listed as theirs.
        assert clean_kept(key) == [] and all((SHM_DIR / n).exists() for n in planted)
        [theirs] = [i for i in list_kept() if i.key == key]
        assert theirs.foreign and theirs.uid == NOBODY.pw_uid and sorted(theirs.segments) == sorted(planted)
        listed = run_cli("shards", "list")
        [line] = [ln for ln in listed.stdout.splitlines() if ln.startswith(key)]
        assert "foreign: of user nobody" in line
        cleaned = run_cli("shards", "clean", "--key", key)
        assert "removed 0" in cleaned.stdout
        assert f"skipped 1 set owned by uid {NOBODY.pw_uid} (user nobody)" in cleaned.stdout, cleaned.stdout

        # The planted set is a faithful copy: given to root, it is mapped, and the output is nobody's.
        for name in planted:
            os.chown(SHM_DIR / name, 0, 0)
        with Coordinator(args, _must_not_load, n_workers=2, max_seq_len=MAX_SEQ, keep_shards=True,
                         model_path=model_file) as c:
            assert not c.store.owned
            assert not torch.equal(c.forward(prompt, torch.tensor([0]), torch.tensor([[0]])), mine)
    finally:
        unlink(planted)
        clean_kept(key)


@as_root
def test_clean_never_removes_another_users_sets(tmp_path):
    """`shards clean` without --key, run by nobody while root has a kept set: nobody removes none of it and
    lists it as foreign (unreadable to nobody: grouped by the key in the names)."""
    args, weights = tiny_model()
    model_file = tmp_path / "model.bin"
    model_file.write_bytes(b"stands for the checkpoint")
    store = _store(model_file, weights.__getitem__)
    names = [s.name for s in store.segments.values()]
    store.close()
    key = shard_key(model_file, torch.float32, 2)
    try:
        seen = as_nobody(lambda: {"removed": clean_kept(),
                                  "foreign": [[i.key, i.uid, i.segments] for i in list_kept() if i.foreign]})
        assert not set(seen["removed"]) & set(names)
        assert [key, 0, sorted(names)] in [[k, uid, sorted(s)] for k, uid, s in seen["foreign"]]
        assert all((SHM_DIR / n).exists() for n in names)
    finally:
        clean_kept(key)


def test_kept_shards_of_other_files_are_rewritten(tmp_path, caplog):
    """Same path, size and mtime (so the same key), other bytes: the fingerprint tells, and the outdated set
    is replaced, not mapped."""
    args, weights = tiny_model()
    model_file = tmp_path / "model.bin"
    model_file.write_bytes(b"A" * 1000)
    key = shard_key(model_file, torch.float32, 2)
    try:
        _store(model_file, weights.__getitem__).close()
        again = _store(model_file, _must_not_load)
        assert not again.owned and again.kept
        again.close()
        st = model_file.stat()
        model_file.write_bytes(b"B" * 1000)
        os.utime(model_file, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert shard_key(model_file, torch.float32, 2) == key
        loaded = []
        with caplog.at_level(logging.WARNING, logger="shardllama"):
            store = _store(model_file, lambda name: loaded.append(name) or weights[name])
        assert store.owned and store.kept and loaded
        assert any(f"removing incomplete or outdated kept shards {key}" in r.getMessage() for r in caplog.records)
        store.close()
        with pytest.raises(AssertionError, match="rebuilt"):  # another plan (args) for the same key: rewritten
            _store(model_file, _must_not_load, args=args.replace(norm_eps=1e-6)).close()
    finally:
        clean_kept(key)


def test_a_set_being_written_by_another_process_is_left_alone(tmp_path, caplog, monkeypatch):
    """Item 4 of the issue: a plain run never waits for or fails on it; a --keep-shards run uses private shards
    and says why; once the writer is gone the incomplete set is replaced."""
    args, weights = tiny_model()
    model_file = tmp_path / "model.bin"
    model_file.write_bytes(b"stands for the checkpoint")
    key = shard_key(model_file, torch.float32, 2)
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    busy = Segment.create(segment_name(key, "emb"), {"t": (torch.float32, (4,))},
                          {"key": key, "kept": True, "owner_pid": writer.pid})  # never marked ready
    busy.keep()  # as the writer's own: this process's exit does not unlink it
    try:
        with caplog.at_level(logging.WARNING, logger="shardllama"):
            plain = _store(model_file, weights.__getitem__, keep=False)
            assert plain.owned and not plain.kept
            plain.close()
            assert not caplog.records
            private = _store(model_file, weights.__getitem__)
            assert private.owned and not private.kept
            private.close()
        [line] = [r.getMessage() for r in caplog.records]
        assert f"being written by pid {writer.pid}" in line and "private shards" in line
        assert (SHM_DIR / busy.name).exists()
        assert clean_kept(key) == []  # still being written: not removed either

        # The kept names taken between the look and the write (a race): private shards, one line.
        import shardllama.shm as shm

        monkeypatch.setattr(shm, "_attach_kept", lambda *a: (None, True))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="shardllama"):
            raced = _store(model_file, weights.__getitem__)
        assert raced.owned and not raced.kept
        raced.close()
        assert "another process started writing them just now" in caplog.records[0].getMessage()
        monkeypatch.undo()

        writer.kill()
        writer.wait()
        store = _store(model_file, weights.__getitem__)
        assert store.owned and store.kept
        store.close()
    finally:
        writer.kill()
        writer.wait()
        busy.close()
        clean_kept(key)
        unlink([busy.name])
