"""Which device each worker computes on: ``--device cpu|cuda|cuda:K[,cuda:L...]`` (and rllama's
``--opencl-device N``, an alias for ``cuda:N``), checked here, at the command line's edge, before a shard is
written.

One worker per device: ``--device cuda`` means every visible GPU, and ``--workers`` must equal the number of
devices listed (or be left out).  CPU and GPU workers never share one tensor-parallel group: every reduction
waits for the slowest rank, so a CPU worker would set the pace of the GPUs.  What cannot run -- a torch
without CUDA, no GPU visible, ``cuda:K`` beyond the visible count -- is a :class:`DeviceError`: one line naming
the device and what is missing, exit 1.

Probing CUDA (``torch.cuda.device_count``) initialises the driver in this process, after which a forked child
cannot use CUDA; so GPU workers are always spawned fresh (``runtime.RuntimeConfig.early_workers``), and each
picks its device first thing (``workers.device``).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Sequence

from .errors import ShardllamaError, UsageError

log = logging.getLogger(__name__)

# The one extra command of README's GPU section: a CUDA build of the same torch release.
CUDA_INSTALL = "python3 -m pip install --force-reinstall torch --index-url https://download.pytorch.org/whl/cu128"
_ONE = re.compile(r"cpu|cuda(?::(\d{1,3}))?")


class DeviceError(ShardllamaError):
    """A device that was asked for is not there (no CUDA in this torch, no GPU, an index beyond the count)."""


@dataclasses.dataclass(frozen=True)
class CudaInfo:
    """What this process's torch can do with GPUs (:func:`probe`; tests make their own)."""

    torch_version: str
    compiled: bool  # built with CUDA (torch.version.cuda)
    count: int  # GPUs visible (torch.cuda.device_count())


def probe() -> CudaInfo:
    import torch

    compiled = torch.version.cuda is not None and torch.backends.cuda.is_built()
    return CudaInfo(torch.__version__, compiled, torch.cuda.device_count() if compiled else 0)


def parse(text: str) -> tuple[str, ...]:
    """``--device``'s value as a tuple of names: ("cpu",), ("cuda",) (every visible GPU) or ("cuda:0", ...).
    UsageError for anything else, or for cpu and cuda mixed."""
    names = tuple(part.strip() for part in text.split(","))
    for name in names:
        if not _ONE.fullmatch(name):
            raise UsageError(f"--device {text}: {name!r} is not cpu, cuda or cuda:N")
    kinds = {name.split(":")[0] for name in names}
    if len(kinds) > 1:
        raise UsageError(f"--device {text}: CPU and GPU workers cannot share one tensor-parallel group (every "
                         "reduction waits for the slowest rank); choose cpu or cuda")
    if len(names) > 1 and ("cpu" in names or "cuda" in names):
        raise UsageError(f"--device {text}: list GPUs by index (cuda:0,cuda:1), or give cpu or cuda alone")
    if len(set(names)) < len(names):
        raise UsageError(f"--device {text}: a GPU is listed twice (one worker per GPU)")
    return names


def from_flags(device: str | None, opencl_device: int | None) -> str | None:
    """The ``--device`` text, with rllama's ``--opencl-device N`` turned into ``cuda:N`` (said on stderr)."""
    if opencl_device is None:
        return device
    if device is not None:
        raise UsageError("give --device or --opencl-device, not both")
    if opencl_device < 0:
        raise UsageError(f"--opencl-device must be >= 0, got {opencl_device}")
    log.warning("--opencl-device %d is rllama's flag: running as --device cuda:%d (CUDA, not OpenCL)",
                opencl_device, opencl_device)
    return f"cuda:{opencl_device}"


def resolve(text: str | None, workers: int | None, info: CudaInfo | None = None) -> tuple[tuple[str, ...] | None, int | None]:
    """(each worker's device, the number of workers) for ``--device text`` and ``--workers``.

    None for ``text`` (or ``cpu``) leaves everything as without the flag: (None, workers).  For GPUs the
    workers default to the number of devices and must equal it; ``info`` (default: :func:`probe`) says
    what this torch sees."""
    if text is None:
        return None, workers
    names = parse(text)
    if names == ("cpu",):
        return None, workers
    if workers == 0:
        raise UsageError(f"--device {text} runs one worker per GPU; --workers 0 (the in-process reference model) "
                         "runs on the CPU")
    info = info or probe()
    if not info.compiled:
        raise DeviceError(f"--device {text}: this torch ({info.torch_version}) has no CUDA; install a CUDA build: "
                          f"{CUDA_INSTALL}")
    if info.count == 0:
        raise DeviceError(f"--device {text}: no GPU is visible to torch {info.torch_version} (no NVIDIA driver, or "
                          "CUDA_VISIBLE_DEVICES hides them all)")
    if names == ("cuda",):
        names = tuple(f"cuda:{i}" for i in range(info.count))
    for name in names:
        if int(name.split(":")[1]) >= info.count:
            raise DeviceError(f"--device {name}: no such GPU; {info.count} visible (cuda:0"
                              + (f" to cuda:{info.count - 1})" if info.count > 1 else ")"))
    if workers is not None and workers != len(names):
        raise UsageError(f"--workers {workers} with --device {text}: one worker per GPU, so --workers must be "
                         f"{len(names)} (or left out)")
    return names, len(names)


def check_list(devices: Sequence[str] | None, n_workers: int) -> tuple[str, ...]:
    """Each of ``n_workers`` workers' device (the coordinator's check of what it is given): all ``cpu`` for
    None; UsageError for a list of another length, or one that mixes CPU and GPU."""
    if devices is None:
        return ("cpu",) * n_workers
    devices = tuple(devices)
    if len(devices) != n_workers:
        raise UsageError(f"{n_workers} workers and {len(devices)} devices ({','.join(devices)}): one worker per device")
    for name in devices:
        if name != "cpu" and not re.fullmatch(r"cuda:\d{1,3}", name):
            raise UsageError(f"device {name!r} is not cpu or cuda:N")
    if len({d.split(":")[0] for d in devices}) > 1:
        raise UsageError(f"devices {','.join(devices)}: CPU and GPU workers cannot share one tensor-parallel group")
    return devices


def is_gpu(devices: Sequence[str] | None) -> bool:
    return bool(devices) and devices[0].startswith("cuda")
