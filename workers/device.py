"""A worker's device: chosen first thing, before any CUDA call, and the shard copied onto it once.

With ``cpu`` (what every test runs) nothing moves: the weights stay the read-only views of shared memory.
With ``cuda:K`` the worker's process (spawned fresh, never forked from a coordinator that probed CUDA:
``shardllama.devices``) selects GPU K, then copies each weight there once -- f16/bf16/f32 as stored; an int8
shard is dequantized on the GPU to the model's activation dtype (f32, what the int8 model's KV cache and
messages hold: there is no int8 GPU kernel here).  The KV cache and each pass's indices live there too; only
the embedded tokens in and the logits (or partial sums of the star) out cross to the host, in the worker's
ZeroMQ frames.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import torch

from shardllama.model import Step
from shardllama import qblocks
from shardllama.quant import INT8, SCALE_SUFFIX, Int8Weight, dequantize


def select(name: str) -> torch.device:
    """The device ``name`` (cpu or cuda:K) made current for this process; a one-line error if it cannot be."""
    device = torch.device(name)
    if device.type == "cuda":
        if torch.version.cuda is None or not torch.cuda.is_available():
            raise RuntimeError(f"{name}: this worker's torch ({torch.__version__}) has no CUDA, or sees no GPU")
        if device.index is None or device.index >= torch.cuda.device_count():
            raise RuntimeError(f"{name}: no such GPU ({torch.cuda.device_count()} visible)")
        torch.cuda.set_device(device)  # before anything else touches CUDA: its context lives on this GPU
    return device


def place(weights: Mapping[str, torch.Tensor], device: torch.device,
          float_dtype: torch.dtype) -> Mapping[str, torch.Tensor]:
    """The shard on ``device``: unchanged on the CPU, else copied once, int8 matrices (with their scales)
    dequantized there to ``float_dtype``, block-quantized ones (``qblocks``) before they go."""
    if device.type == "cpu":
        return weights
    out = {}
    for name, w in weights.items():
        if name.endswith((SCALE_SUFFIX, qblocks.QTYPE_SUFFIX)):
            continue
        if w.dtype == qblocks.GGUF:  # blocks: dequantized on the host (no GPU kernel for them here)
            out[name] = qblocks.dequantize(qblocks.linear_weight(weights, name)).to(device, float_dtype)
        elif w.dtype == INT8:
            q = Int8Weight(w.to(device), weights[name + SCALE_SUFFIX].to(device))
            out[name] = dequantize(q, float_dtype)  # (N, K); q is dropped when this returns
        else:
            out[name] = w.to(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # a failed copy (out of memory) fails here, in the handshake
    return out


def step_to(step: Step, device: torch.device) -> Step:
    """``step`` with its per-pass tensors on ``device`` (copied once per pass, not per layer).  ``positions``
    stays on the host: attention reads one of them as a Python int, which on a GPU would be a sync."""
    if device.type == "cpu":
        return step
    move = {f.name: getattr(step, f.name).to(device, non_blocking=True) for f in dataclasses.fields(step)
            if f.name != "positions" and isinstance(getattr(step, f.name), torch.Tensor)}
    return dataclasses.replace(step, **move)
