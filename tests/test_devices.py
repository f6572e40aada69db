"""GPU workers, as far as a CPU can prove them: --device parsing and its refusals, the error paths of a torch
without CUDA (real CLI runs), the worker's device path with ``cpu``, and the torch.distributed reduction
(gloo on CPU tensors: the code path NCCL takes on GPUs)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import torch

from shardllama import devices
from shardllama import protocol as P
from shardllama.backend import LocalBackend
from shardllama.config import ModelArgs
from shardllama.coordinator import Coordinator
from shardllama.errors import UsageError, WorkerError
from shardllama.kv_cache import blocks_for
from shardllama.model import random_weights
from shardllama.shm import SHM_DIR

MAX_SEQ = 32
GPUS = devices.CudaInfo("2.13.0+cu128", compiled=True, count=2)
CPU_TORCH = torch.version.cuda is None


def shm_names() -> set[str]:
    return set(os.listdir(SHM_DIR))


# ---- parsing and its refusals -------------------------------------------------------------------


def test_device_lists_parse_and_resolve_to_one_worker_per_gpu():
    assert devices.resolve(None, 3) == (None, 3)
    assert devices.resolve("cpu", None) == (None, None)  # as without the flag
    assert devices.resolve("cuda", None, GPUS) == (("cuda:0", "cuda:1"), 2)
    assert devices.resolve("cuda:1", None, GPUS) == (("cuda:1",), 1)
    assert devices.resolve("cuda:1, cuda:0", 2, GPUS) == (("cuda:1", "cuda:0"), 2)


@pytest.mark.parametrize("text, workers, why", [
    ("cpu,cuda:0", None, "CPU and GPU workers cannot share"),
    ("cuda:0,cpu", None, "CPU and GPU workers cannot share"),
    ("gpu", None, "'gpu' is not cpu, cuda or cuda:N"),
    ("cuda:x", None, "is not cpu, cuda or cuda:N"),
    ("cuda:0,cuda:0", None, "listed twice"),
    ("cuda,cuda:1", None, "list GPUs by index"),
    ("cuda:0,cuda:1", 3, "--workers must be 2"),
    ("cuda", 1, "--workers must be 2"),
    ("cuda", 0, "--workers 0"),
])
def test_usage_errors_name_the_flag(text, workers, why):
    with pytest.raises(UsageError, match=why):
        devices.resolve(text, workers, GPUS)


@pytest.mark.parametrize("text, info, why", [
    ("cuda:2", GPUS, r"--device cuda:2: no such GPU; 2 visible \(cuda:0 to cuda:1\)"),
    ("cuda:0,cuda:5", GPUS, "--device cuda:5: no such GPU"),
    ("cuda", devices.CudaInfo("2.13.0+cu128", True, 0), "no GPU is visible to torch 2.13.0"),
    ("cuda:0", devices.CudaInfo("2.13.0+cpu", False, 0), r"this torch \(2.13.0\+cpu\) has no CUDA; install"),
])
def test_missing_devices_are_one_line_errors_exit_1(text, info, why):
    with pytest.raises(devices.DeviceError, match=why) as e:
        devices.resolve(text, None, info)
    assert e.value.exit_code == 1 and "\n" not in str(e.value)


def test_opencl_device_is_an_alias_said_on_stderr(caplog):
    with caplog.at_level(logging.WARNING):
        assert devices.from_flags(None, 1) == "cuda:1"
    assert "--opencl-device 1 is rllama's flag: running as --device cuda:1" in caplog.text
    assert devices.from_flags("cpu", None) == "cpu"
    with pytest.raises(UsageError, match="not both"):
        devices.from_flags("cuda:0", 0)


def test_the_coordinator_checks_its_device_list():
    assert devices.check_list(None, 2) == ("cpu", "cpu")
    with pytest.raises(UsageError, match="one worker per device"):
        devices.check_list(["cpu"], 2)
    with pytest.raises(UsageError, match="cannot share"):
        devices.check_list(["cpu", "cuda:0"], 2)


def test_config_carries_the_device_and_refuses_a_bad_one():
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=100, hidden_dim=96)
    config = P.WorkerConfig(rank=1, n_workers=2, args=args, dtype="f16", max_seq_len=16, n_blocks=3, block_size=4,
                            threads=1, spin_us=0.0, segment="seg", reduce=None, timeout=5.0, prefill_precision="f32",
                            device="cuda:1", dist="file:///tmp/x/store-0")
    assert P.WorkerConfig.unpack(config.pack()) == config
    body = json.loads(config.pack()[P.HEAD_BYTES:])
    for change, why in (({"device": "cuda"}, "'device' is not"), ({"device": 1}, "'device' is of type int"),
                        ({"dist": "tcp://1.2.3.4:5"}, "'dist' is not"), ({"dist": 3}, "'dist' is of type")):
        frame = bytes(P.Header(P.Kind.CONFIG).pack()) + json.dumps({**body, **change}).encode()
        with pytest.raises(P.BadFrame, match=why):
            P.WorkerConfig.unpack(frame)


# ---- the command line on a torch without CUDA -----------------------------------------------------


def run_cli(*argv) -> tuple[subprocess.CompletedProcess, int]:
    """The finished command and its pid, which names its private segments (``segment.run_tag``)."""
    proc = subprocess.Popen([sys.executable, "-m", "shardllama", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), proc.pid


@pytest.mark.skipif(not CPU_TORCH, reason="this torch has CUDA")
@pytest.mark.parametrize("flags, named", [(["--device", "cuda:0"], "--device cuda:0"),
                                          (["--device", "cuda", "--workers", "2"], "--device cuda"),
                                          (["--opencl-device", "0"], "--device cuda:0")])
def test_cuda_on_a_cpu_torch_is_one_line_and_exit_1(demo_gguf, flags, named):
    r, pid = run_cli("--model-path", str(demo_gguf), "--prompt", "hi", "--max-new-tokens", "1", *flags)
    lines = [line for line in r.stderr.splitlines() if "--opencl-device 0 is rllama's flag" not in line]
    assert r.returncode == 1, r.stderr
    assert lines == [f"shardllama: error: {named}: this torch ({torch.__version__}) has no CUDA; install a CUDA "
                     f"build: {devices.CUDA_INSTALL}"]
    assert ("--opencl-device" in flags) == ("running as --device cuda:0" in r.stderr)
    assert not [n for n in shm_names() if f"-{pid}-" in n]  # only its own: other runs may share the machine


def test_mixing_cpu_and_gpu_is_a_usage_error_on_the_command_line(demo_gguf):
    r, _ = run_cli("--model-path", str(demo_gguf), "--prompt", "hi", "--device", "cpu,cuda:0")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "CPU and GPU workers cannot share" in r.stderr


@pytest.mark.skipif(not CPU_TORCH, reason="this torch has CUDA")
def test_a_worker_that_cannot_take_its_gpu_fails_the_start_and_leaves_nothing(tmp_path):
    """Past the CLI's check (a coordinator given cuda:0 directly): the worker fails in its handshake, the
    coordinator names it and the device, and no segment is left."""
    args = ModelArgs(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=40, hidden_dim=32, max_seq_len=MAX_SEQ)
    with pytest.raises(WorkerError, match=r"worker 0 .* could not build its shard: RuntimeError: cuda:0: this "
                                          r"worker's torch .* has no CUDA"):
        Coordinator(args, random_weights(args, torch.float16), n_workers=1, dtype="f16", devices=["cuda:0"])
    assert not [n for n in shm_names() if f"-{os.getpid()}-" in n]  # only its own: other runs may share the machine


# ---- the worker path on the CPU, and the gloo reduction ---------------------------------------------


def tiny(dtype=torch.float32):
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, hidden_dim=48, max_seq_len=MAX_SEQ)
    return args, random_weights(args, dtype, seed=3)


def greedy(backend, prompt: torch.Tensor, n: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and each step's logits (one row in blocks 0.., a prefill then decode steps)."""
    table = torch.arange(blocks_for(MAX_SEQ))[None]
    logits = backend.forward(prompt[None], torch.tensor([0]), table)
    tokens, seen, pos = [], [logits], prompt.numel()
    for _ in range(n):
        tokens.append(int(logits[0].argmax()))
        logits = backend.forward(torch.tensor([[tokens[-1]]]), torch.tensor([pos]), table)
        seen.append(logits)
        pos += 1
    return tokens, seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dist_reduction_on_cpu_workers_matches_the_reference_and_shm(dtype):
    args, weights = tiny(dtype)
    prompt = torch.tensor([5, 9, 1, 30, 2])
    ref = LocalBackend(args, weights, max_seq_len=MAX_SEQ, n_blocks=blocks_for(MAX_SEQ))
    want, want_logits = greedy(ref, prompt, 6)
    got = {}
    for reduce in ("dist", "shm"):
        with Coordinator(args, weights, n_workers=2, dtype=dtype, max_seq_len=MAX_SEQ, devices=["cpu", "cpu"],
                         reduce=reduce) as c:
            assert c.whole_pass and (c._group is not None) == (reduce == "dist")
            got[reduce] = greedy(c, prompt, 6)
            assert got[reduce][0] == want
            # all logits of a batch of two rows at once: dist has no row limit, so never the star
            rows = c.forward(torch.stack([prompt, prompt.flip(0)]), torch.tensor([0, 0]),
                             torch.arange(2 * blocks_for(MAX_SEQ)).view(2, -1) % c.n_blocks, all_logits=True)
            assert rows.shape == (2, 5, args.vocab_size)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    for a, b, r in zip(got["dist"][1], got["shm"][1], want_logits):
        assert torch.allclose(a, r, atol=tol, rtol=0) and torch.allclose(a, b, atol=tol, rtol=0)


