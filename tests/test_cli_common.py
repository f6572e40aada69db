"""What every command line shares (shardllama/cli_common.py), tried as a new user would: real processes.

--version and -v on each command, bare ``shardllama``, the worker's usage line, the level a coordinator hands
its workers, ``shards clean`` in a /dev/shm of its own (a mount namespace: other runs' sets are never touched),
and tools/scaling.py where ``import matplotlib`` fails.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from shardllama.cli_common import version
from tests.test_cli import run_cli

ROOT = Path(__file__).resolve().parents[1]

# How the user starts each command: (argv before the flags, what its usage line says).
COMMANDS = [
    ([sys.executable, "-m", "shardllama"], "shardllama"),
    ([sys.executable, "-m", "shardllama", "generate"], "shardllama generate"),
    ([sys.executable, "-m", "shardllama", "chat"], "shardllama chat"),
    ([sys.executable, "-m", "shardllama", "serve"], "shardllama serve"),
    ([sys.executable, "-m", "shardllama", "worker"], "shardllama worker"),
    ([sys.executable, "-m", "shardllama", "shards"], "shardllama shards"),
    ([sys.executable, "-m", "shardllama", "keys"], "shardllama keys"),
    ([sys.executable, "-P", "-m", "workers"], "python -m workers"),
]


def run(argv, timeout=120, env=None, **kw):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
           **(env or {})}
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL,
                          **kw)


def test_version_comes_from_the_package_metadata():
    from importlib import metadata

    assert version() == metadata.version("shardllama")
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", version())


@pytest.mark.parametrize("argv, prog", COMMANDS, ids=[p for _, p in COMMANDS])
def test_version_on_every_command(argv, prog):
    r = run([*argv, "--version"])
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"shardllama {version()}\n" and r.stderr == ""


@pytest.mark.parametrize("argv, prog", COMMANDS, ids=[p for _, p in COMMANDS])
def test_help_names_the_command_as_typed_and_offers_v_and_log_level(argv, prog):
    r = run([*argv, "--help"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"usage: {prog} "), r.stdout.splitlines()[0]
    if prog != "shardllama":  # the top level lists the commands; each command takes the flags
        assert "-v, --verbose" in r.stdout and "--log-level LEVEL" in r.stdout and "--version" in r.stdout


def test_bare_shardllama_prints_the_help():
    r = run([sys.executable, "-m", "shardllama"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: shardllama ") and "generate" in r.stdout and "--version" in r.stdout
    assert r.stderr == ""
    # ... while flags alone are still generate's: this one fails on its flag, not with the help.
    r = run([sys.executable, "-m", "shardllama", "--temperature", "-1", "--prompt", "x"])
    assert r.returncode == 2 and "temperature" in r.stderr and r.stdout == ""


@pytest.mark.parametrize("flags", [["-v"], ["-vv"], ["--log-level", "debug"], ["--log-level", "ERROR"]])
def test_v_and_log_level_are_accepted_by_every_command(flags, tmp_path):
    """Each command parses them and runs: the ones that need no model really run; the others fail on their
    own missing input, not on the flag."""
    r = run([sys.executable, "-m", "shardllama", "shards", "list", *flags])
    assert r.returncode == 0, r.stderr
    r = run([sys.executable, "-m", "shardllama", "keys", "--keys-dir", tmp_path / "keys", *flags])
    assert r.returncode == 0, r.stderr
    for cmd in (["generate", "--prompt-file", tmp_path / "none.txt"], ["--prompt-file", tmp_path / "none.txt"],
                ["chat", "--model-path", tmp_path / "none.gguf"], ["serve", "--model-path", tmp_path / "none.gguf"]):
        r = run([sys.executable, "-m", "shardllama", *map(str, cmd), *flags])
        assert r.returncode in (1, 2) and "none." in r.stderr, r.stderr
        assert "--log-level" not in r.stderr and "unrecognized" not in r.stderr
    # The worker: past its flags it waits for a coordinator (none here) and gives up after the timeout.
    r = run([sys.executable, "-m", "shardllama", "worker", "--connect", f"ipc://{tmp_path}/none", "--connect-timeout",
             "0.5", *flags])
    assert r.returncode == 1 and "no answer from the coordinator" in r.stderr, r.stderr


def test_a_bad_log_level_is_one_line_naming_the_flag():
    r = run([sys.executable, "-m", "shardllama", "serve", "--log-level", "loud"])
    assert r.returncode == 2
    [line] = r.stderr.strip().splitlines()
    assert line.startswith("shardllama: error:") and "--log-level" in line and "'loud'" in line


def test_the_coordinator_hands_its_level_to_the_workers(tmp_path):
    """-v on the command: the workers it starts log at INFO too (their own lines, from their own processes)."""
    from shardllama.model import random_weights
    from tests.test_loading import ARGS, write_gguf

    model = write_gguf(tmp_path / "tiny.gguf", random_weights(ARGS, seed=5))
    common = ["--model-path", model, "--prompt", "tok1", "--max-new-tokens", "1", "--workers", "2", "--dtype", "f32"]
    quiet = run_cli(*common, timeout=120)
    loud = run_cli(*common, "-v", timeout=120)
    assert quiet.returncode == 0 and loud.returncode == 0, loud.stderr
    assert "shardllama.worker: " not in quiet.stderr
    assert "shardllama.worker: " in loud.stderr, loud.stderr  # the worker's format: its logger's name


# ---- shards clean, in a /dev/shm of its own --------------------------------------------------------------

try:
    NOBODY = pwd.getpwnam("nobody")
except KeyError:
    NOBODY = None


def _private_shm() -> bool:
    if os.geteuid() != 0 or NOBODY is None or shutil.which("unshare") is None:
        return False
    r = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs none /dev/shm"], capture_output=True)
    return r.returncode == 0


# The script run in a mount namespace with a fresh /dev/shm: root keeps a set, nobody keeps one (forked child,
# setuid), root has a kept set still being written and a live run's private set; root runs `shardllama shards
# clean` (no --key, stdin closed); what is left and who owns it.
SCRIPT = textwrap.dedent("""
    import json, os, subprocess, sys
    from shardllama.segment import SHM_DIR, Segment, segment_name

    def kept_set(key, parts=("emb", "r0"), kept=True, ready=True):
        for part in parts:
            info = dict(key=key, kept=kept, owner_pid=os.getpid(), model="m", dtype="float32", n_workers=1, part=part)
            seg = Segment.create(segment_name(key, part), {"w": (__import__("torch").float32, (4,))}, info)
            if ready:
                seg.mark_ready()
            seg.keep()
            seg.close()

    kept_set("0000mine")
    kept_set("1111theirs")
    names = sorted(n for n in os.listdir(SHM_DIR) if "1111theirs" in n)
    pid = os.fork()
    if pid == 0:  # nobody writes a copy of the set under the same names: a set of theirs
        data = {n: (SHM_DIR / n).read_bytes() for n in names}
        for n in names:
            os.unlink(SHM_DIR / n)
        os.setgroups([]); os.setgid(int(sys.argv[2])); os.setuid(int(sys.argv[1]))
        for n, b in data.items():
            fd = os.open(SHM_DIR / n, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, b); os.close(fd)
        os._exit(0)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    kept_set("2222writing", ready=False)  # this process, alive, is still writing it
    kept_set("3333live", kept=False)  # this live process's private shards
    r = subprocess.run([sys.executable, "-m", "shardllama", "shards", "clean"], capture_output=True, text=True,
                       stdin=subprocess.DEVNULL, timeout=120)
    left = {n: os.stat(SHM_DIR / n).st_uid for n in os.listdir(SHM_DIR)}
    print(json.dumps(dict(code=r.returncode, out=r.stdout, err=r.stderr, left=left, pid=os.getpid())))
    for n in os.listdir(SHM_DIR):
        os.unlink(SHM_DIR / n)
