"""The prompt cache on disk, in process: schedulers on the reference model with tiny random weights, one
after another on the same directory (the server restart test with workers is in test_server.py)."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch

from shardllama.backend import LocalBackend
from shardllama.model import blocks_for
from shardllama.slot_bridge import SlotBackend
from shardllama.server.prompt_cache import salt_id
from shardllama.server.prompt_store import PromptStore, model_identity
from shardllama.server.scheduler import Scheduler
from tests.test_scheduler import ARGS, WEIGHTS, job, reference

PROMPT = [1, 5, 9, 2, 7, 7, 3]


@pytest.fixture
def model_file(tmp_path):
    """Something on disk for the model identity to describe."""
    path = tmp_path / "model.bin"
    path.write_bytes(b"weights")
    return path


def store(directory, model_file, dtype=torch.float32, max_seq_len=32) -> PromptStore:
    return PromptStore(directory, model_identity(model_file, ARGS), ARGS, dtype, max_seq_len)


def run(directory, model_file, prompts, n=4, cache_size=4, salt=None, **kw) -> tuple[list, dict]:
    """A scheduler on a fresh backend with a store on ``directory``: each prompt in turn (with cache_salt
    ``salt``), then closed (which waits for the writes).  Returns each job's (tokens, stats) and the
    scheduler's counters."""
    backend = SlotBackend(LocalBackend(ARGS, WEIGHTS, max_seq_len=32, n_blocks=(2 + cache_size) * blocks_for(32)))
    s = Scheduler(backend, max_concurrent=2, max_queue=4, cache_size=cache_size,
                  store=store(directory, model_file, **kw))
    try:
        out = []
        for p in prompts:
            j, c = job(p, n, cache_salt=salt)
            s.submit(j)
            out.append((c.tokens(), c.stats))
        return out, s.stats()
    finally:
        s.close()


def files(directory) -> list:
    return sorted(p.name for p in directory.glob("*.safetensors"))


def test_entries_survive_a_restart(tmp_path, model_file):
    d = tmp_path / "cache"
    [(first, stats)], _ = run(d, model_file, [PROMPT])
    assert stats.cached_tokens == 0 and len(files(d)) == 1
    [(again, stats)], counters = run(d, model_file, [PROMPT])
    assert counters["cache_loaded"] == 1
    assert stats.cached_tokens == len(PROMPT) - 1 and stats.computed_tokens == 1  # only the last token
    assert again == first == reference(PROMPT, 4)
    # The prompt plus its continuation and more: everything up to the new tokens comes from disk.
    follow = PROMPT + first + [11, 12]
    [(tokens, stats)], _ = run(d, model_file, [follow])
    assert stats.cached_tokens == len(PROMPT) + 3 and tokens == reference(follow, 4)
    assert len(files(d)) == 1  # the longer entry replaced the one it extends


def test_salted_entries_survive_a_restart_and_stay_salted(tmp_path, model_file):
    d = tmp_path / "cache"
    [(first, stats)], _ = run(d, model_file, [PROMPT], salt="tenant A")
    [meta] = [_meta(p) for p in d.glob("*.safetensors")]
    assert meta["version"] == "2" and meta["salt"] == salt_id("tenant A")  # a hash of it, not the salt
    assert "tenant A" not in json.dumps(meta)
    [(_, other)], _ = run(d, model_file, [PROMPT], salt="tenant B")
    [(_, unsalted)], _ = run(d, model_file, [PROMPT])
    assert other.cached_tokens == unsalted.cached_tokens == 0 and len(files(d)) == 3
    assert sorted(_meta(p)["version"] for p in d.glob("*.safetensors")) == ["1", "2", "2"]
    [(again, same)], counters = run(d, model_file, [PROMPT], salt="tenant A")
    assert counters["cache_loaded"] == 3 and same.cached_tokens == len(PROMPT) - 1 and again == first


def test_the_directory_keeps_the_most_recently_used_entries(tmp_path, model_file):
    d = tmp_path / "cache"
    prompts = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    run(d, model_file, prompts, cache_size=2)
    assert len(files(d)) == 2  # [1, 2, 3] went first
    # A hit refreshes an entry: [4, 5, 6] is used again, then a new one pushes [7, 8, 9] out.
    [(_, hit), _, _], _ = run(d, model_file, [[4, 5, 6], [10, 11, 12], [4, 5, 6]], cache_size=2)
    assert hit.cached_tokens == 2
    tokens = sorted(tuple(json.loads(_meta(p)["tokens"])) for p in d.glob("*.safetensors"))
    assert [t[:3] for t in tokens] == [(4, 5, 6), (10, 11, 12)]


def _meta(path) -> dict:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return f.metadata()