def test_dist_reduction_gives_every_rank_the_same_bits():
    """Two gloo ranks (real processes) reduce f16 partials: both get exactly h + the f32 sum, rounded once."""
    code = r"""
import sys, torch
from shardllama.dist_reduce import DistReduce
rank, init = int(sys.argv[1]), sys.argv[2]
r = DistReduce(init, rank, 2, torch.device("cpu"), 30)
g = torch.Generator().manual_seed(rank)
part = torch.randn(2, 3, 8, generator=g).half()
h = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(9)).half()
out = r(h, part, 1)
r.close()
torch.save(out, sys.argv[3])
"""
    from shardllama.dist_reduce import Group

    group = Group()
    try:
        outs = [os.path.join(group.directory, f"out{r}.pt") for r in range(2)]
        procs = [subprocess.Popen([sys.executable, "-c", code, str(r), group.init_method(0), outs[r]])
                 for r in range(2)]
        assert [p.wait(timeout=120) for p in procs] == [0, 0]
        a, b = (torch.load(o) for o in outs)
        parts = [torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(r)).half() for r in range(2)]
        h = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(9)).half()
        assert torch.equal(a, b)
        assert torch.equal(a, (h.float() + (parts[0].float() + parts[1].float())).half())
        directory = group.directory
    finally:
        group.close()
    assert not os.path.exists(directory)