""")


@pytest.mark.skipif(not _private_shm(), reason="needs root, a nobody user and unshare -m (a /dev/shm of its own)")
def test_shards_clean_removes_only_the_callers_sets_and_says_what_it_skipped(tmp_path):
    script = tmp_path / "clean.py"
    script.write_text(SCRIPT)
    r = run(["unshare", "-m", "sh", "-c", 'mount -t tmpfs -o mode=1777 none /dev/shm && exec "$0" "$@"',
             sys.executable, script, str(NOBODY.pw_uid), str(NOBODY.pw_gid)])
    assert r.returncode == 0, r.stderr
    seen = json.loads(r.stdout)
    assert seen["code"] == 0, seen["err"]
    assert seen["left"] == {"shardllama-1111theirs-emb": NOBODY.pw_uid, "shardllama-1111theirs-r0": NOBODY.pw_uid,
                            "shardllama-2222writing-emb": 0, "shardllama-2222writing-r0": 0,
                            "shardllama-3333live-emb": 0, "shardllama-3333live-r0": 0}
    assert seen["out"].splitlines() == [
        "removed 2 shared-memory segment(s)",
        f"skipped 1 set owned by uid {NOBODY.pw_uid} (user nobody)",
        f"skipped 1 set being written by pid {seen['pid']}",
        f"skipped 1 set in use by pid {seen['pid']}",
        "(`shardllama shards list` shows them; only their owner can remove another user's sets)",
    ], seen["out"]
    assert seen["err"] == ""


# ---- tools/scaling.py without matplotlib ------------------------------------------------------------------


def test_scaling_without_matplotlib_prints_its_table_and_names_the_extra(tmp_path):
    """A fresh install (no plots extra): ``import matplotlib`` fails through a sitecustomize shim; the table
    of a run comes out whole, then one line naming the extra, exit 0; --no-plot does not even say it."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(textwrap.dedent("""
        import sys

        class NoMatplotlib:
            def find_spec(self, name, path=None, target=None):
                if name == "matplotlib" or name.startswith("matplotlib."):
                    raise ImportError(f"No module named {name!r} (hidden by the test)")
                return None

        sys.meta_path.insert(0, NoMatplotlib())
    """))
    row = dict(workers=1, decode_ms=10.0, decode_gb_s=5.0, prefill_tok_s=100.0, pss_total_mb=300.0,
               pss_coordinator_mb=100.0, pss_workers_mb=[200.0], weights_mb=250.0, kv_cache_mb=10.0,
               sync_ms_per_layer=0.01, bandwidth_gb_s=10.0)
    meta = dict(model="tiny", header="tiny: 2 layers", dtype="f32", rows=[row, dict(row, workers=2, decode_ms=6.0)])
    (tmp_path / "scaling.json").write_text(json.dumps(meta))
    env = {"PYTHONPATH": os.pathsep.join([str(shim), str(ROOT)])}
    check = run([sys.executable, "-c", "import matplotlib"], env=env)
    assert check.returncode != 0 and "hidden by the test" in check.stderr
    r = run([sys.executable, ROOT / "tools" / "scaling.py", "--from-json", tmp_path / "scaling.json", "--out-dir",
             tmp_path / "out"], env=env)
    assert r.returncode == 0, r.stderr
    table = [ln for ln in r.stdout.splitlines() if ln.startswith("| ")]
    assert len(table) == 3 and table[1].startswith("| 1 | 10.0 |") and table[2].startswith("| 2 | 6.0 | 1.67× |")
    [line] = r.stderr.strip().splitlines()
    assert "matplotlib" in line and "pip install 'shardllama[plots]'" in line
    assert not (tmp_path / "out" / "scaling.png").exists()
    r = run([sys.executable, ROOT / "tools" / "scaling.py", "--from-json", tmp_path / "scaling.json", "--no-plot"],
            env=env)
    assert r.returncode == 0 and r.stderr == "" and "| 2 | 6.0 |" in r.stdout