def test_unusable_files_are_skipped_with_one_warning_each(tmp_path, model_file, caplog):
    d = tmp_path / "cache"
    run(d, model_file, [PROMPT, [4, 5, 6]])
    good, other = sorted(d.glob("*.safetensors"), key=lambda p: json.loads(_meta(p)["tokens"])[0] == 4)
    data = other.read_bytes()
    other.unlink()
    (d / "garbage.safetensors").write_bytes(b"not a safetensors file at all")
    (d / "truncated.safetensors").write_bytes(data[:-10])
    flipped = bytearray(data)
    flipped[-1] ^= 0xFF  # in the tensor data: the header is fine, the checksum is not
    (d / "flipped.safetensors").write_bytes(bytes(flipped))
    (d / "notes.txt").write_text("not ours, not a .safetensors file: ignored")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(d / "foreign.safetensors"))
    other_model = tmp_path / "other.bin"
    other_model.write_bytes(b"other weights")
    run(tmp_path / "other-cache", other_model, [PROMPT])
    for i, p in enumerate((tmp_path / "other-cache").glob("*.safetensors")):
        p.rename(d / f"another-model-{i}.safetensors")
    k = torch.zeros(ARGS.n_layers, 3, ARGS.n_kv_heads, ARGS.head_dim, dtype=torch.float16)
    f16 = store(tmp_path / "f16-cache", model_file, dtype=torch.float16)
    f16.open(keep=4)
    f16.save([1, 2, 3], k, k.clone())
    f16.close()
    for p in (tmp_path / "f16-cache").glob("*.safetensors"):
        p.rename(d / "f16.safetensors")
    before = set(os.listdir(d))

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="shardllama"):
        [(tokens, stats)], counters = run(d, model_file, [PROMPT], n=2)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert counters["cache_loaded"] == 1 and stats.cached_tokens == len(PROMPT) - 1  # the good one
    assert tokens == reference(PROMPT, 2)
    expected = {"garbage": "not a readable safetensors file", "truncated": "not a readable safetensors file",
                "flipped": "corrupt (checksum", "foreign": "not a shardllama prompt-cache file",
                "another-model-0": "another model", "f16": "saved with f16 KV states"}
    assert len(warnings) == len(expected), warnings
    for name, fragment in expected.items():
        [line] = [w for w in warnings if f"{name}.safetensors" in w]
        assert fragment in line and "\n" not in line
    assert before <= set(os.listdir(d))  # nothing that is not ours was deleted


def test_model_identity_follows_the_files(model_file):
    a = model_identity(model_file, ARGS)
    assert model_identity(model_file, ARGS) == a
    os.utime(model_file, ns=(1, 1))
    assert model_identity(model_file, ARGS).key != a.key  # touched: another model as far as we know
    assert model_identity(model_file, ARGS.__class__(**{**vars(ARGS), "rope_theta": 1e5})).key != a.key
    assert model_identity(model_file, ARGS.__class__(**{**vars(ARGS), "max_seq_len": 8})).key == \
        model_identity(model_file, ARGS).key  # the context changes no KV value


def test_an_unwritable_directory_is_a_usage_error(tmp_path, model_file):
    from shardllama.errors import UsageError

    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UsageError, match="--prompt-cache-dir"):
        store(blocker / "cache", model_file)


# ---- trust: the directory and its files must be this user's ---------------------------------------------

NOBODY = 65534  # chown needs root; those checks are skipped otherwise


def test_the_directory_is_made_0700_and_entries_0600(tmp_path, model_file):
    d = tmp_path / "new" / "cache"
    run(d, model_file, [PROMPT])
    assert d.stat().st_mode & 0o777 == 0o700
    [entry] = d.glob("*.safetensors")
    assert entry.stat().st_mode & 0o777 == 0o600  # KV states reveal the prompt


@pytest.mark.parametrize("case", ["writable", "other-user", "link-to-other-user"])
def test_a_directory_others_control_is_refused(tmp_path, model_file, case):
    from shardllama.errors import UsageError

    d = tmp_path / "cache"
    d.mkdir()
    given = d
    if case == "writable":
        d.chmod(0o777)
        fragment = "writable by others (mode 0777)"
    else:
        if os.geteuid() != 0:
            pytest.skip("giving a directory to another user needs root")
        os.chown(d, NOBODY, NOBODY)
        fragment = f"owned by uid {NOBODY}"
        if case == "link-to-other-user":
            given = tmp_path / "link"
            given.symlink_to(d)
    with pytest.raises(UsageError, match="--prompt-cache-dir") as e:
        store(given, model_file)
    assert fragment in str(e.value) and "\n" not in str(e.value)
    assert os.listdir(d) == []  # not even the probe was written


def test_entries_others_could_have_written_are_skipped_and_kept(tmp_path, model_file, caplog):
    d = tmp_path / "cache"
    run(d, model_file, [PROMPT])
    [entry] = d.glob("*.safetensors")
    data = entry.read_bytes()
    cases = {"open": "writable by others (mode 0666)", "link": "not a regular file"}
    (d / "open.safetensors").write_bytes(data)
    (d / "open.safetensors").chmod(0o666)
    (d / "link.safetensors").symlink_to(entry)
    if os.geteuid() == 0:
        (d / "chowned.safetensors").write_bytes(data)
        os.chown(d / "chowned.safetensors", NOBODY, NOBODY)
        cases["chowned"] = f"owned by uid {NOBODY}"
    entry.unlink()  # else the good entry would shadow the others
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="shardllama"):
        [(_, stats)], counters = run(d, model_file, [PROMPT], n=2)
    assert counters["cache_loaded"] == 0 and stats.cached_tokens == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    for name, fragment in cases.items():
        [line] = [w for w in warnings if f"{name}.safetensors" in w]
        assert fragment in line and "\n" not in line
    assert all((d / f"{name}.safetensors").is_symlink() or (d / f"{name}.safetensors").exists() for name in cases)


def test_model_identity_covers_every_part_of_a_split_model(tmp_path):
    from shardllama.loading.gguf_split import part_name

    parts = [tmp_path / part_name("m", i, 3) for i in (1, 2, 3)]
    for i, p in enumerate(parts):
        p.write_bytes(bytes([i]) * 100_000)
    a = model_identity(parts[0], ARGS)
    assert [f[0] for f in a.about["files"]] == [p.name for p in parts]
    assert model_identity(parts[1], ARGS).about["files"] == a.about["files"]  # any part names the model
    st = parts[2].stat()
    with open(parts[2], "r+b") as f:  # same size, same mtime, other bytes in the last part
        f.write(b"\xff" * 10)
    os.utime(parts[2], ns=(st.st_atime_ns, st.st_mtime_ns))
    assert parts[2].stat().st_mtime_ns == st.st_mtime_ns
    assert model_identity(parts[0], ARGS).key != a.key