def test_a_worker_killed_in_a_dist_group_replaces_the_whole_group():
    import signal

    args, weights = tiny()
    prompt = torch.tensor([[1, 2, 3]])
    table = torch.arange(blocks_for(MAX_SEQ))[None]
    with Coordinator(args, weights, n_workers=2, max_seq_len=MAX_SEQ, devices=["cpu", "cpu"], reduce="dist",
                     timeout=30) as c:
        want = c.forward(prompt, torch.tensor([0]), table)
        old = list(c.pids)
        os.kill(old[1], signal.SIGKILL)
        got = None
        for _ in range(2):  # the death may be noticed before the request (replaced at once) or in it (raised)
            try:
                got = c.forward(prompt, torch.tensor([0]), table)
                break
            except WorkerError:
                pass
        assert got is not None and torch.allclose(got, want, atol=1e-5)
        assert not set(c.pids) & set(old), "both ranks are new: a process group cannot take in one new rank"
        assert c.cache_epoch >= 1


def test_a_shard_is_placed_once_and_int8_dequantized_on_the_device():
    """``place`` on a device that is not the CPU (meta: shapes and dtypes, no memory) copies every weight,
    turns each int8 matrix and its scale into one float matrix; on the CPU the shard is left as it is."""
    from shardllama.quant import quantize
    from workers.device import place

    w = torch.randn(6, 4)
    q = quantize(w)
    shard = {"a.weight": q.q, "a.weight_scale": q.scale, "norm.weight": torch.ones(4)}
    assert place(shard, torch.device("cpu"), torch.float32) is shard
    out = place(shard, torch.device("meta"), torch.float16)
    assert set(out) == {"a.weight", "norm.weight"}
    assert out["a.weight"].device.type == "meta" and out["a.weight"].dtype == torch.float16
    assert out["a.weight"].shape == (6, 4) and out["norm.weight"].dtype == torch.float32


def test_the_command_line_with_the_dist_reduction_says_what_shm_says(demo_gguf):
    """The whole worker path from the command line: --device cpu --reduce dist (gloo between two workers)
    gives the greedy text that the shared-memory reduction gives."""
    common = ["--model-path", str(demo_gguf), "--prompt", "The capital of France is", "--max-new-tokens", "8",
              "--temperature", "0", "-q", "--workers", "2", "--device", "cpu"]
    (dist, _), (shm, _) = run_cli(*common, "--reduce", "dist"), run_cli(*common, "--reduce", "shm")
    assert dist.returncode == 0 and shm.returncode == 0, dist.stderr + shm.stderr
    assert dist.stdout == shm.stdout and dist.stdout.startswith("The capital of France is")
